"""Preconditioned conjugate gradients for the reduced camera system.

Termination is Ceres' (conjugate_gradients_solver.h): the Nash-Sofer test on the quadratic model
Q(x) = x^T A x / 2 - b^T x, i * (Q_i - Q_{i-1}) / Q_i < eta, which stops once the model stops
improving rather than once the residual is small; plus a tiny relative residual and an iteration
cap. eta = 0.01 by default: Ceres' 0.1 let the first LM step on Ladybug-73 stop after 3 CG
iterations and the LM run stalled (../shared/reference/ba-solver-notes.md, section 3).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def solve(matvec: Callable[[Tensor], Tensor], precond: Callable[[Tensor], Tensor], b: Tensor, options) -> tuple[Tensor | None, int]:
    """Approximately solve A x = b (A SPD). Returns (x, iterations); x is None on breakdown."""
    eta = float(options.pcg_eta)
    max_it = int(options.pcg_max_iterations)
    min_it = int(options.pcg_min_iterations)
    x = torch.zeros_like(b)
    bnorm = float(b.norm())
    if bnorm == 0.0:
        return x, 0
    r = b.clone()
    z = precond(r)
    p = z.clone()
    rz = torch.dot(r, z)
    q_prev = 0.0
    it = 0
    for it in range(1, max_it + 1):
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        pAp_f = float(pAp)
        if not pAp_f > 0.0:  # lost positive definiteness (or NaN)
            return (x if it > 1 else None), it
        alpha = rz / pAp
        x.add_(alpha * p)
        r.sub_(alpha * Ap)
        # Q(x) = -x^T (b + r) / 2 since r = b - A x
        q = float(-0.5 * torch.dot(x, b + r))
        if it >= min_it and q < 0 and it * (q - q_prev) / q < eta:
            break
        q_prev = q
        if float(r.norm()) <= 1e-12 * bnorm:
            break
        z = precond(r)
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it
