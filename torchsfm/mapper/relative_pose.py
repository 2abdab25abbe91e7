"""Relative poses of all valid pairs, from their matches, with the current intrinsics.

Keypoints are unprojected once each (`triangulation.unprojected_keypoints`, so distortion is
removed for every supported model) and gathered per match. Two ways to a pose, per pair:

- `init="database"` (default): the verified two-view geometry already holds a pose (COLMAP
  computes it from E, F or H when it verifies the matches). All those poses are refined at once
  in torch with the current intrinsics (`geometry.epipolar.refine_relative_poses`: batched
  Levenberg-Marquardt on the Sampson error, Cauchy loss), and a pair keeps the result when at
  least `min_refined_inlier_ratio` of its matches lie within `max_epipolar_error`. That is one
  pass over all matches per iteration, on the CPU or GPU, instead of a RANSAC per pair; it also
  keeps COLMAP's homography-based poses of planar pairs, which an essential-matrix RANSAC on
  the same matches gets wrong.
- PoseLib's essential-matrix LO-RANSAC with non-linear refinement, for the other pairs (no
  stored pose, or the refined one explains too few matches) and for every pair with
  `init="ransac"` (GLOMAP's way). Coordinates are rescaled by each camera's mean focal length
  and given to PoseLib with PINHOLE(f, f, 0, 0) cameras, so `max_epipolar_error` is in pixels as
  in GLOMAP. PoseLib releases the GIL, so the pairs run on a thread pool.

Filters: at least `min_num_inliers` inliers (15, COLMAP 4.2's global mapper; GLOMAP's 30 cut the only pairs
that join some sparse captures) and an inlier ratio of at least
`min_inlier_ratio`. Then only the largest connected component of the surviving pairs is kept.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..cameras.models import focal_length
from ..data.model import (
    TWO_VIEW_CALIBRATED,
    TWO_VIEW_PLANAR,
    TWO_VIEW_PLANAR_OR_PANORAMIC,
    TWO_VIEW_UNCALIBRATED,
    Reconstruction,
    offsets_from_counts,
)
from ..geometry import so3
from ..geometry.epipolar import refine_relative_poses, sampson_error
from ..report import progress_bar
from .graph import (
    REASON_COMPONENT,
    REASON_NO_PAIRS,
    REASON_RELPOSE,
    active_images,
    largest_component,
    mark_images,
    stage_copy,
)
from .triangulation import normalized_matches, unprojected_keypoints

log = logging.getLogger(__name__)

# Per-pair outcome codes in RelativePoseReport.status.
PAIR_OK = 0
PAIR_NOT_ESTIMATED = 1  # invalid on input
PAIR_TOO_FEW_MATCHES = 2  # fewer finite matches than min_num_inliers: not attempted
PAIR_FAILED = 3  # PoseLib found no model
PAIR_FEW_INLIERS = 4
PAIR_LOW_RATIO = 5
PAIR_OUTSIDE_COMPONENT = 6

# configurations whose stored pose COLMAP derived from E, F or H (panoramic ones have no baseline)
_POSED_CONFIGS = (TWO_VIEW_CALIBRATED, TWO_VIEW_UNCALIBRATED, TWO_VIEW_PLANAR, TWO_VIEW_PLANAR_OR_PANORAMIC)


@dataclass
class RelativePoseOptions:
    max_epipolar_error: float = 1.0  # pixels (undistorted, at each camera's mean focal length)
    init: str = "database"  # database (refine the stored two-view pose) | ransac (PoseLib for all)
    refine_iterations: int = 6  # batched LM iterations of the database poses
    refine_max_matches: int = 256  # per pair, evenly spread (the inliers are counted over all)
    min_refined_inlier_ratio: float = 0.8  # below: the pair falls back to RANSAC
    min_iterations: int = 100
    max_iterations: int = 10000
    success_prob: float = 0.9999
    refine: bool = True  # PoseLib's non-linear refinement on the inliers
    min_num_inliers: int = 15  # COLMAP 4.2 global mapper: min_num_matches 15 (GLOMAP: 30)
    min_inlier_ratio: float = 0.25
    keep_inlier_matches_only: bool = True  # replace each estimated pair's matches by its inliers
    keep_largest_component: bool = True
    num_threads: int | None = None  # default: the cores this process may use
    seed: int = 0  # RANSAC seed of pair e is seed + e: results do not depend on threading
    progress: bool | None = None  # tqdm bar (None: only on a terminal)
    chunk_matches: int = 1 << 19  # matches per pass (whole pairs): bounds the stage's temporaries


@dataclass
class RelativePoseReport:
    num_pairs_in: int = 0
    num_pairs_valid: int = 0
    num_images_dropped: int = 0
    status: Tensor | None = None  # (E,) PAIR_* code
    num_inliers: Tensor | None = None  # (E,) -1 where not estimated
    inlier_ratio: Tensor | None = None  # (E,) NaN where not estimated

    num_refined: int = 0  # pairs whose stored pose was refined and kept (no RANSAC)

    def counts(self) -> dict:
        names = ["ok", "not_estimated", "too_few_matches", "failed", "few_inliers", "low_ratio", "outside_component"]
        c = torch.bincount(self.status.cpu(), minlength=len(names)).tolist()
        return dict(zip(names, c))


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _refine_stored_poses(vg, valid_in: Tensor, pms: Tensor, xn: list[Tensor], fm: list[Tensor], finite: Tensor,
                         options: RelativePoseOptions) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check, and where needed refine, the stored poses of the valid pairs that have one, all at
    once. Returns (keep (E,) bool: pairs whose pose explains enough matches, so they need no
    RANSAC; quat (E, 4); unit trans (E, 3); inlier (M',) bool over the matches of valid pairs)."""
    E = len(vg)
    keep = torch.zeros(E, dtype=torch.bool, device=pms.device)
    quat, trans = vg.rel_quat.clone(), vg.rel_trans.clone()
    inlier = torch.zeros(pms.numel(), dtype=torch.bool, device=pms.device)
    if options.init == "ransac":
        return keep, quat, trans, inlier
    if options.init != "database":
        raise ValueError(f"relative poses: init must be 'database' or 'ransac', not {options.init!r}")
    tn = vg.rel_trans.norm(dim=1)
    posed = valid_in & torch.isin(vg.config, torch.tensor(_POSED_CONFIGS, device=vg.config.device))
    posed &= (tn > 0) & torch.isfinite(vg.rel_quat).all(1) & torch.isfinite(tn)
    if not bool(posed.any()):
        return keep, quat, trans, inlier
    ids = torch.nonzero(posed, as_tuple=True)[0]
    local = torch.full((len(vg),), -1, dtype=torch.long, device=ids.device)
    local[ids] = torch.arange(ids.numel(), device=ids.device)
    R = so3.quat_to_matrix(so3.quat_normalize(vg.rel_quat[ids]))
    t = vg.rel_trans[ids] / tn[ids, None]
    thr = options.max_epipolar_error

    def count_inliers(pairs: Tensor, r: Tensor, sel: Tensor) -> tuple[Tensor, Tensor]:
        inlier = torch.zeros(pms.numel(), dtype=torch.bool, device=pms.device)
        inlier[sel] = r.abs() <= thr
        n_in = torch.zeros(len(vg), dtype=torch.long, device=pms.device).index_add_(0, pms, inlier.to(torch.long))
        return inlier, pairs & (n_in >= options.min_refined_inlier_ratio * vg.num_matches())

    # The stored pose as it is (one pass over the matches); refine only the pairs it does not
    # explain, typically those whose intrinsics view-graph calibration changed.
    sel = posed[pms] & finite
    Em = so3.skew(t) @ R
    inlier, keep = count_inliers(posed, sampson_error(xn[0][sel], xn[1][sel], Em, fm[0][sel], fm[1][sel],
                                                      local[pms[sel]]), sel)
    redo = posed & ~keep
    if bool(redo.any()) and options.refine_iterations > 0:
        sub = redo[ids]
        sel2 = redo[pms] & finite
        loc2 = torch.cumsum(sub.to(torch.long), 0) - 1
        R2, t2, r2 = refine_relative_poses(xn[0][sel2], xn[1][sel2], loc2[local[pms[sel2]]], R[sub], t[sub],
                                           fm[0][sel2], fm[1][sel2], thr, options.refine_iterations,
                                           options.refine_max_matches)
        R, t = R.clone(), t.clone()
        R[sub], t[sub] = R2, t2
        inlier2, keep2 = count_inliers(redo, r2, sel2)
        inlier = torch.where(redo[pms], inlier2, inlier)
        keep = keep | keep2
    quat[ids], trans[ids] = so3.matrix_to_quat(R).to(quat.dtype), t.to(trans.dtype)
    return keep, quat, trans, inlier


