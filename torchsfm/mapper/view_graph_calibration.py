"""View-graph calibration: focal lengths from the fundamental matrices of the pairs.

Residual. For a pair (i, j) with fundamental matrix F (x_j^T F x_i = 0, pixels) and calibrations
K_i, K_j, the matrix E = K_j^T F K_i is essential exactly when its two non-zero singular values
are equal. With s = exp(theta) scaling a camera's focal length(s) (principal point fixed),
E(theta_i, theta_j) = D(theta_j) E_0 D(theta_i), D = diag(s, s, 1), E_0 from the current
intrinsics. The residual of a pair is the 9-vector

    r(E) = (2 E E^T E - tr(E E^T) E) / ||E||_F^3,

the normalised cubic essential-matrix constraint. For rank-2 E, ||r|| equals
(s1^2 - s2^2) / (s1^2 + s2^2) in [0, 1] (the relative singular-value gap): dimensionless,
comparable across pairs, smooth (unlike the gap itself, which has a cone at its zero), and
free of the 0/0 of closed-form (Bougnoux / Fetzer) focal formulas near degenerate geometry.
It plays the role of GLOMAP's Fetzer residuals; thresholds are therefore not GLOMAP's numbers.

Solver. torchsfm's one Levenberg-Marquardt solver (torchsfm.solver) over the log focal of every
free camera at once, with the Cauchy loss; analytic Jacobians (two directional derivatives of the
residual per pair). Each pair is a residual block whose camera-side block is (theta_i, theta_j),
mapped by `cam_param_map` onto the free cameras' unknowns; nothing is eliminated. The solver's
trust region, float32 and device handling and its one host read per iteration apply here too.
Cameras with `has_prior_focal_length` are held fixed (`fix_prior_focal`).

Degeneracy. When optical axes meet in one point (cameras on a sphere looking at its centre, a
ring looking at its centre) F does not determine the focal lengths (Sturm; Newsam): the
residual is flat along a direction. Each pair's 2x2 Gauss-Newton information on (theta_i,
theta_j) is reduced to what it says about one camera with the other unknown (Schur complement;
with a fixed or identical partner no reduction), and summed per camera: a conservative bound on
the camera's marginal information. The predicted relative focal std is
residual_sigma / sqrt(information); above `max_focal_std` the camera is reported degenerate, its
initial focal is kept and the others are re-solved with it fixed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cameras.models import calibration_matrix, focal_length, scaled_focal_params
from ..data.model import TWO_VIEW_CALIBRATED, TWO_VIEW_UNCALIBRATED, Reconstruction
from ..solver import Linearization, SolverOptions, Step, solve
from .graph import active_images, stage_copy

log = logging.getLogger(__name__)

# Per-camera outcome codes in ViewGraphCalibrationReport.status.
CAM_REFINED = 0
CAM_FIXED_PRIOR = 1  # has a trusted prior focal: held fixed
CAM_UNCONSTRAINED = 2  # in no usable pair: unchanged
CAM_DEGENERATE = 3  # focal not determined by the pairs: initial focal kept
CAM_OUT_OF_RANGE = 4  # estimate outside [min_focal_ratio, max_focal_ratio] x initial: initial kept
CAMERA_STATUS_NAMES = ["refined", "fixed_prior", "unconstrained", "degenerate", "out_of_range"]


@dataclass
class ViewGraphCalibrationOptions:
    fix_prior_focal: bool = True  # cameras with has_prior_focal_length keep their focal
    loss_scale: float = 0.01  # Cauchy scale on the pair residual (relative singular-value gap)
    max_iterations: int = 100
    step_tolerance: float = 1e-8  # stop when |log-focal update| <= this * |focal ratios| (LM parameter tolerance)
    function_tolerance: float = 1e-10  # or when the robust cost falls by less than this fraction
    min_focal_ratio: float = 0.1  # new / initial focal outside [min, max]: keep the initial one
    max_focal_ratio: float = 10.0
    max_pair_error: float = 0.4  # pairs whose final residual norm exceeds this become invalid
    max_focal_std: float = 0.05  # predicted relative focal std above this: degenerate camera
    min_residual_sigma: float = 2e-3  # floor of the residual noise level used for that prediction
    linear_solver: str = "auto"  # of the LM solver (torchsfm.solver.SolverOptions.linear_solver)


@dataclass
class ViewGraphCalibrationReport:
    focal_before: Tensor  # (C,) mean focal length
    focal_after: Tensor  # (C,)
    status: Tensor  # (C,) CAM_* code
    focal_std: Tensor  # (C,) predicted relative std of the estimate (NaN when not estimated)
    pair_error: Tensor  # (E,) final residual norm of the pairs used (NaN elsewhere)
    num_pairs_used: int = 0
    num_pairs_dropped: int = 0
    iterations: int = 0
    initial_cost: float = 0.0
    final_cost: float = 0.0
    residual_sigma: float = 0.0  # robust noise level of the pair residuals at the solution

    @property
    def degenerate(self) -> Tensor:
        """(C,) bool: cameras whose focal the view graph could not determine."""
        return self.status == CAM_DEGENERATE

    def counts(self) -> dict:
        c = torch.bincount(self.status.cpu(), minlength=len(CAMERA_STATUS_NAMES)).tolist()
        return dict(zip(CAMERA_STATUS_NAMES, c))


def _unit(E: Tensor) -> tuple[Tensor, Tensor]:
    n = E.flatten(-2).norm(dim=-1).clamp_min(1e-300)[..., None, None]
    return E / n, n


def _cubic(X: Tensor) -> Tensor:
    """2 X X^T X - tr(X X^T) X."""
    XXt = X @ X.transpose(-1, -2)
    return 2 * XXt @ X - XXt.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * X


def essential_residual(E: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 9): the cubic constraint of E / ||E|| (zero iff E is essential)."""
    return _cubic(_unit(E)[0]).flatten(-2)


