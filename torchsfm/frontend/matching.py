"""`match()`: candidate pairs -> raw matches + geometric verification in database.db.

We choose the pairs (exhaustive, sequential, retrieval) and match and verify them with the
torch engine (`--verifier torch`, default: `torch_matcher`) or with pycolmap's own matcher and
verifier (`--verifier colmap`: `colmap_matcher`, the reference). Either way results are
committed chunk by chunk in COLMAP's format, and pairs that already have a two-view geometry are
never redone, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from ..runtime import resolve_device
from .colmap_db import DatabaseError, check_database, pair_ids, pair_ids_to_images
from .ingest import IngestError, natural_key
from .options import MatchOptions
from .colmap_matcher import match_and_verify_colmap
from .fallback_merge import revert as revert_fallback
from .keypoint_refinement import revert as revert_refinement
from .pairs import exhaustive_pairs, merge_pairs, sequential_pairs, top_k_pairs
from .torch_matcher import match_and_verify
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


def _check_sift_only(conn: sqlite3.Connection) -> None:
    """pycolmap's matcher here matches SIFT descriptors only."""
    types = {r[0] for r in conn.execute("SELECT DISTINCT type FROM descriptors WHERE rows > 0")} - {0}
    if types:
        raise IngestError("--verifier colmap matches SIFT descriptors; this database has learned features "
                          f"(descriptor types {sorted(types)}): use --verifier torch")


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


def named_pairs(names: list[str], image_pairs) -> np.ndarray:
    """(E, 2) rows into names of the pairs named in image_pairs (both images present)."""
    row = {n: k for k, n in enumerate(names)}
    out = {tuple(sorted((row[a], row[b]))) for a, b in image_pairs if a in row and b in row and a != b}
    return np.asarray(sorted(out), dtype=np.int64).reshape(-1, 2)


def _global(conn, image_ids, options: MatchOptions, device) -> torch.Tensor:
    from .retrieval import global_descriptors

    return global_descriptors(
        conn, image_ids, options.num_words, options.kmeans_iterations, options.kmeans_samples, options.seed, device
    )


def _done_pair_ids(database: Path) -> set[int]:
    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        return {r[0] for r in conn.execute("SELECT pair_id FROM two_view_geometries")}


def match(database: str | os.PathLike, options: MatchOptions | None = None) -> MatchReport:
    """Match and verify the candidate pairs of `options.mode` in a COLMAP database made by
    `extract` (or by COLMAP). Pairs already verified in the database are skipped."""
    t0 = time.perf_counter()
    options = options or MatchOptions()
    database = Path(database)
    if not database.exists():
        raise IngestError(f"database {database} does not exist: run `torchsfm extract IMAGES --database {database}` first")
    check_database(database)
    revert_refinement(database)  # the detections first (the fallback's revert keeps SIFT's keypoints as they are)
    revert_fallback(database)  # SIFT matches first: run's learned fallback merges again afterwards
    on_ray = options.verifier == "torch" and options.executor.kind == "ray"
    # this process's device (retrieval; the torch units too when they run here): with Ray,
    # --device cuda is the cluster's, and this process may have none
    torch_device = resolve_device("auto" if on_ray and options.device == "cuda" else options.device)
    if options.verifier == "colmap":
        import pycolmap

        want_cuda = options.device == "cuda" or (options.device == "auto" and pycolmap.has_cuda)
        if options.device == "cuda" and not pycolmap.has_cuda:
            logger.warning("the installed pycolmap has no CUDA support: SIFT matching runs on the CPU (retrieval on %s)", torch_device)
        device_name = "cuda" if want_cuda and pycolmap.has_cuda else "cpu"
    else:
        device_name = torch_device.type
    mode = "listed pairs" if options.image_pairs else options.mode
    report = MatchReport(database=str(database), mode=mode, device=device_name, verifier=options.verifier,
                         executor=options.executor.kind if options.verifier == "torch" else "local")

    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        ids, names = _images_with_features(conn)
        if options.verifier == "colmap":
            _check_sift_only(conn)
        if len(ids) < 2:
            raise IngestError(f"{database} has {len(ids)} image(s) with features, need at least 2: run `torchsfm extract` first")
        if options.image_pairs:
            rows = named_pairs(names, options.image_pairs)
        else:
            rows = candidate_pairs(conn, ids, options, torch_device).numpy()
    report.num_images, report.num_candidate_pairs = len(ids), len(rows)
    id_arr = np.asarray(ids, dtype=np.int64)
    pid = pair_ids(id_arr[rows[:, 0]], id_arr[rows[:, 1]]) if len(rows) else np.zeros(0, np.int64)
    done = np.isin(pid, np.fromiter(_done_pair_ids(database), dtype=np.int64))
    todo = rows[~done]
    report.num_resumed = int(done.sum())

    bar = progress(total=len(todo), enabled=options.progress, desc=f"match ({mode})", unit="pair")
    try:
        if options.verifier == "colmap":
            match_and_verify_colmap(database, ids, names, todo, options, device_name, bar)
        else:
            executor = None
            if on_ray and len(todo):  # started (or joined) only when there is work
                from .ray_executor import RayExecutor

                executor = RayExecutor(options.executor, options.num_threads if options.num_threads > 0 else None,
                                       options.device)
                report.device = executor.device
            unit_device = torch_device if executor is None else torch.device(executor.device)
            stats = match_and_verify(database, ids, todo, options, unit_device, bar, executor)
            report.num_raw_matches = stats.num_raw_matches
            report.stage_times = {k: round(v, 3) for k, v in stats.time_s.items()}
            report.set_executor(stats.executor)
    finally:
        bar.close()
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
