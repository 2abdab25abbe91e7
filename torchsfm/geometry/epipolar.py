"""Epipolar geometry of many image pairs at once: Sampson errors and batched pose refinement.

Coordinates are normalised (undistorted, divided by the focal length); errors are reported in
pixels through each pair's two focal lengths, so thresholds read as in PoseLib or GLOMAP.
The refinement is a per-pair Levenberg-Marquardt on 5 degrees of freedom (rotation, direction
of the translation) with a Cauchy loss, run on all pairs together: one pass over all matches per
iteration, no loop over pairs, so it runs on the GPU as well as on CPU threads.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..segments import spread_subset
from . import so3


def _soa(E: Tensor, index: Tensor | None = None) -> Tensor:
    """(K, 3, 3) -> (9, K) contiguous rows (gathered at `index` when given): per-match 3x3
    products as 1-D vector operations (batched 3x3 reductions are ~30x slower on the CPU)."""
    rows = E.reshape(-1, 9).T.contiguous()
    return rows if index is None else torch.index_select(rows, 1, index)


def _sampson_parts(p: Tensor, e: Tensor, f1: Tensor, f2: Tensor):
    """p (4, M) rows u1, v1, u2, v2; e (9, M) row-major E. Returns the numerator x2^T E x1, the
    first two entries of E x1 and E^T x2, and the pixel-scaled squared norm of the line."""
    u1, v1, u2, v2 = p
    a0 = e[0] * u1 + e[1] * v1 + e[2]
    a1 = e[3] * u1 + e[4] * v1 + e[5]
    a2 = e[6] * u1 + e[7] * v1 + e[8]
    b0 = e[0] * u2 + e[3] * v2 + e[6]
    b1 = e[1] * u2 + e[4] * v2 + e[7]
    num = u2 * a0 + v2 * a1 + a2
    den = (a0 * a0 + a1 * a1) / (f2 * f2) + (b0 * b0 + b1 * b1) / (f1 * f1)
    return num, (a0, a1, b0, b1), den.clamp_min(1e-300)


def sampson_error(x1: Tensor, x2: Tensor, E: Tensor, f1: Tensor, f2: Tensor, index: Tensor | None = None) -> Tensor:
    """Signed Sampson distance (pixels) of matches x1 <-> x2 (M, 2) under essential matrices E
    (x2^T E x1 = 0): per match (M, 3, 3), or per pair (E, 3, 3) with `index` (M,) the pair of
    each match; focal lengths f1, f2 (M,)."""
    num, _, den = _sampson_parts(torch.cat([x1, x2], 1).T, _soa(E, index), f1, f2)
    return num / den.sqrt()


def _sampson_jacobian(p: Tensor, e: Tensor, de: Tensor, f1: Tensor, f2: Tensor) -> Tensor:
    """d(Sampson error)/d(theta) (M,) for the matrix derivative de = dE/d(theta) (9, M)."""
    num, (a0, a1, b0, b1), den = _sampson_parts(p, e, f1, f2)
    dnum, (da0, da1, db0, db1), _ = _sampson_parts(p, de, f1, f2)  # linear in E: the same formulas
    dden = 2 * ((a0 * da0 + a1 * da1) / (f2 * f2) + (b0 * db0 + b1 * db1) / (f1 * f1))
    sq = den.sqrt()
    return dnum / sq - 0.5 * num * dden / (den * sq)


_UPPER = [(a, b) for a in range(5) for b in range(a, 5)]
_UPPER_A = [a for a, _ in _UPPER]
_UPPER_B = [b for _, b in _UPPER]


def _tangent_basis(t: Tensor) -> Tensor:
    """(E, 3, 2) orthonormal basis of the plane orthogonal to each unit vector t (E, 3)."""
    ex = torch.zeros_like(t)
    ex[:, 0] = 1
    ey = torch.zeros_like(t)
    ey[:, 1] = 1
    a = torch.where((t[:, :1].abs() < 0.9), ex, ey)
    b1 = torch.linalg.cross(a, t)
    b1 = b1 / b1.norm(dim=1, keepdim=True)
    b2 = torch.linalg.cross(t, b1)
    return torch.stack([b1, b2], 2)


def _update(R: Tensor, t: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    Rn = so3.exp(delta[:, :3]) @ R
    tn = t + (_tangent_basis(t) @ delta[:, 3:, None])[:, :, 0]
    return Rn, tn / tn.norm(dim=1, keepdim=True)


def refine_relative_poses(x1: Tensor, x2: Tensor, pair: Tensor, R: Tensor, t: Tensor, f1: Tensor, f2: Tensor,
                          loss_scale: float, iterations: int = 10, max_matches: int | None = 256
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Refine cam2_from_cam1 poses (R (E, 3, 3), unit t (E, 3)) of E pairs on their matches.

    x1, x2 (M, 2) normalised coordinates, pair (M,) the pair of each match, f1, f2 (M,) focal
    lengths (for pixel errors), `pair` sorted. Minimises the sum over matches of Cauchy(Sampson
    error in pixels, loss_scale) on at most about `max_matches` matches per pair, evenly spread
    (five unknowns need far fewer than the thousands of matches a pair may have; the CPU pass over
    matches is memory-bound). Each pair keeps its own damping and only accepts steps that lower
    its cost. Returns (R, t, Sampson errors of all matches (M,) at the result).
    """
    if max_matches is not None:
        sub = spread_subset(pair, R.shape[0], max_matches)
        if not bool(sub.all()):
            R, t, _ = refine_relative_poses(x1[sub], x2[sub], pair[sub], R, t, f1[sub], f2[sub], loss_scale,
                                            iterations, None)
            return R, t, sampson_error(x1, x2, so3.skew(t) @ R, f1, f2, pair)
    num_pairs = R.shape[0]
    dt, dev = x1.dtype, x1.device
    c2 = loss_scale ** 2

    p = torch.cat([x1, x2], 1).T.contiguous()  # (4, M)

    def residual(Rp: Tensor, tp: Tensor) -> Tensor:
        num, _, den = _sampson_parts(p, _soa(so3.skew(tp) @ Rp, pair), f1, f2)
        return num / den.sqrt()

    def pair_cost(r: Tensor) -> Tensor:
        return torch.zeros(num_pairs, dtype=dt, device=dev).index_add_(0, pair, c2 * torch.log1p(r.square() / c2))

    r = residual(R, t)
    cost = pair_cost(r)
    lam = torch.full((num_pairs,), 1e-4, dtype=dt, device=dev)
    for _ in range(iterations):
        # dE/d(delta_k) per pair in closed form at delta = 0 (R' = exp(w) R, t' = t + B tau
        # normalised, B orthogonal to t): [t]x [e_k]x R for the rotation, [B_k]x R for the
        # translation; then the chain rule through the Sampson error per match
        Em = _soa(so3.skew(t) @ R, pair)
        eye = torch.eye(3, dtype=dt, device=dev)
        B = _tangent_basis(t)
        dEs = [so3.skew(t) @ so3.skew(eye[k].expand(num_pairs, 3)) @ R for k in range(3)]
        dEs += [so3.skew(B[:, :, k]) @ R for k in range(2)]
        cols = [_sampson_jacobian(p, Em, _soa(dE, pair), f1, f2) for dE in dEs]
        w = 1.0 / (1.0 + r.square() / c2)  # IRLS weight of the Cauchy loss
        wJ = [w * c for c in cols]
        prods = torch.stack([wJ[a] * cols[b] for a, b in _UPPER] + [wj * r for wj in wJ])  # (15 + 5, M)
        acc = torch.zeros(prods.shape[0], num_pairs, dtype=dt, device=dev).index_add_(1, pair, prods)
        H = torch.zeros(num_pairs, 5, 5, dtype=dt, device=dev)
        H[:, _UPPER_A, _UPPER_B] = acc[:15].T
        H[:, _UPPER_B, _UPPER_A] = acc[:15].T
        g = acc[15:].T
        diag = torch.diagonal(H, dim1=1, dim2=2).clamp_min(1e-12)
        A = H + torch.diag_embed(lam[:, None] * diag)
        delta = torch.linalg.solve_ex(A, -g[:, :, None])[0][:, :, 0]
        delta = torch.where(torch.isfinite(delta).all(1, keepdim=True), delta, torch.zeros_like(delta))
        Rn, tn = _update(R, t, delta)
        rn = residual(Rn, tn)
        cn = pair_cost(rn)
        better = cn < cost
        R = torch.where(better[:, None, None], Rn, R)
        t = torch.where(better[:, None], tn, t)
        r = torch.where(better[pair], rn, r)
        cost = torch.where(better, cn, cost)
        lam = torch.where(better, lam * 0.1, lam * 10).clamp(1e-10, 1e10)
    return R, t, r
