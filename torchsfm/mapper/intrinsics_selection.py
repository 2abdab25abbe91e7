"""Intrinsics model selection: free a camera's principal point only where the data determine it.

The mapper's bundle adjustment refines the focal length and the distortion of every camera with
the principal point at the image centre, as COLMAP and GLOMAP do. After the last bundle
adjustment each camera (seen by at least `min_images` registered images) is tested:

1. Determined. The principal point's marginal standard deviation, with every pose and point
   eliminated (`intrinsics_uncertainty`: their correlation with the intrinsics included), must be
   at most `max_principal_point_std_deg` of viewing direction. A centred principal point is a
   bias of that kind (templeRing's is 18 px = 0.7 deg off); a freed one that is not determined
   much better than that trades the bias for noise, and on some captures for much worse.
2. Validated. The freed models (one per distortion level: the mapper's own distortion terms,
   none, ...) are fitted by cross-validation over tracks (at most `max_points` of them, a
   seeded sample): the points are split into `folds`; the
   poses, intrinsics and the other folds' points are adjusted together, then the held-out points
   are re-fitted alone with those poses and intrinsics fixed, and their reprojection errors
   scored (Huber). A freed model whose held-out cost is worse than the centred model's by
   `max_worse_z` standard errors (paired over points) is rejected, and so is one a fold puts
   implausibly far from the centre. Of the rest, the mapper's own distortion level is kept unless
   another predicts the held-out tracks better by `min_z` standard errors.
3. Significant. The model refitted on all observations must place the principal point at least
   `min_shift_sigmas` standard deviations from the centre; closer, the centre is as good and
   freeing it would only add noise (a centred synthetic camera stays centred).

Steps 1 and 3 screen each distortion level before the cross-validation, at that level's own fit
on all observations with the principal point free: only the levels that pass are cross-validated,
and a camera no level passes stays centred without it. Not at the mapper's model: there the
distortion may have absorbed the centred principal point's bias (13 templeRing photos: k1 = -0.41
for a lens without distortion), which distorts the whole structure and makes the principal point
look undetermined (±7 px) where the fit without distortion determines it to ±2 px (AUC@1 23.6 ->
74.5).

Why not a likelihood-ratio test on the fit (the previous rule): on a ring of cameras that share the
vertical axis, a horizontal principal-point shift is, to first order, a yaw of every camera, and
two-view tracks along horizontal baselines constrain only vertical errors. The cost then falls by
a "significant" amount when the principal point moves along with the distortion, while the data
hardly determine it: on a 15-image templeRing subset it moved 15 px the wrong way with k1 = -0.42
(AUC@1 23 -> 6), determined only to +-4.2 px.

A camera with more than `max_images` registered images is tested on its best-observed ones (the
points they see twice): the test's cost stops growing with the scene, and less data only makes it
more cautious. A freed model is then refitted on every image; a centred camera keeps the mapper's
model as it is.

The decision, its evidence (standard deviations, held-out scores of every candidate, the folds'
principal points, the shift) and the reason go into the stage report; `describe` gives one line.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ba.bundle_adjustment import BundleAdjustmentOptions, bundle_adjust
from ..cameras.models import extra_mask, focal_xy, param_mask, principal_point, principal_point_mask
from ..data.model import Reconstruction, Tracks
from .intrinsics_uncertainty import best_observed, intrinsics_std, model_noise_sigma
from .triangulation import reprojection_errors

log = logging.getLogger(__name__)

CURRENT = "current"
# distortion terms refined with a free principal point: as the mapper refines them, the first
# (radial) term only, none
DISTORTION_LEVELS = ("as refined", "first term", "none")


@dataclass
class IntrinsicsSelectionOptions:
    principal_point: str = "auto"  # auto: tested per camera | always: freed | never: kept at the centre
    # a camera seen by fewer registered images keeps the mapper's model. The tests guard small sets
    # too (an 8-image templeRing subset: freed within 3 px of the calibration, AUC@1 4.8 -> 15.4)
    min_images: int = 5
    # the test runs on each camera's this many best-observed images (and the points they see
    # twice); a freed model is then refitted on all. Fewer images only widen the intervals, and the
    # cost no longer grows with the scene (loops5000: 600 s and 7.8 GB when tested on all)
    max_images: int = 150
    # the cross-validation runs on a seeded sample of this many points (with all their
    # observations): its fits cost in proportion, and a few thousand tracks decide it
    max_points: int = 5000
    # determined: the principal point's marginal standard deviation (poses and points eliminated)
    # is at most this angle of viewing direction (atan(std / f); 0.1 deg = 2.6 px at f = 1500 px).
    # A centred principal point is a bias of that kind: templeRing's is 18 px (0.7 deg) off.
    max_principal_point_std_deg: float = 0.1
    # significant: the freed principal point must lie this many standard deviations from the
    # centre (Mahalanobis over x, y); closer, the centre is as good and freeing only adds noise
    min_shift_sigmas: float = 3.0
    distortion_levels: tuple[str, ...] = ("as refined", "none")  # tried with a free principal point
    folds: int = 2
    # a free-principal-point model whose held-out cost is worse than the current model's by this
    # many standard errors (paired over points) is rejected
    max_worse_z: float = 3.0
    min_z: float = 3.0  # a distortion level other than the first must beat it by this many standard errors
    max_principal_point_offset: float = 0.2  # of the image size, from the centre
    huber_sigmas: float = 3.0  # held-out residuals beyond this many noise sigmas count linearly
    max_iterations: int = 100  # training fits and the final refit
    point_iterations: int = 10  # the held-out points' refinement
    seed: int = 0

    def validate(self) -> None:
        if self.principal_point not in ("auto", "always", "never"):
            raise ValueError(f"intrinsics.principal_point must be auto, always or never, not {self.principal_point!r}")
        bad = [c for c in self.distortion_levels if c not in DISTORTION_LEVELS]
        if bad or not self.distortion_levels:
            raise ValueError(f"intrinsics.distortion_levels: choose from {list(DISTORTION_LEVELS)}, not {bad or '()'}")
        if self.folds < 2:
            raise ValueError("intrinsics.folds must be at least 2")


def candidate_name(level: str) -> str:
    return "principal point" + ("" if level == "as refined" else f", distortion: {level}")


def _distortion_mask(cams, level: str) -> Tensor:
    """(C, P) bool: the distortion columns a level keeps free (before the BA options' own switch)."""
    ex = extra_mask(cams)
    if level == "as refined":
        return ex
    if level == "first term":
        return ex & (torch.cumsum(ex.to(torch.int64), 1) == 1)
    return torch.zeros_like(ex)


def candidate_mask(rec: Reconstruction, ba: BundleAdjustmentOptions, level: str | None, cameras: Tensor) -> Tensor:
    """(C, P) bool of refined intrinsics: the mapper's model, with (level not None) a free
    principal point and that distortion level for the cameras in the bool mask `cameras`."""
    cams = rec.cameras
    base = param_mask(cams, ba.refine_focal_length, ba.refine_principal_point, ba.refine_extra_params)
    if level is None:
        return base
    sel = cameras[:, None]
    m = base | (principal_point_mask(cams) & sel)
    return torch.where(sel & extra_mask(cams), base & _distortion_mask(cams, level), m)


def _start(rec: Reconstruction, level: str | None, cameras: Tensor) -> Reconstruction:
    """The candidate's starting model: distortion terms it drops start (and stay) at zero."""
    if level is None or level == "as refined":
        return rec
    out = dataclasses.replace(rec, cameras=rec.cameras.clone())
    zero = extra_mask(out.cameras) & ~_distortion_mask(out.cameras, level) & cameras[:, None]
    out.cameras.params = torch.where(zero, torch.zeros_like(out.cameras.params), out.cameras.params)
    return out


def _ba_options(ba: BundleAdjustmentOptions, mask: Tensor | None, iterations: int) -> BundleAdjustmentOptions:
    b = copy.deepcopy(ba)
    b.intrinsics_mask = mask
    b.solver.max_iterations = min(b.solver.max_iterations, iterations)
    # little damping: intrinsics such as the principal point move along shallow valleys, and
    # the default start stops early there (a reference that is not converged credits its own
    # further convergence to the candidate)
    b.solver.initial_trust_region_radius = max(b.solver.initial_trust_region_radius, 1e6)
    return b


def _with_tracks(rec: Reconstruction, keep_obs: Tensor) -> Reconstruction:
    t = rec.tracks
    return dataclasses.replace(rec, tracks=Tracks(t.point[keep_obs], t.image[keep_obs], t.keypoint[keep_obs]))


def _held_out_costs(trained: Reconstruction, full: Reconstruction, held: Tensor, ba: BundleAdjustmentOptions,
                    iterations: int, tau: float) -> Tensor:
    """Huber cost of each held-out observation (`held`, bool over full.tracks), their points
    (from `full`) re-fitted alone with the trained poses and intrinsics fixed."""
    sub = _with_tracks(dataclasses.replace(full, cameras=trained.cameras, images=trained.images), held)
    b = copy.deepcopy(ba)
    b.intrinsics_mask = torch.zeros_like(sub.cameras.params, dtype=torch.bool)
    b.refine_poses = False
    b.solver.max_iterations = iterations
    fitted, _ = bundle_adjust(sub, b)
    err, _ = reprojection_errors(fitted, fitted.points3D.xyz, fitted.tracks)
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, 10 * tau))  # behind a camera: an outlier
    return torch.where(err <= tau, err.square(), 2 * tau * err - tau * tau)


