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
from ..io.database import read_view_graph
from .colmap_db import _has_table
from .ingest import load_grey
from .options import RefineOptions
from .patch_alignment import ImageBank, align_patches, image_channels, pair_warps, solve_corrections
from .report import RefineReport, log_aggregated, progress

logger = logging.getLogger(__name__)

TABLE = "torchsfm_refined_keypoints"


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


class _Inputs:
    """The database's keypoints (one array, offsets per image) and the inlier matches of the
    verified pairs the mapper reads (`io.database.read_view_graph`), as global keypoint indices."""

    def __init__(self, database: Path, min_num_inliers: int):
        cameras, images, keypoints, vg = read_view_graph(database, device="cpu")
        self.ids = images.image_id.numpy()
        self.names = images.name
        self.sizes = list(zip(cameras.width[images.camera].tolist(), cameras.height[images.camera].tolist()))
        self.xy = keypoints.xy.to(torch.float64).numpy()
        self.offset = keypoints.offsets.numpy()
        enough = vg.num_matches() >= min_num_inliers
        pm = vg.pair_of_match()
        sel = enough[pm]
        pm, m = pm[sel], vg.matches[sel].long()
        rows = vg.pairs[pm]
        self.first = (m[:, 0] + keypoints.offsets[rows[:, 0]]).numpy()
        self.second = (m[:, 1] + keypoints.offsets[rows[:, 1]]).numpy()
        self.pair = pm.numpy()  # index into the view graph's pairs
        self.images_of = rows.numpy()
        self.num_graph_pairs = len(vg)
        self.num_pairs = int(enough.sum())


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
    data = _Inputs(database, options.min_num_inliers)
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
    warp0 = pair_warps(pair, xy[first], xy[second], data.num_graph_pairs)[pair] if E else warp
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
                    g = load_grey(Path(image_dir) / data.names[k])
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
    """The refined keypoints of the images at `positions` (their other columns as stored), and
    their detections in our table, in one transaction."""
    with contextlib.closing(sqlite3.connect(str(database), isolation_level=None, timeout=60.0)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"CREATE TABLE {TABLE} (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL, "
                         "cols INTEGER NOT NULL, data BLOB)")
            for k in positions.tolist():
                iid = int(data.ids[k])
                rows, cols, blob = conn.execute("SELECT rows, cols, data FROM keypoints WHERE image_id = ?",
                                                (iid,)).fetchone()
                conn.execute(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?)", (iid, rows, cols, blob))
                out = np.frombuffer(blob, dtype=np.float32).reshape(rows, cols).copy()
                out[:, :2] = new_xy[data.offset[k]:data.offset[k + 1]]
                conn.execute("UPDATE keypoints SET data = ? WHERE image_id = ?", (out.tobytes(), iid))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
