"""The global mapper: a verified view graph in, one COLMAP-style model per connected component out.

Stages, each `(data, options) -> (new data, report)`, composed in GLOMAP's order:
view-graph calibration [-> focal scan by rotation closure, off by default] -> relative poses ->
loop consistency (ours: drops pairs that no triangle of the view graph confirms, on graphs that
wrong pairs dominate) -> rotation averaging -> tracks ->
global positioning -> bundle-adjustment rounds with filtering -> retriangulation -> final BA ->
normalisation. When bundle adjustment moved a focal length by more than 5 % from the one the
global stages used, all of it runs once more from the adjusted one (`recalibration`).

Reliability (see docs/fault-cases.md):
- non-finite values are looked for in the input and after every stage and quarantined
  (`_check_finite`); a stage that breaks most images is an error naming it;
- a scene without parallax (every pair explained by a pure rotation) gives a rotation-only model
  with a warning instead of positions made of noise; many inconsistent pairs in rotation
  averaging give a symmetry warning; cameras far from all others after positioning, or left
  with too few observations, are dropped with a warning;
- global positioning and bundle adjustment retry out-of-memory failures with smaller chunks,
  the implicit solver, then the CPU (`torchsfm.runtime.memory`);
- with a `CheckpointStore`, the state is saved after every major step and a rerun resumes from
  the latest one with an identical result (`torchsfm.mapper.checkpoint`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..ba.bundle_adjustment import BundleAdjustmentOptions, bundle_adjust
from ..cameras.models import focal_length
from ..config import to_dict
from ..data.model import Points3D, Reconstruction, Tracks
from ..geometry import so3
from ..report import RunReport, StageReport, solver_progress
from ..runtime import resolve_device
from ..runtime.memory import MemoryFallbackOptions, OutOfMemory, run_with_memory_fallback
from .checkpoint import Checkpoint, CheckpointStore, rng_state, set_rng_state
from .degeneracy import DegeneracyOptions, detect_no_parallax, outlier_cameras, symmetry_warning
from .finite import check_finite
from .global_positioning import GlobalPositioningOptions, global_positioning
from .problem_caps import capped_bundle_adjust
from .graph import connected_components, image_reasons, mark_images
from .loop_consistency import LoopConsistencyOptions, filter_by_loop_consistency
from .recalibration import RecalibrationOptions, recalibrated_input
from .relative_pose import RelativePoseOptions, estimate_relative_poses
from .rotation_averaging import RotationAveragingOptions, rotation_averaging
from .tracks import TrackOptions, establish_tracks
from .triangulation import (
    FilterOptions,
    TriangulationOptions,
    compact_tracks,
    filter_reconstruction,
    triangulate_tracks,
)
from .calibration_check import CalibrationCheckOptions, check_calibration
from .focal_scan import FocalScanOptions, scan_focal_length
from .image_keeping import ImageKeepingOptions, complete_weak_images, keep_far_cameras
from .intrinsics_selection import IntrinsicsSelectionOptions, describe, select_intrinsics
from .track_merging import TrackMergingOptions, merge_tracks
from .view_graph_calibration import ViewGraphCalibrationOptions, calibrate_view_graph

log = logging.getLogger(__name__)

REASON_OUTLIER_POSITION = "outlier_position_after_global_positioning"
REASON_FEW_OBSERVATIONS = "too_few_observations"
REASON_OTHER_COMPONENT = "in another connected component"


def _retriangulation_tracks() -> TrackOptions:
    return TrackOptions(min_track_length=2)


@dataclass
class MapperOptions:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    # precision of the model and every solver (float32: what GPUs run fast; the solvers keep
    # their cost sums in float64; PoseLib estimates the relative poses in float64 either way)
    dtype: str = "float64"  # float64 | float32
    min_component_size: int = 3  # images; smaller components are not reconstructed
    max_num_models: int = 10
    skip_view_graph_calibration: bool = False
    # focal lengths that view-graph calibration left unchanged set by rotation closure
    # (focal_scan; off by default)
    focal_scan: FocalScanOptions = field(default_factory=FocalScanOptions)
    skip_retriangulation: bool = False
    # reprojection thresholds (pixels) of the filtering after each BA round
    ba_round_max_reprojection: tuple[float, ...] = (8.0, 4.0, 2.0)
    min_triangulation_angle: float = 1.5  # degrees
    # after the rounds, a last filter at the last threshold capped at this many noise sigmas
    # (estimated from the median reprojection error; 0 = no cap), not below filter_min_reprojection
    # pixels, and a last BA on what it kept
    filter_noise_sigmas: float = 4.0
    filter_min_reprojection: float = 0.5
    # a BA round is skipped when the last BA converged and its filters since removed at most this
    # share of the observations: it would not move the model (the final BA follows anyway)
    ba_round_skip_max_removed: float = 0.001
    # the rounds before retriangulation solve on the tracks each image nominates, at most this
    # many per image, long and spread (problem_caps; None: all); the rest of the points are
    # refined with the cameras held, and the final rounds use every observation
    ba_max_tracks_per_image: int | None = 100
    normalize_extent: float = 10.0  # scene scaled so that the 10-90% camera box has this diagonal
    # a stage giving non-finite values for more than this share of the images is an error
    max_nonfinite_fraction: float = 0.5
    view_graph_calibration: ViewGraphCalibrationOptions = field(default_factory=ViewGraphCalibrationOptions)
    calibration_check: CalibrationCheckOptions = field(default_factory=CalibrationCheckOptions)
    relative_pose: RelativePoseOptions = field(default_factory=RelativePoseOptions)
    loop_consistency: LoopConsistencyOptions = field(default_factory=LoopConsistencyOptions)
    rotation_averaging: RotationAveragingOptions = field(default_factory=RotationAveragingOptions)
    tracks: TrackOptions = field(default_factory=TrackOptions)
    global_positioning: GlobalPositioningOptions = field(default_factory=GlobalPositioningOptions)
    bundle_adjustment: BundleAdjustmentOptions = field(default_factory=BundleAdjustmentOptions)
    retriangulation_tracks: TrackOptions = field(default_factory=_retriangulation_tracks)
    triangulation: TriangulationOptions = field(default_factory=TriangulationOptions)
    # retriangulated points that a match joins and one point explains are merged (track_merging)
    track_merging: TrackMergingOptions = field(default_factory=TrackMergingOptions)
    # weak or far images repaired before any is dropped (image_keeping)
    image_keeping: ImageKeepingOptions = field(default_factory=ImageKeepingOptions)
    # each camera's principal point / distortion model, chosen after the last BA (intrinsics_selection)
    intrinsics: IntrinsicsSelectionOptions = field(default_factory=IntrinsicsSelectionOptions)
    # another mapping pass from the focal lengths bundle adjustment found, when they differ from
    # those the global stages used (recalibration)
    recalibration: RecalibrationOptions = field(default_factory=RecalibrationOptions)
    degeneracy: DegeneracyOptions = field(default_factory=DegeneracyOptions)
    memory: MemoryFallbackOptions = field(default_factory=MemoryFallbackOptions)


def _check_finite(rec: Reconstruction, stage: str, max_fraction: float = 0.5,
                  report: RunReport | None = None) -> Reconstruction:
    """NaN/Inf after a stage: quarantine the cameras, keypoints, pairs, images and points
    concerned, with a warning (`torchsfm.mapper.finite.check_finite`). Returns the cleaned
    reconstruction; raises NonFiniteError when more than `max_fraction` of the images are hit."""
    rec, warnings = check_finite(rec, stage, max_fraction)
    if warnings and report is not None:
        _add_warnings(report, warnings)
    return rec


def _add_warnings(report: RunReport, warnings: list[str], stage: StageReport | None = None) -> None:
    """Warnings go to `stage` (default: the last finished stage) and are counted in the summary."""
    stage = stage or (report.stages[-1] if report.stages else None)
    if stage is not None:
        stage.warnings.extend(warnings)
    report.summary["warnings"] = int(report.summary.get("warnings", 0)) + len(warnings)


def normalize(rec: Reconstruction, extent: float) -> Reconstruction:
    """Centre the registered cameras at the origin and scale them to a fixed extent (GLOMAP).

    The similarity is recorded in `meta["normalization"]` = {"scale": s, "center": c}: a point
    x of the model before normalisation is s (x - c) after it, so x = c + x' / s."""
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
    out.meta["normalization"] = {"scale": s, "center": [float(v) for v in mid]}
    return out