def _cross_validate(rec: Reconstruction, level: str | None, cameras: Tensor, ba: BundleAdjustmentOptions,
                    fold_of_obs: Tensor, opt: IntrinsicsSelectionOptions, tau: float,
                    start: Reconstruction | None = None) -> tuple[Tensor, list[Tensor]]:
    """(held-out Huber cost of every observation, each held out once; principal points per fold).
    The training fits start from `start` (the candidate fitted on all observations, when there
    is one, as the current model's start from the converged model) or else from `rec`."""
    start = _start(rec, level, cameras) if start is None else start
    mask = candidate_mask(rec, ba, level, cameras)
    held_out = torch.zeros(len(rec.tracks), dtype=rec.dtype, device=rec.device)
    pps = []
    for f in range(opt.folds):
        test = fold_of_obs == f
        trained, _ = bundle_adjust(_with_tracks(start, ~test), _ba_options(ba, mask, opt.max_iterations))
        held_out[test] = _held_out_costs(trained, rec, test, ba, opt.point_iterations, tau)
        pps.append(principal_point(trained.cameras))
    return held_out, pps


def _paired(diff: Tensor, point: Tensor, num_points: int) -> tuple[float, float]:
    """Mean and standard error of the per-point sums of `diff` (points with observations only)."""
    s = torch.zeros(num_points, dtype=diff.dtype, device=diff.device).index_add_(0, point, diff)
    s = s[torch.bincount(point, minlength=num_points) > 0]
    if s.numel() < 2:
        return 0.0, math.inf
    return float(s.mean()), float(s.std() / math.sqrt(s.numel()))


