"""Relative pose of verified pairs, as COLMAP's EstimateTwoViewGeometryPose does, batched.

E-based configs (calibrated: the estimated E; uncalibrated: E = K2^T F K1 with the cameras'
current intrinsics) decompose E into its four poses and keep the one with the most inlier rays
in front of both cameras (COLMAP's CheckCheirality). Planar / panoramic configs decompose H
(Malis and Vargas, as COLMAP's DecomposeHomographyMatrix), pick the candidate that triangulates
the most inliers with the smallest angular residual, and resolve PLANAR_OR_PANORAMIC: a zero
translation (H is a rotation up to 1e-3) is PANORAMIC, else PLANAR.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...geometry import so3
from .linalg import det3, smallest_eigvec_sym3


def _rays(xy: Tensor) -> Tensor:
    r = torch.cat([xy, torch.ones_like(xy[..., :1])], -1)
    return r / r.norm(dim=-1, keepdim=True)


def pose_from_essential(E: Tensor, n1: Tensor, n2: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """E (P, 3, 3), normalised image points n1, n2 (P, M, 2), inlier mask (P, M) ->
    R (P, 3, 3), unit t (P, 3), valid (P,) (at least one inlier in front of both cameras)."""
    U, _, Vh = torch.linalg.svd(E)
    U = U * torch.where(det3(U) < 0, -1.0, 1.0).to(U.dtype)[:, None, None]
    Vh = Vh * torch.where(det3(Vh) < 0, -1.0, 1.0).to(U.dtype)[:, None, None]
    W = torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=E.dtype, device=E.device)
    R1, R2 = U @ W @ Vh, U @ W.T @ Vh
    t = U[:, :, 2]
    Rs = torch.stack([R1, R2, R1, R2], 1)
    ts = torch.stack([t, t, -t, -t], 1)
    r1, r2 = _rays(n1), _rays(n2)
    r1c2 = torch.einsum("pkij,pmj->pkmi", Rs, r1)  # (P, 4, M, 3)
    a = -(r1c2 * r2[:, None]).sum(-1)
    b1 = -(r1c2 * ts[:, :, None]).sum(-1)
    b2 = (r2[:, None] * ts[:, :, None]).sum(-1)
    front = (b1 - a * b2 > 0) & (b2 - a * b1 > 0) & mask[:, None]
    count = front.sum(-1)  # (P, 4)
    best = 3 - count.flip(1).argmax(1)  # the last maximum, as COLMAP's >= loop keeps
    ar = torch.arange(E.shape[0], device=E.device)
    return Rs[ar, best], ts[ar, best], count[ar, best] > 0


def _minor(S: Tensor, row: int, col: int) -> Tensor:
    c1 = 1 if col == 0 else 0
    c2 = 1 if col == 2 else 2
    r1 = 1 if row == 0 else 0
    r2 = 1 if row == 2 else 2
    return S[:, r1, c2] * S[:, r2, c1] - S[:, r1, c1] * S[:, r2, c2]


def decompose_homography(H: Tensor, K1: Tensor, K2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """COLMAP's DecomposeHomographyMatrix, batched: (P, 3, 3) -> R (P, 4, 3, 3), t (P, 4, 3),
    is_rotation (P,) (then all four candidates are the rotation with t = 0)."""
    Hn = torch.linalg.solve(K2, H) @ K1
    Hn = Hn / torch.linalg.svdvals(Hn)[:, 1, None, None]
    Hn = Hn * torch.where(det3(Hn) < 0, -1.0, 1.0).to(H.dtype)[:, None, None]
    eye = torch.eye(3, dtype=H.dtype, device=H.device)
    S = Hn.transpose(1, 2) @ Hn - eye
    rotation = S.abs().flatten(1).amax(1) < 1e-3
    M00, M11, M22 = _minor(S, 0, 0), _minor(S, 1, 1), _minor(S, 2, 2)
    rt00, rt11, rt22 = (m.clamp_min(0).sqrt() for m in (M00, M11, M22))
    e12, e02, e01 = (torch.sign(_minor(S, *rc)) for rc in ((1, 2), (0, 2), (0, 1)))
    idx = torch.diagonal(S, dim1=1, dim2=2).abs().argmax(1)
    s = lambda i, j: S[:, i, j]  # noqa: E731
    cand1 = [torch.stack([s(0, 0), s(0, 1) + rt22, s(0, 2) + e12 * rt11], 1),
             torch.stack([s(0, 1) + rt22, s(1, 1), s(1, 2) - e02 * rt00], 1),
             torch.stack([s(0, 2) + e01 * rt11, s(1, 2) + rt00, s(2, 2)], 1)]
    cand2 = [torch.stack([s(0, 0), s(0, 1) - rt22, s(0, 2) - e12 * rt11], 1),
             torch.stack([s(0, 1) - rt22, s(1, 1), s(1, 2) + e02 * rt00], 1),
             torch.stack([s(0, 2) - e01 * rt11, s(1, 2) - rt00, s(2, 2)], 1)]
    ar = torch.arange(H.shape[0], device=H.device)
    np1 = torch.stack(cand1, 1)[ar, idx]
    np2 = torch.stack(cand2, 1)[ar, idx]
    tr = torch.diagonal(S, dim1=1, dim2=2).sum(1)
    v = 2 * (1 + tr - M00 - M11 - M22).clamp_min(0).sqrt()
    esii = torch.sign(S[ar, idx, idx])
    r = (2 + tr + v).clamp_min(0).sqrt()
    nt = (2 + tr - v).clamp_min(0).sqrt()
    n1 = np1 / np1.norm(dim=1, keepdim=True).clamp_min(1e-300)
    n2 = np2 / np2.norm(dim=1, keepdim=True).clamp_min(1e-300)
    t1s = 0.5 * nt[:, None] * (esii[:, None] * r[:, None] * n2 - nt[:, None] * n1)
    t2s = 0.5 * nt[:, None] * (esii[:, None] * r[:, None] * n1 - nt[:, None] * n2)
    vs = torch.where(v != 0, v, torch.ones_like(v))[:, None, None]
    R1 = Hn @ (eye - (2.0 / vs) * t1s[:, :, None] * n1[:, None, :])
    R2 = Hn @ (eye - (2.0 / vs) * t2s[:, :, None] * n2[:, None, :])
    t1 = (R1 @ t1s[..., None])[..., 0]
    t2 = (R2 @ t2s[..., None])[..., 0]
    # COLMAP stores the candidates as quaternions, which re-orthonormalises them
    Rs = so3.quat_to_matrix(so3.matrix_to_quat(torch.stack([R1, R1, R2, R2], 1)))
    ts = torch.stack([t1, -t1, t2, -t2], 1)
    Rrot = so3.quat_to_matrix(so3.matrix_to_quat(Hn))[:, None].expand(-1, 4, 3, 3)
    Rs = torch.where(rotation[:, None, None, None], Rrot, Rs)
    ts = torch.where(rotation[:, None, None], torch.zeros_like(ts), ts)
    return Rs, ts, rotation


def pose_from_homography(H: Tensor, K1: Tensor, K2: Tensor, n1: Tensor, n2: Tensor, mask: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """COLMAP's PoseFromHomographyMatrix: R (P, 3, 3), t (P, 3), number of triangulated inliers (P,)."""
    Rs, ts, _ = decompose_homography(H, K1, K2)
    r1, r2 = _rays(n1), _rays(n2)
    # midpoint triangulation of each inlier under each candidate (TriangulateMidPoint)
    Rt = Rs.transpose(-1, -2)
    r2c1 = torch.einsum("pkij,pmj->pkmi", Rt, r2)  # (P, 4, M, 3)
    c2 = -(Rt @ ts[..., None])[..., 0]  # camera 2 centre in camera 1 (P, 4, 3)
    A = torch.stack([r1[:, None].expand_as(r2c1), -r2c1, -c2[:, :, None].expand_as(r2c1)], -1)
    nv = smallest_eigvec_sym3(A.transpose(-1, -2) @ A)
    ok = nv[..., 2].abs() > 0
    den = torch.where(ok, nv[..., 2], torch.ones_like(nv[..., 2]))
    lam0, lam1 = nv[..., 0] / den, nv[..., 1] / den
    eps = torch.finfo(H.dtype).eps
    ok = ok & (lam0 > eps) & (lam1 > eps) & mask[:, None]
    X = 0.5 * (lam0[..., None] * r1[:, None] + c2[:, :, None] + lam1[..., None] * r2c1)
    X2 = torch.einsum("pkij,pkmj->pkmi", Rs, X) + ts[:, :, None]
    e1 = 1 - (r1[:, None] * X / X.norm(dim=-1, keepdim=True).clamp_min(1e-300)).sum(-1).clamp(-1, 1)
    e2 = 1 - (r2[:, None] * X2 / X2.norm(dim=-1, keepdim=True).clamp_min(1e-300)).sum(-1).clamp(-1, 1)
    count = ok.sum(-1)
    resid = torch.where(ok, e1 + e2, torch.zeros_like(e1)).sum(-1)
    # most points first, then the smallest residual; the first candidate wins exact ties
    score = count.to(H.dtype) - resid / (resid.amax(1, keepdim=True) + 1.0) * 0.5
    best = score.argmax(1)
    ar = torch.arange(H.shape[0], device=H.device)
    return Rs[ar, best], ts[ar, best], count[ar, best]
