"""Global positioning: camera centres and 3D points from known rotations (GLOMAP's BATA cost).

For every observation o of point X by image i with world-frame unit bearing v_o = R_i^T b_o:
    r_o = v_o - s_o (X - c_i),   s_o > 0
with one free scale per observation. The scales are eliminated per observation inside the
problem by variable projection: at every trial point each scale is set to its optimum
v.d/|d|^2, clamped to stay positive, and the Jacobians are projected accordingly (the exact
1x1 Schur complement of the scale blocks). The solver then sees a plain camera/point problem:
camera blocks are centres (3), eliminated blocks are points (3, Schur). Starts from a seeded
random layout, as GLOMAP and InstantSfM do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..data.model import Points3D, Reconstruction
from ..solver.options import SolverOptions
from ..solver.problem import Linearization, Step, compact_param_map
from .triangulation import bearings

log = logging.getLogger(__name__)


def _gp_solver_defaults() -> SolverOptions:
    return SolverOptions(loss="huber", loss_scale=0.1, max_iterations=100, function_tolerance=1e-7,
                         initial_trust_region_radius=1e3)


@dataclass
class GlobalPositioningOptions:
    seed: int = 0
    init_extent: float = 100.0  # random initial centres and points in [-extent, extent]^3
    min_scale: float = 1e-5  # lower bound of the per-observation scales
    min_track_length: int = 3  # tracks used by positioning (longer ones constrain more)
    max_angle_error: float = 1.0  # degrees: observations whose ray disagrees more are dropped after
    uncalibrated_weight: float = 0.5  # residual weight of images whose camera has no focal prior
    solver: SolverOptions = field(default_factory=_gp_solver_defaults)


class PositioningProblem:
    """The BATA problem in the solver's interface (see torchsfm/solver/problem.py)."""

    cam_dim = 3
    point_dim = 3

    def __init__(self, centers: Tensor, points: Tensor, rays_world: Tensor, cam_index: Tensor, point_index: Tensor,
                 weight: Tensor, fixed_cam: int, min_scale: float):
        self.c, self.X = centers, points
        self.v, self.w = rays_world, weight
        self.cam_index, self.point_index = cam_index, point_index
        self.num_cams, self.num_points = centers.shape[0], points.shape[0]
        self.min_scale = min_scale
        self.s = self._optimal_scales(centers, points)
        pm = torch.arange(self.num_cams * 3, device=centers.device).reshape(self.num_cams, 3)
        pm[fixed_cam] = -1  # the translation gauge
        self.cam_param_map = compact_param_map(pm)[0]
        self._trial_s: Tensor | None = None

    def _parts(self, c: Tensor, X: Tensor, s: Tensor):
        d = X[self.point_index] - c[self.cam_index]
        r = self.w[:, None] * (self.v - s[:, None] * d)
        return d, r

    def _optimal_scales(self, c: Tensor, X: Tensor) -> Tensor:
        d = X[self.point_index] - c[self.cam_index]
        return ((self.v * d).sum(1) / d.square().sum(1).clamp_min(1e-300)).clamp_min(self.min_scale)

    def linearize(self) -> Linearization:
        # The scales are at their optimum for the current (c, X) (see residuals), so eliminating
        # ds from the linear model (the 1x1 Schur complement of each scale) projects the
        # Jacobians onto the plane orthogonal to d: J' = (I - dd^T/|d|^2) J, Kaufman's
        # variable-projection Jacobian.
        d, r = self._parts(self.c, self.X, self.s)
        dh = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
        Pm = torch.eye(3, dtype=d.dtype, device=d.device) - dh[:, :, None] * dh[:, None, :]
        Jc = Pm * (self.w * self.s)[:, None, None]  # dr/dc = w s I, dr/dX = -w s I
        return Linearization(r, Jc, -Jc)

    def residuals(self, step: Step | None = None) -> Tensor:
        if step is None:
            return self._parts(self.c, self.X, self.s)[1]
        c, X = self.c + step.cams, self.X + step.points
        s = self._optimal_scales(c, X)  # variable projection: scales re-solved, kept positive
        self._trial_s = s
        return self._parts(c, X, s)[1]

    def accept(self, step: Step) -> None:
        self.c = self.c + step.cams
        self.X = self.X + step.points
        self.s = self._trial_s if self._trial_s is not None else self._optimal_scales(self.c, self.X)
        self._trial_s = None

    def parameter_norm(self) -> float:
        return float(torch.sqrt(self.c.square().sum() + self.X.square().sum() + self.s.square().sum()))


