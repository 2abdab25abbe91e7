import math

import pytest
import torch

from torchsfm.geometry import se3, so3


def rand_aa(n, gen, max_angle=math.pi - 1e-3, dtype=torch.float64):
    axis = torch.randn(n, 3, generator=gen, dtype=dtype)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    ang = torch.rand(n, 1, generator=gen, dtype=dtype) * max_angle
    return axis * ang


def test_exp_log_roundtrip(device):
    gen = torch.Generator().manual_seed(0)
    w = rand_aa(500, gen)
    w = torch.cat([w, torch.zeros(1, 3, dtype=w.dtype), 1e-9 * torch.ones(1, 3, dtype=w.dtype)]).to(device)
    R = so3.exp(w)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=w.dtype, device=device).expand_as(R), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(len(w), dtype=w.dtype, device=device), atol=1e-12)
    assert torch.allclose(so3.log(R), w, atol=1e-9)


def test_log_near_pi(device):
    w = torch.tensor([[math.pi - 1e-7, 0, 0], [0, 0, math.pi]], dtype=torch.float64, device=device)
    back = so3.log(so3.exp(w))
    assert torch.allclose(so3.exp(back), so3.exp(w), atol=1e-9)


def test_quaternion_matrix_roundtrip_and_product(device):
    gen = torch.Generator().manual_seed(1)
    qa = so3.quat_normalize(torch.randn(200, 4, generator=gen, dtype=torch.float64)).to(device)
    qb = so3.quat_normalize(torch.randn(200, 4, generator=gen, dtype=torch.float64)).to(device)
    Ra, Rb = so3.quat_to_matrix(qa), so3.quat_to_matrix(qb)
    assert torch.allclose(so3.matrix_to_quat(Ra), qa, atol=1e-12)
    assert torch.allclose(so3.quat_to_matrix(so3.quat_multiply(qa, qb)), Ra @ Rb, atol=1e-12)
    v = torch.randn(200, 3, dtype=torch.float64, device=device)
    assert torch.allclose(so3.quat_rotate(qa, v), (Ra @ v[..., None])[..., 0], atol=1e-12)
    assert torch.allclose(so3.axis_angle_to_quat(so3.quat_to_axis_angle(qa)), qa, atol=1e-12)


def test_quaternion_matches_pycolmap():
    pycolmap = pytest.importorskip("pycolmap")
    gen = torch.Generator().manual_seed(2)
    for q in so3.quat_normalize(torch.randn(20, 4, generator=gen, dtype=torch.float64)):
        w, x, y, z = q.tolist()
        R_ref = torch.tensor(pycolmap.Rotation3d([x, y, z, w]).matrix())  # pycolmap is xyzw
        assert torch.allclose(so3.quat_to_matrix(q), R_ref, atol=1e-12)


def test_se3_exp_log_compose_inverse(device):
    gen = torch.Generator().manual_seed(3)
    xi = torch.cat([rand_aa(100, gen, 3.0), torch.randn(100, 3, generator=gen, dtype=torch.float64)], -1).to(device)
    R, t = se3.exp(xi)
    assert torch.allclose(se3.log(R, t), xi, atol=1e-9)
    Ri, ti = se3.inverse(R, t)
    Rc, tc = se3.compose(R, t, Ri, ti)
    assert torch.allclose(Rc, torch.eye(3, dtype=R.dtype, device=device).expand_as(Rc), atol=1e-12)
    assert torch.allclose(tc, torch.zeros_like(tc), atol=1e-12)
    x = torch.randn(100, 3, dtype=torch.float64, device=device)
    assert torch.allclose(se3.apply(Ri, ti, se3.apply(R, t, x)), x, atol=1e-10)
    # centre is mapped to the origin of the camera frame
    assert torch.allclose(se3.apply(R, t, se3.center(R, t)), torch.zeros_like(x), atol=1e-10)


def test_relative_pose(device):
    gen = torch.Generator().manual_seed(4)
    Ri, Rj = so3.random_rotation(10, gen).to(device), so3.random_rotation(10, gen).to(device)
    ti, tj = torch.randn(10, 3, dtype=torch.float64, device=device), torch.randn(10, 3, dtype=torch.float64, device=device)
    Rij, tij = se3.relative(Ri, ti, Rj, tj)
    X = torch.randn(10, 3, dtype=torch.float64, device=device)
    assert torch.allclose(se3.apply(Rij, tij, se3.apply(Ri, ti, X)), se3.apply(Rj, tj, X), atol=1e-10)
