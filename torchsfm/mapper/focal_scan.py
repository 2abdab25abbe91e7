"""Focal length by rotation closure: a scan for cameras whose focal length is only a prior.

Without EXIF a camera starts at the prior focal length (1.2 x the longer image side), which can
be 2x off (templeRing: 768 px against 1,523; a phone's is about 0.8 x its longer side).
View-graph calibration finds focal lengths from fundamental matrices, but not where the optical
axes meet in one point (a ring or sphere fixating an object: the calibration check then keeps
the prior). With the wrong focal length every relative rotation is bent, so the rotations around
a triangle of the view graph do not compose to the identity; at the right one they do. That
holds on fixating rings too: rotation closure is the constraint F lacks there.

The scan: for focal lengths `scale` x the current ones (log-spaced over [min_scale, max_scale]),
each pair's relative pose is refined on its matches at that focal length (the batched Sampson
Levenberg-Marquardt of `geometry.epipolar`, continued from the neighbouring scale, starting from
the stored two-view poses), and the view graph's triangles measured by their cycle error
relative to the size of their rotations (median over triangles; the absolute error shrinks with
the rotations at short focal lengths and would favour the shortest). The minimum, refined by a
parabola in log scale, becomes every scanned camera's focal length when it lies clearly below
the measure at the current focal lengths and at both ends of the range. One common scale for the
scanned cameras: their priors share one rule, and view-graph calibration and bundle adjustment
refine each camera from there. The mapper runs it after view-graph calibration, on the cameras
whose focal length that left unchanged (rejected by the calibration check, degenerate, or priors
held fixed): where F determines the focal length, its estimate is the better one (kitchen's
subsets lost up to 23 points of AUC@3 with the scan in its place). The mapper then estimates
every relative pose by RANSAC, as the stored ones were found with the old focal lengths.

Measured (README, mapper step 1): with SIFT it lands within 5 % of the calibration on
templeRing and dtu_scan24, with ALIKED 0-29 % (noisier keypoints); on synthetic rings whose
prior is 0.5-1.6x the true focal length within 8 %. Off by default: on the shared scenes it does
not beat the recalibrated second pass (`recalibration`). All of it in torch on whole batches; the
only host reads are the triangle enumeration's and one after all scales.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..cameras.models import focal_length, scaled_focal_params
from ..data.model import TWO_VIEW_CALIBRATED, TWO_VIEW_PLANAR, TWO_VIEW_UNCALIBRATED, Reconstruction
from ..geometry import so3
from ..geometry.epipolar import refine_relative_poses
from ..segments import spread_subset
from .graph import active_images, stage_copy, triangles
from .loop_consistency import cycle_errors_deg
from .triangulation import normalized_matches

log = logging.getLogger(__name__)

MODES = ("auto", "always", "never")
# configurations with a two-view pose that has a baseline (panoramic pairs have none)
_SCANNED_CONFIGS = (TWO_VIEW_CALIBRATED, TWO_VIEW_UNCALIBRATED, TWO_VIEW_PLANAR)


@dataclass
class FocalScanOptions:
    # never (default: measured no better than the recalibrated second pass on the shared scenes);
    # auto: cameras without a prior focal length (no EXIF); always: every camera (a focal length
    # from EXIF that may be wrong)
    mode: str = "never"
    min_scale: float = 0.4  # of the current focal lengths
    max_scale: float = 2.5
    num_scales: int = 21  # log-spaced over [min_scale, max_scale], plus 1 itself
    max_triangles: int = 2000  # a random sample of the view graph's triangles
    max_matches: int = 256  # per pair, evenly spread over its matches
    iterations: int = 8  # Levenberg-Marquardt iterations per scale (continued from the last)
    loss_scale: float = 1.0  # pixels: Cauchy scale of the Sampson error
    min_triangles: int = 10  # fewer: nothing to measure, nothing changed
    # the minimum must lie this fraction below the measure at the current focal lengths and at
    # both ends of the range
    min_improvement: float = 0.1
    max_lookups: int = 50_000_000  # triangle enumeration bound (graph.triangles); denser: sampled pairs
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"focal scan mode must be one of {MODES}, not {self.mode!r}")
        if not 0 < self.min_scale < 1 < self.max_scale:
            raise ValueError("focal scan: need 0 < min_scale < 1 < max_scale")
        if self.num_scales < 3:
            raise ValueError("focal scan: num_scales must be >= 3")


@dataclass
class FocalScanReport:
    applied: bool = False
    reason: str = ""
    cameras: int = 0  # cameras scanned
    pairs: int = 0
    triangles: int = 0
    scale: float = 1.0  # applied to the scanned cameras' focal lengths (1 when not applied)
    focal_before: float = float("nan")  # median over the scanned cameras
    focal_after: float = float("nan")
    measure_at_start: float = float("nan")  # median relative cycle error (%) at the current focal lengths
    measure_at_scale: float = float("nan")
    scales: list = field(default_factory=list)
    measures: list = field(default_factory=list)

    def counts(self) -> dict:
        out = {k: getattr(self, k) for k in ("applied", "reason", "cameras", "pairs", "triangles")}
        out.update({k: round(getattr(self, k), 4) for k in ("scale", "focal_before", "focal_after",
                                                              "measure_at_start", "measure_at_scale")})
        return out


def _scales(o: FocalScanOptions) -> list[float]:
    lo, hi = math.log(o.min_scale), math.log(o.max_scale)
    grid = [math.exp(lo + (hi - lo) * k / (o.num_scales - 1)) for k in range(o.num_scales)]
    return sorted(set([s for s in grid if abs(math.log(s)) > 1e-9] + [1.0]))


def _sample_triangles(num_images: int, pairs: Tensor, o: FocalScanOptions, gen: torch.Generator) -> Tensor | None:
    tri = triangles(num_images, pairs, max_lookups=o.max_lookups)
    if tri is None:  # too dense to enumerate: the triangles of a random fifth of the pairs, again and again
        keep = torch.rand(pairs.shape[0], generator=gen).to(pairs.device) < 0.2
        sub = torch.nonzero(keep)[:, 0]
        t = _sample_triangles(num_images, pairs[sub], o, gen)
        return None if t is None else sub[t]
    if tri.shape[0] > o.max_triangles:
        pick = torch.randperm(tri.shape[0], generator=gen)[: o.max_triangles].to(tri.device)
        tri = tri[pick]
    return tri


def _relative_closure(pairs: Tensor, R: Tensor, tri: Tensor) -> Tensor:
    """Median over triangles of cycle error / (sum of the triangle's rotation angles), in %."""
    err = cycle_errors_deg(pairs, R, tri)
    angle = torch.rad2deg(so3.log(R).norm(dim=-1))
    return 100 * (err / angle[tri].sum(1).clamp_min(1e-6)).median()


def scan_focal_length(rec: Reconstruction, options: FocalScanOptions | None = None, calibrated: Tensor | None = None
                      ) -> tuple[Reconstruction, FocalScanReport]:
    """`rec` with the scanned cameras' focal lengths scaled to the scan's minimum (or unchanged,
    with the reason in the report). `calibrated` (C,) bool: cameras whose focal length something
    better already set (view-graph calibration), left out of the scan."""
    o = options or FocalScanOptions()
    o.validate()
    report = FocalScanReport()
    cams, images, vg = rec.cameras, rec.images, rec.view_graph
    if o.mode == "never":
        report.reason = "off"
        return rec, report
    dev, dt = cams.params.device, cams.params.dtype
    active = active_images(rec.meta, len(images), dev)
    tn = vg.rel_trans.norm(dim=1)
    posed = (vg.valid & active[vg.pairs].all(1) & (tn > 0) & torch.isfinite(tn) & torch.isfinite(vg.rel_quat).all(1)
             & torch.isin(vg.config, torch.tensor(_SCANNED_CONFIGS, device=vg.config.device)))
    scanned = torch.ones(len(cams), dtype=torch.bool, device=dev)
    if o.mode == "auto":
        scanned &= ~cams.has_prior_focal_length.to(dev)
    if calibrated is not None:
        scanned &= ~calibrated.to(dev)
    in_graph = torch.zeros(len(cams), dtype=torch.bool, device=dev)
    in_graph[images.camera[vg.pairs[posed].reshape(-1)]] = True
    scanned &= in_graph
    report.cameras = int(scanned.sum())
    if report.cameras == 0:
        report.reason = ("no camera to scan (every camera in the view graph has a prior focal length or was "
                         "calibrated from the view graph)")
        return rec, report

    rows = torch.nonzero(posed)[:, 0]
    gen = torch.Generator().manual_seed(o.seed)
    tri = _sample_triangles(len(images), vg.pairs[rows], o, gen)
    if tri is None or tri.shape[0] < o.min_triangles:
        report.triangles = 0 if tri is None else int(tri.shape[0])
        report.reason = f"fewer than {o.min_triangles} triangles in the view graph"
        return rec, report
    used, tri = torch.unique(tri, return_inverse=True)  # local pair rows of the sampled triangles
    rows = rows[used]
    pairs = vg.pairs[rows]
    report.pairs, report.triangles = int(rows.numel()), int(tri.shape[0])

    # at most max_matches matches per used pair, normalised at the current intrinsics
    local = torch.full((len(vg),), -1, dtype=torch.long, device=dev)
    local[rows] = torch.arange(rows.numel(), device=dev)
    pm = vg.pair_of_match()
    in_use = local[pm] >= 0
    take = torch.zeros_like(in_use)
    idx = torch.nonzero(in_use)[:, 0]
    take[idx[spread_subset(local[pm[idx]], rows.numel(), o.max_matches)]] = True
    x1, x2 = normalized_matches(rec, take)
    pair = local[pm[take]]
    f = focal_length(cams)[images.camera]
    cam1, cam2 = images.camera[vg.pairs[pm[take], 0]], images.camera[vg.pairs[pm[take], 1]]
    ok = torch.isfinite(x1).all(1) & torch.isfinite(x2).all(1)
    x1, x2, pair, cam1, cam2 = x1[ok], x2[ok], pair[ok], cam1[ok], cam2[ok]
    f1, f2 = f[vg.pairs[pm[take], 0]][ok], f[vg.pairs[pm[take], 1]][ok]
    on1, on2 = scanned[cam1][:, None], scanned[cam2][:, None]

    R0 = so3.quat_to_matrix(so3.quat_normalize(vg.rel_quat[rows].to(dt)))
    t0 = (vg.rel_trans[rows] / tn[rows, None]).to(dt)
    scales = _scales(o)
    measures: dict[float, Tensor] = {}
    start = (R0, t0)
    for sweep in ([s for s in scales if s >= 1], [s for s in reversed(scales) if s < 1]):
        R, t = start
        for s in sweep:
            s1 = torch.where(on1, s, 1.0).to(dt)
            s2 = torch.where(on2, s, 1.0).to(dt)
            R, t, _ = refine_relative_poses(x1 / s1, x2 / s2, pair, R, t, f1 * s1[:, 0], f2 * s2[:, 0], o.loss_scale,
                                            o.iterations, None)
            measures[s] = _relative_closure(pairs, R, tri)
            if s == 1.0:
                start = (R, t)  # the downward sweep continues from the current focal lengths
    m = torch.stack([measures[s] for s in scales]).cpu().tolist()  # the one host read of the scan
    report.scales, report.measures = [round(s, 4) for s in scales], [round(v, 4) for v in m]
    k1 = scales.index(1.0)
    k = min(range(len(m)), key=lambda i: (not math.isfinite(m[i]), m[i]))
    report.measure_at_start, report.measure_at_scale = m[k1], m[k]
    fs = focal_length(cams)[scanned]
    report.focal_before = report.focal_after = float(fs.median())
    if not math.isfinite(m[k]):
        report.reason = "no finite measure"
        return rec, report
    # a true minimum rises clearly towards both ends of the range (a measure still falling at an
    # end can show a shallow dip just inside it)
    if k in (0, len(m) - 1) or not m[k] <= (1 - o.min_improvement) * min(m[0], m[-1]):
        report.reason = "no clear minimum inside the scanned range (at or near its edge)"
        return rec, report
    if not m[k] <= (1 - o.min_improvement) * m[k1]:
        report.reason = "no clear minimum away from the current focal lengths"
        return rec, report
    # parabola through the minimum and its neighbours, in log scale
    xa, xb, xc = (math.log(scales[i]) for i in (k - 1, k, k + 1))
    ya, yb, yc = m[k - 1], m[k], m[k + 1]
    den = (xa - xb) * (xa - xc) * (xb - xc)
    a = (xc * (yb - ya) + xb * (ya - yc) + xa * (yc - yb)) / den
    b = (xc * xc * (ya - yb) + xb * xb * (yc - ya) + xa * xa * (yb - yc)) / den
    x = -b / (2 * a) if a > 0 else xb
    scale = math.exp(min(max(x, xa), xc))
    out = stage_copy(rec, "cameras")
    out.cameras.params = scaled_focal_params(cams, torch.where(scanned, scale, 1.0).to(dt))
    report.applied, report.scale = True, scale
    report.focal_after = float(focal_length(out.cameras)[scanned].median())
    report.reason = "applied"
    log.info("focal scan: %d camera(s) from %.0f to %.0f px (median; relative cycle error %.2f%% -> %.2f%% on %d "
             "triangles)", report.cameras, report.focal_before, report.focal_after, m[k1], m[k], report.triangles)
    return out, report