def _estimate_chunk(rec: Reconstruction, vg, valid_in: Tensor, first_pair: int, options: RelativePoseOptions,
                    pool, bar, table: Tensor):
    """Poses of the valid pairs of one chunk of the view graph (`vg`, a `pair_slice` starting at
    pair `first_pair`). Returns, per pair of the chunk (CPU): status, quat, trans, inlier count,
    then per match the inlier mask (over all the chunk's matches; False where not estimated) and
    how many stored poses were kept. `table`: `unprojected_keypoints` of the whole graph."""
    import poselib

    cams, images = rec.cameras, rec.images
    E = len(vg)
    device = vg.rel_quat.device
    sub = Reconstruction(cams, images, rec.keypoints, rec.points3D, rec.tracks, vg, rec.meta)
    # Undistorted, focal-scaled coordinates of both ends of every match of a valid pair.
    pm = vg.pair_of_match()
    use = valid_in[pm]
    sel = torch.nonzero(use, as_tuple=True)[0]
    pms = pm[sel]
    xn = list(normalized_matches(sub, use, table))
    fm = [focal_length(cams)[images.camera[vg.pairs[pms, side]]] for side in (0, 1)]
    x1 = (xn[0] * fm[0][:, None]).detach().cpu().numpy().astype(np.float64)
    x2 = (xn[1] * fm[1][:, None]).detach().cpu().numpy().astype(np.float64)
    finite = np.isfinite(x1).all(1) & np.isfinite(x2).all(1)
    f_img = focal_length(cams)[images.camera].detach().cpu().numpy().astype(np.float64)
    counts = vg.num_matches()[valid_in].cpu().numpy()
    starts = np.concatenate([[0], np.cumsum(counts)])
    pair_ids = torch.nonzero(valid_in, as_tuple=True)[0].cpu().numpy()
    pairs_np = vg.pairs.cpu().numpy()
    stored_ok, est_q, est_t, est_inlier = _refine_stored_poses(
        vg, valid_in, pms, xn, fm, torch.from_numpy(finite).to(device), options)
    del xn, fm

    ransac = {
        "max_epipolar_error": float(options.max_epipolar_error),
        "min_iterations": int(options.min_iterations),
        "max_iterations": int(options.max_iterations),
        "success_prob": float(options.success_prob),
    }
    bundle = {} if options.refine else {"max_iterations": 0}
    seed0 = options.seed + first_pair  # the seed of a pair does not depend on the chunking

    def solve(k: int):
        e = int(pair_ids[k])
        s0, s1 = starts[k], starts[k + 1]
        fin = finite[s0:s1]
        if int(fin.sum()) < max(options.min_num_inliers, 5):
            return PAIR_TOO_FEW_MATCHES, None, None, None
        i, j = pairs_np[e]
        ci = {"model": "PINHOLE", "width": 0, "height": 0, "params": [f_img[i], f_img[i], 0.0, 0.0]}
        cj = {"model": "PINHOLE", "width": 0, "height": 0, "params": [f_img[j], f_img[j], 0.0, 0.0]}
        pose, info = poselib.estimate_relative_pose(
            x1[s0:s1][fin], x2[s0:s1][fin], ci, cj, dict(ransac, seed=seed0 + e), bundle)
        inl = np.zeros(s1 - s0, dtype=bool)
        got = np.asarray(info.get("inliers", []), dtype=bool)
        if got.size != int(fin.sum()) or not got.any():
            return PAIR_FAILED, None, None, inl
        inl[np.nonzero(fin)[0][got]] = True
        return PAIR_OK, np.asarray(pose.q, dtype=np.float64), np.asarray(pose.t, dtype=np.float64), inl

    # PoseLib for the pairs without a kept stored pose (one C call per pair; the rest is batched)
    est_status = torch.where(stored_ok, PAIR_OK, PAIR_NOT_ESTIMATED).cpu()
    est_q, est_t = est_q.detach().cpu().to(torch.float64), est_t.detach().cpu().to(torch.float64)
    est_inlier = est_inlier.cpu().numpy()
    kept = stored_ok.cpu().numpy()[pair_ids]
    bar.update(int(kept.sum()))
    todo = np.nonzero(~kept)[0].tolist()
    for k, (st, q, t, inl) in zip(todo, pool.map(solve, todo)):
        e = int(pair_ids[k])
        est_status[e] = st
        if inl is not None:
            est_inlier[starts[k]:starts[k + 1]] = inl
        if st == PAIR_OK:
            est_q[e], est_t[e] = torch.tensor(q), torch.tensor(t)
        bar.update(1)
    inlier = torch.zeros(pm.numel(), dtype=torch.bool)
    inlier[sel.cpu()] = torch.from_numpy(est_inlier)
    n_in = torch.zeros(E, dtype=torch.long).index_add_(0, pm.cpu(), inlier.to(torch.long))
    return est_status, est_q, est_t, n_in, inlier, int(stored_ok.sum())