def _offset(pp: Tensor, size: Tensor) -> float:
    """Largest distance of principal points (k, 2) from the centre, as a fraction of the image size."""
    return float(((pp - size / 2).abs() / size).max())


def select_intrinsics(rec: Reconstruction, ba: BundleAdjustmentOptions, opt: IntrinsicsSelectionOptions
                      ) -> tuple[Reconstruction, dict]:
    """Choose each camera's intrinsics model (see the module doc) and return the model refitted
    with it on all observations, with the evidence. `rec` is the mapper's converged model."""
    opt.validate()
    report: dict = {"cameras": {}}
    full = rec
    rec = best_observed(rec, opt.max_images)
    sampled = rec is not full
    if sampled:
        report["tested_on_images"] = int(rec.images.registered.sum())
    # converge the current model first, with the fits' solver settings: the default start stops
    # early along shallow valleys, and the test assumes a converged model (the one kept, when the
    # test saw every image)
    rec, summary = bundle_adjust(rec, _ba_options(ba, None, opt.max_iterations))
    report["reference"] = {"initial_cost": summary.initial_cost, "final_cost": summary.final_cost,
                           "iterations": summary.iterations, "termination": summary.termination}
    cams = rec.cameras
    C = len(cams)
    per_cam = torch.bincount(full.images.camera[full.images.registered], minlength=C)
    used = [c for c in range(C) if int(per_cam[c]) > 0]
    cid = [int(v) for v in cams.camera_id.tolist()]  # report keys: COLMAP camera ids
    size = torch.stack([cams.width, cams.height], 1).to(rec.dtype)
    ev = {c: {"images": int(per_cam[c])} for c in used}
    chosen: dict[int, str | None] = {c: None for c in used}
    test = []
    for c in used:
        if ba.refine_principal_point:
            ev[c]["reason"] = "freed in every bundle adjustment (bundle_adjustment.refine_principal_point)"
        elif opt.principal_point == "never":
            ev[c]["reason"] = "centred (intrinsics.principal_point = never)"
        elif opt.principal_point == "always":
            chosen[c], ev[c]["reason"] = "as refined", "freed (intrinsics.principal_point = always)"
        elif int(per_cam[c]) < opt.min_images:
            ev[c]["reason"] = f"centred, not tested: {int(per_cam[c])} registered images (< {opt.min_images})"
        else:
            test.append(c)
    fits: dict = {}  # fits on all observations, keyed as _refit's argument
    if test:
        sigma = model_noise_sigma(rec)
        report["noise_sigma_px"] = sigma
        passed = _screen(rec, ba, opt, test, sigma, ev, size, fits)
        if any(passed.values()):
            _validate(rec, ba, opt, passed, sigma, ev, chosen, size, fits)
    if sampled:  # the outcome is refitted on every image; centred cameras keep the mapper's model
        rec, fits = full, {}
    out = rec
    changed = {c: lv for c, lv in chosen.items() if lv is not None}
    while changed:
        key = frozenset(changed.items())
        out, summary = fits[key] if key in fits else _refit(rec, ba, opt, changed)
        report["refit"] = {"initial_cost": summary.initial_cost, "final_cost": summary.final_cost,
                           "iterations": summary.iterations, "termination": summary.termination}
        pp = principal_point(out.cameras)
        back = []
        for c in changed:
            if _offset(pp[c:c + 1], size[c]) > opt.max_principal_point_offset:
                back.append(c)
                ev[c]["reason"] = (f"centred: the refit moved it beyond {opt.max_principal_point_offset:.0%} of the "
                                   "image size from the centre")
            elif "principal_point_std_px" in ev[c]:  # tested: the shift must be significant
                shift, z = _shift_sigmas(pp[c], size[c], ev[c]["principal_point_std_px"])
                ev[c]["shift_px"], ev[c]["shift_sigmas"] = [round(float(v), 2) for v in shift], z
                if z < opt.min_shift_sigmas:
                    back.append(c)
                    ev[c]["reason"] = (f"centred: {float(shift.norm()):.1f} px from the centre = {z:.1f} sigma "
                                       f"(< {opt.min_shift_sigmas:g})")
        if not back:
            break
        for c in back:
            chosen[c] = None
            del changed[c]
        out = rec
    pp = principal_point(out.cameras)
    for c in used:
        ex = extra_mask(cams)[c]
        ev[c].update(model=CURRENT if chosen[c] is None else candidate_name(chosen[c]),
                     principal_point=[float(v) for v in pp[c]],
                     distortion=[float(v) for v in out.cameras.params[c][ex]])
        report["cameras"][cid[c]] = ev[c]
    report["principal_point_refined"] = any(lv is not None for lv in chosen.values())
    return out, report


