"""Global positioning: camera centres and 3D points from known rotations (GLOMAP's BATA cost).

For every observation o of point X by image i with world-frame unit bearing v_o = R_i^T b_o:
    r_o = v_o - s_o (X - c_i),   s_o > 0
with one free scale per observation. The scales are eliminated per observation inside the
problem by variable projection: at every trial point each scale is set to its optimum
v.d/|d|^2, clamped to stay positive, and the Jacobians are projected accordingly (the exact
1x1 Schur complement of the scale blocks). The solver then sees a plain camera/point problem:
camera blocks are centres (3), eliminated blocks are points (3, Schur).

GLOMAP and InstantSfM start BATA from a seeded random layout and need up to 100 LM iterations
(more on long tracks and forward motion, where it often stops at the cap). By default torchsfm
starts it from the minimum of a convex problem instead (`init="convex"`), the least-squares
version of LUD (Ozyesil and Singer) on tracks:
    min sum_o |X - c_i - d_o v_o|^2   subject to d_o >= 1,
with the distances d_o eliminated the same way (d_o = max(1, v.(X - c_i))). The constraint
fixes the scale gauge without a random start, the problem has a single minimum, and Gauss-Newton
reaches it in a few iterations; BATA then only polishes it. `init="random"` is GLOMAP's start.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..data.model import Points3D, Reconstruction, spread_subset
from ..runtime.chunks import row_chunks
from ..solver.options import SolverOptions
from ..solver.problem import Linearization, Step, compact_param_map
from .problem_caps import nominated_tracks
from .triangulation import bearings, triangulate

log = logging.getLogger(__name__)


def _gp_solver_defaults() -> SolverOptions:
    # function tolerance 1e-5, GLOMAP's (OptimizationBaseOptions): with 1e-7 the last 10 of 21
    # iterations on a 10,000-image corridor changed the cost by 0.1 %, and the robustness subsets
    # and the shared scenes give the same models' accuracy with either
    return SolverOptions(loss="huber", loss_scale=0.1, max_iterations=100, function_tolerance=1e-5,
                         initial_trust_region_radius=1e3)


@dataclass
class GlobalPositioningOptions:
    seed: int = 0
    init_extent: float = 100.0  # random initial centres and points in [-extent, extent]^3
    min_scale: float = 1e-5  # lower bound of the per-observation scales
    min_track_length: int = 3  # tracks used by positioning (longer ones constrain more)
    max_angle_error: float = 1.0  # degrees: observations whose ray disagrees more are dropped after
    uncalibrated_weight: float = 0.5  # residual weight of images whose camera has no focal prior
    init: str = "convex"  # convex (LUD-style least squares, see above) | random (GLOMAP)
    max_observations_per_track: int | None = 12  # evenly spread subset solved on (None: all)
    min_observations_per_image: int = 30  # an image with fewer in the subset keeps all of its own
    # tracks solved on: each image nominates at most this many, long and spread (problem_caps;
    # None: all); the others are triangulated from the solved cameras
    max_tracks_per_image: int | None = 100
    init_trim_rounds: int = 1  # convex start solved again without rays off by > the limit below
    init_trim_factor: float = 5.0  # limit: this many median ray angles (at least max_angle_error)
    init_max_iterations: int = 50  # the convex start is solved with `solver`'s options, but these
    init_function_tolerance: float = 1e-4  # (and least squares: no robust loss)
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

    def _rows(self, fn, widths: tuple, soa: bool = False) -> tuple[Tensor, ...]:
        """fn(rows) -> per-observation parts of those rows, written into outputs of the given
        trailing shapes (with `soa`, the solver's layout: observations last), in cache-sized row
        chunks (`runtime.chunks`): the per-observation chains of a 10,000-image corridor (1.8M
        observations) ran 3x slower per observation in one piece, and transposing the whole
        linearisation afterwards took 3.2 s of its positioning."""
        n, ref = self.v.shape[0], self.v
        outs = tuple(ref.new_empty(*w, n) if soa else ref.new_empty(n, *w) for w in widths)
        for c in row_chunks(n, ref.device):
            for o, part in zip(outs, fn(c)):
                if soa:
                    o[..., c] = part.movedim(0, -1)
                else:
                    o[c] = part
        return outs

    def _parts(self, c: Tensor, X: Tensor, s: Tensor, rows):
        d = X[self.point_index[rows]] - c[self.cam_index[rows]]
        r = self.w[rows, None] * (self.v[rows] - s[rows, None] * d)
        return d, r

    def _optimal_scales(self, c: Tensor, X: Tensor) -> Tensor:
        def part(rows):
            d = X[self.point_index[rows]] - c[self.cam_index[rows]]
            return ((self.v[rows] * d).sum(1) / d.square().sum(1).clamp_min(1e-300)).clamp_min(self.min_scale),
        return self._rows(part, ((),))[0]

    def _residuals(self, c: Tensor, X: Tensor, s: Tensor) -> Tensor:
        return self._rows(lambda rows: (self._parts(c, X, s, rows)[1],), ((3,),))[0]

    def linearize(self) -> Linearization:
        # The scales are at their optimum for the current (c, X) (see residuals), so eliminating
        # ds from the linear model (the 1x1 Schur complement of each scale) projects the
        # Jacobians onto the plane orthogonal to d: J' = (I - dd^T/|d|^2) J, Kaufman's
        # variable-projection Jacobian.
        def part(rows):
            d, r = self._parts(self.c, self.X, self.s, rows)
            dh = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
            Pm = torch.eye(3, dtype=d.dtype, device=d.device) - dh[:, :, None] * dh[:, None, :]
            Jc = Pm * (self.w[rows] * self.s[rows])[:, None, None]  # dr/dc = w s I, dr/dX = -w s I
            return r, Jc, -Jc
        return Linearization(*self._rows(part, ((3,), (3, 3), (3, 3)), soa=True), "soa")

    def residuals(self, step: Step | None = None) -> Tensor:
        if step is None:
            return self._residuals(self.c, self.X, self.s)
        c, X = self.c + step.cams, self.X + step.points
        s = self._optimal_scales(c, X)  # variable projection: scales re-solved, kept positive
        self._trial_s = s
        return self._residuals(c, X, s)

    def accept(self, step: Step) -> None:
        self.c = self.c + step.cams
        self.X = self.X + step.points
        self.s = self._trial_s if self._trial_s is not None else self._optimal_scales(self.c, self.X)
        self._trial_s = None

    def parameter_norm(self) -> Tensor:
        return torch.sqrt(self.c.square().sum() + self.X.square().sum() + self.s.square().sum())


class ConvexInitProblem(PositioningProblem):
    """min sum_o w_o^2 |X - c_i - d_o v_o|^2 with d_o = max(1, v.(X - c_i)) (see the module doc).

    Where d_o > 1 the residual is the part of X - c_i across the ray, P_v (X - c_i) (P_v = I -
    v v^T); where the constraint is active it is X - c_i - v. Both are linear in (c, X), so the
    problem is a convex piecewise quadratic and the Jacobians are exact.
    """

    def __init__(self, centers, points, rays_world, cam_index, point_index, weight, fixed_cam):
        super().__init__(centers, points, rays_world, cam_index, point_index, weight, fixed_cam, 1.0)

    def _optimal_scales(self, c: Tensor, X: Tensor) -> Tensor:  # here: the distances d_o >= 1
        def part(rows):
            return ((X[self.point_index[rows]] - c[self.cam_index[rows]]) * self.v[rows]).sum(1).clamp_min(1.0),
        return self._rows(part, ((),))[0]

    def _parts(self, c: Tensor, X: Tensor, s: Tensor, rows):
        e = X[self.point_index[rows]] - c[self.cam_index[rows]]
        return e, self.w[rows, None] * (e - s[rows, None] * self.v[rows])

    def linearize(self) -> Linearization:
        def part(rows):
            e, r = self._parts(self.c, self.X, self.s, rows)
            v = self.v[rows]
            free = (e * v).sum(1) > 1.0  # distance not at its bound: projected Jacobian
            eye = torch.eye(3, dtype=e.dtype, device=e.device)
            Pm = eye - torch.where(free[:, None, None], v[:, :, None] * v[:, None, :], torch.zeros_like(eye))
            Jx = Pm * self.w[rows, None, None]
            return r, -Jx, Jx
        return Linearization(*self._rows(part, ((3,), (3, 3), (3, 3)), soa=True), "soa")


def _triangulate_rest(R: Tensor, t: Tensor, rays: Tensor, obs_image: Tensor, point: Tensor, chosen: Tensor,
                      X_solved: Tensor, max_angle_error: float) -> Tensor:
    """Points of all tracks: the solved ones as solved, the others triangulated (least squares
    over their rays, then again without the rays off by more than 5x `max_angle_error`)."""
    num = chosen.numel()
    rest = ~chosen[point]
    img, trk, ray = obs_image[rest], point[rest], rays[rest]
    weight = torch.ones(trk.numel(), dtype=rays.dtype, device=rays.device)
    for _ in range(2):
        Xr, _ = triangulate(R, t, ray, img, trk, num, weight=weight)
        d = (R[img] @ Xr[trk][:, :, None])[:, :, 0] + t[img]  # camera frame
        cos = (d * ray).sum(1) / d.norm(dim=1).clamp_min(1e-300)
        weight = (cos >= math.cos(math.radians(5 * max_angle_error))).to(rays.dtype)
    Xr[chosen] = X_solved
    return Xr


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
    # Long tracks add Schur pairs quadratically but constrain positions little beyond a few
    # well-spread views: the problem sees at most max_observations_per_track of each track (all
    # of an image's when it would keep too few); every observation is checked afterwards.
    chosen = torch.ones(trk_ids.numel(), dtype=torch.bool, device=dev)
    if opt.max_tracks_per_image:
        cam = rec.images.camera[obs_image]
        size = torch.stack([rec.cameras.width[cam], rec.cameras.height[cam]], 1).to(dt)
        xy = rec.keypoints.xy[rec.keypoints.flat_index(obs_image, obs_kp)].to(dt)
        chosen = nominated_tracks(point_index, cam_index, xy, size, trk_ids.numel(), opt.max_tracks_per_image)
    use = chosen[point_index]
    if opt.max_observations_per_track:
        use &= spread_subset(point_index, trk_ids.numel(), opt.max_observations_per_track)
        few = torch.bincount(cam_index[use], minlength=img_ids.numel()) < opt.min_observations_per_image
        use |= few[cam_index] & chosen[point_index]
    full = (v, cam_index, point_index, w)
    solved_ids = torch.nonzero(chosen, as_tuple=True)[0]  # the problem's points, densely numbered
    if not bool(use.all()):
        v, cam_index, point_index, w = (x[use] for x in full)
        if solved_ids.numel() < trk_ids.numel():
            point_index = torch.searchsorted(solved_ids, point_index)
    init_iterations = 0
    if opt.init == "convex":
        z = lambda n: torch.zeros(n, 3, dtype=dt, device=dev)  # noqa: E731
        c0, X0 = z(img_ids.numel()), z(solved_ids.numel())
        init_solver = dataclasses.replace(opt.solver, loss="trivial", max_iterations=opt.init_max_iterations,
                                          function_tolerance=opt.init_function_tolerance,
                                          initial_trust_region_radius=1e6, callback=None)
        wi = w
        for rnd in range(1 + opt.init_trim_rounds):
            # every round starts from zero: the problem is convex, so the start does not change its
            # optimum, and from the previous round's solution (on the other side of many kinks of
            # d_o) LM crawled: corridor1000's second round took 45 iterations, 12 from zero
            init = ConvexInitProblem(c0, X0, v, cam_index, point_index, wi, fixed_cam=0)
            init_summary = solve(init, init_solver)
            log.info("global positioning, convex start %d: %s", rnd + 1, init_summary.brief())
            c0, X0, init_iterations = init.c, init.X, init_iterations + init_summary.iterations
            if rnd == opt.init_trim_rounds:
                break
            # least squares follows outliers: drop the rays far off the fit (by angle, which does
            # not grow with depth as the residual does) and solve again from here
            d = X0[point_index] - c0[cam_index]
            ang = torch.rad2deg(torch.acos(((v * d).sum(1) / d.norm(dim=1).clamp_min(1e-300)).clamp(-1, 1)))
            lim = max(opt.max_angle_error, opt.init_trim_factor * float(ang[wi > 0].median()))
            wi = torch.where(ang > lim, torch.zeros_like(w), w)
            c0, X0 = z(img_ids.numel()), z(solved_ids.numel())
        w = wi  # trimmed rays stay out of BATA too (the angle filter below drops them)
    elif opt.init == "random":
        gen = torch.Generator().manual_seed(opt.seed)
        c0 = ((torch.rand(img_ids.numel(), 3, generator=gen, dtype=torch.float64) * 2 - 1) * opt.init_extent).to(dev, dt)
        X0 = ((torch.rand(solved_ids.numel(), 3, generator=gen, dtype=torch.float64) * 2 - 1) * opt.init_extent).to(dev, dt)
    else:
        raise ValueError(f"global positioning: init must be 'convex' or 'random', not {opt.init!r}")
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
    v, cam_index, point_index, w = full
    X = problem.X
    if solved_ids.numel() < trk_ids.numel():  # the other tracks, from the solved cameras
        X = _triangulate_rest(R, images.trans, b, obs_image, point_index, chosen, problem.X, opt.max_angle_error)
    # drop observations whose ray disagrees with the solved geometry (all, not only those solved on)
    d = X[point_index] - problem.c[cam_index]
    cosang = (v * d).sum(1) / d.norm(dim=1).clamp_min(1e-300)
    good = cosang >= torch.cos(torch.deg2rad(torch.tensor(opt.max_angle_error, dtype=dt)))
    from ..data.model import Tracks

    tracks = Tracks(point_index[good], obs_image[good], obs_kp[good])
    order = torch.argsort(tracks.point, stable=True)
    tracks = Tracks(tracks.point[order], tracks.image[order], tracks.keypoint[order])
    n = trk_ids.numel()
    pts = Points3D(torch.arange(1, n + 1, device=dev), X.clone(), torch.zeros(n, 3, dtype=torch.uint8, device=dev),
                   -torch.ones(n, dtype=dt, device=dev))
    out = Reconstruction(rec.cameras, images, rec.keypoints, pts, tracks, rec.view_graph, dict(rec.meta))
    counts = {"images": int(img_ids.numel()), "points": n, "points_solved": int(solved_ids.numel()),
              "observations": int(good.sum()), "observations_solved": int(use.sum()),
              "observations_dropped": int((~good).sum()), "initial_cost": summary.initial_cost,
              "final_cost": summary.final_cost, "init_iterations": init_iterations, "iterations": summary.iterations, "termination": summary.termination}
    return out, counts