def _deregister(rec: Reconstruction, drop, reason: str) -> Reconstruction:
    """Unregister images `drop` (bool (I,)), record why, and remove their observations (points
    left with fewer than two are dropped)."""
    out = Reconstruction(rec.cameras, dataclasses.replace(rec.images), rec.keypoints, rec.points3D, rec.tracks,
                         rec.view_graph, dict(rec.meta))
    out.images.registered = rec.images.registered & ~drop
    mark_images(out.meta, len(out.images), drop, reason)
    keep_obs = ~drop[out.tracks.image]
    keep_pt = torch.ones(len(out.points3D), dtype=torch.bool, device=rec.device)
    return compact_tracks(out, out.points3D.xyz, out.tracks, keep_obs, keep_pt, 2)


class _Run:
    """One mapping run: options, report, device, checkpoints and the step counter."""

    def __init__(self, opt: MapperOptions, report: RunReport, dev: torch.device, store: CheckpointStore | None,
                 prefix: str = ""):
        self.opt, self.report, self.dev, self.store, self.prefix = opt, report, dev, store, prefix
        self.seq = 0
        self.base: Reconstruction | None = None  # the common-phase result, shared by component states
        self.base_seq = -1
        self.report_base = len(report.stages)  # stages before the mapper's (load_database, front end)
        self.memory_events: list = []

    def stage(self, name: str, device=None):
        """A report stage; a recalibrated pass's stages carry its prefix."""
        return self.report.stage(self.prefix + name, device)

    def check(self, rec: Reconstruction, stage: str, st: StageReport | None = None) -> Reconstruction:
        rec, warnings = check_finite(rec, stage, self.opt.max_nonfinite_fraction)
        if warnings:
            _add_warnings(self.report, warnings, st)
        return rec

    def warn(self, msg: str) -> None:
        log.warning(msg)
        _add_warnings(self.report, [msg])

    def solve(self, st: StageReport, fn: Callable, rec: Reconstruction) -> Reconstruction:
        """fn(rec, options) -> rec inside stage `st`, with the out-of-memory fallbacks."""
        n = len(self.memory_events)
        out = run_with_memory_fallback(st.name, fn, rec, self.opt, self.opt.memory, self.memory_events)
        if len(self.memory_events) > n:
            self.report.summary["memory_fallbacks"] = list(self.memory_events)
            st.warnings.extend(f"out of memory: {e['attempt']} -> {e['result']}" for e in self.memory_events[n:])
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, phase: str, component: int, step: int, name: str, rec: Reconstruction,
             models: list[Reconstruction]) -> None:
        self.seq += 1
        name = self.prefix + name
        if self.store is None:
            return
        snap = {"stages": [to_dict(s) for s in self.report.stages[self.report_base:]],
                "summary": dict(self.report.summary)}
        base, base_seq = (self.base, self.base_seq) if phase == "component" else (None, -1)
        self.store.save(Checkpoint(self.seq, name, phase, component, step, rec, list(models), snap, rng_state(),
                                   base=base, base_seq=base_seq))

    def restore(self, ck: Checkpoint) -> None:
        self.seq = ck.seq
        stages = [StageReport(**s) for s in ck.report.get("stages", [])]
        self.report.stages[self.report_base:] = stages
        self.report.summary.update(ck.report.get("summary", {}))
        self.memory_events = list(self.report.summary.get("memory_fallbacks", []))
        if ck.rng is not None:
            set_rng_state(ck.rng)
        with self.report.stage("resume") as st:
            st.counts.update({"from_checkpoint": ck.name, "file": str(ck.path)})
        log.info("resuming from checkpoint %s (%s)", ck.name, ck.path)


