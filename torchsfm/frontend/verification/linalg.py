"""Closed-form batched 3x3 linear algebra for the minimal solvers and local optimisation.

LAPACK's batched eigh/svd run one small matrix at a time on the CPU (~10-20 us each); the RANSAC
loop needs hundreds of thousands per second, so null vectors, rank-2 and essential projections
and cubic roots are written here as a few vectorised tensor ops each (float64).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...geometry.epipolar import _tangent_basis


def _rows_cross(S: Tensor) -> Tensor:
    """(…, 3, 3) cross products of the row pairs (1, 2), (2, 0), (0, 1): the adjugate of a
    symmetric 3x3 matrix."""
    r0, r1, r2 = S[..., 0, :], S[..., 1, :], S[..., 2, :]
    return torch.stack([torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], -2)


def smallest_eigvec_sym3(S: Tensor) -> Tensor:
    """Unit eigenvector of the smallest eigenvalue of symmetric 3x3 matrices S (…, 3, 3).

    The smallest eigenvalue in closed form (trigonometric solution of the characteristic cubic),
    then the eigenvector as the largest cross product of two rows of S - lambda I (the adjugate
    of a rank-2 matrix). Zero where S - lambda I has rank <= 1 (a repeated smallest eigenvalue).
    """
    q = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1) / 3
    p1 = S[..., 0, 1] ** 2 + S[..., 0, 2] ** 2 + S[..., 1, 2] ** 2
    d = torch.diagonal(S, dim1=-2, dim2=-1) - q[..., None]
    p = torch.sqrt(((d * d).sum(-1) + 2 * p1) / 6)
    eye = torch.eye(3, dtype=S.dtype, device=S.device)
    B = (S - q[..., None, None] * eye) / torch.where(p > 0, p, 1.0)[..., None, None]
    r = (det3(B) / 2).clamp(-1.0, 1.0)
    lam = q + 2 * p * torch.cos(torch.acos(r) / 3 + 2 * math.pi / 3)
    A = _rows_cross(S - lam[..., None, None] * eye)
    col = torch.linalg.vector_norm(A, dim=-1).argmax(-1)
    v = torch.take_along_dim(A, col[..., None, None].expand(*A.shape[:-2], 1, 3), -2)[..., 0, :]
    n = v.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, v / n.clamp_min(1e-300), torch.zeros_like(v))


def rank2(F: Tensor) -> Tensor:
    """Closest rank-2 matrix (Frobenius) to each F (…, 3, 3): remove its smallest singular direction."""
    v = smallest_eigvec_sym3(F.transpose(-1, -2) @ F)
    return F - (F @ v[..., None]) @ v[..., None, :]


def essential_from_rank2(F: Tensor) -> Tensor:
    """Closest essential matrix U diag(1, 1, 0) V^T to each rank-2 F (…, 3, 3), unit singular values.

    With u3, v3 the left/right null vectors, F maps the plane orthogonal to v3 onto the plane
    orthogonal to u3 by a 2x2 matrix A; the projection replaces A by its orthogonal polar factor,
    closed form in 2x2: A + sign(det A) cof(A), normalised.
    """
    v3 = smallest_eigvec_sym3(F.transpose(-1, -2) @ F)
    u3 = smallest_eigvec_sym3(F @ F.transpose(-1, -2))
    shape = F.shape[:-2]
    Bv = _tangent_basis(v3.reshape(-1, 3)).reshape(*shape, 3, 2)
    Bu = _tangent_basis(u3.reshape(-1, 3)).reshape(*shape, 3, 2)
    A = Bu.transpose(-1, -2) @ F @ Bv
    a, b, c, d = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
    pos = (a * d - b * c) >= 0
    q00 = torch.where(pos, a + d, a - d)
    q01 = torch.where(pos, b - c, b + c)
    q10 = torch.where(pos, c - b, b + c)
    q11 = torch.where(pos, a + d, d - a)
    Q = torch.stack([torch.stack([q00, q01], -1), torch.stack([q10, q11], -1)], -2)
    Q = Q / torch.sqrt(q00 * q00 + q10 * q10).clamp_min(1e-300)[..., None, None]
    return Bu @ Q @ Bv.transpose(-1, -2)


def det3(F: Tensor) -> Tensor:
    return (F[..., 0, 0] * (F[..., 1, 1] * F[..., 2, 2] - F[..., 1, 2] * F[..., 2, 1])
            - F[..., 0, 1] * (F[..., 1, 0] * F[..., 2, 2] - F[..., 1, 2] * F[..., 2, 0])
            + F[..., 0, 2] * (F[..., 1, 0] * F[..., 2, 1] - F[..., 1, 1] * F[..., 2, 0]))


def cubic_real_roots(c3: Tensor, c2: Tensor, c1: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:
    """Real roots of c3 x^3 + c2 x^2 + c1 x + c0 (float64, closed form, two Newton polishes).

    Returns roots (…, 3) and valid (…, 3); invalid slots hold 0. A (near) zero leading
    coefficient falls back to the quadratic.
    """
    scale = torch.stack([c3.abs(), c2.abs(), c1.abs(), c0.abs()], -1).amax(-1).clamp_min(1e-300)
    cubic = c3.abs() > 1e-10 * scale
    c3s = torch.where(cubic, c3, torch.ones_like(c3))
    a, b, c = c2 / c3s, c1 / c3s, c0 / c3s
    p = b - a * a / 3.0
    q = 2.0 * a * a * a / 27.0 - a * b / 3.0 + c
    D = (q / 2.0) ** 2 + (p / 3.0) ** 3
    one = D > 0
    sD = torch.sqrt(D.clamp_min(0))
    u = -q / 2.0 + sD
    v = -q / 2.0 - sD
    t1 = torch.sign(u) * u.abs().pow(1.0 / 3.0) + torch.sign(v) * v.abs().pow(1.0 / 3.0)
    pm = torch.where(one, -torch.ones_like(p), p).clamp(max=-1e-300)  # p <= 0 when D <= 0
    m = 2.0 * torch.sqrt(-pm / 3.0)
    arg = (3.0 * q / (pm * m)).clamp(-1.0, 1.0)
    theta = torch.acos(arg) / 3.0
    k = torch.arange(3, device=c3.device, dtype=c3.dtype)
    t3 = m[..., None] * torch.cos(theta[..., None] - 2.0 * math.pi * k / 3.0)
    t = torch.where(one[..., None], torch.stack([t1, t1, t1], -1), t3)
    roots = t - a[..., None] / 3.0
    valid = torch.stack([torch.ones_like(one), ~one, ~one], -1)
    # quadratic fallback c2 x^2 + c1 x + c0
    quad = c2.abs() > 1e-10 * scale
    disc = c1 * c1 - 4 * c2 * c0
    sq = torch.sqrt(disc.clamp_min(0))
    c2s = torch.where(quad, c2, torch.ones_like(c2))
    qr = torch.stack([(-c1 + sq) / (2 * c2s), (-c1 - sq) / (2 * c2s), torch.zeros_like(c1)], -1)
    lin = -c0 / torch.where(c1.abs() > 0, c1, torch.ones_like(c1))
    qr = torch.where(quad[..., None], qr, torch.stack([lin, lin, lin], -1))
    qvalid = torch.where(quad[..., None], torch.stack([disc >= 0, disc >= 0, torch.zeros_like(quad)], -1),
                         torch.stack([c1.abs() > 0, torch.zeros_like(quad), torch.zeros_like(quad)], -1))
    roots = torch.where(cubic[..., None], roots, qr)
    valid = torch.where(cubic[..., None], valid, qvalid)
    C = [x[..., None] for x in (c3, c2, c1, c0)]
    for _ in range(2):
        f = ((C[0] * roots + C[1]) * roots + C[2]) * roots + C[3]
        df = (3 * C[0] * roots + 2 * C[1]) * roots + C[2]
        step = f / torch.where(df.abs() > 0, df, torch.ones_like(df))
        roots = torch.where(df.abs() > 0, roots - step, roots)
    valid = valid & torch.isfinite(roots)
    return torch.where(valid, roots, torch.zeros_like(roots)), valid


def smallest_eigvec_inverse_iteration(N: Tensor, x0: Tensor, steps: int = 2) -> Tensor:
    """Refine x0 (…, n) towards the smallest eigenvector of PSD matrices N (…, n, n) by inverse
    iteration (one batched LU solve per step; LAPACK's eigh is ~10x slower per small matrix).
    Rows whose solve fails keep their previous vector."""
    n = N.shape[-1]
    tr = torch.diagonal(N, dim1=-2, dim2=-1).sum(-1)
    Ns = N + (1e-12 * tr.clamp_min(1e-300) / n)[..., None, None] * torch.eye(n, dtype=N.dtype, device=N.device)
    x = x0 / x0.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    for _ in range(steps):
        y, info = torch.linalg.solve_ex(Ns, x[..., None])
        y = y[..., 0]
        ok = (info == 0)[..., None] & torch.isfinite(y).all(-1, keepdim=True)
        y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        x = torch.where(ok, y * torch.sign((y * x).sum(-1, keepdim=True) + 1e-300), x)
    return x
