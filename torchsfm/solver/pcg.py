"""Preconditioned conjugate gradients: the one PCG of torchsfm (reduced camera systems, graph
Laplacians), with the host reading one flag per block of iterations, not per iteration.

Columns of a 2-D right-hand side (n, m) are independent systems run in lock step. Each column
stops on its own, by either test:
- Ceres' Nash-Sofer test on the quadratic model Q(x) = x^T A x / 2 - b^T x,
  i * (Q_i - Q_{i-1}) / Q_i < eta (conjugate_gradients_solver.h), which stops once the model
  stops improving rather than once the residual is small (`eta`; None: off). eta = 0.01 for
  the LM steps: Ceres' 0.1 let the first step on Ladybug-73 stop after 3 CG iterations and the
  LM run stalled (../shared/reference/ba-solver-notes.md, section 3);
- a relative residual |r| <= rtol |b|.
A finished column is frozen (its step size is zeroed), so iterating needs no host decision:
`PCG.run(k)` queues k iterations and the caller reads `PCG.active` (is any column still
running?) when it chooses. `solve` reads it after blocks of `next_block` iterations: first the
expected count (e.g. the previous solve's) and an eighth, then half the iterations done so far,
so a solve needing about what the last one needed costs one read, and one needing k times more
about log(k) / log(1.5) more. Iterations run after a
column finished change nothing; they cost their arithmetic (the price of not stalling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MIN_BLOCK = 8  # iterations between two reads at least


def next_block(done: int, expected: int = 0) -> int:
    """CG iterations to queue before the next read, after `done` so far: first the expected
    count with a margin of an eighth (CG counts grow while the LM damping falls), then half of
    what was done, at least MIN_BLOCK (simulated on recorded LM runs: 1.1-2.1 blocks per solve,
    4-38 % iterations past convergence, against 1.3-2.8 and 0-58 % with neither the margin nor
    blocks of 8 at least)."""
    if done == 0:
        return max(MIN_BLOCK, expected + expected // 8 + 2 if expected else 0)
    return max(MIN_BLOCK, done // 2)


@dataclass
class PCGResult:
    x: Tensor  # the solution, like b
    iterations: Tensor  # () int64 on b's device: iterations the slowest column ran
    ok: Tensor  # () bool: no column broke down in its first iteration (x would be meaningless)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(0)


class PCG:
    """The CG state of A x = b on b's device; `run(k)` advances it without a host read."""

    def __init__(self, matvec: Callable[[Tensor], Tensor], precond: Callable[[Tensor], Tensor], b: Tensor, *,
                 max_iterations: int, eta: float | None = None, rtol: float = 0.0, min_iterations: int = 1):
        self.matvec, self.precond, self.b = matvec, precond, b
        self.max_iterations, self.eta, self.rtol, self.min_iterations = max_iterations, eta, rtol, min_iterations
        self.x = torch.zeros_like(b)
        self.r = b.clone()
        self.p = precond(self.r)
        self.rz = _dot(self.r, self.p)
        self.b_norm = b.norm(dim=0)
        self.active = self.b_norm > 0  # a zero right-hand side is solved by x = 0
        self.q_prev = torch.zeros_like(self.rz)
        self.its = torch.zeros(self.rz.shape, dtype=torch.int64, device=b.device)
        self.ok = torch.ones((), dtype=torch.bool, device=b.device)
        self.done = 0  # iterations queued (host count)

    @property
    def exhausted(self) -> bool:
        return self.done >= self.max_iterations

    def run(self, iterations: int) -> None:
        zero = torch.zeros_like(self.rz)
        for _ in range(min(iterations, self.max_iterations - self.done)):
            self.done += 1
            p, active = self.p, self.active
            Ap = self.matvec(p)
            pAp = _dot(p, Ap)
            broke = active & ~(pAp > 0)  # lost positive definiteness (or NaN)
            if self.done == 1:
                self.ok = ~broke.any()
            active = active & ~broke
            alpha = torch.where(active, self.rz / torch.where(active, pAp, 1), zero)
            self.x.add_(alpha * p)
            self.r.sub_(alpha * Ap)
            self.its.add_(active.to(self.its.dtype))
            stop = self.r.norm(dim=0) <= self.rtol * self.b_norm
            if self.eta is not None:
                q = -0.5 * _dot(self.x, self.b + self.r)  # Q(x) = -x^T (b + r) / 2 since r = b - A x
                i = self.its.to(q.dtype)  # i (Q_i - Q_i-1) / Q_i < eta, multiplied by Q_i < 0
                stop |= (self.its >= self.min_iterations) & (q < 0) & (i * (q - self.q_prev) > self.eta * q)
                self.q_prev = q
            active = active & ~stop
            z = self.precond(self.r)
            rz_new = _dot(self.r, z)
            beta = torch.where(active, rz_new / torch.where(self.rz != 0, self.rz, 1), zero)
            self.p = z + beta * p
            self.rz = torch.where(active, rz_new, self.rz)
            self.active = active

    def result(self) -> PCGResult:
        return PCGResult(self.x, self.its.max() if self.its.dim() else self.its, self.ok)


def solve(matvec: Callable[[Tensor], Tensor], precond: Callable[[Tensor], Tensor], b: Tensor, *,
          max_iterations: int, eta: float | None = None, rtol: float = 0.0, min_iterations: int = 1,
          expected_iterations: int = 0) -> PCGResult:
    """Approximately solve A x = b for SPD A given as `matvec`; `precond` applies M^-1 ~ A^-1.

    Everything stays on b's device; the host reads one bool per block of iterations.
    """
    cg = PCG(matvec, precond, b, max_iterations=max_iterations, eta=eta, rtol=rtol, min_iterations=min_iterations)
    while not cg.exhausted:
        cg.run(next_block(cg.done, expected_iterations))
        if not bool(cg.active.any()):  # the one read per block
            break
    return cg.result()