def _camera_mask(rec: Reconstruction, cams_: list[int]) -> Tensor:
    """(C,) bool: the cameras `cams_` (row indices)."""
    m = torch.zeros(len(rec.cameras), dtype=torch.bool, device=rec.device)
    m[cams_] = True
    return m


def _refit(rec: Reconstruction, ba: BundleAdjustmentOptions, opt: IntrinsicsSelectionOptions,
           changed: dict[int, str]):
    """The model refitted on all observations with the chosen distortion level per camera."""
    mask = candidate_mask(rec, ba, None, _camera_mask(rec, []))
    start = rec
    for level in set(changed.values()):
        sel = _camera_mask(rec, [c for c, lv in changed.items() if lv == level])
        mask = torch.where(sel[:, None], candidate_mask(rec, ba, level, sel), mask)
        start = _start(start, level, sel)
    return bundle_adjust(start, _ba_options(ba, mask, opt.max_iterations))


def _shift_sigmas(pp: Tensor, size: Tensor, std_px: list[float]) -> tuple[Tensor, float]:
    shift = pp - size / 2
    return shift, float((shift / torch.as_tensor(std_px, dtype=shift.dtype, device=shift.device)).norm())


def _screen(rec: Reconstruction, ba: BundleAdjustmentOptions, opt: IntrinsicsSelectionOptions, cams_: list[int],
            sigma: float, ev: dict, size: Tensor, fits: dict) -> dict[int, list[str]]:
    """Per camera of `cams_`, the distortion levels at which a freed principal point is determined
    and significant (steps 1 and 3 of the module doc, before the cross-validation). Each level is
    fitted on all observations with the principal point free (kept in `fits`, keyed as `_refit`'s
    argument: the final refit is one of them); at that fit its marginal standard deviation must be
    at most `max_principal_point_std_deg`, and the fit must place it at least `min_shift_sigmas`
    of those from the centre, within `max_principal_point_offset`.

    Measured at each level's own fit, not at the mapper's model: a distortion term that absorbed
    the centred principal point's bias (templeRing subsets: k1 = -0.3 to -0.5 where the lens has
    none) distorts the whole structure, and the principal point looks undetermined there (±3-7 px)
    while the fit without it determines the principal point to ±1-2 px."""
    sel = _camera_mask(rec, cams_)
    f = focal_xy(rec.cameras).mean(1)
    passed: dict[int, list[str]] = {c: [] for c in cams_}
    for level in opt.distortion_levels:
        changed = {c: level for c in cams_}
        fits[frozenset(changed.items())] = fit = _refit(rec, ba, opt, changed)
        std = intrinsics_std(fit[0], _ba_options(ba, candidate_mask(rec, ba, level, sel), 1), sigma, opt.max_images)
        std_pp = principal_point(dataclasses.replace(rec.cameras, params=std))
        pp = principal_point(fit[0].cameras)
        for c in cams_:
            s = [float(v) for v in std_pp[c]]
            deg = math.degrees(math.atan(max(s) / float(f[c])))
            shift, z = _shift_sigmas(pp[c], size[c], s)
            e = {"principal_point_std_px": [round(v, 3) for v in s], "principal_point_std_deg": deg,
                 "shift_px": [round(float(v), 2) for v in shift], "shift_sigmas": z}
            if not (math.isfinite(deg) and deg <= opt.max_principal_point_std_deg):
                e["rejected_because"] = (f"determined only to ±{max(s):.1f} px ({deg:.2f}° > "
                                         f"{opt.max_principal_point_std_deg:g}°)")
            elif not z >= opt.min_shift_sigmas:
                e["rejected_because"] = (f"{float(shift.norm()):.1f} px from the centre = {z:.1f} sigma "
                                         f"(< {opt.min_shift_sigmas:g})")
            elif _offset(pp[c:c + 1], size[c]) > opt.max_principal_point_offset:
                e["rejected_because"] = f"beyond {opt.max_principal_point_offset:.0%} of the image size from the centre"
            else:
                passed[c].append(level)
            ev[c].setdefault("levels", {})[candidate_name(level)] = e
    for c in cams_:
        _summarise_level(ev[c], passed[c][0] if passed[c] else opt.distortion_levels[0])
        if not passed[c]:
            ev[c]["reason"] = "centred at every distortion level: " + "; ".join(
                f"{n}: {e['rejected_because']}" for n, e in ev[c]["levels"].items())
    return passed


