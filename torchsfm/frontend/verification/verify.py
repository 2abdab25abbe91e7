"""`verify_pairs`: COLMAP's geometric verification of a chunk of image pairs, batched in torch.

Per pair the estimator follows COLMAP 4.2's choice from the cameras
(`EstimateTwoViewGeometry` in src/colmap/estimators/two_view_geometry.cc):

| cameras of the pair | COLMAP | here |
|---|---|---|
| both have a focal prior | E, F and H compared (calibrated) | the same |
| one shared camera, no focal prior | shared-focal 6-point relative pose + H | shared focal from 7-point F samples + H |
| exactly one focal prior | one-sided-focal relative pose + H | F and H (uncalibrated) |
| a fisheye camera without focal prior | degenerate | the same |
| otherwise | F and H (uncalibrated) | the same |

Shared-focal hypotheses come from 7-point F samples (shared_focal.py), decided by COLMAP's
shared-focal rules (UNCALIBRATED, F = K^-T E K^-1 of the estimated focal). The one-sided-focal
solver's pairs are verified with F and H here; both label their pairs UNCALIBRATED, and the focal
is left to the mapper's view-graph calibration. Homographies are estimated on pixels for every
camera model.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...cameras.models import unproject
from ...data.model import (TWO_VIEW_CALIBRATED, TWO_VIEW_DEGENERATE, TWO_VIEW_PANORAMIC, TWO_VIEW_PLANAR,
                           TWO_VIEW_PLANAR_OR_PANORAMIC, TWO_VIEW_UNCALIBRATED)
from ...geometry import so3
from .batch import PairBatch, TwoViewGeometries
from .decision import (Estimate, apply_watermark, decide_calibrated, decide_shared_focal, decide_uncalibrated,
                       watermark)
from .options import VerificationOptions
from .pose import pose_from_essential, pose_from_homography
from .ransac import E_KIND, F_KIND, H_KIND, max_trials_for_ratio, run_ransac
from .refine import polish, polish_essential
from .scoring import Frames
from .shared_focal import SF_KIND, finish_shared_focal, shared_focal_frames

_FISHEYE_MODELS = (5,)  # OPENCV_FISHEYE: not a perspective pinhole (COLMAP's IsPerspectivePinhole)
# (model id) -> indices of fx, fy, cx, cy in the parameter vector
_PINHOLE_LAYOUT = {0: (0, 0, 1, 2), 1: (0, 1, 2, 3), 2: (0, 0, 1, 2), 3: (0, 0, 1, 2), 4: (0, 1, 2, 3),
                   5: (0, 1, 2, 3)}


def _intrinsics(model_id: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """Focal (P, 2) and principal point (P, 2) of each pair's camera (mixed models allowed)."""
    table = torch.tensor([_PINHOLE_LAYOUT.get(m, (0, 0, 1, 2)) for m in range(max(_PINHOLE_LAYOUT) + 1)],
                         device=params.device)
    cols = table[model_id.clamp(0, table.shape[0] - 1)]
    v = params.gather(1, cols)
    return v[:, :2], v[:, 2:]


def calibration_matrices(model_id: Tensor, params: Tensor) -> Tensor:
    f, c = _intrinsics(model_id, params)
    K = params.new_zeros(params.shape[0], 3, 3)
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = f[:, 0], f[:, 1], c[:, 0], c[:, 1], 1.0
    return K


def _unproject(model_id: Tensor, params: Tensor, xy: Tensor) -> Tensor:
    """Normalised camera coordinates (P, M, 2) through each pair's camera model."""
    out = torch.zeros_like(xy)
    for m in torch.unique(model_id).tolist():
        sel = model_id == m
        out[sel] = unproject(int(m), params[sel][:, None, :], xy[sel])
    return out


