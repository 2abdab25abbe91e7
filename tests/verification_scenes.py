"""Synthetic two-view pairs with ground truth for the verification tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from torchsfm.frontend.verification import PairBatch
from torchsfm.geometry import so3

W, H = 800, 600


@dataclass
class SyntheticPair:
    xy1: Tensor  # (n, 2) float64 pixels
    xy2: Tensor
    true: Tensor  # (n,) bool: a correct match
    K: Tensor  # (3, 3)
    R: Tensor  # cam2_from_cam1
    t: Tensor
    F: Tensor  # ground-truth fundamental matrix (unit norm)
    Hm: Tensor | None  # ground-truth homography (planar / rotation scenes), unit norm


def _unit(M: Tensor) -> Tensor:
    return M / M.norm()


def make_pair(kind: str = "general", n_true: int = 200, outlier_ratio: float = 0.3, noise: float = 0.5,
              seed: int = 0, f: float = 700.0, angle_deg: float = 12.0) -> SyntheticPair:
    """A pair seen by one pinhole camera (f, principal point at the centre).

    kind: 'general' (3-D points at depth 4-8, baseline 1), 'planar' (points on a tilted plane),
    'rotation' (pure rotation, t = 0). Outliers are uniform random pixel pairs."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], dtype=dt)
    axis = torch.randn(3, generator=g, dtype=dt)
    R = so3.exp((axis / axis.norm() * angle_deg * torch.pi / 180)[None])[0]
    if kind == "rotation":
        t = torch.zeros(3, dtype=dt)
    else:
        t = torch.tensor([1.0, 0.1, 0.2], dtype=dt)
        t = -R @ torch.tensor([1.0, 0.05, 0.1], dtype=dt)  # camera 2 centre at (1, 0.05, 0.1)
    pts = []
    while sum(p.shape[0] for p in pts) < n_true:
        u = torch.rand(4 * n_true, 2, generator=g, dtype=dt) * torch.tensor([W, H], dtype=dt)
        if kind == "planar":
            # plane z = 6 + 0.3 x - 0.2 y in camera 1
            ray = torch.cat([(u - K[:2, 2]) / f, torch.ones(u.shape[0], 1, dtype=dt)], 1)
            depth = 6.0 / (1 - 0.3 * ray[:, 0] + 0.2 * ray[:, 1])
        else:
            ray = torch.cat([(u - K[:2, 2]) / f, torch.ones(u.shape[0], 1, dtype=dt)], 1)
            depth = 4 + 4 * torch.rand(u.shape[0], generator=g, dtype=dt)
        X = ray * depth[:, None]
        X2 = X @ R.T + t
        u2 = (X2 @ K.T)[:, :2] / X2[:, 2:]
        ok = (X2[:, 2] > 0.1) & (u2[:, 0] > 0) & (u2[:, 0] < W) & (u2[:, 1] > 0) & (u2[:, 1] < H)
        pts.append(torch.cat([u[ok], u2[ok]], 1))
    p = torch.cat(pts)[:n_true]
    p = p + noise * torch.randn(p.shape, generator=g, dtype=dt)
    n_out = int(round(n_true * outlier_ratio / max(1e-9, 1 - outlier_ratio)))
    o = torch.rand(n_out, 4, generator=g, dtype=dt) * torch.tensor([W, H, W, H], dtype=dt)
    allp = torch.cat([p, o])
    true = torch.cat([torch.ones(n_true, dtype=torch.bool), torch.zeros(n_out, dtype=torch.bool)])
    perm = torch.randperm(allp.shape[0], generator=g)
    allp, true = allp[perm], true[perm]
    Kinv = torch.linalg.inv(K)
    E = so3.skew(t[None])[0] @ R
    F = Kinv.T @ E @ Kinv if kind != "rotation" else torch.zeros(3, 3, dtype=dt)
    Hm = None
    if kind == "rotation":
        Hm = _unit(K @ R @ Kinv)
    elif kind == "planar":
        n = torch.tensor([-0.3, 0.2, 1.0], dtype=dt) / 6.0  # n^T X = 1 on the plane
        Hm = _unit(K @ (R + t[:, None] * n[None, :]) @ Kinv)
    return SyntheticPair(allp[:, :2].contiguous(), allp[:, 2:].contiguous(), true, K, R, t,
                         _unit(F) if kind != "rotation" else F, Hm)


def batch_of(pairs: list[SyntheticPair], prior_focal: bool = False, same_camera: bool = False,
             model_id: int = 0, device="cpu", pad_to: int | None = None, seeds: list[int] | None = None) -> PairBatch:
    """A padded PairBatch of synthetic pairs (SIMPLE_PINHOLE by default, true intrinsics)."""
    P = len(pairs)
    M = max(max(p.xy1.shape[0] for p in pairs), pad_to or 0)
    xy1 = torch.zeros(P, M, 2, dtype=torch.float64)
    xy2 = torch.zeros(P, M, 2, dtype=torch.float64)
    params = torch.zeros(P, 12, dtype=torch.float64)
    for i, p in enumerate(pairs):
        n = p.xy1.shape[0]
        xy1[i, :n], xy2[i, :n] = p.xy1, p.xy2
        f, cx, cy = p.K[0, 0], p.K[0, 2], p.K[1, 2]
        params[i, :4] = torch.tensor([f, f, cx, cy]) if model_id in (1, 4, 5) else torch.tensor([f, cx, cy, 0.0])
    b = torch.ones(P, dtype=torch.bool)
    return PairBatch(
        xy1=xy1, xy2=xy2, num_matches=torch.tensor([p.xy1.shape[0] for p in pairs]),
        camera_model_id1=torch.full((P,), model_id), params1=params.clone(),
        camera_model_id2=torch.full((P,), model_id), params2=params.clone(),
        has_prior_focal1=b & prior_focal, has_prior_focal2=b & prior_focal, same_camera=b & same_camera,
        width1=torch.full((P,), W), height1=torch.full((P,), H), width2=torch.full((P,), W), height2=torch.full((P,), H),
        pair_seed=torch.tensor(seeds if seeds is not None else list(range(P))),
    ).to(device)
