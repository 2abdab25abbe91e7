"""Learned features where SIFT is weak (`run --fallback-features aliked|disk|xfeat`).

SIFT holds most captures and locates its keypoints about 3x more precisely than the learned
networks (median epipolar error of verified inliers on templeRing: SIFT 0.17 px, ALIKED 0.56),
so a model of SIFT's matches is the more accurate one wherever SIFT connects the images. Learned
features with LightGlue connect the images SIFT cannot (low texture, few or distant views). This
stage keeps SIFT's database and adds learned matches only around the images SIFT left weak (fewer
than `min_pairs` verified pairs):

1. the weak images and their candidate partners (the pairs of the match mode that touch a weak
   image and that SIFT did not verify) get learned features in a database of their own beside
   the main one, `<database>.fallback-<features>.db`, which resumes like any database;
2. LightGlue matches and the torch verifier verifies those pairs there;
3. the verified pairs are merged into the main database: the learned keypoints of their images
   are appended after the image's SIFT keypoints, and the pair's matches and two-view geometry
   are the learned ones. Our tables torchsfm_fallback_keypoints (image -> its SIFT keypoint
   count) and torchsfm_fallback_pairs (the merged pairs) record it.

`revert` undoes a merge (keypoints cut back, merged pairs deleted so that `match` verifies them
with SIFT again); `match` calls it first, so a rerun judges the images on SIFT's pairs alone and
merges again from the cached learned database. COLMAP reads the merged database as it is
(keypoints beyond the descriptor count are never matched by COLMAP, only mapped).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import resolve_device
from .colmap_db import pair_ids
from .fallback_merge import merge, revert, verified_filter
from .ingest import natural_key
from .keypoint_refinement import revert as revert_refinement
from .options import ExtractOptions, FallbackOptions, MatchOptions
from .report import FallbackReport

logger = logging.getLogger(__name__)


def sidecar_path(database: Path, features: str) -> Path:
    """The learned features' own database beside DATABASE."""
    return database.with_name(f"{database.stem}.fallback-{features}{database.suffix}")


def verified_pair_ids(conn: sqlite3.Connection, min_num_inliers: int) -> np.ndarray:
    """Pair ids of the two-view geometries the mapper uses (a verified configuration, enough inliers)."""
    return np.fromiter((r[0] for r in conn.execute(
        f"SELECT pair_id FROM two_view_geometries WHERE {verified_filter()}", (min_num_inliers,))), dtype=np.int64)


def _degrees(image_ids: np.ndarray, verified: np.ndarray) -> np.ndarray:
    """Verified pairs per image (image_ids unique)."""
    from .colmap_db import pair_ids_to_images

    order = np.argsort(image_ids)
    ends = np.concatenate(pair_ids_to_images(verified)).astype(np.int64)
    pos = np.searchsorted(image_ids[order], ends).clip(0, max(len(image_ids) - 1, 0))
    known = image_ids[order][pos] == ends if len(image_ids) else np.zeros(0, bool)
    counts = np.bincount(pos[known], minlength=len(image_ids))
    return counts[np.argsort(order)]


def _candidate_rows(conn: sqlite3.Connection, ids: list[int], options: MatchOptions,
                    device: torch.device) -> np.ndarray:
    """(E, 2) rows into ids of the match mode's candidate pairs over all images. Retrieval ranks
    SIFT descriptors: an image without any is paired with every other image."""
    from .matching import candidate_pairs

    if options.mode != "retrieval":
        return candidate_pairs(conn, ids, options, device).numpy()
    has = {r[0] for r in conn.execute("SELECT image_id FROM descriptors WHERE rows > 0")}
    with_f = np.asarray([k for k, i in enumerate(ids) if i in has], dtype=np.int64)
    rows = [with_f[candidate_pairs(conn, [ids[k] for k in with_f], options, device).numpy()].reshape(-1, 2)]
    for k in sorted(set(range(len(ids))) - set(with_f.tolist())):
        rows.append(np.stack([np.full(len(ids) - 1, k), np.delete(np.arange(len(ids)), k)], 1))
    rows = np.sort(np.concatenate(rows), axis=1)
    return np.unique(rows, axis=0)


def learned_fallback(image_dir: str | Path, database: str | Path, options: FallbackOptions,
                     extract_options: ExtractOptions | None = None,
                     match_options: MatchOptions | None = None) -> FallbackReport:
    """Add learned matches around the images SIFT left weak in DATABASE (made by `extract` and
    `match` with SIFT) from the images in IMAGE_DIR. The learned extraction uses
    extract_options' learned_* settings; the candidate pairs are match_options' mode's."""
    from . import extract, match

    t0 = time.perf_counter()
    database = Path(database)
    ex = extract_options or ExtractOptions()
    ma = match_options or MatchOptions()
    report = FallbackReport(database=str(database), features=options.features, min_pairs=options.min_pairs,
                            min_inlier_ratio=options.min_inlier_ratio)
    if options.features == "none":
        return report
    revert_refinement(database)  # the detections, before the merge's own revert cuts them back
    revert(database)
    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        rows_ = sorted(conn.execute("SELECT image_id, name FROM images").fetchall(), key=lambda r: natural_key(r[1]))
        ids, names = [r[0] for r in rows_], [r[1] for r in rows_]
        verified = verified_pair_ids(conn, ma.min_num_inliers)
        weak = _degrees(np.asarray(ids, dtype=np.int64), verified) < options.min_pairs
        report.num_images = len(ids)
        report.weak_images = [names[k] for k in np.flatnonzero(weak)]
        if weak.sum() > len(ids) / 2:
            logger.warning("%d of %d images have fewer than %d SIFT-verified pairs: the fallback adds learned pairs "
                           "around them only; for a capture SIFT cannot hold, learned features throughout "
                           "(--features %s --matcher lightglue) may do better", int(weak.sum()), len(ids),
                           options.min_pairs, options.features)
        if weak.any() and len(ids) >= 2:
            rows = _candidate_rows(conn, ids, ma, resolve_device(ma.device))
            id_arr = np.asarray(ids, dtype=np.int64)
            pid = pair_ids(id_arr[rows[:, 0]], id_arr[rows[:, 1]])
            rows = rows[(weak[rows[:, 0]] | weak[rows[:, 1]]) & ~np.isin(pid, verified)]
        else:
            rows = np.zeros((0, 2), dtype=np.int64)
    report.num_candidate_pairs = len(rows)
    if len(rows):
        learned = np.unique(rows)
        report.num_learned_images = len(learned)
        sidecar = sidecar_path(database, options.features)
        report.sidecar = str(sidecar)
        t = time.perf_counter()
        extract(image_dir, sidecar, dataclasses.replace(
            ex, features=options.features, image_names=tuple(names[k] for k in learned), min_images=2))
        report.stage_times["extract"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        pairs = [(names[a], names[b]) for a, b in rows]
        match(sidecar, dataclasses.replace(ma, matcher="lightglue", verifier="torch", guided_matching=False,
                                           image_pairs=tuple(pairs)))
        report.stage_times["match"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        report.num_merged_pairs = merge(database, sidecar, pairs, ma.min_num_inliers, options.min_inlier_ratio)
        report.stage_times["merge"] = round(time.perf_counter() - t, 3)
        with contextlib.closing(sqlite3.connect(str(database))) as conn:
            degree = _degrees(np.asarray(ids, dtype=np.int64), verified_pair_ids(conn, ma.min_num_inliers))
        report.still_weak = [names[k] for k in np.flatnonzero(degree < options.min_pairs)]
    report.elapsed_s = time.perf_counter() - t0
    logger.debug(report.summary())
    return report
