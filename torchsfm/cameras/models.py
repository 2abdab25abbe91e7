"""Batched camera models with analytic Jacobians, numerically equal to COLMAP's.

Supported models (COLMAP ids and parameter orders, see `torchsfm.data.camera_models`): SIMPLE_PINHOLE,
PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, OPENCV_FISHEYE. Every function is batched over a
leading dimension N, follows the inputs' device and dtype, and has no per-point Python loop.

Conventions (the same as pycolmap's `Camera.img_from_cam` / `Camera.cam_from_img`):
- `project` maps points in the camera frame (x right, y down, z forward) to pixels.
- Depth guard: a point is projectable when z >= eps (eps = machine epsilon of the dtype,
  COLMAP's `HasProjectableDepth`). With `check_cheirality=False` points behind the camera are
  projected too and only |z| < eps fails. Failed points get uv = NaN (pycolmap returns NaN
  rows for them) and all-zero Jacobian rows, so a solver that masks residuals by
  multiplication with `valid_depth(...)` never sees a NaN in its normal equations.
- `unproject` returns normalised coordinates on the z = 1 plane. Distorted models are inverted
  with COLMAP's Newton iteration (same trust region, step threshold and 100-iteration cap),
  run on all points at once; points that do not converge are NaN, as in pycolmap.
- OPENCV_FISHEYE unprojection follows COLMAP exactly: the equidistant angle theta is mapped back
  with tan(theta)/theta only while theta*cos(theta) > eps; beyond 90 degrees COLMAP (and so
  this code) returns the undistorted fisheye coordinates unscaled, which is not a valid ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..data.model import MAX_CAMERA_PARAMS, Cameras
from ..data.camera_models import MODELS_BY_ID, ModelInfo, model_info
from ..runtime.chunks import row_chunks

# COLMAP's IterativeUndistortion constants (src/colmap/sensor/models.h).
UNDISTORT_MAX_ITERATIONS = 100
_MIN_STEP_SQUARED_NORM = 1e-10
_REL_STEP_RADIUS = 0.1
_STEP_RADIUS = 0.1


@dataclass(frozen=True)
class _Spec:
    """How a model distorts: radial polynomial in r^2, optional OpenCV tangential terms,
    optional equidistant (fisheye) mapping of the normalised point before distortion."""

    info: ModelInfo
    radial: int  # number of radial coefficients k_i multiplying r2^(i+1)
    tangential: bool  # p1, p2 follow the radial coefficients
    fisheye: bool


_SPECS: dict[int, _Spec] = {
    0: _Spec(MODELS_BY_ID[0], 0, False, False),
    1: _Spec(MODELS_BY_ID[1], 0, False, False),
    2: _Spec(MODELS_BY_ID[2], 1, False, False),
    3: _Spec(MODELS_BY_ID[3], 2, False, False),
    4: _Spec(MODELS_BY_ID[4], 2, True, False),
    5: _Spec(MODELS_BY_ID[5], 4, False, True),
}


def _spec(model: int | str) -> _Spec:
    info = model_info(model)
    if info.model_id not in _SPECS:
        raise ValueError(f"camera model {info.name} has no projection implementation")
    return _SPECS[info.model_id]


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# ----------------------------------------------------------------------------------------
# Pieces of the projection pipeline, each returning its value and local Jacobian.


def _distort(spec: _Spec, extra: Tensor, u: Tensor, v: Tensor, jac_point: bool, jac_extra: bool):
    """(u, v) -> distorted (ud, vd); optionally D = d(ud, vd)/d(u, v) (..., 2, 2) and
    Dk = d(ud, vd)/d extra (..., 2, n_extra). Term order follows COLMAP's `Distortion`."""
    r2 = u * u + v * v
    radial = torch.zeros_like(u)
    dradial = torch.zeros_like(u)  # d radial / d r2
    powers = []  # r2^(i+1), the columns of d/dk
    p, prev = r2, torch.ones_like(u)  # r2^(i+1), r2^i
    for i in range(spec.radial):
        k = extra[..., i]
        radial = radial + k * p
        if jac_point:
            dradial = dradial + (i + 1) * k * prev
        powers.append(p)
        prev, p = p, p * r2
    ud = u + u * radial
    vd = v + v * radial
    uv = u * v
    if spec.tangential:
        p1 = extra[..., spec.radial]
        p2 = extra[..., spec.radial + 1]
        ud = ud + 2 * p1 * uv + p2 * (r2 + 2 * u * u)
        vd = vd + 2 * p2 * uv + p1 * (r2 + 2 * v * v)
    D = Dk = None
    if jac_point:
        one = 1 + radial
        dxx = one + 2 * u * u * dradial
        dyy = one + 2 * v * v * dradial
        dxy = 2 * uv * dradial
        dyx = dxy
        if spec.tangential:
            dxx = dxx + 2 * p1 * v + 6 * p2 * u
            dyy = dyy + 2 * p2 * u + 6 * p1 * v
            dxy = dxy + 2 * p1 * u + 2 * p2 * v
            dyx = dyx + 2 * p2 * v + 2 * p1 * u
        D = torch.stack([torch.stack([dxx, dxy], -1), torch.stack([dyx, dyy], -1)], -2)
    if jac_extra:
        cols = [torch.stack([u * q, v * q], -1) for q in powers]
        if spec.tangential:
            cols.append(torch.stack([2 * uv, r2 + 2 * v * v], -1))
            cols.append(torch.stack([r2 + 2 * u * u, 2 * uv], -1))
        Dk = torch.stack(cols, -1) if cols else u.new_zeros(*u.shape, 2, 0)
    return ud, vd, D, Dk


