"""The global mapper: a verified view graph in, one COLMAP-style model per connected component out.

Stages, each `(data, options) -> (new data, report)`, composed in GLOMAP's order:
view-graph calibration -> relative poses -> rotation averaging -> tracks -> global positioning ->
bundle-adjustment rounds with filtering -> retriangulation -> final BA -> normalisation.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch

from ..ba.bundle_adjustment import BundleAdjustmentOptions, bundle_adjust
from ..data.model import Reconstruction
from ..report import RunReport
from ..runtime import resolve_device
from .global_positioning import GlobalPositioningOptions, global_positioning
from .graph import connected_components, image_reasons, mark_images
from .relative_pose import RelativePoseOptions, estimate_relative_poses
from .rotation_averaging import RotationAveragingOptions, rotation_averaging
from .tracks import TrackOptions, establish_tracks
from .triangulation import FilterOptions, TriangulationOptions, filter_reconstruction, triangulate_tracks
from .view_graph_calibration import ViewGraphCalibrationOptions, calibrate_view_graph

log = logging.getLogger(__name__)


def _retriangulation_tracks() -> TrackOptions:
    return TrackOptions(min_track_length=2)


@dataclass
class MapperOptions:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    min_component_size: int = 3  # images; smaller components are not reconstructed
    max_num_models: int = 10
    skip_view_graph_calibration: bool = False
    skip_retriangulation: bool = False
    # reprojection thresholds (pixels) of the filtering after each BA round
    ba_round_max_reprojection: tuple[float, ...] = (16.0, 8.0, 4.0)
    min_triangulation_angle: float = 1.5  # degrees
    refine_principal_point: str = "auto"  # auto | always | never (see _final_rounds)
    min_images_for_principal_point: int = 10
    principal_point_min_gain: float = 10.0  # likelihood-ratio threshold per freed parameter
    max_principal_point_offset: float = 0.2
    normalize_extent: float = 10.0  # scene scaled so that the 10-90% camera box has this diagonal
    view_graph_calibration: ViewGraphCalibrationOptions = field(default_factory=ViewGraphCalibrationOptions)
    relative_pose: RelativePoseOptions = field(default_factory=RelativePoseOptions)
    rotation_averaging: RotationAveragingOptions = field(default_factory=RotationAveragingOptions)
    tracks: TrackOptions = field(default_factory=TrackOptions)
    global_positioning: GlobalPositioningOptions = field(default_factory=GlobalPositioningOptions)
    bundle_adjustment: BundleAdjustmentOptions = field(default_factory=BundleAdjustmentOptions)
    retriangulation_tracks: TrackOptions = field(default_factory=_retriangulation_tracks)
    triangulation: TriangulationOptions = field(default_factory=TriangulationOptions)


def _check_finite(rec: Reconstruction, stage: str) -> None:
    """NaN/Inf after a stage: quarantine the images and points concerned, with a warning."""
    bad_img = ~torch.isfinite(rec.images.quat).all(1) | ~torch.isfinite(rec.images.trans).all(1)
    bad_img &= rec.images.registered
    if bool(bad_img.any()):
        log.warning("%s produced non-finite poses for %d images; they are unregistered", stage, int(bad_img.sum()))
        rec.images.registered = rec.images.registered & ~bad_img
        mark_images(rec.meta, len(rec.images), bad_img, f"non-finite pose after {stage}")
    if rec.points3D is not None and len(rec.points3D):
        bad_pt = ~torch.isfinite(rec.points3D.xyz).all(1)
        if bool(bad_pt.any()):
            log.warning("%s produced %d non-finite points; they are dropped", stage, int(bad_pt.sum()))
            rec.points3D.xyz[bad_pt] = 0.0
            keep = ~bad_pt[rec.tracks.point]
            rec.tracks.point, rec.tracks.image, rec.tracks.keypoint = (
                rec.tracks.point[keep], rec.tracks.image[keep], rec.tracks.keypoint[keep])


def normalize(rec: Reconstruction, extent: float) -> Reconstruction:
    """Centre the registered cameras at the origin and scale them to a fixed extent (GLOMAP)."""
    reg = rec.images.registered
    if int(reg.sum()) < 2:
        return rec
    c = rec.images.centers[reg]
    lo, hi = torch.quantile(c, 0.1, dim=0), torch.quantile(c, 0.9, dim=0)
    mid = torch.median(c, dim=0).values
    diag = float((hi - lo).norm())
    s = extent / diag if diag > 1e-12 else 1.0
    out = rec.clone()
    # x' = s (x - mid): t' = s (t + R mid)
    R = out.images.rotation
    out.images.trans = s * (out.images.trans + (R @ mid[:, None])[..., 0])
    if out.points3D is not None:
        out.points3D.xyz = s * (out.points3D.xyz - mid)
    return out


def _bundle_rounds(rec: Reconstruction, opt: MapperOptions, report: RunReport, dev, tag: str) -> Reconstruction:
    for k, thr in enumerate(opt.ba_round_max_reprojection):
        with report.stage(f"{tag}bundle_adjustment_{k + 1}", dev) as st:
            rec, summary = bundle_adjust(rec, opt.bundle_adjustment)
            st.counts.update({"initial_cost": summary.initial_cost, "final_cost": summary.final_cost,
                              "iterations": summary.iterations, "termination": summary.termination})
        _check_finite(rec, "bundle adjustment")
        with report.stage(f"{tag}filter_{k + 1}", dev) as st:
            rec, counts = filter_reconstruction(rec, FilterOptions(thr, opt.min_triangulation_angle, 2))
            st.counts.update(counts)
    return rec


def _map_component(rec: Reconstruction, opt: MapperOptions, report: RunReport, dev, tag: str) -> Reconstruction:
    with report.stage(f"{tag}rotation_averaging", dev) as st:
        rec, r = rotation_averaging(rec, opt.rotation_averaging)
        st.counts.update(_counts(r))
    _check_finite(rec, "rotation averaging")
    with report.stage(f"{tag}tracks", dev) as st:
        rec, r = establish_tracks(rec, opt.tracks)
        st.counts.update(_counts(r))
    with report.stage(f"{tag}global_positioning", dev) as st:
        gp = opt.global_positioning
        rec, counts = global_positioning(rec, gp)
        st.counts.update(counts)
    _check_finite(rec, "global positioning")
    rec = _bundle_rounds(rec, opt, report, dev, tag)
    if not opt.skip_retriangulation:
        with report.stage(f"{tag}retriangulation", dev) as st:
            # all tracks again (length >= 2 now), triangulated from the adjusted poses
            tracked, _ = establish_tracks(rec, opt.retriangulation_tracks)
            rec, counts = triangulate_tracks(tracked, tracked.tracks, opt.triangulation)
            st.counts.update(counts)
    rec = _final_rounds(rec, opt, report, dev, tag)
    return normalize(rec, opt.normalize_extent)


def _principal_point_ok(rec: Reconstruction, max_offset: float) -> bool:
    from ..cameras.models import principal_point

    size = torch.stack([rec.cameras.width, rec.cameras.height], 1).to(rec.dtype)
    off = (principal_point(rec.cameras) - size / 2).abs() / size
    return bool((off <= max_offset).all())


def _final_rounds(rec: Reconstruction, opt: MapperOptions, report: RunReport, dev, tag: str) -> Reconstruction:
    """Last BA rounds; then the principal points are freed when the data constrain them.

    "auto" frees them only when every camera is seen by enough registered images, and keeps the
    result only when it is significant: on the same observations, the cost decrease must pass a
    likelihood-ratio test (2 dC / sigma^2 > principal_point_min_gain per freed parameter, sigma^2
    estimated from the residuals) and the principal points must stay near the image centre. On
    a ring fixating one point, a principal-point shift is nearly a rotation of every camera, so
    an untested refinement there trades pose accuracy for noise.
    """
    mode = opt.refine_principal_point
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"refine_principal_point must be auto, always or never, not {mode!r}")
    out = _bundle_rounds(rec, opt, report, dev, f"{tag}final_")
    per_cam = torch.bincount(out.images.camera[out.images.registered], minlength=len(out.cameras))
    used = per_cam > 0
    if mode == "never" or opt.bundle_adjustment.refine_principal_point or (
            mode == "auto" and not bool((per_cam[used] >= opt.min_images_for_principal_point).all())):
        return out
    ba = copy.deepcopy(opt.bundle_adjustment)
    ba.refine_principal_point = True
    with report.stage(f"{tag}principal_point_bundle_adjustment", dev) as st:
        pp, summary = bundle_adjust(out, ba)
        sigma2 = max(summary.initial_cost / max(1, len(out.tracks)), 1e-12)  # per coordinate
        stat = 2 * (summary.initial_cost - summary.final_cost) / sigma2
        k = 2 * int(used.sum())
        plausible = _principal_point_ok(pp, opt.max_principal_point_offset)
        accept = mode == "always" or (stat > opt.principal_point_min_gain * k and plausible)
        st.counts.update({"initial_cost": summary.initial_cost, "final_cost": summary.final_cost,
                          "likelihood_ratio": stat, "parameters": k, "plausible": plausible, "accepted": accept})
    report.summary["principal_point_refined"] = accept
    if not accept:
        return out
    with report.stage(f"{tag}principal_point_filter", dev) as st:
        pp, counts = filter_reconstruction(pp, FilterOptions(opt.ba_round_max_reprojection[-1],
                                                             opt.min_triangulation_angle, 2))
        st.counts.update(counts)
    return pp


def _counts(r) -> dict:
    if isinstance(r, dict):
        return r
    d = getattr(r, "__dict__", {})
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}


def global_mapping(rec: Reconstruction, options: MapperOptions | None = None,
                   report: RunReport | None = None) -> tuple[list[Reconstruction], RunReport]:
    """Map `rec` (cameras, images, keypoints, view graph; no poses needed) to one model per
    connected component, largest first. Images that could not be registered are listed with a
    reason in each model's `meta['image_reason']` and in the report."""
    opt = options or MapperOptions()
    report = report or RunReport(command="map")
    dev = resolve_device(opt.device)
    report.device, report.seed = str(dev), opt.seed
    torch.manual_seed(opt.seed)
    rec = rec.to(dev, torch.float64)
    if rec.view_graph is None or not bool(rec.view_graph.valid.any()):
        raise ValueError("the view graph has no verified image pairs: nothing to reconstruct")
    if not opt.skip_view_graph_calibration:
        with report.stage("view_graph_calibration", dev) as st:
            rec, r = calibrate_view_graph(rec, opt.view_graph_calibration)
            st.counts.update(_counts(r))
    with report.stage("relative_poses", dev) as st:
        relopt = opt.relative_pose
        relopt.keep_largest_component = False  # components are mapped one by one below
        rec, r = estimate_relative_poses(rec, relopt)
        st.counts.update(_counts(r))
    vg = rec.view_graph
    labels = connected_components(len(rec.images), vg.pairs, vg.valid)
    in_graph = torch.zeros(len(rec.images), dtype=torch.bool, device=dev)
    in_graph[vg.pairs[vg.valid].reshape(-1)] = True
    comp_ids, sizes = torch.unique(labels[in_graph], return_counts=True)
    order = torch.argsort(sizes, descending=True, stable=True)
    models = []
    for rank, k in enumerate(order.tolist()):
        if int(sizes[k]) < opt.min_component_size or len(models) >= opt.max_num_models:
            break
        members = labels == comp_ids[k]
        sub = rec.clone()
        sub.view_graph.valid = vg.valid & members[vg.pairs[:, 0]] & members[vg.pairs[:, 1]]
        tag = f"model{rank}/" if len(order) > 1 else ""
        try:
            model = _map_component(sub, opt, report, dev, tag)
        except RuntimeError as e:  # a component that cannot be positioned is reported, not fatal
            log.warning("component %d (%d images) failed: %s", rank, int(sizes[k]), e)
            continue
        n = len(model.images)
        mark_images(model.meta, n, ~model.images.registered & ~members, "in another connected component")
        mark_images(model.meta, n, ~model.images.registered, "not registered")
        models.append(model)
    models.sort(key=lambda m: int(m.images.registered.sum()), reverse=True)
    if not models:
        raise RuntimeError("no connected component of the view graph could be reconstructed")
    best = models[0]
    report.summary.update({
        "models": len(models),
        "registered_images": f"{int(best.images.registered.sum())} / {len(best.images)}",
        "points3D": len(best.points3D),
        "mean_track_length": round(len(best.tracks) / max(1, len(best.points3D)), 3),
        "mean_reprojection_error_px": float(best.points3D.error.mean()) if len(best.points3D) else math.nan,
    })
    reasons = image_reasons(best.meta, len(best.images))
    report.skipped.extend({"image": best.images.name[i], "reason": reasons[i]}
                          for i in torch.nonzero(~best.images.registered)[:, 0].tolist())
    return models, report
