"""The learned fallback in the main database (`fallback`): merging the learned database's verified
pairs in, and reverting that. Learned keypoints go after an image's SIFT keypoints; the merged
pairs' matches and two-view geometries replace SIFT's; torchsfm_fallback_keypoints (image -> its
SIFT keypoint count) and torchsfm_fallback_pairs record both, so that `revert` restores SIFT's
database (the merged pairs deleted, for `match` to verify them with SIFT again)."""
from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

import numpy as np
import torch

from ..geometry import so3
from ..io.database import UNVERIFIED_CONFIGS
from .colmap_db import _has_table, pair_ids, write_pair_results

logger = logging.getLogger(__name__)

KEYPOINTS_TABLE = "torchsfm_fallback_keypoints"
PAIRS_TABLE = "torchsfm_fallback_pairs"


def verified_filter() -> str:
    """SQL condition on two_view_geometries for a pair the mapper uses (with `rows >= ?` bound to
    the least inlier count)."""
    return f"config NOT IN ({','.join(str(int(c)) for c in UNVERIFIED_CONFIGS)}) AND rows >= ?"


def revert(database: str | Path) -> tuple[int, int]:
    """Undo a merge: each image's keypoints cut back to its SIFT ones, the merged pairs' matches
    and geometries deleted. Returns (images, pairs) reverted; (0, 0) on a database without one."""
    with contextlib.closing(sqlite3.connect(str(database), isolation_level=None, timeout=60.0)) as conn:
        if not _has_table(conn, KEYPOINTS_TABLE):
            return 0, 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            images = conn.execute(f"SELECT image_id, sift_rows FROM {KEYPOINTS_TABLE}").fetchall()
            for iid, sift_rows in images:
                r = conn.execute("SELECT rows, cols, data FROM keypoints WHERE image_id = ?", (iid,)).fetchone()
                if r is not None and r[0] > sift_rows:
                    kp = np.frombuffer(r[2], dtype=np.float32).reshape(r[0], r[1])[:sift_rows]
                    conn.execute("UPDATE keypoints SET rows = ?, data = ? WHERE image_id = ?",
                                 (sift_rows, kp.tobytes(), iid))
            pairs = [(p,) for (p,) in conn.execute(f"SELECT pair_id FROM {PAIRS_TABLE}")]
            conn.executemany("DELETE FROM matches WHERE pair_id = ?", pairs)
            conn.executemany("DELETE FROM two_view_geometries WHERE pair_id = ?", pairs)
            conn.execute(f"DROP TABLE {KEYPOINTS_TABLE}")
            conn.execute(f"DROP TABLE {PAIRS_TABLE}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    if images or pairs:
        logger.info("removed the learned fallback from %s (%d images, %d pairs)", database, len(images), len(pairs))
    return len(images), len(pairs)


def _pad(xy: np.ndarray, cols: int) -> np.ndarray:
    """Learned keypoints (n, 2) as rows of `cols` COLMAP keypoint columns: 4 = x, y, scale,
    orientation; 6 = x, y and an affine shape (unit scale, upright)."""
    out = np.zeros((len(xy), cols), dtype=np.float32)
    out[:, :2] = xy
    if cols == 4:
        out[:, 2] = 1
    elif cols == 6:
        out[:, 2] = out[:, 5] = 1
    return out


def _inverse_geometry(g: dict) -> dict:
    """A pair's two-view geometry seen from its other image: F and E transposed, H inverted,
    the relative pose inverted."""
    out = dict(g)
    for k in ("F", "E"):
        if g[k] is not None:
            out[k] = g[k].T.copy()
    if g["H"] is not None:
        out["H"] = np.linalg.inv(g["H"])
    if g["qvec"] is not None:
        q = so3.quat_conjugate(torch.from_numpy(g["qvec"]))
        out["qvec"] = q.numpy()
        out["tvec"] = -so3.quat_rotate(q, torch.from_numpy(g["tvec"])).numpy()
    return out


def _matrix(blob: bytes | None, shape) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float64).reshape(shape).copy()


