"""Small known-answer scenes for the mapper-stage tests (no tests here; imported by them).

Kept independent of `torchsfm.synthetic` so that the stage tests pin exactly the geometry they
reason about (rings with jittered viewing directions, a sphere looking at its centre, chains).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torchsfm.data.model import (
    TWO_VIEW_UNCALIBRATED,
    Cameras,
    Images,
    Keypoints,
    Points3D,
    Reconstruction,
    Tracks,
    ViewGraph,
    offsets_from_counts,
)
from torchsfm.geometry import se3, so3


@dataclass
class Scene:
    rec: Reconstruction  # view graph filled, images posed (GT), tracks = GT tracks
    R: torch.Tensor  # (I, 3, 3) GT cam_from_world
    t: torch.Tensor  # (I, 3)
    focal: torch.Tensor  # (C,) GT focal lengths
    point_of_keypoint: torch.Tensor  # (K,) GT point of every flat keypoint
    outlier_match: torch.Tensor  # (M,) bool


def look_at(centers: torch.Tensor, target: torch.Tensor, up=(0.0, -1.0, 0.0)) -> torch.Tensor:
    """cam_from_world rotations with +z towards target, y down."""
    z = target - centers
    z = z / z.norm(dim=-1, keepdim=True)
    upv = torch.tensor(up, dtype=centers.dtype).expand_as(z)
    x = torch.cross(upv, z, dim=-1)
    bad = x.norm(dim=-1) < 1e-6
    x[bad] = torch.cross(torch.tensor([1.0, 0, 0], dtype=centers.dtype).expand_as(z[bad]), z[bad], dim=-1)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.cross(z, x, dim=-1)
    return torch.stack([x, y, z], -2)


def make_scene(num_images=12, num_points=400, layout="ring", focal=600.0, width=640, height=480,
               noise_px=0.0, outlier_ratio=0.0, look_jitter_deg=10.0, shared_camera=False, seed=0,
               radius=4.0, min_shared=16, camera_model=0, dtype=torch.float64) -> Scene:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    I = num_images
    if layout == "ring":
        a = torch.arange(I, dtype=dtype) / I * 2 * math.pi
        C = torch.stack([radius * torch.cos(a), 0.3 * randn(I), radius * torch.sin(a)], -1)
        target = torch.zeros(I, 3, dtype=dtype)
    elif layout == "sphere":
        d = randn(I, 3)
        d[:, 1] = d[:, 1].abs() * -0.6 - 0.3  # upper hemisphere (y is down)
        C = radius * d / d.norm(dim=-1, keepdim=True)
        target = torch.zeros(I, 3, dtype=dtype)
    elif layout == "line":  # sideways-moving camera looking at a wall of points
        C = torch.stack([torch.linspace(-2, 2, I, dtype=dtype), 0.1 * randn(I),
                         torch.full((I,), -radius, dtype=dtype)], -1)
        target = C + torch.tensor([0, 0, radius], dtype=dtype)
    else:
        raise ValueError(layout)
    R = look_at(C, target)
    if look_jitter_deg > 0:
        R = so3.exp(randn(I, 3) * math.radians(look_jitter_deg) / math.sqrt(3)) @ R
    t = -(R @ C[..., None])[..., 0]

    X = (rand(num_points, 3) * 2 - 1) * 1.2
    if layout == "line":
        X[:, 2] = X[:, 2] * 0.5
        X[:, 0] = X[:, 0] * 2.5
    nc = 1 if shared_camera else I
    f_gt = torch.full((nc,), focal, dtype=dtype) * (1 + 0.1 * (rand(nc) - 0.5)) if not shared_camera else \
        torch.full((1,), focal, dtype=dtype)
    params = torch.zeros(nc, 12, dtype=dtype)
    if camera_model == 0:  # SIMPLE_PINHOLE
        params[:, 0], params[:, 1], params[:, 2] = f_gt, width / 2, height / 2
    else:  # PINHOLE
        params[:, 0], params[:, 1], params[:, 2], params[:, 3] = f_gt, f_gt, width / 2, height / 2
    cams = Cameras(torch.arange(1, nc + 1), torch.full((nc,), camera_model), torch.full((nc,), width),
                   torch.full((nc,), height), params, torch.ones(nc, dtype=torch.bool))
    cam_of_image = torch.zeros(I, dtype=torch.long) if shared_camera else torch.arange(I)

    # Project, keep visible points, shuffle keypoint order per image.
    Xc = (R[:, None] @ X[None, :, :, None])[..., 0] + t[:, None]
    f = f_gt[cam_of_image][:, None]
    uv = torch.stack([f * Xc[..., 0] / Xc[..., 2] + width / 2, f * Xc[..., 1] / Xc[..., 2] + height / 2], -1)
    vis = (Xc[..., 2] > 0.1) & (uv[..., 0] > 0) & (uv[..., 0] < width) & (uv[..., 1] > 0) & (uv[..., 1] < height)
    uv = uv + noise_px * randn(*uv.shape)
    xy_list, pid_list, kp_of = [], [], torch.full((I, num_points), -1, dtype=torch.long)
    for i in range(I):
        pids = torch.nonzero(vis[i], as_tuple=True)[0]
        pids = pids[torch.randperm(pids.numel(), generator=g)]
        kp_of[i, pids] = torch.arange(pids.numel())
        xy_list.append(uv[i, pids])
        pid_list.append(pids)
    counts = torch.tensor([p.numel() for p in pid_list])
    keypoints = Keypoints(torch.cat(xy_list), offsets_from_counts(counts))
    point_of_kp = torch.cat(pid_list)

    pairs, matches, outl, noff = [], [], [], [0]
    for i in range(I):
        for j in range(i + 1, I):
            shared = torch.nonzero(vis[i] & vis[j], as_tuple=True)[0]
            if shared.numel() < min_shared:
                continue
            mm = torch.stack([kp_of[i, shared], kp_of[j, shared]], 1)
            o = rand(shared.numel()) < outlier_ratio
            mm[o, 1] = torch.randint(0, int(counts[j]), (int(o.sum()),), generator=g)
            o = o & (point_of_kp[keypoints.offsets[j] + mm[:, 1]] != shared)
            pairs.append((i, j))
            matches.append(mm)
            outl.append(o)
            noff.append(noff[-1] + shared.numel())
    pairs = torch.tensor(pairs, dtype=torch.long)
    E_ = pairs.shape[0]
    Rij, tij = se3.relative(R[pairs[:, 0]], t[pairs[:, 0]], R[pairs[:, 1]], t[pairs[:, 1]])
    tij = tij / tij.norm(dim=-1, keepdim=True)
    Emat = so3.skew(tij) @ Rij
    K = torch.zeros(I, 3, 3, dtype=dtype)
    K[:, 0, 0] = K[:, 1, 1] = f_gt[cam_of_image]
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = width / 2, height / 2, 1
    Ki, Kj = K[pairs[:, 0]], K[pairs[:, 1]]
    F = torch.linalg.inv(Kj).transpose(-1, -2) @ Emat @ torch.linalg.inv(Ki)
    F = F / F.flatten(1).norm(dim=-1)[:, None, None]
    vg = ViewGraph(pairs=pairs, config=torch.full((E_,), TWO_VIEW_UNCALIBRATED), F=F, E=Emat,
                   H=torch.zeros(E_, 3, 3, dtype=dtype), rel_quat=so3.matrix_to_quat(Rij), rel_trans=tij,
                   matches=torch.cat(matches), match_offsets=torch.tensor(noff), valid=torch.ones(E_, dtype=torch.bool))
    images = Images(torch.arange(1, I + 1), [f"im{i:03d}.png" for i in range(I)], cam_of_image, so3.matrix_to_quat(R),
                    t, torch.ones(I, dtype=torch.bool))
    seen = torch.unique(point_of_kp)
    remap = torch.full((num_points,), -1, dtype=torch.long)
    remap[seen] = torch.arange(seen.numel())
    img_of_kp = keypoints.image_of()
    kidx = torch.arange(len(keypoints)) - keypoints.offsets[img_of_kp]
    order = torch.argsort(remap[point_of_kp] * I + img_of_kp)
    tracks = Tracks(remap[point_of_kp][order], img_of_kp[order], kidx[order])
    points = Points3D(torch.arange(1, seen.numel() + 1), X[seen], torch.zeros(seen.numel(), 3, dtype=torch.uint8),
                      torch.zeros(seen.numel(), dtype=dtype))
    rec = Reconstruction(cams, images, keypoints, points, tracks, vg)
    return Scene(rec, R, t, f_gt, point_of_kp, torch.cat(outl))


def unposed(rec: Reconstruction) -> Reconstruction:
    """The scene as the mapper sees it: no poses, no points, no tracks."""
    out = rec.clone()
    I = len(out.images)
    out.images.quat = torch.tensor([[1.0, 0, 0, 0]], dtype=out.images.quat.dtype).repeat(I, 1)
    out.images.trans = torch.zeros_like(out.images.trans)
    out.images.registered = torch.zeros(I, dtype=torch.bool)
    z = torch.zeros(0, dtype=torch.long)
    out.tracks = Tracks(z, z.clone(), z.clone())
    dt = out.images.quat.dtype
    out.points3D = Points3D(z.clone(), torch.zeros(0, 3, dtype=dt), torch.zeros(0, 3, dtype=torch.uint8),
                            torch.zeros(0, dtype=dt))
    return out


def rotation_error_deg(R_gt: torch.Tensor, R_est: torch.Tensor) -> torch.Tensor:
    """Per-image angle (deg) after the best global rotation aligning R_est to R_gt (gauge)."""
    M = (R_gt.transpose(-1, -2) @ R_est).sum(0)
    U, _, Vh = torch.linalg.svd(M)
    D = torch.eye(3, dtype=M.dtype)
    D[2, 2] = torch.sign(torch.det(U @ Vh))
    G = U @ D @ Vh
    return torch.rad2deg(so3.angle_between(R_gt @ G, R_est))
