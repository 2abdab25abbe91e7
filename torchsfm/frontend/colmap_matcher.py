"""`--verifier colmap`: pycolmap's own threaded matcher and verifier (`match_image_pairs`), the
reference the torch front end is compared with.

Pairs are handed over in chunks as a pair list: the results are exactly COLMAP's, each chunk is
committed, and the chunks drive the progress bar. COLMAP's pair-list format cannot express names
containing white space; such pairs go through a slower per-pair path (pycolmap.FeatureMatcher +
estimate_two_view_geometry).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .options import MatchOptions

logger = logging.getLogger(__name__)


def _pycolmap_options(options: MatchOptions):
    import pycolmap

    mo = pycolmap.FeatureMatchingOptions()
    mo.num_threads = int(options.num_threads)
    mo.max_num_matches = int(options.max_num_matches)
    mo.guided_matching = bool(options.guided_matching)
    mo.sift.max_ratio = float(options.max_ratio)
    mo.sift.max_distance = float(options.max_distance)
    mo.sift.cross_check = bool(options.cross_check)
    vo = pycolmap.TwoViewGeometryOptions()
    vo.min_num_inliers = int(options.min_num_inliers)
    vo.min_inlier_ratio = options.effective_min_inlier_ratio()
    vo.compute_relative_pose = bool(options.compute_relative_pose)
    vo.ransac.max_error = float(options.max_error)
    vo.ransac.confidence = float(options.confidence)
    vo.ransac.max_num_trials = int(options.max_num_trials)
    vo.ransac.random_seed = int(options.seed)
    if options.verification:
        vo.mergedict(dict(options.verification))
    return mo, vo


def _pairfile_safe(name: str) -> bool:
    """COLMAP's pair-list reader splits lines at spaces and skips lines starting with '#'."""
    return bool(name) and not name.startswith("#") and not any(c.isspace() for c in name)


def _match_listed(database: Path, names: list[str], pairs: np.ndarray, mo, vo, device) -> None:
    """One pycolmap.match_image_pairs call over the given (row, row) pairs."""
    import pycolmap

    fd, tmp = tempfile.mkstemp(prefix="torchsfm-pairs-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{names[i]} {names[j]}\n" for i, j in pairs.tolist())
        po = pycolmap.ImportedPairingOptions()
        po.match_list_path = tmp
        po.block_size = max(len(pairs), 1)
        pycolmap.match_image_pairs(str(database), matching_options=mo, pairing_options=po, verification_options=vo, device=device)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _match_one_by_one(database: Path, ids: list[int], pairs: np.ndarray, mo, vo, device, bar) -> None:
    """The path for names COLMAP's pair lists cannot hold; one transaction per pair."""
    import pycolmap

    matcher = pycolmap.FeatureMatcher.create(mo, device)
    db = pycolmap.Database.open(str(database))
    try:
        cams = {c.camera_id: c for c in db.read_all_cameras()}
        img_cam = {im.image_id: im.camera_id for im in db.read_all_images()}
        for a, b in pairs.tolist():
            i1, i2 = sorted((ids[a], ids[b]))
            m = matcher.match(None, db.read_descriptors(i1), None, db.read_descriptors(i2))
            if len(m) >= vo.min_num_inliers:
                k1 = db.read_keypoints(i1)[:, :2].astype(np.float64)
                k2 = db.read_keypoints(i2)[:, :2].astype(np.float64)
                tvg = pycolmap.estimate_two_view_geometry(cams[img_cam[i1]], k1, cams[img_cam[i2]], k2, m, vo)
            else:
                tvg = pycolmap.TwoViewGeometry()
            with pycolmap.DatabaseTransaction(db):
                if db.exists_matches(i1, i2):
                    db.delete_matches(i1, i2)
                db.write_matches(i1, i2, m)
                db.write_two_view_geometry(i1, i2, tvg)
            bar.update(1)
    finally:
        db.close()




def match_and_verify_colmap(database: Path, ids: list[int], names: list[str], todo: np.ndarray, options: MatchOptions,
                            device: str, bar) -> None:
    """Match and verify `todo` ((E, 2) rows into ids/names) with pycolmap on `device` ('cpu'/'cuda')."""
    import pycolmap

    pc_device = pycolmap.Device.cuda if device == "cuda" else pycolmap.Device.cpu
    safe = np.fromiter((_pairfile_safe(n) for n in names), dtype=bool, count=len(names))
    ok = safe[todo[:, 0]] & safe[todo[:, 1]] if len(todo) else np.zeros(0, bool)
    listed, unlisted = todo[ok], todo[~ok]
    if len(unlisted):
        logger.warning(
            "%d pairs involve image names with white space (or a leading '#'), which COLMAP's pair lists cannot hold; "
            "they are matched one by one (slower)", len(unlisted)
        )
    mo, vo = _pycolmap_options(options)
    old_level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = max(old_level, 1)
    try:
        for s in range(0, len(listed), options.chunk_size):
            chunk = listed[s : s + options.chunk_size]
            _match_listed(database, names, chunk, mo, vo, pc_device)
            bar.update(len(chunk))
        if len(unlisted):
            _match_one_by_one(database, ids, unlisted, mo, vo, pc_device, bar)
    finally:
        pycolmap.logging.minloglevel = old_level
