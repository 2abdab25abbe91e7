"""Batched SO(3): skew, exp/log, quaternion <-> matrix, composition.

Quaternions are w-first (w, x, y, z), as in COLMAP's files. Every function takes tensors of
shape (..., k) and follows their device and dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


def skew(v: Tensor) -> Tensor:
    """(..., 3) -> (..., 3, 3) with skew(a) @ b == cross(a, b)."""
    z = torch.zeros_like(v[..., 0])
    x, y, w = v[..., 0], v[..., 1], v[..., 2]
    return torch.stack(
        [torch.stack([z, -w, y], -1), torch.stack([w, z, -x], -1), torch.stack([-y, x, z], -1)], -2
    )


def _small(theta2: Tensor, dtype: torch.dtype) -> Tensor:
    # Below this, the Taylor expansion is exact to machine precision.
    return theta2 < (1e-10 if dtype == torch.float64 else 1e-5)


def exp(w: Tensor) -> Tensor:
    """Rodrigues: axis-angle (..., 3) -> rotation matrix (..., 3, 3)."""
    th2 = (w * w).sum(-1)[..., None, None]
    small = _small(th2, w.dtype)
    th2s = torch.where(small, torch.ones_like(th2), th2)
    th = th2s.sqrt()
    a = torch.where(small, 1 - th2 / 6, torch.sin(th) / th)
    b = torch.where(small, 0.5 - th2 / 24, (1 - torch.cos(th)) / th2s)
    K = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(K.shape)
    return eye + a * K + b * (K @ K)


def log(R: Tensor) -> Tensor:
    """Rotation matrix (..., 3, 3) -> axis-angle (..., 3), robust near 0 and pi (via quaternions)."""
    return quat_to_axis_angle(matrix_to_quat(R))


def quat_normalize(q: Tensor) -> Tensor:
    """Unit norm and w >= 0 (the canonical one of q and -q)."""
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_to_matrix(q: Tensor) -> Tensor:
    """(..., 4) w-first unit quaternion -> (..., 3, 3)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def matrix_to_quat(R: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 4) w-first, w >= 0. Branch-free choice of the best-conditioned pivot."""
    m = R
    t0 = 1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    t1 = 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2]
    t2 = 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2]
    t3 = 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack(
        [
            torch.stack([t0, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], t1, m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], t2, m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], t3], -1),
        ],
        -2,
    )  # (..., 4 candidates, 4)
    t = torch.stack([t0, t1, t2, t3], -1)
    best = t.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    tb = torch.gather(t, -1, best[..., None])
    q = q * (0.5 / tb.clamp_min(1e-300).sqrt())
    return quat_normalize(q)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a * b (w-first): the rotation b followed by a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        -1,
    )


def quat_conjugate(q: Tensor) -> Tensor:
    return q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype, device=q.device)


def quat_rotate(q: Tensor, v: Tensor) -> Tensor:
    """Rotate vectors (..., 3) by unit quaternions (..., 4)."""
    u = q[..., 1:]
    w = q[..., :1]
    t = 2 * torch.cross(u, v, dim=-1)
    return v + w * t + torch.cross(u, t, dim=-1)


def axis_angle_to_quat(w: Tensor) -> Tensor:
    th2 = (w * w).sum(-1, keepdim=True)
    small = _small(th2, w.dtype)
    th = torch.where(small, torch.ones_like(th2), th2).sqrt()
    half = 0.5 * th
    s = torch.where(small, 0.5 - th2 / 48, torch.sin(half) / th)
    c = torch.where(small, 1 - th2 / 8, torch.cos(half))
    return torch.cat([c, s * w], -1)


def quat_to_axis_angle(q: Tensor) -> Tensor:
    q = quat_normalize(q)
    v = q[..., 1:]
    sn = v.norm(dim=-1, keepdim=True)
    w = q[..., :1]
    # 2*atan2(|v|, w) is accurate everywhere, including near pi.
    ang = 2 * torch.atan2(sn, w)
    small = sn < (1e-8 if q.dtype == torch.float64 else 1e-4)
    scale = torch.where(small, 2 / w.clamp_min(1e-300) * (1 - sn * sn / (3 * w * w).clamp_min(1e-300)),
                        ang / torch.where(small, torch.ones_like(sn), sn))
    return scale * v


def angle_between(Ra: Tensor, Rb: Tensor) -> Tensor:
    """Geodesic angle (radians) between rotation matrices, (..., 3, 3) x2 -> (...)."""
    cos = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.arccos(cos.clamp(-1.0, 1.0))


def random_rotation(n: int, generator: torch.Generator | None = None, dtype=torch.float64, device=None) -> Tensor:
    """Uniformly distributed rotations (n, 3, 3)."""
    q = torch.randn(n, 4, generator=generator, dtype=dtype, device=device)
    return quat_to_matrix(quat_normalize(q))