def global_positioning(rec: Reconstruction, options: GlobalPositioningOptions | None = None
                       ) -> tuple[Reconstruction, dict]:
    """Centres and points for the registered images of `rec` (rotations known, `rec.tracks` =
    track ids). Returns the posed reconstruction with triangulated-by-positioning points."""
    from ..solver.lm import solve

    opt = options or GlobalPositioningOptions()
    dev, dt = rec.device, rec.dtype
    reg = rec.images.registered
    tr = rec.tracks
    keep = reg[tr.image]
    num_tracks = int(tr.point.max()) + 1 if len(tr) else 0
    lengths = torch.bincount(tr.point[keep], minlength=num_tracks)
    keep &= lengths[tr.point] >= opt.min_track_length
    obs_image, obs_track, obs_kp = tr.image[keep], tr.point[keep], tr.keypoint[keep]
    if obs_image.numel() == 0:
        raise RuntimeError("global positioning: no track with enough observations in registered images")
    # dense numbering of the images and tracks that take part
    img_ids, cam_index = torch.unique(obs_image, return_inverse=True)
    trk_ids, point_index = torch.unique(obs_track, return_inverse=True)
    R = rec.images.rotation
    b = bearings(rec, obs_image, obs_kp)
    v = (R[obs_image].transpose(1, 2) @ b[:, :, None])[:, :, 0]
    prior = rec.cameras.has_prior_focal_length[rec.images.camera[obs_image]]
    w = torch.where(prior, torch.ones_like(v[:, 0]), torch.full_like(v[:, 0], opt.uncalibrated_weight))
    gen = torch.Generator().manual_seed(opt.seed)
    c0 = ((torch.rand(img_ids.numel(), 3, generator=gen, dtype=torch.float64) * 2 - 1) * opt.init_extent).to(dev, dt)
    X0 = ((torch.rand(trk_ids.numel(), 3, generator=gen, dtype=torch.float64) * 2 - 1) * opt.init_extent).to(dev, dt)
    problem = PositioningProblem(c0, X0, v, cam_index, point_index, w, fixed_cam=0, min_scale=opt.min_scale)
    summary = solve(problem, opt.solver)
    log.info("global positioning: %s", summary.brief())
    # poses: t = -R c
    centers = torch.zeros(len(rec.images), 3, dtype=dt, device=dev)
    centers[img_ids] = problem.c
    images = rec.images.clone()
    images.trans = -(R @ centers[:, :, None])[:, :, 0]
    images.registered = torch.zeros_like(reg)
    images.registered[img_ids] = True
    # drop observations whose ray disagrees with the solved geometry
    d = problem.X[point_index] - problem.c[cam_index]
    cosang = (v * d).sum(1) / d.norm(dim=1).clamp_min(1e-300)
    good = cosang >= torch.cos(torch.deg2rad(torch.tensor(opt.max_angle_error, dtype=dt)))
    from ..data.model import Tracks

    tracks = Tracks(point_index[good], obs_image[good], obs_kp[good])
    order = torch.argsort(tracks.point, stable=True)
    tracks = Tracks(tracks.point[order], tracks.image[order], tracks.keypoint[order])
    n = trk_ids.numel()
    pts = Points3D(torch.arange(1, n + 1, device=dev), problem.X.clone(), torch.zeros(n, 3, dtype=torch.uint8, device=dev),
                   -torch.ones(n, dtype=dt, device=dev))
    out = Reconstruction(rec.cameras, images, rec.keypoints, pts, tracks, rec.view_graph, dict(rec.meta))
    counts = {"images": int(img_ids.numel()), "points": n, "observations": int(good.sum()),
              "observations_dropped": int((~good).sum()), "initial_cost": summary.initial_cost,
              "final_cost": summary.final_cost, "iterations": summary.iterations, "termination": summary.termination}
    return out, counts
