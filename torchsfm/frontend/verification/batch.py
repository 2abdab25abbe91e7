"""Inputs and outputs of `verify_pairs`: a padded chunk of pairs, and COLMAP's two-view geometry.

`make_pair_batches` builds the chunks from flat data (keypoints of all images in CSR layout and
one (K, 2) match list per pair), grouping pairs of similar match counts so little is padded.
Memory of a PairBatch: 32 bytes per padded match (two float64 (x, y)) plus ~250 bytes per pair
(camera parameters, sizes, flags); the engine's own buffers are bounded by
`VerificationOptions.max_elements` (see `verify.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import torch
from torch import Tensor

from ...data.model import MAX_CAMERA_PARAMS, Cameras


@dataclass
class PairBatch:
    """One chunk of P image pairs with up to M matches each, padded; all tensors on one device."""

    xy1: Tensor  # (P, M, 2) float pixels (COLMAP convention: pixel centre at +0.5)
    xy2: Tensor  # (P, M, 2)
    num_matches: Tensor  # (P,) int64; rows >= num_matches[p] are padding
    camera_model_id1: Tensor  # (P,) int64 COLMAP model id
    params1: Tensor  # (P, 12) zero-padded COLMAP parameters
    camera_model_id2: Tensor
    params2: Tensor
    has_prior_focal1: Tensor  # (P,) bool
    has_prior_focal2: Tensor
    same_camera: Tensor  # (P,) bool: both images share one camera (COLMAP camera_id equal)
    width1: Tensor  # (P,) image sizes, for the watermark border test
    height1: Tensor
    width2: Tensor
    height2: Tensor
    pair_seed: Tensor | None = None  # (P,) int64 per-pair stream id (e.g. the global pair index);
    # the same seed and inputs give the same result however pairs are chunked. None: row index.

    @property
    def num_pairs(self) -> int:
        return int(self.xy1.shape[0])

    def to(self, device=None) -> "PairBatch":
        return PairBatch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                            for f in fields(self)})

    def check(self) -> None:
        """Raise ValueError when shapes or dtypes are inconsistent."""
        P = self.xy1.shape[0] if self.xy1.dim() == 3 else -1
        if self.xy1.dim() != 3 or self.xy1.shape[-1] != 2 or self.xy2.shape != self.xy1.shape:
            raise ValueError(f"PairBatch: xy1/xy2 must both be (P, M, 2), got {tuple(self.xy1.shape)} and "
                             f"{tuple(self.xy2.shape)}")
        if not self.xy1.is_floating_point():
            raise ValueError("PairBatch: xy1/xy2 must be floating point pixels")
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or f.name in ("xy1", "xy2"):
                continue
            if v.shape[0] != P:
                raise ValueError(f"PairBatch.{f.name}: leading dimension {v.shape[0]} != {P} pairs")
            if v.device != self.xy1.device:
                raise ValueError(f"PairBatch.{f.name} is on {v.device}, xy1 on {self.xy1.device}")
        for name in ("params1", "params2"):
            if getattr(self, name).shape[1:] != (MAX_CAMERA_PARAMS,):
                raise ValueError(f"PairBatch.{name} must be (P, {MAX_CAMERA_PARAMS})")
        n = self.num_matches
        if P and (int(n.min()) < 0 or int(n.max()) > self.xy1.shape[1]):
            raise ValueError("PairBatch.num_matches must lie in [0, M]")


@dataclass
class TwoViewGeometries:
    """Per pair, what COLMAP writes to `two_view_geometries` (plus the relative pose)."""

    config: Tensor  # (P,) int64, pycolmap.TwoViewGeometryConfiguration values
    F: Tensor  # (P, 3, 3) float64 pixel frame, x2^T F x1 = 0; zeros where not estimated
    E: Tensor  # (P, 3, 3) float64 normalised camera frame; zeros where not estimated
    H: Tensor  # (P, 3, 3) float64 pixel frame, x2 ~ H x1; zeros where not estimated
    inliers: Tensor  # (P, M) bool: the inlier matches of the chosen configuration
    num_inliers: Tensor  # (P,) int64
    rel_quat: Tensor  # (P, 4) w-first cam2_from_cam1 rotation (identity where not valid)
    rel_trans: Tensor  # (P, 3) cam2_from_cam1 translation (unit for E-based poses, as COLMAP)
    pose_valid: Tensor  # (P,) bool
    num_trials: Tensor  # (P,) RANSAC trials of the epipolar model (F, or E on calibrated pairs)
    num_trials_H: Tensor | None = None  # (P,) RANSAC trials of the homography


def make_pair_batches(xy: Tensor, offsets: Tensor, pairs: Tensor, matches: Tensor, match_offsets: Tensor,
                      cameras: Cameras, image_camera: Tensor, *, pair_seed: Tensor | None = None,
                      max_elements: int = 2**21, max_pairs: int = 2048, max_padding: float = 1.5,
                      dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                      ) -> Iterator[tuple[Tensor, PairBatch]]:
    """Chunk pairs into padded PairBatches, sorted by match count (no Python loop over pairs).

    xy (K, 2) keypoints of all images, `offsets` (I+1,) CSR per image; `pairs` (P, 2) image rows
    (i, j); `matches` (Q, 2) keypoint indices local to (i, j), `match_offsets` (P+1,) CSR per pair,
    best match first if known; `image_camera` (I,) row of each image in `cameras`. A batch holds
    at most `max_pairs` pairs and `max_elements` padded matches, and its padded length is at most
    `max_padding` x its shortest pair's count (+32). `pair_seed` defaults to the pair's row in
    `pairs`, so results do not depend on chunking. Yields (rows (B,) into `pairs`, PairBatch).
    """
    device = torch.device(device) if device is not None else xy.device
    counts = (match_offsets[1:] - match_offsets[:-1]).cpu()
    P = counts.numel()
    seeds = torch.arange(P) if pair_seed is None else pair_seed.cpu().long()
    order = torch.argsort(counts, stable=True)
    sorted_counts = counts[order].tolist()
    start = 0
    while start < P:
        first = max(sorted_counts[start], 1)
        end = start + 1
        while end < P and end - start < max_pairs:
            m = max(sorted_counts[end], 1)
            if m > max_padding * first + 32 or (end - start + 1) * m > max_elements:
                break
            end += 1
        rows = order[start:end]
        yield rows.to(device), _gather_batch(xy, offsets, pairs, matches, match_offsets, cameras, image_camera,
                                             rows, seeds[rows], dtype, device)
        start = end


def _gather_batch(xy, offsets, pairs, matches, match_offsets, cameras, image_camera, rows, seeds, dtype, device):
    rows_d = rows.to(match_offsets.device)
    n = (match_offsets[1:] - match_offsets[:-1])[rows_d]
    M = max(int(n.max()), 1) if rows.numel() else 1
    ar = torch.arange(M, device=match_offsets.device)
    valid = ar[None, :] < n[:, None]
    flat = torch.where(valid, match_offsets[rows_d][:, None] + ar[None, :], torch.zeros_like(valid, dtype=torch.long))
    m = matches[flat.clamp_max(max(matches.shape[0] - 1, 0))] if matches.numel() else torch.zeros(
        *flat.shape, 2, dtype=torch.long, device=flat.device)
    img = pairs[rows_d]
    k1 = offsets[img[:, 0]][:, None] + m[..., 0]
    k2 = offsets[img[:, 1]][:, None] + m[..., 1]
    zero = torch.zeros((), dtype=xy.dtype, device=xy.device)
    xy1 = torch.where(valid[..., None], xy[torch.where(valid, k1, 0)], zero)
    xy2 = torch.where(valid[..., None], xy[torch.where(valid, k2, 0)], zero)
    c1 = image_camera[img[:, 0]]
    c2 = image_camera[img[:, 1]]

    def cam(field: Tensor, c: Tensor) -> Tensor:
        return field[c.to(field.device)].to(device)

    return PairBatch(
        xy1=xy1.to(device, dtype), xy2=xy2.to(device, dtype), num_matches=n.to(device),
        camera_model_id1=cam(cameras.model_id, c1), params1=cam(cameras.params, c1).to(dtype),
        camera_model_id2=cam(cameras.model_id, c2), params2=cam(cameras.params, c2).to(dtype),
        has_prior_focal1=cam(cameras.has_prior_focal_length, c1), has_prior_focal2=cam(cameras.has_prior_focal_length, c2),
        same_camera=(c1 == c2).to(device),
        width1=cam(cameras.width, c1), height1=cam(cameras.height, c1),
        width2=cam(cameras.width, c2), height2=cam(cameras.height, c2),
        pair_seed=seeds.to(device))