def merge(database: Path, sidecar: Path, pairs: list[tuple[str, str]], min_num_inliers: int,
          min_inlier_ratio: float = 0.0) -> int:
    """Merge SIDECAR's verified geometries of `pairs` (image names) with at least min_num_inliers
    inliers, min_inlier_ratio of the pair's raw matches, into DATABASE, in one transaction: the
    learned keypoints of their images appended, the pairs' matches and geometries replaced, both
    recorded in our tables. Returns the pairs merged."""
    with contextlib.closing(sqlite3.connect(str(sidecar))) as side:
        sid = {n: i for i, n in side.execute("SELECT image_id, name FROM images")}
        both = [(a, b) for a, b in pairs if a in sid and b in sid]
        pid = pair_ids(np.asarray([sid[a] for a, _ in both]), np.asarray([sid[b] for _, b in both]))
        want = dict(zip(pid.tolist(), both))
        geo = {r[0]: r for r in side.execute(
            f"SELECT pair_id, rows, data, config, F, E, H, qvec, tvec FROM two_view_geometries WHERE {verified_filter()}",
            (min_num_inliers,)) if r[0] in want}
        raw = {r[0]: r for r in side.execute("SELECT pair_id, rows, data FROM matches") if r[0] in geo}
        geo = {p: r for p, r in geo.items() if r[1] >= min_inlier_ratio * (raw[p][1] if p in raw else r[1])}
        used = sorted({n for p in geo for n in want[p]})
        learned = {}
        for n in used:
            r = side.execute("SELECT rows, cols, data FROM keypoints WHERE image_id = ?", (sid[n],)).fetchone()
            learned[n] = np.frombuffer(r[2], dtype=np.float32).reshape(r[0], r[1])[:, :2]
    if not geo:
        return 0
    with contextlib.closing(sqlite3.connect(str(database), isolation_level=None, timeout=60.0)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            mid = {n: i for i, n in conn.execute("SELECT image_id, name FROM images")}
            conn.execute(f"CREATE TABLE IF NOT EXISTS {KEYPOINTS_TABLE} (image_id INTEGER PRIMARY KEY NOT NULL, "
                         "sift_rows INTEGER NOT NULL)")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {PAIRS_TABLE} (pair_id INTEGER PRIMARY KEY NOT NULL)")
            offset = {}
            for n in used:
                iid = mid[n]
                r = conn.execute("SELECT rows, cols, data FROM keypoints WHERE image_id = ?", (iid,)).fetchone()
                own = np.zeros((0, 6), np.float32) if r is None else np.frombuffer(r[2], np.float32).reshape(r[0], r[1])
                kp = np.ascontiguousarray(np.concatenate([own, _pad(learned[n], own.shape[1])]))
                conn.execute("INSERT OR REPLACE INTO keypoints(image_id, rows, cols, data) VALUES (?, ?, ?, ?)",
                             (iid, kp.shape[0], kp.shape[1], kp.tobytes()))
                conn.execute(f"INSERT INTO {KEYPOINTS_TABLE}(image_id, sift_rows) VALUES (?, ?)", (iid, len(own)))
                offset[n] = len(own)
            merged = _merged_pairs(geo, raw, want, sid, mid, offset)
            write_pair_results(conn, **merged)
            conn.executemany(f"INSERT OR REPLACE INTO {PAIRS_TABLE}(pair_id) VALUES (?)",
                             [(int(p),) for p in pair_ids(merged["image_id1"], merged["image_id2"])])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return len(geo)


def _merged_pairs(geo: dict, raw: dict, want: dict, sid: dict, mid: dict, offset: dict) -> dict:
    """write_pair_results' arguments for the sidecar's geometries `geo`, in the main database's
    image ids, orientation and keypoint indices."""
    out = {k: [] for k in ("image_id1", "image_id2", "matches", "inliers", "config", "F", "E", "H", "qvec", "tvec")}
    for p, r in geo.items():
        a, b = sorted(want[p], key=lambda n: sid[n])  # the sidecar's orientation: smaller id first
        g = {"F": _matrix(r[4], (3, 3)), "E": _matrix(r[5], (3, 3)), "H": _matrix(r[6], (3, 3)),
             "qvec": _matrix(r[7], (4,)), "tvec": _matrix(r[8], (3,))}
        inl = np.frombuffer(r[2], dtype=np.uint32).reshape(-1, 2).astype(np.int64) + [offset[a], offset[b]]
        m = raw.get(p)
        mat = (np.frombuffer(m[2], dtype=np.uint32).reshape(-1, 2).astype(np.int64) + [offset[a], offset[b]]
               if m is not None and m[1] else inl)
        if mid[a] > mid[b]:  # the main database orients the pair the other way
            a, b, inl, mat, g = b, a, inl[:, ::-1], mat[:, ::-1], _inverse_geometry(g)
        out["image_id1"].append(mid[a])
        out["image_id2"].append(mid[b])
        out["matches"].append(mat)
        out["inliers"].append(inl)
        out["config"].append(r[3])
        for k in g:
            out[k].append(g[k])
    n = len(out["config"])
    has = {k: np.asarray([v is not None for v in out[k]]) for k in ("F", "E", "H", "qvec")}
    fill = {"F": np.zeros((3, 3)), "E": np.zeros((3, 3)), "H": np.zeros((3, 3)), "qvec": np.zeros(4), "tvec": np.zeros(3)}
    dense = {k: np.stack([v if v is not None else fill[k] for v in out[k]]) if n else None for k in fill}
    return dict(image_id1=np.asarray(out["image_id1"]), image_id2=np.asarray(out["image_id2"]),
                matches=out["matches"], inliers=out["inliers"], config=np.asarray(out["config"]), **dense,
                has_F=has["F"], has_E=has["E"], has_H=has["H"], has_pose=has["qvec"])
