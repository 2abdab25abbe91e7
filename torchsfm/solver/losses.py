"""Robust losses on squared residual norms, with Ceres' conventions.

A loss maps s = |r_i|^2 of one residual block to rho(s); the cost is 0.5 * sum_i rho(s_i). The
scale `a` is where the loss departs from the quadratic (Ceres' `HuberLoss(a)` etc., also what
COLMAP's `loss_function_scale` means).

The losses enter the normal equations, not only step acceptance: `robustify` rescales residuals
and Jacobians as Ceres' `Corrector` does (Triggs et al., "Bundle adjustment - a modern
synthesis", sec. 4.3), so that the Gauss-Newton model of the robustified cost is minimised.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOSSES = ("trivial", "huber", "cauchy", "soft_l1")


def evaluate(s: Tensor, loss: str, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(rho, rho', rho'') at squared norms s (any shape)."""
    if loss == "trivial":
        one = torch.ones_like(s)
        return s, one, torch.zeros_like(s)
    a = float(scale)
    if not (a > 0 and math.isfinite(a)):
        raise ValueError(f"loss scale must be positive and finite, got {scale}")
    b = a * a
    if loss == "huber":
        inlier = s <= b
        root = s.clamp_min(b).sqrt()  # >= a > 0, so no division by zero below
        rho = torch.where(inlier, s, 2 * a * root - b)
        rho1 = torch.where(inlier, torch.ones_like(s), a / root)
        rho2 = torch.where(inlier, torch.zeros_like(s), -0.5 * rho1 / root.square())
        return rho, rho1, rho2
    if loss == "cauchy":
        t = 1 + s / b
        rho1 = 1 / t
        return b * torch.log1p(s / b), rho1, -rho1 * rho1 / b
    if loss == "soft_l1":
        t = 1 + s / b
        root = t.sqrt()
        rho1 = 1 / root
        return 2 * b * (root - 1), rho1, -0.5 * rho1 / (b * t)
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


# Losses whose rho'' is never positive: their Corrector is plain IRLS (no second-order term).
_CONCAVE = ("trivial", "huber", "cauchy", "soft_l1")


def cost_tensor(residuals: Tensor, loss: str, scale: float = 1.0) -> Tensor:
    """0.5 * sum rho(|r_i|^2) for residual blocks (N, d), accumulated in float64: a () tensor on
    the residuals' device (the solver reads it with its per-iteration status)."""
    s = residuals.to(torch.float64).square().sum(-1)
    if loss == "trivial":
        return 0.5 * s.sum()
    return 0.5 * evaluate(s, loss, scale)[0].sum()


def cost(residuals: Tensor, loss: str, scale: float = 1.0) -> float:
    """`cost_tensor` as a float."""
    return float(cost_tensor(residuals, loss, scale))


def robustify(r: Tensor, jacobians: list[Tensor], loss: str, scale: float = 1.0, soa: bool = False
              ) -> tuple[Tensor, list[Tensor]]:
    """Ceres' Corrector: returns (r~, [J~...]).

    Layout rows: r (N, d), each J (N, d, n); soa: r (d, N), each J (d, n, N).
    With sqrt_rho1 = sqrt(rho'(s)): if rho'' <= 0 (every loss in LOSSES) the model is plain IRLS,
    r~ = sqrt_rho1 r, J~ = sqrt_rho1 J. Otherwise the second-order (Triggs) correction is used,
    J~ = sqrt_rho1 (I - alpha r r^T / s) J and r~ = sqrt_rho1 / (1 - alpha) r with
    alpha = 1 - sqrt(1 + 2 s rho'' / rho').
    """
    if loss == "trivial":
        return r, jacobians
    s = r.square().sum(0 if soa else -1)
    _, rho1, rho2 = evaluate(s, loss, scale)
    sq1 = rho1.clamp_min(0).sqrt()
    # views that broadcast a per-block scalar against r and J
    vr = (lambda x: x[None, :]) if soa else (lambda x: x[:, None])
    vj = (lambda x: x[None, None, :]) if soa else (lambda x: x[:, None, None])
    if loss in _CONCAVE:  # known without looking at the values (no host read)
        return r * vr(sq1), [J * vj(sq1) for J in jacobians]
    second = (rho2 > 0) & (s > 0)
    d = (1 + 2 * s * rho2 / rho1).clamp_min(0)
    alpha = torch.where(second, 1 - d.sqrt(), torch.zeros_like(s))
    rscale = torch.where(second, sq1 / (1 - alpha), sq1)
    a_over_s = torch.where(second, alpha / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    out = []
    for J in jacobians:
        if soa:
            rJ = (r[:, None, :] * J).sum(0, keepdim=True)  # (1, n, N) = r^T J
            out.append(vj(sq1) * (J - vj(a_over_s) * r[:, None, :] * rJ))
        else:
            rJ = (r[:, :, None] * J).sum(1, keepdim=True)  # (N, 1, n)
            out.append(vj(sq1) * (J - vj(a_over_s) * r[:, :, None] * rJ))
    return r * vr(rscale), out


def weights(r: Tensor, loss: str, scale: float = 1.0) -> Tensor:
    """IRLS weights rho'(|r_i|^2) (N,): 1 for inliers, < 1 for down-weighted residual blocks."""
    s = r.square().sum(-1)
    return evaluate(s, loss, scale)[1]