# -- steps before the split into components ----------------------------------------------------

def _calibration_step(rec: Reconstruction, run: _Run) -> Reconstruction:
    f0 = focal_length(rec.cameras)
    if not run.opt.skip_view_graph_calibration:
        with run.stage("view_graph_calibration", run.dev) as st:
            calibrated, r = calibrate_view_graph(rec, run.opt.view_graph_calibration)
            st.record(r)
        with run.stage("calibration_check", run.dev) as st:
            rec, counts = check_calibration(rec, calibrated, run.opt.calibration_check,
                                            run.opt.relative_pose.num_threads)
            st.counts.update(counts)
        rec = run.check(rec, "view-graph calibration")
    if run.opt.focal_scan.mode == "never":
        return rec
    with run.stage("focal_scan", run.dev) as st:
        # only where view-graph calibration left the focal length as it was (rejected by the
        # check, degenerate, or a prior held fixed): where it holds, it is the better estimate
        rec, r = scan_focal_length(rec, run.opt.focal_scan, calibrated=focal_length(rec.cameras) != f0)
        st.counts.update(r.counts())
    if r.applied:  # the stored two-view poses were found with the old focal lengths
        rec.meta["relative_pose_init"] = "ransac"
    return run.check(rec, "focal scan")


def _relative_pose_step(rec: Reconstruction, run: _Run) -> Reconstruction:
    with run.stage("relative_poses", run.dev) as st:
        # components are mapped one by one, so none is dropped here (the options stay untouched)
        relopt = dataclasses.replace(run.opt.relative_pose, keep_largest_component=False,
                                     init=rec.meta.get("relative_pose_init", run.opt.relative_pose.init))
        rec, r = estimate_relative_poses(rec, relopt)
        st.record(r)
    rec = run.check(rec, "relative poses")
    with run.stage("parallax_check", run.dev) as st:
        no_parallax, counts, Rfit = detect_no_parallax(rec, run.opt.degeneracy)
        st.counts.update(counts)
    rec.meta["no_parallax"] = no_parallax
    if no_parallax:
        # rotation-only relative poses (the homography of a rotating camera) for rotation averaging
        vg = rec.view_graph
        rec.view_graph = dataclasses.replace(
            vg, rel_quat=torch.where(vg.valid[:, None], so3.matrix_to_quat(Rfit).to(vg.rel_quat.dtype), vg.rel_quat),
            rel_trans=torch.where(vg.valid[:, None], torch.zeros_like(vg.rel_trans), vg.rel_trans))
        run.report.summary["no_parallax"] = True
        run.warn(f"no parallax: {counts['rotation_only_pairs']} of {counts['pairs']} image pairs are explained by a "
                 "pure rotation (a tripod panorama, or images taken from one spot). Camera positions cannot be "
                 "recovered: the model has rotations only, every centre at the origin and no 3D points")
    return rec


