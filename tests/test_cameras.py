"""Camera models: parity with pycolmap, round trips, analytic Jacobians vs finite differences."""
from __future__ import annotations

import numpy as np
import pycolmap
import pytest
import torch

from torchsfm.cameras import models as M
from torchsfm.cameras.projection import project_world
from torchsfm.data.camera_models import MODELS
from torchsfm.data.model import MAX_CAMERA_PARAMS, Cameras
from torchsfm.geometry import se3, so3

NAMES = list(MODELS)
F64 = torch.float64
W, H = 640, 480
# Realistic distortion magnitudes (uniform in +-m).
DISTORTION = {
    "SIMPLE_RADIAL": [0.1],
    "RADIAL": [0.1, 0.05],
    "OPENCV": [0.1, 0.05, 2e-3, 2e-3],
    "OPENCV_FISHEYE": [0.05, 0.02, 0.01, 0.005],
}


def rand_params(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    info = MODELS[name]
    P = torch.zeros(n, info.num_params, dtype=F64)
    r = lambda: torch.rand(n, generator=gen, dtype=F64)  # noqa: E731
    for i in info.focal:
        P[:, i] = 400 + 800 * r()
    P[:, info.principal[0]] = W / 2 + 40 * (r() - 0.5)
    P[:, info.principal[1]] = H / 2 + 40 * (r() - 0.5)
    for j, m in zip(info.extra, DISTORTION.get(name, [])):
        P[:, j] = m * (2 * r() - 1)
    return P


def rand_points(n: int, gen: torch.Generator, spread: float = 0.9) -> torch.Tensor:
    """Points in front of the camera, |x/z|, |y/z| < spread."""
    z = 0.5 + 10 * torch.rand(n, generator=gen, dtype=F64)
    xy = (2 * torch.rand(n, 2, generator=gen, dtype=F64) - 1) * spread * z[:, None]
    return torch.cat([xy, z[:, None]], -1)


def colmap_camera(name: str, params: torch.Tensor) -> pycolmap.Camera:
    return pycolmap.Camera(model=name, params=params.cpu().numpy(), width=W, height=H)


def per_camera_batch(name: str, n_cams: int, n_per: int, seed: int):
    """params (n_cams*n_per, k) repeated per camera, points (n_cams*n_per, 3)."""
    gen = torch.Generator().manual_seed(seed)
    P = rand_params(name, n_cams, gen)
    X = rand_points(n_cams * n_per, gen)
    return P, P.repeat_interleave(n_per, 0), X


def fd_jacobian(fn, x: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    """Central differences of fn: (N, d) -> (N, 2) w.r.t. every column of x: (N, 2, d)."""
    cols = []
    for j in range(x.shape[1]):
        h = rel * x[:, j].abs().clamp_min(1.0)
        xp, xm = x.clone(), x.clone()
        xp[:, j] += h
        xm[:, j] -= h
        cols.append((fn(xp) - fn(xm)) / (2 * h[:, None]))
    return torch.stack(cols, -1)


def make_cameras(model_names: list[str], gen: torch.Generator, device) -> Cameras:
    C = len(model_names)
    params = torch.zeros(C, MAX_CAMERA_PARAMS, dtype=F64)
    for i, name in enumerate(model_names):
        params[i, : MODELS[name].num_params] = rand_params(name, 1, gen)[0]
    return Cameras(
        camera_id=torch.arange(1, C + 1),
        model_id=torch.tensor([MODELS[n].model_id for n in model_names]),
        width=torch.full((C,), W),
        height=torch.full((C,), H),
        params=params,
        has_prior_focal_length=torch.zeros(C, dtype=torch.bool),
    ).to(device)


# ---------------------------------------------------------------------------------------
# Parity with pycolmap


@pytest.mark.parametrize("name", NAMES)
def test_project_matches_pycolmap(name, device):
    n_cams, n_per = 12, 150
    P, Prow, X = per_camera_batch(name, n_cams, n_per, seed=1)
    uv = M.project(name, Prow.to(device), X.to(device)).cpu().numpy()
    ref = np.concatenate(
        [colmap_camera(name, P[c]).img_from_cam(X[c * n_per : (c + 1) * n_per].numpy()) for c in range(n_cams)]
    )
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(uv, ref, rtol=0, atol=1e-9)
    # Same answer through the model id and with broadcast (k,) params.
    uv0 = M.project(MODELS[name].model_id, P[0].to(device), X[:n_per].to(device)).cpu().numpy()
    np.testing.assert_allclose(uv0, ref[:n_per], rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("check_cheirality", [True, False])
def test_depth_guard_matches_pycolmap(name, check_cheirality, device):
    gen = torch.Generator().manual_seed(2)
    P = rand_params(name, 1, gen)[0]
    eps = np.finfo(np.float64).eps
    z = torch.tensor([1.0, -1.0, 0.0, 1e-9, eps, 0.5 * eps, -eps, -0.5 * eps, -3.0], dtype=F64)
    X = torch.stack([0.1 * z.abs().clamp_min(1e-3), -0.05 * z.abs().clamp_min(1e-3), z], -1)
    uv, Jp, Jk = M.project(name, P.to(device), X.to(device), jacobian=True, check_cheirality=check_cheirality)
    ref = colmap_camera(name, P).img_from_cam(X.numpy(), check_cheirality=check_cheirality)
    uv = uv.cpu().numpy()
    nan = np.isnan(ref).any(-1)
    expected_nan = (z < eps) if check_cheirality else (z.abs() < eps)
    np.testing.assert_array_equal(nan, expected_nan.numpy())
    np.testing.assert_array_equal(np.isnan(uv).any(-1), nan)
    np.testing.assert_allclose(uv[~nan], ref[~nan], rtol=1e-12, atol=1e-9)
    valid = M.valid_depth(X.to(device), check_cheirality).cpu().numpy()
    np.testing.assert_array_equal(valid, ~nan)
    # Points that fail the guard have zero (not NaN) Jacobians, so masking by product is safe.
    assert torch.all(Jp[~torch.from_numpy(valid).to(device)] == 0)
    assert torch.all(Jk[~torch.from_numpy(valid).to(device)] == 0)
    assert torch.isfinite(Jp).all() and torch.isfinite(Jk).all()


def pixel_grid(gen: torch.Generator, n: int) -> torch.Tensor:
    """Random pixels in the image plus far-off ones where undistortion may fail."""
    pix = torch.rand(n, 2, generator=gen, dtype=F64) * torch.tensor([W, H], dtype=F64)
    far = torch.tensor([[-2000.0, -2000.0], [3000.0, 3000.0], [1000.0, 1000.0], [W / 2, H / 2], [0.0, 0.0]], dtype=F64)
    return torch.cat([pix, far])


@pytest.mark.parametrize("name", NAMES)
def test_unproject_matches_pycolmap(name, device):
    gen = torch.Generator().manual_seed(3)
    n_cams = 12
    P = rand_params(name, n_cams, gen)
    pix = [pixel_grid(gen, 150) for _ in range(n_cams)]
    per = pix[0].shape[0]
    out = M.unproject(name, P.repeat_interleave(per, 0).to(device), torch.cat(pix).to(device)).cpu().numpy()
    ref = np.concatenate([colmap_camera(name, P[c]).cam_from_img(pix[c].numpy()) for c in range(n_cams)])
    # NaN exactly where COLMAP's iterative undistortion fails, equal elsewhere.
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    fin = ~np.isnan(ref)
    assert fin.all(-1).sum() >= n_cams * 150  # every in-image pixel converged
    np.testing.assert_allclose(out[fin], ref[fin], rtol=0, atol=1e-9)


def test_fisheye_unproject_wide_angles_match_pycolmap():
    """Undistorted fisheye angles beyond 90 degrees: COLMAP leaves them unscaled; so do we."""
    P = torch.tensor([500.0, 510.0, 320.0, 240.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    theta = torch.tensor([0.0, 1e-9, 0.5, 1.0, 1.5, 1.6, 2.5, 3.5], dtype=F64)
    pix = torch.stack([320 + 500 * theta, torch.full_like(theta, 240.0)], -1)
    out = M.unproject("OPENCV_FISHEYE", P, pix).numpy()
    ref = colmap_camera("OPENCV_FISHEYE", P).cam_from_img(pix.numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(out[3, 0], np.tan(1.0), rtol=1e-13)
    np.testing.assert_allclose(out[6, 0], 2.5, rtol=1e-13)  # unscaled past 90 degrees


@pytest.mark.parametrize(
    "name, params",
    [
        ("SIMPLE_RADIAL", [500, 320, 240, -0.2]),
        ("RADIAL", [500, 320, 240, -0.25, 0.05]),
        ("OPENCV", [500, 500, 320, 240, -0.3, 0.1, 0.01, -0.01]),
        ("OPENCV_FISHEYE", [500, 500, 320, 240, -0.1, 0.05, -0.02, 0.01]),
    ],
)
def test_unproject_strong_distortion_matches_pycolmap(name, params):
    """Strong distortion and pixels far outside the image: the trust-region Newton iteration,
    its convergence test and its failures (NaN) are COLMAP's."""
    gen = torch.Generator().manual_seed(12)
    P = torch.tensor(params, dtype=F64)
    pix = (3 * torch.rand(4000, 2, generator=gen, dtype=F64) - 1) * torch.tensor([W, H], dtype=F64)
    out = M.unproject(name, P, pix).numpy()
    ref = colmap_camera(name, P).cam_from_img(pix.numpy())
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    if name == "SIMPLE_RADIAL":
        assert np.isnan(ref).any()  # beyond the fold of the barrel distortion
    fin = ~np.isnan(ref)
    # Relative: fisheye rays near 90 degrees have huge tan(theta).
    np.testing.assert_allclose(out[fin], ref[fin], rtol=1e-11, atol=1e-9)


def test_atan_ratio_series_matches_closed_form():
    """The series for atan(r)/r and its r^2-derivative (used in fp32 up to r^2 = 1e-2)."""
    r2 = torch.linspace(1e-6, 9.9e-3, 200, dtype=F64)
    s32, ds32 = M._atan_ratio(r2.float())
    r = r2.sqrt()
    s = torch.atan(r) / r
    ds = (1 / (1 + r2) - s) / (2 * r2)
    torch.testing.assert_close(s32.double(), s, rtol=1e-6, atol=0)
    torch.testing.assert_close(ds32.double(), ds, rtol=1e-5, atol=0)
    s64, ds64 = M._atan_ratio(torch.tensor([0.0, 1e-12, 9.9e-5, 1.01e-4], dtype=F64))
    assert s64[0] == 1 and ds64[0] == -1.0 / 3
    r = torch.tensor([9.9e-5, 1.01e-4], dtype=F64).sqrt()
    torch.testing.assert_close(s64[2:], torch.atan(r) / r, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip(name, device):
    _, Prow, X = per_camera_batch(name, 10, 100, seed=4)
    Prow, X = Prow.to(device), X.to(device)
    back = M.unproject(name, Prow, M.project(name, Prow, X))
    # COLMAP stops Newton at |step| < 1e-5; the quadratic convergence leaves ~1e-10.
    torch.testing.assert_close(back, X[:, :2] / X[:, 2:], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Jacobians


@pytest.mark.parametrize("name", NAMES)
def test_project_jacobians_match_finite_differences(name, device):
    _, Prow, X = per_camera_batch(name, 10, 30, seed=5)
    Prow, X = Prow.to(device), X.to(device)
    uv, Jp, Jk = M.project(name, Prow, X, jacobian=True)
    assert Jp.shape == (len(X), 2, 3) and Jk.shape == (len(X), 2, MODELS[name].num_params)
    torch.testing.assert_close(uv, M.project(name, Prow, X), rtol=0, atol=0)
    fd_p = fd_jacobian(lambda x: M.project(name, Prow, x), X)
    fd_k = fd_jacobian(lambda p: M.project(name, p, X), Prow)
    torch.testing.assert_close(Jp, fd_p, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(Jk, fd_k, rtol=1e-6, atol=1e-5)


def test_fisheye_jacobian_near_optical_axis():
    """The atan(r)/r series branch (r^2 < 1e-4) and the closed form agree with FD on both sides."""
    gen = torch.Generator().manual_seed(6)
    P = rand_params("OPENCV_FISHEYE", 1, gen)[0]
    r = torch.tensor([0.0, 1e-9, 1e-5, 3e-3, 9.9e-3, 1.01e-2, 3e-2], dtype=F64)
    ang = torch.rand(len(r), generator=gen, dtype=F64) * 6.28
    X = torch.stack([r * torch.cos(ang), r * torch.sin(ang), torch.ones_like(r)], -1) * 2.0
    uv, Jp, Jk = M.project("OPENCV_FISHEYE", P, X, jacobian=True)
    ref = colmap_camera("OPENCV_FISHEYE", P).img_from_cam(X.numpy())
    np.testing.assert_allclose(uv.numpy(), ref, rtol=0, atol=1e-9)
    fd_p = fd_jacobian(lambda x: M.project("OPENCV_FISHEYE", P, x), X, rel=1e-7)
    torch.testing.assert_close(Jp, fd_p, rtol=1e-6, atol=1e-5)


def test_project_world_jacobians(device):
    gen = torch.Generator().manual_seed(7)
    cams = make_cameras(NAMES, gen, device)
    n = 120
    cam = torch.randint(0, len(cams), (n,), generator=gen).to(device)
    R = so3.random_rotation(n, generator=gen).to(device)
    p_cam = rand_points(n, gen).to(device)
    X = (2 * torch.rand(n, 3, generator=gen, dtype=F64) - 1).to(device) * 5
    t = p_cam - (R @ X[..., None])[..., 0]  # so that the points land in front of the cameras
    res = project_world(cams, cam, R, t, X, jacobian=True)
    assert res.valid.all()
    torch.testing.assert_close(res.p_cam, p_cam, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.uv, M.project_cameras(cams, cam, p_cam), rtol=0, atol=1e-9)
    # Quaternion input gives the same projection.
    res_q = project_world(cams, cam, so3.matrix_to_quat(R), t, X)
    torch.testing.assert_close(res_q.uv, res.uv, rtol=0, atol=1e-8)
    assert res_q.J_pose is None

    def by_pose(delta):
        R2, t2 = se3.left_update(R, t, delta)
        return project_world(cams, cam, R2, t2, X).uv

    fd_pose = fd_jacobian(by_pose, torch.zeros(n, 6, dtype=F64, device=device), rel=1e-7)
    fd_X = fd_jacobian(lambda x: project_world(cams, cam, R, t, x).uv, X)

    # An observation depends only on its own camera's row, so perturbing column j of every
    # camera at once yields each observation's derivative w.r.t. its own parameter j.
    fd_k = []
    for j in range(MAX_CAMERA_PARAMS):
        h = 1e-6 * cams.params[:, j].abs().clamp_min(1.0)
        uv_pm = []
        for sgn in (1.0, -1.0):
            c = cams.clone()
            c.params[:, j] += sgn * h
            uv_pm.append(project_world(c, cam, R, t, X).uv)
        fd_k.append((uv_pm[0] - uv_pm[1]) / (2 * h[cam, None]))
    fd_k = torch.stack(fd_k, -1)
    torch.testing.assert_close(res.J_pose, fd_pose, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(res.J_X, fd_X, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(res.J_params, fd_k, rtol=1e-6, atol=1e-5)
    # Padding columns beyond each model's parameter count are zero.
    assert torch.all(res.J_params.transpose(1, 2)[~M.used_mask(cams)[cam]] == 0)


# ---------------------------------------------------------------------------------------
# Mixed-model cameras, dtypes, helpers


def test_project_cameras_mixed_equals_per_model(device):
    gen = torch.Generator().manual_seed(8)
    names = NAMES + NAMES[::-1]
    cams = make_cameras(names, gen, device)
    n = 500
    cam = torch.randint(0, len(cams), (n,), generator=gen).to(device)
    X = rand_points(n, gen).to(device)
    X[:5, 2] = -1.0  # some behind the camera
    uv, Jp, Jk = M.project_cameras(cams, cam, X, jacobian=True)
    assert Jk.shape == (n, 2, MAX_CAMERA_PARAMS)
    torch.testing.assert_close(uv, M.project_cameras(cams, cam, X), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(uv[:5]).all() and torch.isfinite(uv[5:]).all()
    for c, name in enumerate(names):
        sel = cam == c
        k = MODELS[name].num_params
        uv_c, Jp_c, Jk_c = M.project(name, cams.params[c], X[sel], jacobian=True)
        torch.testing.assert_close(uv[sel], uv_c, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(Jp[sel], Jp_c, rtol=0, atol=0)
        torch.testing.assert_close(Jk[sel, :, :k], Jk_c, rtol=0, atol=0)
        assert torch.all(Jk[sel, :, k:] == 0)
    # And through unproject_cameras back to the normalised coordinates.
    back = M.unproject_cameras(cams, cam[5:], uv[5:])
    torch.testing.assert_close(back, X[5:, :2] / X[5:, 2:], rtol=0, atol=1e-9)
    for c, name in enumerate(names):
        sel = cam[5:] == c
        torch.testing.assert_close(back[sel], M.unproject(name, cams.params[c], uv[5:][sel]), rtol=0, atol=0)


def test_single_model_cameras_fast_path(device):
    gen = torch.Generator().manual_seed(9)
    cams = make_cameras(["OPENCV"] * 3, gen, device)
    cam = torch.tensor([2, 0, 1, 1, 2], device=device)
    X = rand_points(5, gen).to(device)
    uv = M.project_cameras(cams, cam, X)
    ref = M.project("OPENCV", cams.params[cam], X)
    torch.testing.assert_close(uv, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_fp32_in_fp32_out(name, device):
    _, Prow, X = per_camera_batch(name, 4, 50, seed=10)
    P32, X32 = Prow.to(device, torch.float32), X.to(device, torch.float32)
    uv, Jp, Jk = M.project(name, P32, X32, jacobian=True)
    xy = M.unproject(name, P32, uv)
    for t in (uv, Jp, Jk, xy):
        assert t.dtype == torch.float32 and t.device.type == device.type
    uv64 = M.project(name, Prow.to(device), X.to(device))
    torch.testing.assert_close(uv.double(), uv64, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(xy.double(), (X[:, :2] / X[:, 2:]).to(device), rtol=0, atol=1e-4)
    cams = make_cameras(NAMES, torch.Generator().manual_seed(0), device).to(dtype=torch.float32)
    cam = torch.arange(len(cams), device=device).repeat(3)
    R = torch.eye(3, device=device).expand(len(cam), 3, 3)
    t = torch.zeros(len(cam), 3, device=device)
    res = project_world(cams, cam, R, t, X32[: len(cam)], jacobian=True)
    for t in (res.uv, res.p_cam, res.J_pose, res.J_X, res.J_params):
        assert t.dtype == torch.float32


def test_parameter_helpers_match_pycolmap(device):
    gen = torch.Generator().manual_seed(11)
    cams = make_cameras(NAMES, gen, device)
    K = M.calibration_matrix(cams).cpu()
    f = M.focal_length(cams).cpu()
    thr = M.cam_from_img_threshold(cams, 2.0).cpu()
    masks = {
        "focal": M.focal_mask(cams).cpu(),
        "pp": M.principal_point_mask(cams).cpu(),
        "extra": M.extra_mask(cams).cpu(),
    }
    assert M.num_params(cams).tolist() == [MODELS[n].num_params for n in NAMES]
    for i, name in enumerate(NAMES):
        k = MODELS[name].num_params
        c = colmap_camera(name, cams.params[i, :k])
        np.testing.assert_allclose(K[i].numpy(), c.calibration_matrix(), rtol=1e-15)
        np.testing.assert_allclose(float(f[i]), c.mean_focal_length(), rtol=1e-15)
        np.testing.assert_allclose(float(thr[i]), c.cam_from_img_threshold(2.0), rtol=1e-15)
        assert torch.nonzero(masks["focal"][i]).flatten().tolist() == list(c.focal_length_idxs())
        assert torch.nonzero(masks["pp"][i]).flatten().tolist() == list(c.principal_point_idxs())
        assert torch.nonzero(masks["extra"][i]).flatten().tolist() == list(c.extra_params_idxs())
        ref = pycolmap.Camera.create_from_model_name(1, name, 777.0, W, H).params
        dp = M.default_params(name, torch.tensor(777.0, dtype=F64), W, H)
        np.testing.assert_array_equal(dp[:k].numpy(), ref)
        assert torch.all(dp[k:] == 0)
    pm = M.param_mask(cams, refine_focal=True, refine_principal_point=False, refine_extra=True)
    assert torch.equal(pm, masks["focal"].to(device) | masks["extra"].to(device))
    assert not M.param_mask(cams, False, False, False).any()
    assert torch.equal(M.param_mask(cams, True, True, True), M.used_mask(cams))


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="unsupported camera model"):
        M.project("FULL_OPENCV", torch.zeros(12, dtype=F64), torch.ones(1, 3, dtype=F64))
    with pytest.raises(ValueError, match="needs 8 parameters"):
        M.project("OPENCV", torch.zeros(4, dtype=F64), torch.ones(1, 3, dtype=F64))


def test_project_cameras_in_chunks_equals_whole(monkeypatch):
    """On the CPU the projections run in cache-sized row chunks (also within each model's rows):
    the same numbers as in one piece."""
    import torchsfm.runtime.chunks as chunks

    gen = torch.Generator().manual_seed(12)
    cams = make_cameras(NAMES, gen, "cpu")
    n = 300
    cam = torch.randint(0, len(cams), (n,), generator=gen)
    X = rand_points(n, gen)
    whole = M.project_cameras(cams, cam, X, jacobian=True)
    back = M.unproject_cameras(cams, cam, whole[0])
    monkeypatch.setattr(chunks, "CPU_CHUNK_ROWS", 7)
    assert len(chunks.row_chunks(n, "cpu")) == 43
    parts = M.project_cameras(cams, cam, X, jacobian=True)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(M.unproject_cameras(cams, cam, whole[0]), back, rtol=0, atol=1e-12, equal_nan=True)
