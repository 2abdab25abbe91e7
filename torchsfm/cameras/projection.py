"""World -> image projection for posed cameras, with the Jacobians the solvers use.

The pose Jacobian is written for the left update of `geometry.se3.left_update`
(R <- Exp(dw) R, t <- Exp(dw) t + dt), under which p_cam <- Exp(dw) p_cam + dt, so
d p_cam / d dw = -skew(p_cam) and d p_cam / d dt = I. Tangent order: (dw, dt).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..data.model import Cameras
from ..geometry import so3
from .models import project_cameras, valid_depth


class WorldProjection(NamedTuple):
    uv: Tensor  # (N, 2) pixels; NaN where the depth guard fails
    p_cam: Tensor  # (N, 3) point in the camera frame (depth checks, triangulation angles)
    valid: Tensor  # (N,) bool: passed the depth guard (uv finite, Jacobians non-zero)
    J_pose: Tensor | None = None  # (N, 2, 6) d uv / d (dw, dt)
    J_X: Tensor | None = None  # (N, 2, 3) d uv / d X_world
    J_params: Tensor | None = None  # (N, 2, MAX_CAMERA_PARAMS), zero beyond each model's params


def project_world(
    cameras: Cameras,
    cam: Tensor,
    R: Tensor,
    t: Tensor,
    X_world: Tensor,
    jacobian: bool = False,
    check_cheirality: bool = True,
    groups: list | None = None,
) -> WorldProjection:
    """Project world points through cam_from_world poses (one pose per row).

    cam: (N,) rows into `cameras`; R: (N, 3, 3) rotation or (N, 4) w-first quaternion;
    t: (N, 3); X_world: (N, 3). Gather per-image poses to observations before calling.
    groups: `models.model_groups(cameras, cam)`, precomputed by iterative callers (no host read).
    """
    if R.shape[-1] == 4 and R.dim() == X_world.dim():
        R = so3.quat_to_matrix(R)
    p_cam = (R @ X_world[..., None])[..., 0] + t
    valid = valid_depth(p_cam, check_cheirality)
    if not jacobian:
        return WorldProjection(project_cameras(cameras, cam, p_cam, False, check_cheirality, groups), p_cam, valid)
    uv, J_point, J_params = project_cameras(cameras, cam, p_cam, True, check_cheirality, groups)
    J_pose = torch.cat([-J_point @ so3.skew(p_cam), J_point], -1)
    J_X = J_point @ R
    return WorldProjection(uv, p_cam, valid, J_pose, J_X, J_params)
