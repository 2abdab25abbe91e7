"""Levenberg-Marquardt for problems that fall apart into independent eliminated blocks.

When no reduced unknown is free (points refined against fixed cameras), each point is a small
problem of its own. One shared trust region makes every point wait for the slowest: a point far
from its optimum shrinks the radius for all, and the loop runs until the last one converges
(templeRing's first bundle adjustment: 94 iterations for the points outside its capped problem).
Here every block has its own radius, its own step acceptance and its own convergence test
(Ceres' rules, applied per block), all as tensor operations. The whole stops, as lm.py does, when
the candidates change the total cost by at most function_tolerance of it, or when no block is
left active. The host reads one status per
iteration (whether any block is still active, the total cost), so the sync budget of lm.py holds.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..runtime import host_read
from . import losses
from .options import IterationRecord, SolverOptions, SolverSummary
from .problem import SparseProblem, Step
from .schur import _chol_inv_factor


def _block_cost(r: Tensor, point: Tensor, num_points: int, opt: SolverOptions) -> Tensor:
    """0.5 * rho(|r|^2) summed per block, float64 (P,); r in soa layout (d, N)."""
    s = r.to(torch.float64).square().sum(0)
    rho = s if opt.loss == "trivial" else losses.evaluate(s, opt.loss, opt.loss_scale)[0]
    return torch.zeros(num_points, dtype=torch.float64, device=r.device).index_add_(0, point, 0.5 * rho)


def _normal_equations(problem: SparseProblem, opt: SolverOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(cost per block (P,) float64, gradient (k, P), Gauss-Newton matrix (k*k, P)) at the
    problem's current parameters, robustified as in lm.py."""
    lin = problem.linearize().as_soa()
    r, Jp = lin.residuals, lin.jac_point  # (d, N), (d, k, N)
    pi, P = problem.point_index, problem.num_points
    cost = _block_cost(r, pi, P, opt)
    r, (Jp,) = losses.robustify(r, [Jp], opt.loss, opt.loss_scale, soa=True)
    k, N = Jp.shape[1], Jp.shape[2]
    g = torch.zeros(k, P, dtype=r.dtype, device=r.device).index_add_(1, pi, (Jp * r[:, None, :]).sum(0))
    Vo = (Jp[:, :, None, :] * Jp[:, None, :, :]).sum(0).reshape(k * k, N)
    V = torch.zeros(k * k, P, dtype=r.dtype, device=r.device).index_add_(1, pi, Vo)
    return cost, g, V


@torch.no_grad()
def solve_separable(problem: SparseProblem, opt: SolverOptions, summary: SolverSummary, t_start: float
                    ) -> SolverSummary:
    """Minimise the cost of a problem whose reduced unknowns are all constant, block by block.
    `opt` has the device defaults applied; `summary` holds the setup already done."""
    k, P, C = problem.point_dim, problem.num_points, problem.num_cams
    t0 = time.perf_counter()
    cost, g, V = _normal_equations(problem, opt)
    dt, dev = g.dtype, g.device
    tol = 1e-12 if dt == torch.float64 else 1e-6
    total, gnorm = host_read(cost.sum(), g.abs().amax() if g.numel() else 0.0)
    summary.initial_cost = summary.final_cost = total
    summary.trace.append(IterationRecord(0, total, total, True, 0.0, opt.initial_trust_region_radius, 0.0, gnorm, 0,
                                         0.0))
    if opt.callback:
        opt.callback(summary.trace[0])
    if not math.isfinite(total):
        summary.termination, summary.message = "invalid_initial_cost", "initial cost is not finite"
        return _done(summary, t_start)
    radius = torch.full((P,), opt.initial_trust_region_radius, dtype=dt, device=dev)
    nu = torch.full((P,), 2.0, dtype=dt, device=dev)
    diag = V[:: k + 1]  # (k, P)
    active = (diag.abs().sum(0) > 0) & (g.abs().amax(0) > opt.gradient_tolerance)
    zero_cams = torch.zeros(C, problem.cam_dim, dtype=dt, device=dev)
    no_reduced = torch.zeros(0, dtype=dt, device=dev)
    termination, it = "max_iterations", 0
    while it < opt.max_iterations:
        if time.perf_counter() - t_start > opt.max_time_s:
            termination = "max_time"
            break
        it += 1
        Vd = V.clone()
        Vd[:: k + 1] += diag.clamp(opt.min_lm_diagonal, opt.max_lm_diagonal) / radius
        M = _chol_inv_factor(Vd, k, tol)  # M M^T = Vd^-1, (k, k, P)
        z = (M * g[:, None, :]).sum(0)  # M^T g
        dp = torch.where(active, -(M * z[None, :, :]).sum(1), 0)  # (k, P)
        Vdp = (V.reshape(k, k, P) * dp[None, :, :]).sum(1)
        model = -((g * dp).sum(0) + 0.5 * (dp * Vdp).sum(0)).to(torch.float64)
        trial = Step(cams=zero_cams, points=dp.T, reduced=no_reduced)
        new_cost = _block_cost(problem.residuals(trial).T, problem.point_index, P, opt)
        ok = active & torch.isfinite(dp).all(0) & (model > 0)
        new_cost = torch.where(torch.isfinite(new_cost), new_cost, math.inf)
        rho = (cost - new_cost) / torch.where(ok, model, 1.0)
        done = ok & ((cost - new_cost).abs() <= opt.function_tolerance * cost)
        accept = ok & torch.where(done, new_cost < cost, rho > opt.min_relative_decrease)
        problem.accept(Step(cams=zero_cams, points=torch.where(accept, dp, 0).T, reduced=no_reduced))
        grow = accept & ~done
        shrink = active & ~accept & ~done
        factor = torch.clamp_min(1.0 - (2.0 * rho - 1.0) ** 3, 1.0 / 3.0).to(dt)
        radius = torch.where(grow, (radius / factor).clamp_max(opt.max_trust_region_radius),
                             torch.where(shrink, radius / nu, radius))
        nu = torch.where(grow, 2.0, torch.where(shrink, nu * 2, nu))
        cost_before = cost
        cost, g, V = _normal_equations(problem, opt)
        diag = V[:: k + 1]
        active = active & ~done & (radius >= opt.min_trust_region_radius) & (g.abs().amax(0) > opt.gradient_tolerance)
        change = torch.where(ok, (cost_before - new_cost).abs(), 0).sum()
        total, left, n_acc, step_norm, change = host_read(cost.sum(), active.sum(), accept.sum(),
                                                          dp.square().sum().sqrt(), change)
        summary.successful_steps += int(n_acc > 0)
        summary.unsuccessful_steps += int(n_acc == 0)
        rec = IterationRecord(it, total, total, n_acc > 0, math.nan, math.nan, step_norm, math.nan, 0,
                              time.perf_counter() - t0)
        summary.trace.append(rec)
        if opt.callback:
            opt.callback(rec)
        if left == 0 or change <= opt.function_tolerance * total:
            termination = "function_tolerance"
            break
    summary.iterations = it
    summary.final_cost = total
    summary.termination = termination
    return _done(summary, t_start)


def _done(summary: SolverSummary, t_start: float) -> SolverSummary:
    summary.total_time_s = time.perf_counter() - t_start
    return summary