def _hartley(xy: Tensor, valid: Tensor, num: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre and scale each pair's points to RMS distance sqrt(2); returns n, s (P, 2), T (P, 3, 3)."""
    w = valid.to(xy.dtype)[..., None]
    cnt = num.clamp_min(1).to(xy.dtype)[:, None]
    c = (xy * w).sum(1) / cnt
    rms = torch.sqrt((((xy - c[:, None]) ** 2).sum(-1, keepdim=True) * w).sum(1) / cnt)
    s = torch.where(rms > 0, 2 ** 0.5 / rms.clamp_min(1e-300), torch.ones_like(rms))  # (P, 1)
    n = (xy - c[:, None]) * s[:, None] * w
    T = xy.new_zeros(xy.shape[0], 3, 3)
    T[:, 0, 0] = T[:, 1, 1] = s[:, 0]
    T[:, :2, 2] = -c * s
    T[:, 2, 2] = 1
    return n, s.expand(-1, 2), T


def _unit(G: Tensor) -> Tensor:
    n = G.flatten(1).norm(dim=1)
    return torch.where((n > 0)[:, None, None], G / n.clamp_min(1e-300)[:, None, None], G)


def _with_focal(model_id: Tensor, params: Tensor, f: Tensor) -> Tensor:
    """params (P, 12) with the focal length(s) replaced by f (P,)."""
    table = torch.tensor([_PINHOLE_LAYOUT.get(m, (0, 0, 1, 2))[:2] for m in range(max(_PINHOLE_LAYOUT) + 1)],
                         device=params.device)
    cols = table[model_id.clamp(0, table.shape[0] - 1)]
    return params.scatter(1, cols, f[:, None].to(params.dtype).expand(-1, 2))


def _route(batch: PairBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(calibrated, shared, runnable) (P,) following COLMAP's estimator choice."""
    pin1 = ~torch.isin(batch.camera_model_id1, torch.tensor(_FISHEYE_MODELS, device=batch.camera_model_id1.device))
    pin2 = ~torch.isin(batch.camera_model_id2, torch.tensor(_FISHEYE_MODELS, device=batch.camera_model_id2.device))
    p1, p2 = batch.has_prior_focal1, batch.has_prior_focal2
    one_sided = (p1 != p2) & torch.where(p1, pin2, pin1)
    shared = ~one_sided & batch.same_camera & ~p1 & pin1
    calibrated = ~one_sided & ~shared & p1 & p2
    runnable = one_sided | shared | calibrated | (pin1 & pin2)
    return calibrated, shared, runnable


def verify_pairs(batch: PairBatch, options: VerificationOptions | None = None) -> TwoViewGeometries:
    """Verify every pair of `batch`; device and dtype follow the batch (geometry in float64)."""
    opt = (options or VerificationOptions()).check()
    batch.check()
    dev = batch.xy1.device
    P, M = batch.xy1.shape[:2]
    f64 = torch.float64
    xy1, xy2 = batch.xy1.to(f64), batch.xy2.to(f64)
    pair_seed = batch.pair_seed if batch.pair_seed is not None else torch.arange(P, device=dev)
    # non-finite matches are dropped (moved behind the valid ones, order kept) and never inliers
    in_range = torch.arange(M, device=dev)[None, :] < batch.num_matches[:, None]
    finite = torch.isfinite(xy1).all(-1) & torch.isfinite(xy2).all(-1)
    valid_in = in_range & finite
    perm = torch.argsort((~valid_in).to(torch.int8), dim=1, stable=True)
    g = perm[..., None].expand(-1, -1, 2)
    zero = torch.zeros((), dtype=f64, device=dev)
    xy1 = torch.where(valid_in[..., None], xy1, zero).gather(1, g)
    xy2 = torch.where(valid_in[..., None], xy2, zero).gather(1, g)
    num = valid_in.sum(1)
    valid = torch.arange(M, device=dev)[None, :] < num[:, None]

    calibrated, shared, runnable = _route(batch)
    runnable = runnable & (batch.num_matches >= opt.min_num_inliers)
    calibrated = calibrated & runnable
    shared = shared & runnable & opt.shared_focal
    base_ratio = opt.two_view_min_inlier_ratio if opt.two_view_min_inlier_ratio > 0 else opt.min_inlier_ratio
    ratio = torch.where(calibrated, base_ratio, opt.min_inlier_ratio).to(f64)

    # F and H on Hartley-normalised pixels
    n1, s1, T1 = _hartley(xy1, valid, num)
    n2, s2, T2 = _hartley(xy2, valid, num)
    pix = Frames(n1, n2, s1, s2, valid, num)
    m = opt.min_num_inliers
    floor = torch.full_like(num, m) if opt.stop_at_decision_floor else None
    Fr = run_ransac(pix, F_KIND, opt, pair_seed, max_trials_for_ratio(ratio, F_KIND.sample_size, opt),
                    runnable & ~shared, floor)
    Fr = polish(pix, F_KIND, Fr, opt)
    F_est = Estimate(Fr.success, Fr.num_inliers, Fr.inliers)
    ref = Fr.num_inliers
    F_px = _unit(T2.transpose(1, 2) @ Fr.model @ T1) * (Fr.num_inliers > 0)[:, None, None]
    num_trials = Fr.num_trials

    # the shared-focal model of pairs that share one camera without a focal prior (no F, as COLMAP)
    SF = None
    params1 = batch.params1.to(f64)
    if bool(shared.any()):
        f0, c0 = _intrinsics(batch.camera_model_id1, params1)
        sff = shared_focal_frames(xy1, xy2, valid, num, f0.mean(1), c0)
        SF = run_ransac(sff, SF_KIND, opt, pair_seed, max_trials_for_ratio(ratio, SF_KIND.sample_size, opt), shared,
                        floor)
        SF, sf_focal, sf_F, _ = finish_shared_focal(sff, SF, f0.mean(1), c0, opt)
        ref = torch.where(shared, SF.num_inliers, ref)
        num_trials = torch.where(shared, SF.num_trials, Fr.num_trials)

    # E on calibrated coordinates (pairs whose two cameras have a focal prior)
    E_est = Estimate(torch.zeros_like(runnable), torch.zeros_like(num), torch.zeros_like(valid))
    E_model = torch.zeros(P, 3, 3, dtype=f64, device=dev)
    c1 = c2 = None
    any_calibrated = bool(calibrated.any())
    if any_calibrated or opt.compute_relative_pose:
        c1 = torch.where(valid[..., None], _unproject(batch.camera_model_id1, batch.params1.to(f64), xy1), zero)
        c2 = torch.where(valid[..., None], _unproject(batch.camera_model_id2, batch.params2.to(f64), xy2), zero)
    if any_calibrated:
        f1, _ = _intrinsics(batch.camera_model_id1, batch.params1.to(f64))
        f2, _ = _intrinsics(batch.camera_model_id2, batch.params2.to(f64))
        cal_ok = valid & torch.isfinite(c1).all(-1) & torch.isfinite(c2).all(-1)
        cal = Frames(torch.where(cal_ok[..., None], c1, zero), torch.where(cal_ok[..., None], c2, zero),
                     1.0 / f1, 1.0 / f2, cal_ok, num)
        Er = run_ransac(cal, E_KIND, opt, pair_seed, max_trials_for_ratio(ratio, E_KIND.sample_size, opt), calibrated,
                        floor)
        Er = polish_essential(cal, Er, f1.mean(1), f2.mean(1), opt)
        E_est = Estimate(Er.success, Er.num_inliers, Er.inliers)
        E_model = torch.where(Er.success[:, None, None], _unit(Er.model), E_model)
        num_trials = num_trials + Er.num_trials
        ref = torch.where(calibrated, torch.minimum(Er.num_inliers, Fr.num_inliers), ref)

    # H, its trial budget set by the inlier ratio it must reach to be chosen
    h_ratio = torch.maximum(ratio, opt.max_H_inlier_ratio * ref.to(f64) / num.clamp_min(1).to(f64))
    # H changes the decision from min_num_inliers on, or above max_H_inlier_ratio x the epipolar count
    h_floor = None if floor is None else torch.where(
        ref >= m, torch.minimum(floor, torch.floor(opt.max_H_inlier_ratio * ref.to(f64)).long() + 1), floor)
    Hr = run_ransac(pix, H_KIND, opt, pair_seed, max_trials_for_ratio(h_ratio, H_KIND.sample_size, opt), runnable,
                    h_floor)
    H_est = Estimate(Hr.success, Hr.num_inliers, Hr.inliers)

    config, num_inliers, inliers = decide_uncalibrated(F_est, H_est, num, opt)
    cfg_c, n_c, m_c = decide_calibrated(E_est, F_est, H_est, num, opt)
    config = torch.where(calibrated, cfg_c, config)
    num_inliers = torch.where(calibrated, n_c, num_inliers)
    inliers = torch.where(calibrated[:, None], m_c, inliers)
    if SF is not None:
        cfg_s, n_s, m_s = decide_shared_focal(Estimate(SF.success, SF.num_inliers, SF.inliers), H_est, num, opt)
        config = torch.where(shared, cfg_s, config)
        num_inliers = torch.where(shared, n_s, num_inliers)
        inliers = torch.where(shared[:, None], m_s, inliers)
        sf_used = shared & (cfg_s == TWO_VIEW_UNCALIBRATED)
        F_px = torch.where(sf_used[:, None, None], _unit(sf_F), F_px)
        E_model = torch.where(sf_used[:, None, None], _unit(SF.model), E_model)
    config = torch.where(runnable, config, TWO_VIEW_DEGENERATE)
    num_inliers = num_inliers * runnable
    inliers = inliers & runnable[:, None]
    if opt.detect_watermark:
        wm = watermark(xy1, xy2, inliers, num_inliers, batch.width1, batch.height1, batch.width2, batch.height2, opt)
        config = apply_watermark(config, wm)

    H_px = _unit(torch.linalg.solve(T2, Hr.model) @ T1) * (Hr.num_inliers > 0)[:, None, None]

    rel_quat = torch.zeros(P, 4, dtype=f64, device=dev)
    rel_quat[:, 0] = 1
    rel_trans = torch.zeros(P, 3, dtype=f64, device=dev)
    pose_valid = torch.zeros(P, dtype=torch.bool, device=dev)
    if opt.compute_relative_pose:
        use_E = config == TWO_VIEW_CALIBRATED
        if SF is not None and bool(sf_used.any()):
            # as COLMAP: rays through the camera with the estimated focal, pose from the estimated E
            use_E = use_E | sf_used
            i = torch.nonzero(sf_used).flatten()
            p_sf = _with_focal(batch.camera_model_id1[i], params1[i], sf_focal[i])
            c1, c2 = c1.clone(), c2.clone()
            c1[i] = torch.where(valid[i, :, None], _unproject(batch.camera_model_id1[i], p_sf, xy1[i]), zero)
            c2[i] = torch.where(valid[i, :, None], _unproject(batch.camera_model_id1[i], p_sf, xy2[i]), zero)
        config, rel_quat, rel_trans, pose_valid = _relative_pose(batch, config, inliers, use_E, E_model, F_px, H_px,
                                                                 c1, c2, rel_quat, rel_trans, pose_valid)

    # back to the caller's match order
    inliers_out = torch.zeros_like(inliers).scatter(1, perm, inliers)
    return TwoViewGeometries(config=config, F=F_px, E=E_model, H=H_px, inliers=inliers_out, num_inliers=num_inliers,
                             rel_quat=rel_quat, rel_trans=rel_trans, pose_valid=pose_valid, num_trials=num_trials,
                             num_trials_H=Hr.num_trials)


def _relative_pose(batch, config, inliers, use_E, E_model, F_px, H_px, c1, c2, rel_quat, rel_trans, pose_valid):
    f64 = torch.float64
    K1 = calibration_matrices(batch.camera_model_id1, batch.params1.to(f64))
    K2 = calibration_matrices(batch.camera_model_id2, batch.params2.to(f64))
    finite = torch.isfinite(c1).all(-1) & torch.isfinite(c2).all(-1)
    mask = inliers & finite
    zero = torch.zeros((), dtype=f64, device=c1.device)
    c1 = torch.where(finite[..., None], c1, zero)
    c2 = torch.where(finite[..., None], c2, zero)
    has = mask.any(1)
    epi = ((config == TWO_VIEW_CALIBRATED) | (config == TWO_VIEW_UNCALIBRATED)) & has
    if bool(epi.any()):
        i = torch.nonzero(epi).flatten()
        E = torch.where(use_E[i][:, None, None], E_model[i], K2[i].transpose(1, 2) @ F_px[i] @ K1[i])
        R, t, ok = pose_from_essential(E, c1[i], c2[i], mask[i])
        rel_quat[i] = torch.where(ok[:, None], so3.matrix_to_quat(R), rel_quat[i])
        rel_trans[i] = torch.where(ok[:, None], t, rel_trans[i])
        pose_valid[i] = ok
    hom = ((config == TWO_VIEW_PLANAR) | (config == TWO_VIEW_PANORAMIC) | (config == TWO_VIEW_PLANAR_OR_PANORAMIC)) & has
    if bool(hom.any()):
        i = torch.nonzero(hom).flatten()
        R, t, npts = pose_from_homography(H_px[i], K1[i], K2[i], c1[i], c2[i], mask[i])
        cfg = config[i]
        resolved = torch.where((t * t).sum(1) < 1e-12, TWO_VIEW_PANORAMIC, TWO_VIEW_PLANAR)
        cfg = torch.where(cfg == TWO_VIEW_PLANAR_OR_PANORAMIC, resolved, cfg)
        config = config.clone()
        config[i] = cfg
        ok = ~((cfg == TWO_VIEW_PLANAR) & (npts == 0))
        rel_quat[i] = torch.where(ok[:, None], so3.matrix_to_quat(R), rel_quat[i])
        rel_trans[i] = torch.where(ok[:, None], t, rel_trans[i])
        pose_valid[i] = ok
    return config, rel_quat, rel_trans, pose_valid


def verify_all(xy: Tensor, offsets: Tensor, pairs: Tensor, matches: Tensor, match_offsets: Tensor, cameras,
               image_camera: Tensor, options: VerificationOptions | None = None, *, pair_seed: Tensor | None = None,
               device: torch.device | str | None = None, max_elements: int = 2**21) -> TwoViewGeometries:
    """Verify all pairs given as flat data (see `make_pair_batches`), chunk by chunk.

    Returns one TwoViewGeometries row per pair in the order of `pairs`, on `device`, except that
    `inliers` is flat: (Q,) bool aligned with `matches`.
    """
    from .batch import make_pair_batches

    dev = torch.device(device) if device is not None else xy.device
    P = pairs.shape[0]
    f64 = torch.float64
    out = TwoViewGeometries(
        config=torch.zeros(P, dtype=torch.long, device=dev), F=torch.zeros(P, 3, 3, dtype=f64, device=dev),
        E=torch.zeros(P, 3, 3, dtype=f64, device=dev), H=torch.zeros(P, 3, 3, dtype=f64, device=dev),
        inliers=torch.zeros(matches.shape[0], dtype=torch.bool, device=dev),
        num_inliers=torch.zeros(P, dtype=torch.long, device=dev),
        rel_quat=torch.zeros(P, 4, dtype=f64, device=dev), rel_trans=torch.zeros(P, 3, dtype=f64, device=dev),
        pose_valid=torch.zeros(P, dtype=torch.bool, device=dev), num_trials=torch.zeros(P, dtype=torch.long, device=dev),
        num_trials_H=torch.zeros(P, dtype=torch.long, device=dev))
    mo = match_offsets.to(dev)
    for rows, batch in make_pair_batches(xy, offsets, pairs, matches, match_offsets, cameras, image_camera,
                                         pair_seed=pair_seed, max_elements=max_elements, device=dev):
        g = verify_pairs(batch, options)
        for name in ("config", "F", "E", "H", "num_inliers", "rel_quat", "rel_trans", "pose_valid", "num_trials",
                     "num_trials_H"):
            getattr(out, name)[rows] = getattr(g, name)
        ar = torch.arange(g.inliers.shape[1], device=dev)
        sel = ar[None] < batch.num_matches[:, None]
        out.inliers[(mo[rows][:, None] + ar[None])[sel]] = g.inliers[sel]
    return out