def _summarise_level(e: dict, level: str) -> None:
    """Copy one level's principal-point evidence to the camera's top level (the summary line, the refit's check)."""
    for k in ("principal_point_std_px", "principal_point_std_deg", "shift_px", "shift_sigmas"):
        e[k] = e["levels"][candidate_name(level)][k]


def _validate(rec: Reconstruction, ba: BundleAdjustmentOptions, opt: IntrinsicsSelectionOptions,
              passed: dict[int, list[str]], sigma: float, ev: dict, chosen: dict, size: Tensor, fits: dict) -> None:
    """Cross-validation over tracks of the free-principal-point models `passed` (camera -> the
    distortion levels `_screen` let through): fills ev[c] (held-out scores per model, reason) and
    chosen[c] (the distortion level, or None).

    A free-principal-point model is rejected when it predicts the held-out tracks worse than the
    current model by more than `max_worse_z` standard errors, or when a fold puts its principal
    point implausibly far from the centre. Of the others, the first distortion level of
    `distortion_levels` (the mapper's own) is kept unless another predicts the held-out tracks
    better than it by `min_z` standard errors."""
    dev = rec.device
    screened = list(passed)
    cams_ = [c for c in screened if passed[c]]
    g = torch.Generator().manual_seed(opt.seed)
    label = torch.randperm(len(rec.points3D), generator=g).to(dev)  # a random label per point
    seen = torch.bincount(rec.tracks.point, minlength=len(rec.points3D)) > 0
    keep_obs = None
    if int(seen.sum()) > opt.max_points:  # the observed points with the lowest labels
        order = torch.argsort(torch.where(seen, label, len(label)))
        keep = torch.zeros_like(seen)
        keep[order[:opt.max_points]] = True
        keep_obs = keep[rec.tracks.point]
        rec = _with_tracks(rec, keep_obs)
        for c in cams_:
            ev[c]["cross_validation_points"] = opt.max_points
    fold_of_obs = (label % opt.folds)[rec.tracks.point]
    tau = opt.huber_sigmas * sigma
    cam_of_obs = rec.images.camera[rec.tracks.image]
    point, P = rec.tracks.point, len(rec.points3D)

    def compare(a: Tensor, b: Tensor, on: Tensor) -> tuple[float, float]:
        """(relative gain, z) of held-out costs a against b on the observations `on`."""
        diff = a[on] - b[on]
        mean, se = _paired(diff, point[on], P)
        return -float(diff.sum()) / max(float(b[on].sum()), 1e-300), (-mean / se if se > 0 else 0.0)

    base, _ = _cross_validate(rec, None, _camera_mask(rec, cams_), ba, fold_of_obs, opt, tau)
    held = {}
    for c in cams_:
        ev[c]["held_out"] = {CURRENT: {"cost": float(base[cam_of_obs == c].sum())}}
    for level in opt.distortion_levels:
        cams_l = [c for c in cams_ if level in passed[c]]
        if not cams_l:
            continue
        # the candidate fitted on all observations (by _screen, for every screened camera)
        fit = fits.get(frozenset((c, level) for c in screened)) if cams_l == screened else None
        start = None if fit is None else fit[0] if keep_obs is None else _with_tracks(fit[0], keep_obs)
        held[level], pps = _cross_validate(rec, level, _camera_mask(rec, cams_l), ba, fold_of_obs, opt, tau, start)
        for c in cams_l:
            on = cam_of_obs == c
            gain, z = compare(held[level], base, on)
            pp = torch.stack([p[c] for p in pps])
            e = {"cost": float(held[level][on].sum()), "relative_gain": gain, "z": z,
                 "principal_point_per_fold": [[round(float(v), 2) for v in p] for p in pp]}
            if z < -opt.max_worse_z:
                e["rejected_because"] = f"held-out cost {-gain:+.2%}, worse at z {z:.1f}"
            elif _offset(pp, size[c]) > opt.max_principal_point_offset:
                e["rejected_because"] = f"a fold's principal point beyond {opt.max_principal_point_offset:.0%} of the image size"
            ev[c]["held_out"][candidate_name(level)] = e
    for c in cams_:
        on = cam_of_obs == c
        ok = [lv for lv in passed[c] if "rejected_because" not in ev[c]["held_out"][candidate_name(lv)]]
        if not ok:
            ev[c]["reason"] = "centred: " + "; ".join(
                f"{n}: {e['rejected_because']}" for n, e in ev[c]["held_out"].items() if "rejected_because" in e)
            continue
        chosen[c] = ok[0]
        for lv in ok[1:]:  # another distortion level only when clearly better than the first
            gain, z = compare(held[lv], held[ok[0]], on)
            ev[c]["held_out"][candidate_name(lv)]["against_" + ok[0].replace(" ", "_")] = {"relative_gain": gain, "z": z}
            if z >= opt.min_z:
                chosen[c] = lv
        e = ev[c]["held_out"][candidate_name(chosen[c])]
        _summarise_level(ev[c], chosen[c])
        ev[c]["reason"] = (f"{candidate_name(chosen[c]).replace('principal point', 'freed')}: ±"
                           f"{max(ev[c]['principal_point_std_px']):.1f} px, held-out cost {-e['relative_gain']:+.1%} "
                           f"(z {e['z']:.1f})")


def describe(report: dict) -> str:
    """One short line for the run summary: each camera's decision and its main evidence (the full
    reasons and scores are in the stage report)."""
    parts = []
    for k, v in report.get("cameras", {}).items():
        std = v.get("principal_point_std_px")
        if v["model"] != CURRENT and "shift_px" in v:
            what = (f"{v['model'].replace('principal point', 'principal point freed')} (±{max(std):.1f} px, "
                    f"{math.hypot(*v['shift_px']):.1f} px = {v['shift_sigmas']:.0f} sigma from the centre)")
        elif v["model"] != CURRENT:
            what = v["model"].replace("principal point", "principal point freed")
        elif std is None:
            what = "principal point " + v.get("reason", "")
        elif "determined only" in v.get("reason", ""):
            what = f"principal point centred (±{max(std):.1f} px: not determined)"
        elif "shift_sigmas" in v:
            what = f"principal point centred ({v['shift_sigmas']:.1f} sigma from the centre: not significant)"
        else:
            what = "principal point centred (" + v.get("reason", "").removeprefix("centred: ") + ")"
        parts.append(f"camera {k}: {what}")
    return "; ".join(parts)
