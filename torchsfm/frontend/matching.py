"""`match()`: candidate pairs -> SIFT matches + geometric verification in database.db.

We choose the pairs (exhaustive, sequential, retrieval) and hand them to pycolmap's own
threaded matcher and verifier (`match_image_pairs`) in chunks: the results are exactly
COLMAP's, each chunk is committed, and the chunks drive the progress bar. Pairs that already
have a two-view geometry are never redone, so an interrupted run resumes where it stopped.
COLMAP's pair-list format cannot express names containing white space; such pairs go through
a slower per-pair path (pycolmap.FeatureMatcher + estimate_two_view_geometry).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import resolve_device
from .colmap_db import DatabaseError, check_database, pair_ids, pair_ids_to_images
from .ingest import IngestError, natural_key
from .options import MatchOptions
from .pairs import exhaustive_pairs, merge_pairs, sequential_pairs, top_k_pairs
from .report import MatchReport, progress

logger = logging.getLogger(__name__)

CONFIG_NAMES = {
    0: "undefined", 1: "degenerate", 2: "calibrated", 3: "uncalibrated", 4: "planar", 5: "panoramic",
    6: "planar_or_panoramic", 7: "watermark", 8: "multiple",
}


def _images_with_features(conn: sqlite3.Connection) -> tuple[list[int], list[str]]:
    """Image ids and names with keypoints and descriptors, in natural name order (the video
    order of sequential matching)."""
    rows = conn.execute(
        "SELECT i.image_id, i.name FROM images i JOIN keypoints k ON k.image_id = i.image_id "
        "JOIN descriptors d ON d.image_id = i.image_id WHERE k.rows > 0 AND d.rows > 0"
    ).fetchall()
    rows.sort(key=lambda r: natural_key(r[1]))
    return [r[0] for r in rows], [r[1] for r in rows]


def candidate_pairs(conn: sqlite3.Connection, image_ids: list[int], options: MatchOptions, device: torch.device) -> torch.Tensor:
    """(E, 2) rows into image_ids."""
    n = len(image_ids)
    if options.mode == "exhaustive":
        return exhaustive_pairs(n)
    if options.mode == "sequential":
        pairs = sequential_pairs(n, options.overlap, options.quadratic_overlap, options.loop_closure)
        if options.loop_detection and n > options.overlap + 1:
            g = _global(conn, image_ids, options, device)
            queries = torch.arange(0, n, options.loop_period)
            loops = top_k_pairs(g, options.num_neighbors, exclude_within=options.overlap, queries=queries)
            pairs = merge_pairs(pairs, loops)
        return pairs
    if n - 1 <= options.num_neighbors:
        return exhaustive_pairs(n)
    return top_k_pairs(_global(conn, image_ids, options, device), options.num_neighbors)


def _global(conn, image_ids, options: MatchOptions, device) -> torch.Tensor:
    from .retrieval import global_descriptors

    return global_descriptors(
        conn, image_ids, options.num_words, options.kmeans_iterations, options.kmeans_samples, options.seed, device
    )


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


def _done_pair_ids(database: Path) -> set[int]:
    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        return {r[0] for r in conn.execute("SELECT pair_id FROM two_view_geometries")}


def match(database: str | os.PathLike, options: MatchOptions | None = None) -> MatchReport:
    """Match and verify the candidate pairs of `options.mode` in a COLMAP database made by
    `extract` (or by COLMAP). Pairs already verified in the database are skipped."""
    import pycolmap

    t0 = time.perf_counter()
    options = options or MatchOptions()
    database = Path(database)
    if not database.exists():
        raise IngestError(f"database {database} does not exist: run `torchsfm extract IMAGES --database {database}` first")
    check_database(database)
    torch_device = resolve_device(options.device)
    want_cuda = options.device == "cuda" or (options.device == "auto" and pycolmap.has_cuda)
    if options.device == "cuda" and not pycolmap.has_cuda:
        logger.warning("the installed pycolmap has no CUDA support: SIFT matching runs on the CPU (retrieval on %s)", torch_device)
    pc_device = pycolmap.Device.cuda if want_cuda and pycolmap.has_cuda else pycolmap.Device.cpu
    report = MatchReport(database=str(database), mode=options.mode, device=pc_device.name)

    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        ids, names = _images_with_features(conn)
        if len(ids) < 2:
            raise IngestError(f"{database} has {len(ids)} image(s) with features, need at least 2: run `torchsfm extract` first")
        rows = candidate_pairs(conn, ids, options, torch_device).numpy()
    report.num_images, report.num_candidate_pairs = len(ids), len(rows)
    id_arr = np.asarray(ids, dtype=np.int64)
    pid = pair_ids(id_arr[rows[:, 0]], id_arr[rows[:, 1]]) if len(rows) else np.zeros(0, np.int64)
    done = np.isin(pid, np.fromiter(_done_pair_ids(database), dtype=np.int64))
    todo = rows[~done]
    report.num_resumed = int(done.sum())
    safe = np.fromiter((_pairfile_safe(n) for n in names), dtype=bool, count=len(names))
    listed = todo[safe[todo[:, 0]] & safe[todo[:, 1]]] if len(todo) else todo
    unlisted = todo[~(safe[todo[:, 0]] & safe[todo[:, 1]])] if len(todo) else todo
    if len(unlisted):
        logger.warning(
            "%d pairs involve image names with white space (or a leading '#'), which COLMAP's pair lists cannot hold; "
            "they are matched one by one (slower)", len(unlisted)
        )

    mo, vo = _pycolmap_options(options)
    old_level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = max(old_level, 1)
    bar = progress(total=len(todo), enabled=options.progress, desc=f"match ({options.mode})", unit="pair")
    try:
        for s in range(0, len(listed), options.chunk_size):
            chunk = listed[s : s + options.chunk_size]
            _match_listed(database, names, chunk, mo, vo, pc_device)
            bar.update(len(chunk))
        if len(unlisted):
            _match_one_by_one(database, ids, unlisted, mo, vo, pc_device, bar)
    finally:
        bar.close()
        pycolmap.logging.minloglevel = old_level
    report.num_matched = len(todo)

    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        stats = conn.execute("SELECT pair_id, config, rows FROM two_view_geometries").fetchall()
    missing = set(pid[~done].tolist()) - {r[0] for r in stats}
    if missing:
        a, b = pair_ids_to_images(np.fromiter(missing, dtype=np.int64))
        logger.warning("%d candidate pairs got no result from pycolmap (e.g. images %s)", len(missing), list(zip(a[:5].tolist(), b[:5].tolist())))
    verified = [r for r in stats if r[1] >= 2 and r[2] >= options.min_num_inliers]
    report.num_verified = len(verified)
    report.num_inlier_matches = int(sum(r[2] for r in verified))
    cfg: dict[str, int] = {}
    for r in stats:
        cfg[CONFIG_NAMES.get(r[1], str(r[1]))] = cfg.get(CONFIG_NAMES.get(r[1], str(r[1])), 0) + 1
    report.configs = cfg
    report.elapsed_s = time.perf_counter() - t0
    logger.debug(report.summary())
    return report


def load_view_graph(database: str | os.PathLike):
    """(cameras, images, keypoints, view graph) of a database, via torchsfm.io.database's
    validating reader (one implementation, owned there)."""
    from ..io.database import read_view_graph

    return read_view_graph(database)


__all__ = ["DatabaseError", "MatchReport", "candidate_pairs", "load_view_graph", "match"]