def _loop_consistency_step(rec: Reconstruction, run: _Run) -> Reconstruction:
    if run.opt.loop_consistency.mode == "never":
        return rec
    with run.stage("loop_consistency", run.dev) as st:
        rec, r = filter_by_loop_consistency(rec, run.opt.loop_consistency)
        st.record(r)
    msg = symmetry_warning(r.num_pairs_in, r.num_pairs_dropped, run.opt.degeneracy, "loop consistency")
    if msg:
        run.report.summary["symmetry_suspected"] = True
        run.warn(msg)
    return rec


COMMON_STEPS: list[tuple[str, Callable]] = [("view_graph_calibration", _calibration_step),
                                            ("relative_poses", _relative_pose_step),
                                            ("loop_consistency", _loop_consistency_step)]


# -- steps of one connected component ----------------------------------------------------------

def _rotation_step(rec: Reconstruction, run: _Run, tag: str) -> Reconstruction:
    with run.stage(f"{tag}rotation_averaging", run.dev) as st:
        rec, r = rotation_averaging(rec, run.opt.rotation_averaging)
        st.record(r)
    rec = run.check(rec, "rotation averaging")
    msg = symmetry_warning(r.num_edges_in, r.num_edges_dropped, run.opt.degeneracy)
    if msg:
        run.report.summary["symmetry_suspected"] = True
        run.warn(msg)
    if not bool(rec.images.registered.any()):
        raise RuntimeError("rotation averaging registered no image")
    return rec


def _rotation_only_step(rec: Reconstruction, run: _Run, tag: str) -> Reconstruction:
    """The model of a scene without parallax: rotations, all centres at the origin, no points."""
    with run.stage(f"{tag}rotation_only_model", run.dev) as st:
        dt, dev = rec.dtype, rec.device
        images = dataclasses.replace(rec.images, trans=torch.zeros_like(rec.images.trans))
        e = torch.zeros(0, dtype=torch.long, device=dev)
        pts = Points3D(e.clone(), torch.zeros(0, 3, dtype=dt, device=dev),
                       torch.zeros(0, 3, dtype=torch.uint8, device=dev), torch.zeros(0, dtype=dt, device=dev))
        rec = Reconstruction(rec.cameras, images, rec.keypoints, pts, Tracks(e, e.clone(), e.clone()), rec.view_graph,
                             dict(rec.meta))
        st.counts["registered_images"] = int(images.registered.sum())
    return rec


