"""Finite-difference checks of a problem's Jacobians (tests and debugging of new residuals).

Differences are taken through the problem's own retraction (`residuals(step)`), so they test the
Jacobians in the tangent chart the solver uses, including shared and constant parameters:
- reduced (camera-side) unknowns one at a time, since a shared unknown moves many residuals;
- point coordinates one coordinate for all points at once (each residual sees one point).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .problem import SparseProblem, Step, identity_param_map


@dataclass
class JacobianCheck:
    max_abs_error_cam: float
    max_rel_error_cam: float
    max_abs_error_point: float
    max_rel_error_point: float

    def ok(self, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
        return (self.max_abs_error_cam <= atol or self.max_rel_error_cam <= rtol) and (
            self.max_abs_error_point <= atol or self.max_rel_error_point <= rtol
        )


def _param_map(problem: SparseProblem) -> Tensor:
    pm = problem.cam_param_map
    if pm is None:
        pm = identity_param_map(problem.num_cams, problem.cam_dim, device=problem.cam_index.device)
    return pm


def reduced_jacobian(problem: SparseProblem, jac_cam: Tensor) -> Tensor:
    """Analytic d r / d (reduced unknowns), dense (N, d, n), from per-block Jacobians (N, d, nc)."""
    pm = _param_map(problem)
    n = int(pm.max()) + 1 if bool((pm >= 0).any()) else 0
    N, d, nc = jac_cam.shape
    cols = pm[problem.cam_index]  # (N, nc)
    out = jac_cam.new_zeros(N, d, n + 1)
    out.scatter_add_(2, torch.where(cols < 0, n, cols)[:, None, :].expand(N, d, nc), jac_cam)
    return out[:, :, :n]


@torch.no_grad()
def numeric_jacobians(problem: SparseProblem, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Central differences: (d r/d reduced (N, d, n), d r/d point coordinates (N, d, k))."""
    pm = _param_map(problem)
    n = int(pm.max()) + 1 if bool((pm >= 0).any()) else 0
    r0 = problem.residuals(None)
    dt, dev = r0.dtype, r0.device
    C, nc, P, k = problem.num_cams, problem.cam_dim, problem.num_points, problem.point_dim
    zc, zp = torch.zeros(C, nc, dtype=dt, device=dev), torch.zeros(P, k, dtype=dt, device=dev)

    def cams_of(x):
        return torch.cat([x, x.new_zeros(1)])[torch.where(pm < 0, n, pm)]

    Jr = r0.new_zeros(*r0.shape, n)
    for u in range(n):
        rs = []
        for sgn in (1.0, -1.0):
            x = torch.zeros(n, dtype=dt, device=dev)
            x[u] = sgn * eps
            rs.append(problem.residuals(Step(cams_of(x), zp, x)))
        Jr[:, :, u] = (rs[0] - rs[1]) / (2 * eps)
    Jp = r0.new_zeros(*r0.shape, k)
    x0 = torch.zeros(n, dtype=dt, device=dev)
    for j in range(k):
        rs = []
        for sgn in (1.0, -1.0):
            p = zp.clone()
            p[:, j] = sgn * eps
            rs.append(problem.residuals(Step(zc, p, x0)))
        Jp[:, :, j] = (rs[0] - rs[1]) / (2 * eps)
    return Jr, Jp


def check_jacobians(problem: SparseProblem, eps: float = 1e-6) -> JacobianCheck:
    """Compare the problem's analytic Jacobians with central differences."""
    lin = problem.linearize().as_rows()
    Jr_num, Jp_num = numeric_jacobians(problem, eps)
    Jr = reduced_jacobian(problem, lin.jac_cam)

    def errs(a, b):
        if a.numel() == 0:
            return 0.0, 0.0
        abs_err = float((a - b).abs().max())
        scale = float(b.abs().max())
        return abs_err, abs_err / max(scale, 1e-300)

    ac, rc = errs(Jr, Jr_num)
    ap, rp = errs(lin.jac_point, Jp_num)
    return JacobianCheck(ac, rc, ap, rp)
