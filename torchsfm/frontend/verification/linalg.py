"""Closed-form batched 3x3 linear algebra for the minimal solvers and local optimisation.

LAPACK's batched eigh/svd run one small matrix at a time on the CPU (~10-20 us each); the RANSAC
loop needs hundreds of thousands per second, so null vectors, rank-2 and essential projections
and cubic roots are written here as a few vectorised tensor ops each (float64).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor



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


def _soa(F: Tensor) -> list[Tensor]:
    """(…, 3, 3) -> the 9 row-major entries as (N,) tensors (structure of arrays: 3x3 algebra on
    (N,) vectors runs several times faster than on (N, 3, 3) blocks)."""
    return list(F.reshape(-1, 9).T)


def _aos(f: list[Tensor], shape) -> Tensor:
    return torch.stack(f, -1).reshape(*shape, 3, 3)


def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _null_soa(r0, r1, r2):
    """Unit null direction of a rank-2 matrix from three of its rows (or columns): the largest of
    their pairwise cross products (exact for rank 2); zero where the rank is lower."""
    cs = [_cross(r0, r1), _cross(r1, r2), _cross(r0, r2)]
    ns = [c[0] * c[0] + c[1] * c[1] + c[2] * c[2] for c in cs]
    use1 = ns[1] > ns[0]
    best = [torch.where(use1, x1, x0) for x0, x1 in zip(cs[0], cs[1])]
    nb = torch.where(use1, ns[1], ns[0])
    use2 = ns[2] > nb
    best = [torch.where(use2, x2, x) for x, x2 in zip(best, cs[2])]
    nb = torch.where(use2, ns[2], nb).sqrt()
    inv = torch.where(nb > 0, 1.0 / nb.clamp_min(1e-300), 0.0)
    return tuple(x * inv for x in best)


def _essential_soa(f: list[Tensor], v3=None, u3=None) -> list[Tensor]:
    if v3 is None:
        v3 = _null_soa(f[0:3], f[3:6], f[6:9])
    if u3 is None:
        u3 = _null_soa((f[0], f[3], f[6]), (f[1], f[4], f[7]), (f[2], f[5], f[8]))
    # [u3]x F [v3]x^T = U diag(s2, s1, 0) V^T up to sign, so F +- it is (s1 + s2) U diag(1, 1, 0) V^T
    y = [_cross(u3, (f[j], f[3 + j], f[6 + j])) for j in range(3)]  # columns of [u3]x F
    z = [_cross(v3, (y[0][i], y[1][i], y[2][i])) for i in range(3)]  # rows of ... [v3]x^T
    zf = [z[i][j] for i in range(3) for j in range(3)]
    plus = [a + b for a, b in zip(f, zf)]
    minus = [a - b for a, b in zip(f, zf)]
    n_plus = sum(x * x for x in plus)
    n_minus = sum(x * x for x in minus)
    use = n_plus >= n_minus
    n = torch.where(use, n_plus, n_minus).sqrt()
    scale = torch.where(n > 0, 2 ** 0.5 / n.clamp_min(1e-300), 0.0)
    return [torch.where(use, p, m) * scale for p, m in zip(plus, minus)]


def essential_from_rank2(F: Tensor) -> Tensor:
    """Closest essential matrix U diag(1, 1, 0) V^T to each rank-2 F (…, 3, 3), unit singular values.

    With u3, v3 the left/right null vectors (cross products of columns/rows), [u3]x F [v3]x^T is
    U diag(s2, s1, 0) V^T up to sign, so the larger of F +- it is (s1 + s2) U diag(1, 1, 0) V^T:
    no SVD, a few dozen elementwise ops.
    """
    return _aos(_essential_soa(_soa(F)), F.shape[:-2])


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


def _bougnoux_soa(f: list[Tensor]):
    e1 = _null_soa(f[0:3], f[3:6], f[6:9])  # F e1 = 0
    e2 = _null_soa((f[0], f[3], f[6]), (f[1], f[4], f[7]), (f[2], f[5], f[8]))  # F^T e2 = 0
    a1 = e2[0] * f[5] - e2[1] * f[2]
    z0 = f[0] * f[6] + f[1] * f[7]  # F I~ F^T p, p = (0, 0, 1)
    z1 = f[3] * f[6] + f[4] * f[7]
    d1 = e2[0] * z1 - e2[1] * z0
    a2 = e1[0] * f[7] - e1[1] * f[6]
    y0 = f[0] * f[2] + f[3] * f[5]  # F^T I~ F p
    y1 = f[1] * f[2] + f[4] * f[5]
    d2 = e1[0] * y1 - e1[1] * y0
    return -a1 * f[8] / d1, -a2 * f[8] / d2, e1, e2


def bougnoux_focals(F: Tensor) -> tuple[Tensor, Tensor]:
    """Squared focal lengths (f1^2, f2^2) (…,) of the two cameras of fundamental matrices F (…, 3, 3)
    whose principal points are the origin (Bougnoux 1998; exact for a noise-free F, negative or
    unstable when the focal is not identifiable, e.g. parallel optical axes)."""
    q1, q2, _, _ = _bougnoux_soa(_soa(F))
    return q1.reshape(F.shape[:-2]), q2.reshape(F.shape[:-2])


def shared_focal_projection(F: Tensor, rho_range: tuple[float, float] = (0.05, 20.0)) -> tuple[Tensor, Tensor, Tensor]:
    """The shared-focal model nearest to a rank-2 F (…, 3, 3) in a frame whose principal point is
    the origin: rho from Bougnoux's two estimates (their geometric mean, or the positive one),
    then K^-1 proj_E(K F K) K^-1 with K = diag(rho, rho, 1), unit norm. Returns (model, rho, valid)."""
    f = _soa(F)
    q1, q2, e1, e2 = _bougnoux_soa(f)
    both = (q1 > 0) & (q2 > 0)
    rho2 = torch.where(both, torch.sqrt(q1.clamp_min(0) * q2.clamp_min(0)), torch.where(q1 > 0, q1, q2))
    valid = (rho2 > rho_range[0] ** 2) & (rho2 < rho_range[1] ** 2) & torch.isfinite(rho2)
    rho = torch.sqrt(torch.where(valid, rho2, 1.0))
    k = (rho, rho, torch.ones_like(rho))
    kf = [f[3 * i + j] * k[i] * k[j] for i in range(3) for j in range(3)]  # K F K
    # its null vectors are K^-1 e1, K^-1 e2
    v3 = _unit_tuple((e1[0] / rho, e1[1] / rho, e1[2]))
    u3 = _unit_tuple((e2[0] / rho, e2[1] / rho, e2[2]))
    E = _essential_soa(kf, v3, u3)
    G = [E[3 * i + j] / (k[i] * k[j]) for i in range(3) for j in range(3)]
    n = sum(x * x for x in G).sqrt()
    valid = valid & (n > 0) & torch.isfinite(n)
    inv = torch.where(valid, 1.0 / n.clamp_min(1e-300), 0.0)
    shape = F.shape[:-2]
    return _aos([x * inv for x in G], shape), rho.reshape(shape), valid.reshape(shape)


def _unit_tuple(v):
    n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
    inv = torch.where(n > 0, 1.0 / n.clamp_min(1e-300), 0.0)
    return tuple(x * inv for x in v)