def _positioning_step(rec: Reconstruction, run: _Run, tag: str) -> Reconstruction:
    with run.stage(f"{tag}tracks", run.dev) as st:
        rec, r = establish_tracks(rec, run.opt.tracks)
        st.record(r)
    rec = run.check(rec, "tracks")
    with run.stage(f"{tag}global_positioning", run.dev) as st:
        def gp(r, o):
            with solver_progress(o.global_positioning, st.name) as gpo:
                out, counts = global_positioning(r, gpo)
            st.counts.update(counts)
            return out

        rec = run.solve(st, gp, rec)
    rec = run.check(rec, "global positioning")
    far = outlier_cameras(rec, run.opt.degeneracy)
    if bool(far.any()) and run.opt.image_keeping.enabled:
        # far is not wrong: a camera is dropped only when no position explains its observations
        with run.stage(f"{tag}far_cameras", run.dev) as st:
            rec, far, counts = keep_far_cameras(rec, far, run.opt.image_keeping)
            st.counts.update(counts)
    if bool(far.any()):
        names = [rec.images.name[i] for i in torch.nonzero(far)[:, 0].tolist()]
        run.warn(f"global positioning placed {len(names)} camera(s) far from all others, and no position explains "
                 f"their observations; dropped as outliers: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
        rec = _deregister(rec, far, REASON_OUTLIER_POSITION)
    return rec


def _filter_options(opt: MapperOptions, max_reprojection: float, noise_capped: bool) -> FilterOptions:
    return FilterOptions(max_reprojection, opt.min_triangulation_angle, 2,
                         opt.filter_noise_sigmas if noise_capped else 0.0, opt.filter_min_reprojection)


_CONVERGED_AT = "observations_at_converged_ba"  # meta: observation count when the last BA converged
_CONVERGED = ("function_tolerance", "gradient_tolerance", "parameter_tolerance")


def _ba_step(k: int, prefix: str, filtered: bool = True):
    """BA round k (skipped when it would not move the model), then its filter (unless not `filtered`)."""
    def step(rec: Reconstruction, run: _Run, tag: str) -> Reconstruction:
        opt = run.opt
        converged = {}
        with run.stage(f"{tag}{prefix}bundle_adjustment_{k + 1}", run.dev) as st:
            at = rec.meta.get(_CONVERGED_AT)
            removed = None if at is None else (at - len(rec.tracks)) / max(at, 1)
            if removed is not None and removed <= opt.ba_round_skip_max_removed:
                st.counts["skipped"] = (f"the last bundle adjustment converged and {removed:.3%} of its "
                                        "observations were filtered since")
            else:
                cap = opt.ba_max_tracks_per_image if not prefix else None  # the rounds before retriangulation

                def ba(r, o):
                    with solver_progress(o.bundle_adjustment, st.name) as bao:
                        out, summary, counts = capped_bundle_adjust(r, bao, cap, bundle_adjust)
                    st.counts.update(counts)
                    st.counts.update({"initial_cost": summary.initial_cost, "final_cost": summary.final_cost,
                                      "iterations": summary.iterations, "termination": summary.termination})
                    converged["yes"] = summary.termination in _CONVERGED
                    return out

                rec = run.solve(st, ba, rec)
                rec.meta.pop(_CONVERGED_AT, None)
        n_obs = len(rec.tracks)
        rec = run.check(rec, "bundle adjustment")  # after the stage closes: its warnings go to it
        if converged.get("yes") and len(rec.tracks) == n_obs:
            rec.meta[_CONVERGED_AT] = n_obs
        if not filtered:
            return rec
        with run.stage(f"{tag}{prefix}filter_{k + 1}", run.dev) as st:
            rec, counts = filter_reconstruction(rec, _filter_options(opt, opt.ba_round_max_reprojection[k], False))
            st.counts.update(counts)
        return rec

    return step


def _noise_filter_step(rec: Reconstruction, run: _Run, tag: str) -> Reconstruction:
    """The last threshold, capped at `filter_noise_sigmas` sigmas of the keypoint noise."""
    opt = run.opt
    with run.stage(f"{tag}noise_filter", run.dev) as st:
        rec, counts = filter_reconstruction(rec, _filter_options(opt, opt.ba_round_max_reprojection[-1], True))
        st.counts.update(counts)
    return rec


def _retriangulation_step(rec: Reconstruction, run: _Run, tag: str) -> Reconstruction:
    rec.meta.pop(_CONVERGED_AT, None)
    with run.stage(f"{tag}retriangulation", run.dev) as st:
        # all tracks again (length >= 2 now), triangulated from the adjusted poses
        tracked, _ = establish_tracks(rec, run.opt.retriangulation_tracks)
        rec, counts = triangulate_tracks(tracked, tracked.tracks, run.opt.triangulation)
        st.counts.update(counts)
        rec, counts = merge_tracks(rec, run.opt.track_merging)  # split tracks that one point explains
        st.counts.update(counts)
    return run.check(rec, "retriangulation")


def _intrinsics_step(out: Reconstruction, run: _Run, tag: str) -> Reconstruction:
    """After the last BA, each camera's intrinsics model is chosen by cross-validation over tracks
    (`intrinsics_selection`): the principal point is freed where that predicts held-out tracks
    better, and the model is refitted with the choice."""
    with run.stage(f"{tag}intrinsics_selection", run.dev) as st:
        res = {}

        def fn(r, o):
            res["out"], res["report"] = select_intrinsics(r, o.bundle_adjustment, o.intrinsics)
            return res["out"]

        out = run.solve(st, fn, out)
        st.counts.update(res["report"])
    if "intrinsics" not in run.report.summary:  # the largest component's (it is mapped first)
        run.report.summary["principal_point_refined"] = res["report"]["principal_point_refined"]
        run.report.summary["intrinsics"] = describe(res["report"])
    return run.check(out, "intrinsics selection")


def _weak_images(rec: Reconstruction, run: _Run) -> Tensor:
    """(I,) registered images with fewer observations than a registered image needs."""
    n_obs = torch.bincount(rec.tracks.image, minlength=len(rec.images))
    return rec.images.registered & (n_obs < run.opt.degeneracy.min_camera_observations)


def _image_keeping_step(rec: Reconstruction, run: _Run, tag: str) -> Reconstruction:
    """Images left with too few observations get what their matches support (image_keeping),
    then one bundle adjustment; what is still too weak is dropped by the finish step."""
    weak = _weak_images(rec, run)
    if not run.opt.image_keeping.enabled or not bool(weak.any()):
        return rec
    with run.stage(f"{tag}image_keeping", run.dev) as st:
        rec, counts = complete_weak_images(rec, weak, run.opt.image_keeping)

        def ba(r, o):
            with solver_progress(o.bundle_adjustment, st.name) as bao:
                return bundle_adjust(r, bao)[0]

        rec = run.solve(st, ba, rec)
        n_obs = torch.bincount(rec.tracks.image, minlength=len(rec.images))
        for name, c in counts.items():
            c["observations_after"] = int(n_obs[rec.images.name.index(name)])
        st.counts["images"] = counts
    rec.meta["image_detail"] = {**rec.meta.get("image_detail", {}), **counts}  # a copy: clones share meta
    return run.check(rec, "image keeping")


def _finish_step(rec: Reconstruction, run: _Run, tag: str) -> Reconstruction:
    """Drop images left with too few observations, then normalise the scene."""
    rec.meta.pop(_CONVERGED_AT, None)  # the BA-round bookkeeping does not belong in the model
    reg = rec.images.registered
    few = _weak_images(rec, run)
    if bool(few.any()) and int((reg & ~few).sum()) >= 2:
        n_obs = torch.bincount(rec.tracks.image, minlength=len(rec.images))
        rows = torch.nonzero(few)[:, 0].tolist()
        names = [f"{rec.images.name[i]} ({int(n_obs[i])})" for i in rows]
        run.warn(f"{len(names)} registered image(s) kept fewer than {run.opt.degeneracy.min_camera_observations} "
                 f"observations (their count in brackets) after the last filtering and after completing their tracks "
                 f"from their matches, and are dropped: {', '.join(names[:10])}")
        details = dict(rec.meta.get("image_detail", {}))  # a copy: clones share meta
        for i in rows:
            details[rec.images.name[i]] = {**details.get(rec.images.name[i], {}), "observations": int(n_obs[i])}
        rec.meta["image_detail"] = details
        rec = _deregister(rec, few, REASON_FEW_OBSERVATIONS)
    with run.stage(f"{tag}normalize", run.dev) as st:
        rec = normalize(rec, run.opt.normalize_extent)
        # x_normalized = scale * (x - center): the report keeps the way back to the mapper's frame
        st.counts.update(rec.meta.get("normalization", {}))
    return rec


def component_steps(opt: MapperOptions, rotation_only: bool) -> list[tuple[str, Callable]]:
    """The steps of one component, in order; a checkpoint follows each."""
    if rotation_only:
        return [("rotation_averaging", _rotation_step), ("rotation_only_model", _rotation_only_step)]
    n = len(opt.ba_round_max_reprojection)
    steps = [("rotation_averaging", _rotation_step), ("global_positioning", _positioning_step)]
    steps += [(f"bundle_adjustment_{k + 1}", _ba_step(k, "")) for k in range(n)]
    if not opt.skip_retriangulation:
        steps.append(("retriangulation", _retriangulation_step))
    steps += [(f"final_bundle_adjustment_{k + 1}", _ba_step(k, "final_")) for k in range(n)]
    # the tightest filter (noise-capped threshold), then the model adjusted once more to what it kept
    steps += [("noise_filter", _noise_filter_step), (f"final_bundle_adjustment_{n + 1}", _ba_step(n, "final_", False))]
    steps += [("image_keeping", _image_keeping_step), ("intrinsics_selection", _intrinsics_step),
              ("finish", _finish_step)]
    return steps


def global_mapping(rec: Reconstruction, options: MapperOptions | None = None, report: RunReport | None = None,
                   checkpoints: CheckpointStore | None = None) -> tuple[list[Reconstruction], RunReport]:
    """Map `rec` (cameras, images, keypoints, view graph; no poses needed) to one model per
    connected component, largest first. Images that could not be registered are listed with a
    reason in each model's `meta['image_reason']` and in the report. When bundle adjustment moved
    a focal length far from the one the global stages used, the mapping runs again from it
    (`torchsfm.mapper.recalibration`).

    With `checkpoints`, the state is saved after every step and the run resumes from the latest
    valid checkpoint of the store (giving the same models as an uninterrupted run)."""
    opt = options or MapperOptions()
    opt.intrinsics.validate()
    opt.recalibration.validate()
    if opt.dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64 or float32, not {opt.dtype!r}")
    report = report or RunReport(command="map")
    dev = resolve_device(opt.device)
    report.device, report.seed = str(dev), opt.seed
    torch.manual_seed(opt.seed)
    run = _Run(opt, report, dev, checkpoints)
    models, used = _mapping_pass(rec, run)
    again_opt = dataclasses.replace(opt, skip_view_graph_calibration=True,
                                    focal_scan=dataclasses.replace(opt.focal_scan, mode="never"),
                                    relative_pose=dataclasses.replace(opt.relative_pose, init="ransac"))
    checked = None
    for k in range(1, opt.recalibration.max_passes + 1):
        with run.stage("recalibration", dev) as st:
            if checked is None:  # the input as the first pass checked it (its warnings were reported then)
                checked, _ = check_finite(rec.to(dev, getattr(torch, opt.dtype)), "input", opt.max_nonfinite_fraction)
            again, counts = recalibrated_input(checked, used, models, opt.recalibration)
            st.record({**counts, "mapped_again": again is not None})
        if again is None:
            break
        changed = ", ".join(f"camera {c}: {a:g} -> {b:g} px" for c, (a, b) in counts["changed"].items())
        log.info("recalibration: bundle adjustment moved focal lengths by up to %.0f%% from those the global stages "
                 "used (%s); mapping again from them (pass %d, relative poses by RANSAC)",
                 100 * counts["max_focal_change"], changed, k + 1)
        report.summary["recalibration"] = f"mapped {k + 1} times, from bundle adjustment's focal lengths ({changed})"
        for key in ("intrinsics", "principal_point_refined"):  # the last pass's
            report.summary.pop(key, None)
        torch.manual_seed(opt.seed)
        store = checkpoints.child(f"pass{k + 1}") if checkpoints is not None else None
        run = _Run(again_opt, report, dev, store, prefix=f"pass{k + 1}/")
        models, used = _mapping_pass(again, run, checked=True)
    return models, _summarise(models, run)


def _components(rec: Reconstruction) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Connected components of the valid view graph: (labels (I,), in_graph (I,) bool, the
    component ids and sizes of the images in a pair)."""
    vg = rec.view_graph
    labels = connected_components(len(rec.images), vg.pairs, vg.valid)
    in_graph = torch.zeros(len(rec.images), dtype=torch.bool, device=rec.device)
    in_graph[vg.pairs[vg.valid].reshape(-1)] = True
    comp_ids, sizes = torch.unique(labels[in_graph], return_counts=True)
    return labels, in_graph, comp_ids, sizes


def _mapping_pass(rec: Reconstruction, run: _Run, checked: bool = False) -> tuple[list[Reconstruction], Tensor]:
    """One mapping of `rec` (`checked`: already through the input check): the common steps,
    then each connected component. Returns the models (largest first) and the focal lengths (C,)
    the global stages used."""
    opt, dev, checkpoints = run.opt, run.dev, run.store
    latest = checkpoints.latest(dev) if checkpoints is not None else None
    if latest is not None:
        run.restore(latest)
        if latest.phase == "common":
            rec, common_done, run.base_seq = latest.rec, latest.step, latest.seq
        else:
            rec, common_done, run.base_seq = latest.base, len(COMMON_STEPS) - 1, latest.base_seq
    else:
        rec = rec.to(dev, getattr(torch, opt.dtype))
        if not checked:
            with run.stage("input_check", dev) as st:
                rec = run.check(rec, "input", st)
        common_done = -1
    if rec.view_graph is None or not bool(rec.view_graph.valid.any()):
        raise ValueError("the view graph has no verified image pairs: nothing to reconstruct")
    for s, (name, fn) in enumerate(COMMON_STEPS):
        if s > common_done:
            rec = fn(rec, run)
            run.save("common", -1, s, name, rec, [])
            run.base_seq = run.seq
    run.base = rec

    vg = rec.view_graph
    labels, _, comp_ids, sizes = _components(rec)
    order = torch.argsort(sizes, descending=True, stable=True)
    resume_comp, resume_step, models = -1, -1, []
    if latest is not None and latest.phase == "component":
        resume_comp, resume_step, models = latest.component, latest.step, list(latest.models)
    steps = component_steps(opt, bool(rec.meta.get("no_parallax", False)))
    failures = []
    for rank, k in enumerate(order.tolist()):
        if rank < resume_comp:
            continue
        if int(sizes[k]) < opt.min_component_size or len(models) >= opt.max_num_models:
            break
        members = labels == comp_ids[k]
        tag = f"model{rank}/" if len(order) > 1 else ""
        if rank == resume_comp:
            sub, first = latest.rec, resume_step + 1
        else:
            # copy-on-write: the component shares every tensor with `rec` except its pair mask
            valid = vg.valid & members[vg.pairs[:, 0]] & members[vg.pairs[:, 1]]
            sub = Reconstruction(rec.cameras, rec.images, rec.keypoints, rec.points3D, rec.tracks,
                                 dataclasses.replace(vg, valid=valid), dict(rec.meta))
            first = 0
        try:
            for s in range(first, len(steps)):
                name, fn = steps[s]
                sub = fn(sub, run, tag)
                if s == len(steps) - 1:
                    n = len(sub.images)
                    mark_images(sub.meta, n, ~sub.images.registered & ~members, REASON_OTHER_COMPONENT)
                    mark_images(sub.meta, n, ~sub.images.registered, "not registered")
                    models.append(sub)
                run.save("component", rank, s, f"{tag}{name}", sub, models)
        except OutOfMemory:
            raise
        except RuntimeError as e:  # a component that cannot be positioned is reported, not fatal
            failures.append(f"component {rank} ({int(sizes[k])} images): {e}")
            log.warning("component %d (%d images) failed: %s", rank, int(sizes[k]), e)
            continue
    models.sort(key=lambda m: int(m.images.registered.sum()), reverse=True)
    if not models:
        largest = int(sizes.max()) if sizes.numel() else 0
        why = "; ".join(failures) if failures else (
            f"the largest has {largest} images; a model needs at least {opt.min_component_size} (min_component_size)")
        raise RuntimeError(f"no connected component of the view graph could be reconstructed ({why})")
    return models, focal_length(rec.cameras)


def _summarise(models: list[Reconstruction], run: _Run) -> RunReport:
    """The run's summary from the last pass's models, and the images in none of them with why."""
    opt, report, rec = run.opt, run.report, run.base
    labels, in_graph, comp_ids, sizes = _components(rec)
    best = models[0]
    in_model = torch.stack([m.images.registered for m in models]).any(0)
    report.summary.update({
        "models": len(models),
        "model_sizes": [{"registered_images": int(m.images.registered.sum()), "points3D": len(m.points3D)}
                        for m in models],
        "images_in_no_model": int((~in_model).sum()),
        "registered_images": f"{int(best.images.registered.sum())} / {len(best.images)}",  # the largest model
        "points3D": len(best.points3D),
        "mean_track_length": round(len(best.tracks) / max(1, len(best.points3D)), 3),
        "mean_reprojection_error_px": float(best.points3D.error.mean()) if len(best.points3D) else math.nan,
    })
    # images in no model, with the reason the largest model recorded (or why their component was not mapped)
    reasons = image_reasons(best.meta, len(best.images))
    details = best.meta.get("image_detail", {})
    comp_size = torch.zeros(len(rec.images), dtype=torch.long, device=rec.device)
    comp_size[in_graph] = sizes[torch.searchsorted(comp_ids, labels[in_graph])]
    for i in torch.nonzero(~in_model)[:, 0].tolist():
        why = reasons[i]
        if why == REASON_OTHER_COMPONENT:
            n = int(comp_size[i])
            why = ("in no verified image pair" if n == 0 else
                   f"its connected component of the view graph ({n} images) was not reconstructed"
                   + (f": fewer than min_component_size={opt.min_component_size}" if n < opt.min_component_size else ""))
        name = best.images.name[i]
        report.skipped.append({"image": name, "reason": why, **({"detail": details[name]} if name in details else {})})
    return report
