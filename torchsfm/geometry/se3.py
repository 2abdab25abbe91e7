"""Batched rigid transforms target_from_source = (R, t): x_target = R x_source + t.

Poses are stored as (quaternion w-first, translation) in the data model and as (R, t) matrices
in hot paths; these helpers convert and compose. The tangent space is (omega, v) with the
left-multiplicative update  T <- Exp(delta) * T  used by the solvers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import so3


def apply(R: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """x (..., 3) mapped by (R (..., 3, 3), t (..., 3))."""
    return (R @ x[..., None])[..., 0] + t


def compose(Ra: Tensor, ta: Tensor, Rb: Tensor, tb: Tensor) -> tuple[Tensor, Tensor]:
    """a_from_c = a_from_b * b_from_c."""
    return Ra @ Rb, apply(Ra, ta, tb)


def inverse(R: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    Rt = R.transpose(-1, -2)
    return Rt, -(Rt @ t[..., None])[..., 0]


def relative(Ri: Tensor, ti: Tensor, Rj: Tensor, tj: Tensor) -> tuple[Tensor, Tensor]:
    """cam_j_from_cam_i given cam_i_from_world and cam_j_from_world."""
    Rii, tii = inverse(Ri, ti)
    return compose(Rj, tj, Rii, tii)


def center(R: Tensor, t: Tensor) -> Tensor:
    """Camera centre in world coordinates of cam_from_world (R, t): -R^T t."""
    return -(R.transpose(-1, -2) @ t[..., None])[..., 0]


def exp(xi: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 6) tangent (omega, v) -> (R, t) with the SE(3) left Jacobian on v."""
    w, v = xi[..., :3], xi[..., 3:]
    R = so3.exp(w)
    th2 = (w * w).sum(-1)[..., None, None]
    small = th2 < (1e-10 if xi.dtype == torch.float64 else 1e-5)
    th2s = torch.where(small, torch.ones_like(th2), th2)
    th = th2s.sqrt()
    b = torch.where(small, 0.5 - th2 / 24, (1 - torch.cos(th)) / th2s)
    c = torch.where(small, 1.0 / 6 - th2 / 120, (th - torch.sin(th)) / (th2s * th))
    K = so3.skew(w)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand(K.shape)
    V = eye + b * K + c * (K @ K)
    return R, (V @ v[..., None])[..., 0]


def log(R: Tensor, t: Tensor) -> Tensor:
    """Inverse of exp: (R, t) -> (..., 6)."""
    w = so3.log(R)
    th2 = (w * w).sum(-1)[..., None, None]
    small = th2 < (1e-10 if R.dtype == torch.float64 else 1e-5)
    th2s = torch.where(small, torch.ones_like(th2), th2)
    th = th2s.sqrt()
    # V^-1 = I - K/2 + (1/th^2)(1 - th sin th / (2(1 - cos th))) K^2
    d = torch.where(small, 1.0 / 12 + th2 / 720, (1 - th * torch.sin(th) / (2 * (1 - torch.cos(th)))) / th2s)
    K = so3.skew(w)
    eye = torch.eye(3, dtype=R.dtype, device=R.device).expand(K.shape)
    Vinv = eye - 0.5 * K + d * (K @ K)
    return torch.cat([w, (Vinv @ t[..., None])[..., 0]], -1)


def left_update(R: Tensor, t: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Solver update on cam_from_world: R <- Exp(dw) R, t <- Exp(dw) t + dt.

    This (SO(3) x R^3) chart is what the BA Jacobians are written for; it has the same minima
    as the SE(3) one and keeps translation updates decoupled from rotation ones.
    """
    dR = so3.exp(delta[..., :3])
    return dR @ R, (dR @ t[..., None])[..., 0] + delta[..., 3:6]
