"""The two big tables of a COLMAP database, read straight from SQLite in chunks.

Keypoints and matches are most of a database (a 10,000-image sequence: 6.6M keypoints, 45M
verified matches). pycolmap's readers build one object per pair, all of them at once, and copy
their arrays again when they are converted; here each table is read twice instead: first the small
columns (ids, row counts, configuration), which size the output arrays exactly, then the blobs in
id order, a chunk of rows at a time, straight into those arrays. The peak stays near the size of
the result (int32 matches, float32 keypoints: the database's own precision).

Blob layouts are COLMAP's (src/colmap/scene/database.cc): keypoints `rows x cols` float32 (x, y
first), matches `rows x 2` uint32, F/E/H nine float64 row-major, qvec (w, x, y, z) and tvec
float64; a missing blob is an absent matrix (zeros) or pose (identity).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

PAIR_ID_BASE = 2147483647  # COLMAP's pair_id = id1 * base + id2 (id1 < id2 when COLMAP writes it)


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)


def read_keypoints(con: sqlite3.Connection, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xy (K, 2) float32, counts (I,) int64) of the images `image_ids` (sorted), in that order;
    an image without a keypoints row has none."""
    row_of = {int(i): r for r, i in enumerate(image_ids.tolist())}
    counts = np.zeros(len(image_ids), dtype=np.int64)
    for iid, rows in con.execute("SELECT image_id, rows FROM keypoints"):
        if iid in row_of:
            counts[row_of[iid]] = rows
    offsets = np.concatenate([[0], np.cumsum(counts)])
    xy = np.zeros((int(offsets[-1]), 2), dtype=np.float32)
    for iid, rows, cols, data in con.execute("SELECT image_id, rows, cols, data FROM keypoints"):
        r = row_of.get(iid)
        if r is None or not rows:
            continue
        k = np.frombuffer(data, dtype=np.float32).reshape(rows, cols)
        xy[offsets[r]:offsets[r + 1]] = k[:, :2]
    return xy, counts


@dataclass
class PairTable:
    """The small columns of the selected pairs, in pair_id order."""

    pair_id: np.ndarray  # (E,) int64
    id1: np.ndarray  # (E,) int64 image ids as encoded in pair_id
    id2: np.ndarray
    count: np.ndarray  # (E,) int64 matches stored per pair
    config: np.ndarray  # (E,) int64 TwoViewGeometry configuration (UNDEFINED for the raw matches)
    num_all: int  # rows in the table before the selection


def _where(source: str, skip_configs: tuple[int, ...]) -> tuple[str, str]:
    if source == "two_view_geometries":
        bad = ",".join(str(int(c)) for c in skip_configs)
        return "two_view_geometries", f"WHERE rows > 0 AND config NOT IN ({bad})"
    if source == "matches":
        return "matches", "WHERE rows > 0"
    raise ValueError(f"source must be 'two_view_geometries' or 'matches', not {source!r}")


def read_pair_table(con: sqlite3.Connection, source: str, skip_configs: tuple[int, ...]) -> PairTable:
    """Pairs with matches (and, for two_view_geometries, a configuration not in `skip_configs`)."""
    table, where = _where(source, skip_configs)
    num_all = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    cfg = "config" if source == "two_view_geometries" else "0"
    rows = np.array(con.execute(f"SELECT pair_id, rows, {cfg} FROM {table} {where} ORDER BY pair_id").fetchall(),
                    dtype=np.int64).reshape(-1, 3)
    pid = rows[:, 0]
    return PairTable(pid, pid // PAIR_ID_BASE, pid % PAIR_ID_BASE, rows[:, 1], rows[:, 2], int(num_all))


def _matrix(blob, size: int, default: np.ndarray) -> np.ndarray:
    if blob is None or len(blob) != 8 * size:
        return default
    return np.frombuffer(blob, dtype=np.float64)


def read_geometry(con: sqlite3.Connection, source: str, skip_configs: tuple[int, ...]) -> np.ndarray:
    """(E, 34) float64 per selected pair, in pair_id order: F, E, H (row-major), qvec (w first),
    tvec. Absent matrices are zeros, an absent pose the identity."""
    table, where = _where(source, skip_configs)
    z9, q0, z3 = np.zeros(9), np.array([1.0, 0, 0, 0]), np.zeros(3)
    if source == "matches":
        n = con.execute(f"SELECT count(*) FROM {table} {where}").fetchone()[0]
        return np.tile(np.concatenate([z9, z9, z9, q0, z3]), (n, 1))
    cols = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
    pose = "qvec, tvec" if {"qvec", "tvec"} <= cols else "NULL, NULL"
    out = []
    for F, E, H, q, t in con.execute(f"SELECT F, E, H, {pose} FROM {table} {where} ORDER BY pair_id"):
        out.append(np.concatenate([_matrix(F, 9, z9), _matrix(E, 9, z9), _matrix(H, 9, z9), _matrix(q, 4, q0),
                                   _matrix(t, 3, z3)]))
    return np.stack(out) if out else np.zeros((0, 34))


def stream_matches(con: sqlite3.Connection, source: str, skip_configs: tuple[int, ...],
                   chunk_matches: int = 1 << 20) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first pair, end pair, (m, 2) uint32 matches of pairs first..end-1, concatenated) for chunks
    of consecutive selected pairs (pair_id order) holding about `chunk_matches` matches."""
    table, where = _where(source, skip_configs)
    first, blobs, n = 0, [], 0
    for k, (rows, data) in enumerate(con.execute(f"SELECT rows, data FROM {table} {where} ORDER BY pair_id")):
        blobs.append(data)
        n += rows
        if n >= chunk_matches:
            yield first, k + 1, np.frombuffer(b"".join(blobs), dtype=np.uint32).reshape(-1, 2)
            first, blobs, n = k + 1, [], 0
    if blobs:
        yield first, first + len(blobs), np.frombuffer(b"".join(blobs), dtype=np.uint32).reshape(-1, 2)
