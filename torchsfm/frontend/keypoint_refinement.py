"""Keypoint refinement in a database (`refine_keypoints`, run's --refine-keypoints): the verified
pairs' inlier matches aligned patch by patch (`patch_alignment`), one correction per keypoint,
written back to the keypoints table.

The detections are kept in a table of our own (torchsfm_refined_keypoints: image -> its keypoints
as detected), so that `revert` restores them exactly: `match` and the learned fallback revert
first (the fallback's own revert cuts keypoints back to SIFT's count, so it must see the
detections), and a rerun refines from the detections again. Matches, two-view geometries and
descriptors are untouched: the database stays COLMAP's, and the mapper reads the refined
keypoints.

Images are decoded block by block: the images are split into blocks that fit `cache_mb` two at
a time, and the pairs are visited by block pair, so each image is decoded once per block pair
that has one of its pairs (all at once when the whole set fits).
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import resolve_device
from .colmap_db import _has_table
from .fallback_merge import verified_filter
from .ingest import load_uint8
from .options import RefineOptions
from .patch_alignment import ImageBank, align_patches, image_channels, pair_warps, solve_corrections
from .report import RefineReport, log_aggregated, progress

logger = logging.getLogger(__name__)

TABLE = "torchsfm_refined_keypoints"
MAX_IMAGE_ID = 2147483647  # COLMAP's pair_id = image_id1 * MAX_IMAGE_ID + image_id2


def revert(database: str | Path) -> int:
    """Put the detections back (images whose keypoint count changed since, e.g. re-extracted,
    keep their new keypoints) and drop our table. Returns the images restored."""
    with contextlib.closing(sqlite3.connect(str(database), isolation_level=None, timeout=60.0)) as conn:
        if not _has_table(conn, TABLE):
            return 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(f"UPDATE keypoints SET data = (SELECT t.data FROM {TABLE} t WHERE t.image_id = "
                               f"keypoints.image_id) WHERE image_id IN (SELECT t.image_id FROM {TABLE} t WHERE "
                               f"t.image_id = keypoints.image_id AND t.rows = keypoints.rows AND t.cols = keypoints.cols)")
            restored = cur.rowcount
            conn.execute(f"DROP TABLE {TABLE}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    logger.info("restored the detected keypoints of %d images in %s", restored, database)
    return restored


def _grey(path: Path) -> np.ndarray:
    a = load_uint8(path)
    if a.ndim == 2:
        return a
    return (a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).round().astype(np.uint8)


class _Inputs:
    """The database's keypoints (all images, one array with offsets) and the verified pairs'
    inlier matches as global keypoint indices."""

    def __init__(self, conn: sqlite3.Connection, min_num_inliers: int):
        images = conn.execute("SELECT i.image_id, i.name, c.width, c.height FROM images i JOIN cameras c "
                              "ON i.camera_id = c.camera_id ORDER BY i.image_id").fetchall()
        self.ids = np.array([r[0] for r in images], dtype=np.int64)
        self.names = [r[1] for r in images]
        self.sizes = [(int(r[2]), int(r[3])) for r in images]
        self.keypoints: dict[int, np.ndarray] = {}  # position -> (rows, cols) float32
        pos = {int(i): k for k, i in enumerate(self.ids)}
        for iid, rows, cols, data in conn.execute("SELECT image_id, rows, cols, data FROM keypoints"):
            if iid in pos and rows:
                self.keypoints[pos[iid]] = np.frombuffer(data, dtype=np.float32).reshape(rows, cols).copy()
        counts = np.array([len(self.keypoints.get(k, ())) for k in range(len(self.ids))], dtype=np.int64)
        self.offset = np.cumsum(counts) - counts
        self.xy = np.concatenate([self.keypoints[k][:, :2] for k in sorted(self.keypoints)] or
                                 [np.zeros((0, 2), np.float32)]).astype(np.float64)
        first, second, pair, images_of = [], [], [], []
        rows_ = conn.execute(f"SELECT pair_id, rows, data FROM two_view_geometries WHERE {verified_filter()}",
                             (min_num_inliers,)).fetchall()
        for p, (pid, rows, data) in enumerate(rows_):
            i, j = pos.get(pid // MAX_IMAGE_ID), pos.get(pid % MAX_IMAGE_ID)
            if i is None or j is None or data is None:
                continue
            m = np.frombuffer(data, dtype=np.uint32).reshape(rows, 2).astype(np.int64)
            ok = (m[:, 0] < counts[i]) & (m[:, 1] < counts[j])
            first.append(m[ok, 0] + self.offset[i])
            second.append(m[ok, 1] + self.offset[j])
            pair.append(np.full(int(ok.sum()), p))
            images_of.append(np.tile([i, j], (int(ok.sum()), 1)))
        cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, np.int64))
        self.first, self.second, self.pair = cat(first, (0,)), cat(second, (0,)), cat(pair, (0,))
        self.images_of = cat(images_of, (0, 2))
        self.num_pairs = len(rows_)


def _blocks(positions: np.ndarray, sizes: list[tuple[int, int]], cache_mb: int) -> np.ndarray:
    """Block of each image position: consecutive images, two blocks fitting cache_mb (3 float32
    channels a pixel)."""
    if not len(positions):
        return np.zeros(0, np.int64)
    largest = max(12 * sizes[k][0] * sizes[k][1] for k in positions)
    per_block = max(1, int(cache_mb * 2**20 // (2 * largest)))
    block = np.full(len(sizes), -1, dtype=np.int64)
    block[positions] = np.arange(len(positions)) // per_block
    return block


def refine_keypoints(image_dir: str | Path, database: str | Path, options: RefineOptions | None = None,
                     progress_bar: bool = False) -> RefineReport:
    """Refine the keypoints of DATABASE's verified inlier matches against the images in
    IMAGE_DIR (the folder `extract` read). Reverts an earlier refinement first."""
    t0 = time.perf_counter()
    options = options or RefineOptions()
    database = Path(database)
    dev = resolve_device(options.device)
    report = RefineReport(database=str(database), device=dev.type)
    revert(database)
    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        data = _Inputs(conn, options.min_num_inliers)
    report.num_pairs = data.num_pairs
    used = np.unique(data.images_of)
    times = dict.fromkeys(("decode", "align", "solve", "write"), 0.0)
    block = _blocks(used, data.sizes, options.cache_mb)
    bad: dict[int, str] = {}
    E = len(data.first)
    shift = torch.zeros(E, 2, dtype=torch.float64, device=dev)
    warp = torch.zeros(E, 2, 2, dtype=torch.float64, device=dev)
    info = torch.zeros(E, 2, 2, dtype=torch.float64, device=dev)
    keep = torch.zeros(E, dtype=torch.bool, device=dev)
    xy = torch.from_numpy(data.xy).to(dev)
    first, second = torch.from_numpy(data.first).to(dev), torch.from_numpy(data.second).to(dev)
    pair = torch.from_numpy(data.pair).to(dev)
    warp0 = pair_warps(pair, xy[first], xy[second], max(data.num_pairs, 1))[pair] if E else warp
    bi, bj = block[data.images_of[:, 0]], block[data.images_of[:, 1]]
    block_pairs = sorted(set(zip(bi.tolist(), bj.tolist()))) if E else []
    banks: dict[int, tuple[ImageBank, np.ndarray]] = {}

    def bank(b: int, also: int) -> tuple[ImageBank, np.ndarray]:
        """The bank of block b and each image position's index in it (-1: not there); the banks
        of other blocks than b and `also` are dropped."""
        if b not in banks:
            for k in [k for k in banks if k not in (b, also)]:
                del banks[k]
            t = time.perf_counter()
            chans, sizes, local = [], [], np.full(len(data.sizes), -1, dtype=np.int64)
            for k in used[block[used] == b]:
                if k in bad:
                    continue
                try:
                    g = _grey(Path(image_dir) / data.names[k])
                except (OSError, ValueError) as e:
                    bad[k] = f"cannot read it: {e}"
                    continue
                if (g.shape[1], g.shape[0]) != data.sizes[k]:
                    bad[k] = f"it is {g.shape[1]}x{g.shape[0]}, its camera {data.sizes[k][0]}x{data.sizes[k][1]}"
                    continue
                local[k] = len(chans)
                chans.append(image_channels(g, dev))
                sizes.append(data.sizes[k])
            banks[b] = (ImageBank.build(chans, sizes) if chans else None, local)
            times["decode"] += time.perf_counter() - t
        return banks[b]

    bar = progress(total=E, desc="refine keypoints", unit="match", enabled=progress_bar)
    for b1, b2 in block_pairs:
        bank1, local1 = bank(b1, b1)
        bank2, local2 = bank(b2, b1)
        t = time.perf_counter()
        sel = np.flatnonzero((bi == b1) & (bj == b2))
        l1, l2 = local1[data.images_of[sel, 0]], local2[data.images_of[sel, 1]]
        sel, l1, l2 = sel[(l1 >= 0) & (l2 >= 0)], l1[(l1 >= 0) & (l2 >= 0)], l2[(l1 >= 0) & (l2 >= 0)]
        for c in range(0, len(sel), options.batch_size):
            s = torch.from_numpy(sel[c:c + options.batch_size]).to(dev)
            a = align_patches(bank1, torch.from_numpy(l1[c:c + options.batch_size]).to(dev), xy[first[s]],
                              bank2, torch.from_numpy(l2[c:c + options.batch_size]).to(dev), xy[second[s]],
                              warp0[s], options.patch_radius, options.iterations)
            shift[s], warp[s], info[s] = a.shift, a.warp, a.information
            keep[s] = a.inside & (a.ncc > options.min_ncc) & (a.shift.norm(dim=1) < options.max_shift)
            bar.update(len(s))
        times["align"] += time.perf_counter() - t
    bar.close()
    banks.clear()
    if bad:
        report.skipped_images = [f"{data.names[k]}: {why}" for k, why in sorted(bad.items())]
        log_aggregated(logger, f"keypoint refinement left out {len(bad)} images (their keypoints stay as detected)",
                       report.skipped_images)

    t = time.perf_counter()
    kept = keep.nonzero()[:, 0]
    report.num_matches, report.num_kept = E, len(kept)
    report.num_images = len(used)
    if len(kept):
        touched, compact = torch.unique(torch.cat([first[kept], second[kept]]), return_inverse=True)
        W = info[kept]
        if options.weighting == "information":  # the median match's strongest direction weighs 1
            W = W / torch.linalg.eigvalsh(W)[:, 1].median().clamp_min(1e-12)
        else:
            W = torch.eye(2, dtype=W.dtype, device=dev).expand(len(kept), 2, 2)
        c = solve_corrections(len(touched), compact[:len(kept)], compact[len(kept):], warp[kept], shift[kept], W,
                              options.prior)
        report.num_keypoints = len(touched)
        report.median_shift_px = round(float(shift[kept].norm(dim=1).median()), 4)
        report.median_correction_px = round(float(c.norm(dim=1).median()), 4)
        new = xy.clone()
        new[touched] += c
        new = new.cpu().numpy().astype(np.float32)
        times["solve"] = time.perf_counter() - t
        t = time.perf_counter()
        _write(database, data, new, np.unique(data.images_of[keep.cpu().numpy()]))
        times["write"] = time.perf_counter() - t
    report.stage_times = {k: round(v, 3) for k, v in times.items()}
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    logger.info(report.summary())
    return report


def _write(database: Path, data: _Inputs, new_xy: np.ndarray, positions: np.ndarray) -> None:
    """The refined keypoints of the images at `positions`, and their detections in our table, in
    one transaction."""
    with contextlib.closing(sqlite3.connect(str(database), isolation_level=None, timeout=60.0)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"CREATE TABLE {TABLE} (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, "
                         "cols INTEGER NOT NULL, data BLOB)")
            for k in positions.tolist():
                kp = data.keypoints[k]
                iid = int(data.ids[k])
                conn.execute(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", (iid, kp.shape[0], kp.shape[1], kp.tobytes()))
                out = kp.copy()
                out[:, :2] = new_xy[data.offset[k]:data.offset[k] + len(kp)]
                conn.execute("UPDATE keypoints SET data = ? WHERE image_id = ?", (out.tobytes(), iid))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