def _atan_ratio(r2: Tensor) -> tuple[Tensor, Tensor]:
    """s = atan(r)/r and ds/d(r2), with a series near r = 0 where the closed forms cancel."""
    small = r2 < (1e-4 if r2.dtype == torch.float64 else 1e-2)
    t = torch.where(small, torch.ones_like(r2), r2)
    r = t.sqrt()
    s_full = torch.atan(r) / r
    ds_full = (1 / (1 + t) - s_full) / (2 * t)
    s_ser = 1 - r2 / 3 + r2 * r2 / 5 - r2**3 / 7 + r2**4 / 9
    ds_ser = -1.0 / 3 + 2 * r2 / 5 - 3 * r2 * r2 / 7 + 4 * r2**3 / 9
    return torch.where(small, s_ser, s_full), torch.where(small, ds_ser, ds_full)


def _focals(spec: _Spec, params: Tensor) -> tuple[Tensor, Tensor]:
    f = spec.info.focal
    return (params[..., f[0]], params[..., f[-1]])


def _split(spec: _Spec, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fx, fy = _focals(spec, params)
    cx, cy = params[..., spec.info.principal[0]], params[..., spec.info.principal[1]]
    extra = params[..., spec.info.extra[0] :] if spec.info.extra else params[..., :0]
    return fx, fy, cx, cy, extra


def _prepare(spec: _Spec, params: Tensor, batch: torch.Size) -> Tensor:
    k = spec.info.num_params
    if params.shape[-1] < k:
        raise ValueError(f"{spec.info.name} needs {k} parameters, got params of shape {tuple(params.shape)}")
    return params[..., :k].expand(*batch, k)


# ----------------------------------------------------------------------------------------
# Per-model public API.


def valid_depth(p_cam: Tensor, check_cheirality: bool = True, min_depth: float | None = None) -> Tensor:
    """Points that `project` maps to finite pixels: z >= min_depth (default machine eps, COLMAP's
    rule); with check_cheirality=False, |z| >= min_depth."""
    eps = _eps(p_cam.dtype) if min_depth is None else min_depth
    z = p_cam[..., 2]
    return z >= eps if check_cheirality else z.abs() >= eps


def project(
    model: int | str,
    params: Tensor,
    p_cam: Tensor,
    jacobian: bool = False,
    check_cheirality: bool = True,
):
    """Camera-frame points (N, 3) -> pixels (N, 2), equal to pycolmap `Camera.img_from_cam`.

    params: (N, k) or (k,) (broadcast) in COLMAP order; extra trailing columns (zero padding
    to MAX_CAMERA_PARAMS) are ignored. With `jacobian=True` returns (uv, J_point (N, 2, 3),
    J_params (N, 2, k)). Points failing the depth guard give NaN pixels and zero Jacobians.
    """
    spec = _spec(model)
    batch = p_cam.shape[:-1]
    params = _prepare(spec, params, batch)
    fx, fy, cx, cy, extra = _split(spec, params)
    ok = valid_depth(p_cam, check_cheirality)
    z = torch.where(ok, p_cam[..., 2], torch.ones_like(p_cam[..., 2]))  # no inf/NaN in graph
    u = p_cam[..., 0] / z
    v = p_cam[..., 1] / z
    if spec.fisheye:
        s, ds = _atan_ratio(u * u + v * v)
        a, b = s * u, s * v
    else:
        a, b = u, v
    ud, vd, D, Dk = _distort(spec, extra, a, b, jacobian, jacobian)
    uv = torch.stack([fx * ud + cx, fy * vd + cy], -1)
    nan = torch.full_like(uv, float("nan"))
    uv = torch.where(ok[..., None], uv, nan)
    if not jacobian:
        return uv

    iz = 1 / z
    zero = torch.zeros_like(iz)
    Jn = torch.stack(
        [torch.stack([iz, zero, -u * iz], -1), torch.stack([zero, iz, -v * iz], -1)], -2
    )  # d(u, v)/d p_cam
    if spec.fisheye:
        G = torch.stack(
            [
                torch.stack([s + 2 * ds * u * u, 2 * ds * u * v], -1),
                torch.stack([2 * ds * u * v, s + 2 * ds * v * v], -1),
            ],
            -2,
        )
        Jn = G @ Jn  # d(s u, s v)/d(u, v) chained
    F = torch.stack([fx, fy], -1)[..., None]  # (..., 2, 1)
    J_point = F * (D @ Jn)

    k = spec.info.num_params
    J_params = p_cam.new_zeros(*batch, 2, k)
    if len(spec.info.focal) == 1:
        J_params[..., :, spec.info.focal[0]] = torch.stack([ud, vd], -1)
    else:
        J_params[..., 0, spec.info.focal[0]] = ud
        J_params[..., 1, spec.info.focal[1]] = vd
    J_params[..., 0, spec.info.principal[0]] = 1
    J_params[..., 1, spec.info.principal[1]] = 1
    if spec.info.extra:
        J_params[..., :, spec.info.extra[0] :] = F * Dk
    m = ok[..., None, None]
    return uv, torch.where(m, J_point, torch.zeros_like(J_point)), torch.where(m, J_params, torch.zeros_like(J_params))


def _undistort(spec: _Spec, extra: Tensor, x0: Tensor, y0: Tensor) -> Tensor:
    """Invert `_distort` with COLMAP's trust-region Newton iteration, all points at once.

    Each point stops updating once its step is below COLMAP's threshold, so results match
    pycolmap to rounding; points that never converge (or become non-finite) are NaN.
    """
    x, y = x0.clone(), y0.clone()
    active = torch.isfinite(x) & torch.isfinite(y)
    converged = torch.zeros_like(active)
    rel2 = _REL_STEP_RADIUS * _REL_STEP_RADIUS
    min_r2 = _STEP_RADIUS * _STEP_RADIUS
    for _ in range(UNDISTORT_MAX_ITERATIONS):
        ud, vd, D, _ = _distort(spec, extra, x, y, jac_point=True, jac_extra=False)
        rx, ry = ud - x0, vd - y0
        a, b, c, d = D[..., 0, 0], D[..., 0, 1], D[..., 1, 0], D[..., 1, 1]
        det = a * d - b * c
        sx = (d * rx - b * ry) / det
        sy = (a * ry - c * rx) / det
        radius2 = torch.clamp_min((x * x + y * y) * rel2, min_r2)
        n2 = sx * sx + sy * sy
        scale = torch.where(n2 > radius2, torch.sqrt(radius2 / n2), torch.ones_like(n2))
        sx, sy = sx * scale, sy * scale
        x = torch.where(active, x - sx, x)
        y = torch.where(active, y - sy, y)
        done = active & (sx * sx + sy * sy < _MIN_STEP_SQUARED_NORM)
        converged = converged | done
        active = active & ~done & torch.isfinite(x) & torch.isfinite(y)
        if not bool(active.any()):
            break
    xy = torch.stack([x, y], -1)
    return torch.where(converged[..., None], xy, torch.full_like(xy, float("nan")))


def unproject(model: int | str, params: Tensor, uv: Tensor) -> Tensor:
    """Pixels (N, 2) -> normalised camera coordinates (N, 2) on z = 1, equal to pycolmap
    `Camera.cam_from_img` (NaN where COLMAP's undistortion fails)."""
    spec = _spec(model)
    params = _prepare(spec, params, uv.shape[:-1])
    fx, fy, cx, cy, extra = _split(spec, params)
    x0 = (uv[..., 0] - cx) / fx
    y0 = (uv[..., 1] - cy) / fy
    if spec.radial == 0 and not spec.tangential:
        return torch.stack([x0, y0], -1)
    xy = _undistort(spec, extra, x0, y0)
    if spec.fisheye:
        theta = xy.norm(dim=-1, keepdim=True)
        tc = theta * torch.cos(theta)
        ok = tc > _eps(uv.dtype)
        scale = torch.sin(theta) / torch.where(ok, tc, torch.ones_like(tc))
        xy = torch.where(ok, xy * scale, xy)
    return xy


# ----------------------------------------------------------------------------------------
# Mixed-model cameras.


def _groups(cameras: Cameras, cam: Tensor):
    """Yield (model_id, row indices into `cam` or None for all rows), one per model in use."""
    ids = cameras.model_id[cam]
    present = torch.unique(cameras.model_id).tolist()
    if len(present) == 1:
        yield int(present[0]), None
        return
    for m in present:
        idx = torch.nonzero(ids == m, as_tuple=True)[0]
        if idx.numel():
            yield int(m), idx


def model_groups(cameras: Cameras, cam: Tensor) -> list[tuple[int, Tensor | None]]:
    """[(model id, rows of `cam` with that model, or None for all rows), ...]: finding them reads
    the model ids on the host, so iterative solvers compute them once and pass `groups`."""
    return list(_groups(cameras, cam))


def project_cameras(
    cameras: Cameras, cam: Tensor, p_cam: Tensor, jacobian: bool = False, check_cheirality: bool = True,
    groups: list | None = None,
):
    """`project` for observations of mixed-model cameras: cam (N,) rows into `cameras`.

    Returns uv (N, 2), or (uv, J_point (N, 2, 3), J_params (N, 2, MAX_CAMERA_PARAMS)) with the
    columns beyond each model's parameter count zero. `groups`: `model_groups(cameras, cam)`,
    precomputed (no host read here then).
    """
    n = p_cam.shape[0]
    uv = p_cam.new_empty(n, 2)
    if jacobian:
        J_point = p_cam.new_zeros(n, 2, 3)
        J_params = p_cam.new_zeros(n, 2, MAX_CAMERA_PARAMS)
    for m, idx in (_groups(cameras, cam) if groups is None else groups):
        k = MODELS_BY_ID[m].num_params
        for c in row_chunks(n if idx is None else idx.numel(), p_cam.device):
            sel = c if idx is None else idx[c]
            out = project(m, cameras.params[cam[sel]], p_cam[sel], jacobian, check_cheirality)
            if jacobian:
                uv[sel], J_point[sel] = out[0], out[1]
                J_params[sel, :, :k] = out[2]
            else:
                uv[sel] = out
    return (uv, J_point, J_params) if jacobian else uv


def unproject_cameras(cameras: Cameras, cam: Tensor, uv: Tensor) -> Tensor:
    """`unproject` for pixels of mixed-model cameras: cam (N,) rows into `cameras`."""
    out = uv.new_empty(uv.shape[0], 2)
    for m, idx in _groups(cameras, cam):
        for c in row_chunks(uv.shape[0] if idx is None else idx.numel(), uv.device):
            sel = c if idx is None else idx[c]
            out[sel] = unproject(m, cameras.params[cam[sel]], uv[sel])
    return out


# ----------------------------------------------------------------------------------------
# Parameter layout helpers (built from torchsfm.data.camera_models).


@lru_cache(maxsize=None)
def _layout_table(kind: str) -> Tensor:
    """(max model id + 1, MAX_CAMERA_PARAMS) bool on the CPU: which columns are `kind`."""
    table = torch.zeros(max(MODELS_BY_ID) + 1, MAX_CAMERA_PARAMS, dtype=torch.bool)
    for mid, info in MODELS_BY_ID.items():
        cols = {
            "focal": info.focal,
            "principal": info.principal,
            "extra": info.extra,
            "all": tuple(range(info.num_params)),
        }[kind]
        table[mid, list(cols)] = True
    return table


def _layout(cameras: Cameras, kind: str) -> Tensor:
    return _layout_table(kind).to(cameras.model_id.device)[cameras.model_id]


def focal_mask(cameras: Cameras) -> Tensor:
    """(C, MAX_CAMERA_PARAMS) bool: focal length columns."""
    return _layout(cameras, "focal")


def scaled_focal_params(cameras: Cameras, scale) -> Tensor:
    """(C, MAX_CAMERA_PARAMS) params with every focal length column times `scale` ((C,) or a
    number); the principal point and distortion unchanged."""
    scale = torch.as_tensor(scale, dtype=cameras.params.dtype, device=cameras.params.device)
    if scale.dim() == 1:
        scale = scale[:, None]
    return torch.where(focal_mask(cameras), cameras.params * scale, cameras.params)


def principal_point_mask(cameras: Cameras) -> Tensor:
    """(C, MAX_CAMERA_PARAMS) bool: cx, cy columns."""
    return _layout(cameras, "principal")


def extra_mask(cameras: Cameras) -> Tensor:
    """(C, MAX_CAMERA_PARAMS) bool: distortion columns."""
    return _layout(cameras, "extra")


def used_mask(cameras: Cameras) -> Tensor:
    """(C, MAX_CAMERA_PARAMS) bool: columns the model uses (the rest is zero padding)."""
    return _layout(cameras, "all")


def num_params(cameras: Cameras) -> Tensor:
    """(C,) int64 parameter count of each camera's model."""
    return used_mask(cameras).sum(-1)


def param_mask(
    cameras: Cameras, refine_focal: bool = True, refine_principal_point: bool = False, refine_extra: bool = True
) -> Tensor:
    """(C, MAX_CAMERA_PARAMS) bool: the intrinsics a bundle adjuster should refine
    (COLMAP's refine_focal_length / refine_principal_point / refine_extra_params)."""
    m = torch.zeros_like(used_mask(cameras))
    if refine_focal:
        m |= focal_mask(cameras)
    if refine_principal_point:
        m |= principal_point_mask(cameras)
    if refine_extra:
        m |= extra_mask(cameras)
    return m


@lru_cache(maxsize=None)
def _xy_columns(kind: str) -> Tensor:
    """(max model id + 1, 2) int64: the x and y columns of the focal length or principal point
    (single-focal models use the same column twice)."""
    table = torch.zeros(max(MODELS_BY_ID) + 1, 2, dtype=torch.long)
    for mid, info in MODELS_BY_ID.items():
        cols = info.focal if kind == "focal" else info.principal
        table[mid] = torch.tensor([cols[0], cols[-1]])
    return table


def _gather_xy(cameras: Cameras, kind: str) -> Tensor:
    cols = _xy_columns(kind).to(cameras.model_id.device)[cameras.model_id]
    return cameras.params.gather(-1, cols)


def focal_xy(cameras: Cameras) -> Tensor:
    """(C, 2) focal lengths (fx, fy); single-focal models repeat f."""
    return _gather_xy(cameras, "focal")


def focal_length(cameras: Cameras) -> Tensor:
    """(C,) mean focal length (pycolmap `Camera.mean_focal_length`)."""
    fm = focal_mask(cameras)
    return (cameras.params * fm).sum(-1) / fm.sum(-1)


def principal_point(cameras: Cameras) -> Tensor:
    """(C, 2) principal point (cx, cy)."""
    return _gather_xy(cameras, "principal")


def calibration_matrix(cameras: Cameras) -> Tensor:
    """(C, 3, 3) K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] (pycolmap `Camera.calibration_matrix`)."""
    f = focal_xy(cameras)
    c = principal_point(cameras)
    K = cameras.params.new_zeros(len(cameras), 3, 3)
    K[:, 0, 0], K[:, 1, 1] = f[:, 0], f[:, 1]
    K[:, 0, 2], K[:, 1, 2] = c[:, 0], c[:, 1]
    K[:, 2, 2] = 1
    return K


def cam_from_img_threshold(cameras: Cameras, threshold: float | Tensor) -> Tensor:
    """(C,) a pixel threshold in normalised units (pycolmap `Camera.cam_from_img_threshold`)."""
    return threshold / focal_length(cameras)


def default_params(model: int | str, focal_length: Tensor, width: Tensor, height: Tensor) -> Tensor:
    """COLMAP's initial parameters (..., MAX_CAMERA_PARAMS): focal(s) = focal_length, principal
    point at the image centre, no distortion (`Camera.create_from_model_name`)."""
    info = model_info(model)
    focal_length = torch.as_tensor(focal_length)
    dtype = focal_length.dtype if focal_length.is_floating_point() else torch.float64
    focal_length = focal_length.to(dtype)
    shape = torch.broadcast_shapes(focal_length.shape, torch.as_tensor(width).shape, torch.as_tensor(height).shape)
    out = focal_length.new_zeros(*shape, MAX_CAMERA_PARAMS)
    for i in info.focal:
        out[..., i] = focal_length
    out[..., info.principal[0]] = torch.as_tensor(width, dtype=dtype, device=out.device) / 2
    out[..., info.principal[1]] = torch.as_tensor(height, dtype=dtype, device=out.device) / 2
    return out