def essential_residual_jvp(E: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
    """Residual and its directional derivative along D, analytically (the residual is
    scale-invariant, so with X = E/|E|, V = D/|E| and <X, X> = 1:
    d = 2 (V X^T X + X V^T X + X X^T V) - 2 <X, V> X - V - 3 <X, V> cubic(X))."""
    X, n = _unit(E)
    V = D / n
    xv = (X * V).sum((-1, -2))[..., None, None]
    Xt = X.transpose(-1, -2)
    c = _cubic(X)
    d = 2 * (V @ Xt @ X + X @ V.transpose(-1, -2) @ X + X @ Xt @ V) - 2 * xv * X - V - 3 * xv * c
    return c.flatten(-2), d.flatten(-2)


class _PairProblem:
    """Residuals and Jacobians of the pairs for a log-focal vector theta (C,)."""

    def __init__(self, E0: Tensor, ci: Tensor, cj: Tensor):
        self.E0, self.ci, self.cj = E0, ci, cj
        self.P = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=E0.dtype, device=E0.device))

    def essential(self, theta: Tensor) -> Tensor:
        one = torch.ones_like(theta)
        d = torch.stack([theta.exp(), theta.exp(), one], -1)  # (C, 3)
        return d[self.cj][:, :, None] * self.E0 * d[self.ci][:, None, :]

    def residuals(self, theta: Tensor) -> Tensor:
        return essential_residual(self.essential(theta))

    def linearize(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """r (P, 9), dr/dtheta_i (P, 9), dr/dtheta_j (P, 9)."""
        E = self.essential(theta)
        r, Ji = essential_residual_jvp(E, E @ self.P)
        _, Jj = essential_residual_jvp(E, self.P @ E)
        return r, Ji, Jj


def _robust(sq: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Cauchy cost and IRLS weight of squared residual norms."""
    s2 = scale * scale
    return s2 * torch.log1p(sq / s2), 1.0 / (1.0 + sq / s2)


class _FocalProblem:
    """The pair residuals as a `torchsfm.solver.SparseProblem` over the free cameras' theta.

    Residual block e = pair e (9 values); its camera-side block is (theta_ci, theta_cj), sent by
    `cam_param_map` to the unknowns of the free cameras (-1 for fixed ones; both columns name
    one unknown when the two images share a camera). Nothing is eliminated: point_dim 0, one
    empty block per pair. Pairs whose residual or Jacobian is not finite count zero (a step
    that makes a pair degenerate is not rewarded: the cost is then that of a perfect pair, as
    the former `nansum` did). theta stays within +-bound (the retraction clamps).
    """

    cam_dim = 2
    point_dim = 0

    def __init__(self, prob: _PairProblem, theta: Tensor, free: Tensor, bound: float):
        self.prob, self.theta, self.bound = prob, theta, bound
        E, dev = prob.ci.numel(), theta.device
        self.num_cams = self.num_points = E
        self.cam_index = self.point_index = torch.arange(E, device=dev)
        self.free_cams = torch.nonzero(free)[:, 0]
        unknown = torch.full_like(prob.ci, -1)
        unknown[self.free_cams] = torch.arange(self.free_cams.numel(), device=dev)
        self.cam_param_map = torch.stack([unknown[prob.ci], unknown[prob.cj]], 1)
        self._trial: tuple[Step, Tensor] | None = None

    def _move(self, step: Step) -> Tensor:
        return self.theta.index_add(0, self.free_cams, step.reduced).clamp(-self.bound, self.bound)

    @staticmethod
    def _finite_rows(*xs: Tensor) -> Tensor:
        return torch.stack([torch.isfinite(x).flatten(1).all(1) for x in xs]).all(0)

    def linearize(self) -> Linearization:
        r, Ji, Jj = self.prob.linearize(self.theta)
        ok = self._finite_rows(r, Ji, Jj)[:, None]
        Jc = torch.where(ok[:, :, None], torch.stack([Ji, Jj], -1), 0.0)
        return Linearization(torch.where(ok, r, 0.0), Jc, Jc.new_zeros(*Jc.shape[:2], 0))

    def residuals(self, step: Step | None = None) -> Tensor:
        theta = self.theta
        if step is not None:
            theta = self._move(step)
            self._trial = (step, theta)
        r = self.prob.residuals(theta)
        return torch.where(self._finite_rows(r)[:, None], r, 0.0)

    def accept(self, step: Step) -> None:
        self.theta = self._trial[1] if self._trial is not None and self._trial[0] is step else self._move(step)
        self._trial = None

    def parameter_norm(self) -> Tensor:
        return self.theta.index_select(0, self.free_cams).exp().norm()  # |focal ratios|


def _solve(prob: _PairProblem, theta: Tensor, free: Tensor, options: ViewGraphCalibrationOptions):
    """LM over theta[free]. Returns theta, iterations, initial cost, final cost (sum of Cauchy
    costs, twice the solver's 0.5 * sum)."""
    problem = _FocalProblem(prob, theta, free, math.log(options.max_focal_ratio * 2.0))
    summary = solve(problem, SolverOptions(
        loss="cauchy", loss_scale=options.loss_scale, max_iterations=options.max_iterations,
        function_tolerance=options.function_tolerance, parameter_tolerance=options.step_tolerance,
        linear_solver=options.linear_solver))
    log.debug("view-graph calibration: %s", summary.brief())
    return problem.theta, summary.iterations, 2 * summary.initial_cost, 2 * summary.final_cost


def _camera_information(prob: _PairProblem, theta: Tensor, free: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Summed pair-marginal Gauss-Newton information per camera (C,) and the residual norms."""
    r, Ji, Jj = prob.linearize(theta)
    ci, cj = prob.ci, prob.cj
    sq = (r * r).sum(-1)
    _, w = _robust(sq, scale)
    ok = torch.isfinite(sq) & torch.isfinite(Ji).all(-1) & torch.isfinite(Jj).all(-1)
    w = torch.where(ok, w, torch.zeros_like(w))
    Ji, Jj = torch.nan_to_num(Ji), torch.nan_to_num(Jj)
    same = ci == cj
    a, b, c = w * (Ji * Ji).sum(-1), w * (Ji * Jj).sum(-1), w * (Jj * Jj).sum(-1)
    both = free[ci] & free[cj] & ~same
    tiny = torch.finfo(a.dtype).tiny
    mi = torch.where(both, a - b * b / c.clamp_min(tiny), a)
    mj = torch.where(both, c - b * b / a.clamp_min(tiny), c)
    ms = a + c + 2 * b
    info = torch.zeros_like(theta)
    info.index_add_(0, ci, torch.where(same, ms, mi).clamp_min(0))
    info.index_add_(0, cj, torch.where(same, torch.zeros_like(mj), mj).clamp_min(0))
    return info * free.to(info.dtype), sq.sqrt()


def calibrate_view_graph(
    rec: Reconstruction, options: ViewGraphCalibrationOptions | None = None
) -> tuple[Reconstruction, ViewGraphCalibrationReport]:
    """Refine focal lengths from the view graph's F matrices and drop inconsistent pairs.

    Uses valid pairs of configuration CALIBRATED or UNCALIBRATED with a non-zero, finite F and
    both images active. Returns a new reconstruction with updated camera focal lengths (all focal
    parameters of a camera scaled by one factor) and `valid` False for pairs whose final residual
    exceeds `max_pair_error`.
    """
    options = options or ViewGraphCalibrationOptions()
    rec = stage_copy(rec, "cameras", "view_graph")
    vg, cams, images = rec.view_graph, rec.cameras, rec.images
    C, E = len(cams), len(vg)
    dtype, device = cams.params.dtype, cams.params.device
    f_before = focal_length(cams)

    active = active_images(rec.meta, len(images), device)
    Fn = vg.F.to(dtype).flatten(1).norm(dim=-1)
    usable = (vg.valid & active[vg.pairs].all(1) & torch.isfinite(Fn) & (Fn > 0)
              & ((vg.config == TWO_VIEW_UNCALIBRATED) | (vg.config == TWO_VIEW_CALIBRATED)))
    pidx = torch.nonzero(usable, as_tuple=True)[0]
    ci, cj = images.camera[vg.pairs[pidx, 0]], images.camera[vg.pairs[pidx, 1]]
    K = calibration_matrix(cams)
    E0 = K[cj].transpose(-1, -2) @ (vg.F[pidx].to(dtype) / Fn[pidx, None, None]) @ K[ci]
    prob = _PairProblem(E0, ci, cj)

    in_pair = torch.zeros(C, dtype=torch.bool, device=device)
    in_pair[ci], in_pair[cj] = True, True
    fixed_prior = cams.has_prior_focal_length if options.fix_prior_focal else torch.zeros_like(in_pair)
    status = torch.full((C,), CAM_UNCONSTRAINED, dtype=torch.long, device=device)
    status[in_pair & fixed_prior] = CAM_FIXED_PRIOR
    free = in_pair & ~fixed_prior
    theta = torch.zeros(C, dtype=dtype, device=device)
    focal_std = torch.full((C,), float("nan"), dtype=dtype, device=device)
    iters, cost0, cost = 0, 0.0, 0.0
    sigma = options.min_residual_sigma
    for attempt in range(2):  # second pass only when degenerate cameras were fixed
        if not bool(free.any()):
            break
        theta, it, c0, cost = _solve(prob, theta, free, options)
        iters += it
        if attempt == 0:
            cost0 = c0
        info, err = _camera_information(prob, theta, free, options.loss_scale)
        sigma = max(float(err.median()) if err.numel() else 0.0, options.min_residual_sigma)
        std = sigma / info.sqrt().clamp_min(1e-300)
        focal_std = torch.where(free, std, focal_std)
        degenerate = free & (std > options.max_focal_std)
        if not bool(degenerate.any()):
            break
        status[degenerate] = CAM_DEGENERATE
        theta = torch.where(degenerate, torch.zeros_like(theta), theta)
        free = free & ~degenerate
        log.warning("view-graph calibration: %d camera(s) have focal lengths the pairs do not determine "
                    "(e.g. optical axes meeting in one point); keeping their initial focal lengths",
                    int(degenerate.sum()))
    ratio = theta.exp()
    out_of_range = free & ((ratio < options.min_focal_ratio) | (ratio > options.max_focal_ratio))
    status[free & ~out_of_range] = CAM_REFINED
    status[out_of_range] = CAM_OUT_OF_RANGE
    theta = torch.where(free & ~out_of_range, theta, torch.zeros_like(theta))
    if bool(out_of_range.any()):
        log.warning("view-graph calibration: %d focal estimate(s) outside [%.2g, %.2g] x initial; kept initial",
                    int(out_of_range.sum()), options.min_focal_ratio, options.max_focal_ratio)

    cams.params = scaled_focal_params(cams, theta.exp())
    err = prob.residuals(theta).norm(dim=-1)
    pair_error = torch.full((E,), float("nan"), dtype=dtype, device=device)
    pair_error[pidx] = err
    drop = torch.zeros(E, dtype=torch.bool, device=device)
    drop[pidx] = ~(err <= options.max_pair_error)  # NaN counts as too large
    vg.valid = vg.valid & ~drop
    report = ViewGraphCalibrationReport(
        focal_before=f_before, focal_after=focal_length(cams), status=status, focal_std=focal_std,
        pair_error=pair_error, num_pairs_used=int(pidx.numel()), num_pairs_dropped=int(drop.sum()),
        iterations=iters, initial_cost=cost0, final_cost=float(_robust(err * err, options.loss_scale)[0].nansum()),
        residual_sigma=sigma,
    )
    log.info("view-graph calibration: %d pairs, cameras %s, %d pairs dropped, %d iterations",
             report.num_pairs_used, report.counts(), report.num_pairs_dropped, iters)
    return rec, report