def estimate_relative_poses(
    rec: Reconstruction, options: RelativePoseOptions | None = None
) -> tuple[Reconstruction, RelativePoseReport]:
    """Re-estimate `rel_quat`/`rel_trans`/`E` of every valid pair and filter the view graph.

    Returns a new reconstruction: pairs that fail get `valid` False; with
    `keep_inlier_matches_only` the estimated pairs keep only their inlier matches; images left
    outside the largest component get a reason in `meta["image_reason"]`. The pass over the
    matches runs in chunks of about `options.chunk_matches` matches (whole pairs; each pair's
    result does not depend on the chunking), so its temporaries stay bounded.
    """
    options = options or RelativePoseOptions()
    rec = stage_copy(rec, "view_graph")
    vg, images = rec.view_graph, rec.images
    num_images, E = len(images), len(vg)
    device, dtype = vg.rel_quat.device, vg.rel_quat.dtype
    active = active_images(rec.meta, num_images, device)
    valid_in = vg.valid & active[vg.pairs].all(1)
    report = RelativePoseReport(num_pairs_in=int(valid_in.sum()))
    status = torch.full((E,), PAIR_NOT_ESTIMATED, dtype=torch.long)
    num_inliers = torch.full((E,), -1, dtype=torch.long)
    est_q = vg.rel_quat.detach().cpu().to(torch.float64, copy=True)
    est_t = vg.rel_trans.detach().cpu().to(torch.float64, copy=True)
    ratio = torch.full((E,), float("nan"), dtype=torch.float64)
    n_all = vg.num_matches().cpu()
    keep_match = torch.ones(int(vg.matches.shape[0]), dtype=torch.bool)
    kept = n_all.clone()  # matches per pair after the inlier selection
    valid_cpu = valid_in.cpu()

    threads = options.num_threads or _default_threads()
    bar = progress_bar(total=report.num_pairs_in, enabled=options.progress is not False, desc="relative poses",
                       unit="pair")
    table = unprojected_keypoints(rec, valid_in)  # once, not per chunk
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for e0, e1 in vg.chunks(options.chunk_matches):
            if not bool(valid_cpu[e0:e1].any()):
                continue
            st, q, t, n_in, inlier, n_ref = _estimate_chunk(rec, vg.pair_slice(e0, e1), valid_in[e0:e1], e0,
                                                            options, pool, bar, table)
            st = torch.where(valid_cpu[e0:e1], st, status[e0:e1])
            estimated = st == PAIR_OK
            n = n_all[e0:e1]
            num_inliers[e0:e1] = torch.where(estimated, n_in, -1)
            ratio[e0:e1] = torch.where(estimated, n_in.double() / n.clamp_min(1), ratio[e0:e1])
            # GLOMAP's filters: enough inliers, and a large enough share of the matches
            st = torch.where(estimated & (n_in < options.min_num_inliers), PAIR_FEW_INLIERS, st)
            st = torch.where((st == PAIR_OK) & (ratio[e0:e1] < options.min_inlier_ratio), PAIR_LOW_RATIO, st)
            status[e0:e1] = st
            good = st == PAIR_OK
            est_q[e0:e1] = torch.where(good[:, None], q, est_q[e0:e1])
            est_t[e0:e1] = torch.where(good[:, None], t / t.norm(dim=1, keepdim=True).clamp_min(1e-300), est_t[e0:e1])
            report.num_refined += n_ref
            if options.keep_inlier_matches_only:  # an estimated pair keeps its inliers only
                m0, m1 = int(vg.match_offsets[e0]), int(vg.match_offsets[e1])
                keep_match[m0:m1] = torch.where(torch.repeat_interleave(good, n), inlier, True)
                kept[e0:e1] = torch.where(good, n_in, n)
    bar.close()

    ok = (status == PAIR_OK).to(device)
    vg.rel_quat = so3.quat_normalize(est_q.to(device=device, dtype=dtype))
    vg.rel_trans = est_t.to(device=device, dtype=dtype)
    Rm = so3.quat_to_matrix(vg.rel_quat)
    vg.E = torch.where(ok[:, None, None], so3.skew(vg.rel_trans) @ Rm, vg.E)
    if options.keep_inlier_matches_only and not bool(keep_match.all()):
        vg.matches = vg.matches[keep_match.to(device)]
        vg.match_offsets = offsets_from_counts(kept).to(device)
    valid = ok

    touched = torch.zeros(num_images, dtype=torch.bool, device=device)
    touched[vg.pairs[valid_in].reshape(-1)] = True
    if options.keep_largest_component:
        comp, _ = largest_component(num_images, vg.pairs, valid)
        outside = valid & ~comp[vg.pairs].all(1)
        status[outside.cpu()] = PAIR_OUTSIDE_COMPONENT
        valid = valid & ~outside
        has_pose = torch.zeros(num_images, dtype=torch.bool, device=device)
        has_pose[vg.pairs[ok].reshape(-1)] = True
        report.num_images_dropped += mark_images(rec.meta, num_images, has_pose & ~comp, REASON_COMPONENT)
    keep_img = torch.zeros(num_images, dtype=torch.bool, device=device)
    keep_img[vg.pairs[valid].reshape(-1)] = True
    report.num_images_dropped += mark_images(rec.meta, num_images, touched & ~keep_img, REASON_RELPOSE)
    report.num_images_dropped += mark_images(rec.meta, num_images, active & ~touched, REASON_NO_PAIRS)
    vg.valid = valid
    report.num_pairs_valid = int(valid.sum())
    report.status, report.num_inliers, report.inlier_ratio = status, num_inliers, ratio
    log.info("relative poses: %d/%d pairs kept %s", report.num_pairs_valid, report.num_pairs_in, report.counts())
    return rec, report
