"""Scoring many models against all matches of their pair in one batched matmul.

Each pair's matches live in a normalised frame n = (xy - c) * s per image (Hartley for F and H,
the intrinsics for E); errors are in pixels through the scales s, as COLMAP thresholds them:
squared Sampson error (F, E) or squared transfer error in image 2 (H) <= max_error^2.

Epipolar models: per match a 9-vector [x1, y1, 1, x2, y2, x2x1, x2y1, y2x1, y2y1] times 5 rows
per model gives (G x1)_0,1 and (G^T x2)_0,1, pre-multiplied by the pixel scales, and x2^T G x1;
then Sampson^2 = num^2 / (a0^2 + a1^2 + b0^2 + b1^2). Homographies: 3 rows per model give H x1,
rows 0 and 1 pre-divided by the pixel scales of image 2, against pre-scaled x2.
A match is an inlier when its squared error is strictly below max_error^2 (COLMAP: <=; equal
only on a set of measure zero), which also rejects padded matches (zero features: 0 < 0 fails)
and zero models without extra masks. The support of a model is COLMAP's InlierSupportMeasurer:
more inliers, then a smaller sum of squared inlier errors, folded into one float64 key.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass
class Frames:
    """Matches of P pairs in normalised coordinates, with what scoring needs."""

    n1: Tensor  # (P, M, 2) float64
    n2: Tensor  # (P, M, 2) float64
    s1: Tensor  # (P, 2) normalised units per pixel, image 1 (x, y)
    s2: Tensor  # (P, 2)
    valid: Tensor  # (P, M) bool: a real, finite match (valid ones first)
    num: Tensor  # (P,) int64 number of valid matches
    features: Tensor | None = None  # (P, 11, M) float32 scoring features, built on demand

    def feats(self) -> Tensor:
        """Rows 0-8 the epipolar features, rows 9-10 x2, y2 in pixel units (homography targets);
        all zero for padded matches."""
        if self.features is None:
            x1, y1 = self.n1[..., 0], self.n1[..., 1]
            x2, y2 = self.n2[..., 0], self.n2[..., 1]
            f = torch.stack([x1, y1, torch.ones_like(x1), x2, y2, x2 * x1, x2 * y1, y2 * x1, y2 * y1,
                             x2 / self.s2[:, None, 0], y2 / self.s2[:, None, 1]], 1)
            self.features = (f * self.valid[:, None]).to(torch.float32)
        return self.features

    def index(self, idx: Tensor) -> "Frames":
        return Frames(self.n1[idx], self.n2[idx], self.s1[idx], self.s2[idx], self.valid[idx], self.num[idx],
                      None if self.features is None else self.features[idx])


# the 5 x 9 epipolar scoring rows as a linear map of vec(G): row r, column c holds G[_EPI[r][c]]
_EPI = [
    [0, 1, 2, None, None, None, None, None, None],  # a0 = (G x1)_0
    [3, 4, 5, None, None, None, None, None, None],  # a1
    [None, None, 6, 0, 3, None, None, None, None],  # b0 = (G^T x2)_0
    [None, None, 7, 1, 4, None, None, None, None],  # b1
    [6, 7, 8, 2, 5, 0, 1, 3, 4],  # x2^T G x1
]
_EPI_SELECT = torch.zeros(5, 9, 45)  # (row, vec(G) index, row * 9 + column)
for _r, _row in enumerate(_EPI):
    for _c, _g in enumerate(_row):
        if _g is not None:
            _EPI_SELECT[_r, _g, _r * 9 + _c] = 1.0


@lru_cache(maxsize=None)
def _epi_select(device: torch.device) -> Tensor:
    return _EPI_SELECT.to(device)  # one copy per device, not one per call (a host-to-device sync on CUDA)


def _epipolar_rows(G: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """(P, H, 3, 3) models -> (P, H * 5, 9) float32 scoring rows, the pixel scales folded in
    (one small matmul with a per-pair selection-and-scale matrix; fancy indexing is ~10x slower)."""
    scale = torch.cat([s2, s1, torch.ones_like(s1[:, :1])], 1).to(torch.float32)  # (P, 5)
    sel = (_epi_select(G.device)[None] * scale[:, :, None, None]).sum(1)  # (P, 9, 45)
    P, Hn = G.shape[:2]
    return torch.bmm(G.reshape(P, Hn, 9).to(torch.float32), sel).view(P, Hn * 5, 9)


def _homography_rows(Hm: Tensor, s2: Tensor) -> Tensor:
    scale = torch.cat([1.0 / s2, torch.ones_like(s2[:, :1])], 1).to(torch.float32)  # (P, 3)
    return (Hm.to(torch.float32) * scale[:, None, :, None]).flatten(1, 2)


def epipolar_residuals(frames: Frames, G: Tensor) -> tuple[Tensor, Tensor]:
    """Squared Sampson errors in pixels (P, M) of one model per pair G (P, 3, 3), and the
    Sampson denominators (P, M) (weights of a Sampson-normalised refit); float32."""
    out = torch.bmm(_epipolar_rows(G[:, None], frames.s1, frames.s2), frames.feats()[:, :9])  # (P, 5, M)
    den = _sum_squares(out[:, 0], out[:, 1], out[:, 2], out[:, 3])
    return out[:, 4].square() / den, den


def homography_residuals(frames: Frames, Hm: Tensor) -> tuple[Tensor, Tensor]:
    """Squared transfer errors in pixels (P, M) of one homography per pair, and h2 = (H x1)_2."""
    f = frames.feats()
    out = torch.bmm(_homography_rows(Hm[:, None], frames.s2), f[:, :3])  # (P, 3, M)
    h2 = out[:, 2]
    return (f[:, 9] - out[:, 0] / h2).square() + (f[:, 10] - out[:, 1] / h2).square(), h2


def _count(inl: Tensor) -> Tensor:
    return inl.sum(-1)


def _sum_squares(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """a^2 + b^2 + c^2 + d^2 in one new tensor (no (…, 4, M) temporary)."""
    return (a * a).addcmul_(b, b).addcmul_(c, c).addcmul_(d, d)


def epipolar_support(feats: Tensor, s1: Tensor, s2: Tensor, G: Tensor, thr2: float, with_rsum: bool = True):
    """Inlier counts (P, H) and sums of squared inlier errors (P, H) (or None) of models
    G (P, H, 3, 3) against features (P, 11, M)."""
    P, Hn = G.shape[:2]
    out = torch.bmm(_epipolar_rows(G, s1, s2), feats[:, :9]).view(P, Hn, 5, -1)
    num2 = out[:, :, 4].square()
    den = _sum_squares(out[:, :, 0], out[:, :, 1], out[:, :, 2], out[:, :, 3])
    inl = num2 < den.mul_(thr2)
    count = _count(inl)
    if not with_rsum:
        return count, None
    r = num2.mul_(thr2).div_(den)  # num^2 / den
    return count, torch.where(inl, r, 0.0).sum(-1).to(torch.float64)


def homography_support(feats: Tensor, s1: Tensor, s2: Tensor, Hm: Tensor, thr2: float, with_rsum: bool = True):
    """As epipolar_support, for homographies (P, H, 3, 3) (transfer error in image 2)."""
    P, Hn = Hm.shape[:2]
    out = torch.bmm(_homography_rows(Hm, s2), feats[:, :3]).view(P, Hn, 3, -1)
    inv = out[:, :, 2].reciprocal()
    dx = out[:, :, 0].mul_(inv).sub_(feats[:, None, 9]).square_()
    err = out[:, :, 1].mul_(inv).sub_(feats[:, None, 10]).square_().add_(dx)
    inl = err < thr2
    count = _count(inl)
    if not with_rsum:
        return count, None
    return count, torch.where(inl, err, 0.0).sum(-1).to(torch.float64)


def support_key(count: Tensor, rsum: Tensor, num: Tensor, thr2: float) -> Tensor:
    """count - residual_sum / (thr2 (n + 1)): orders models as COLMAP's InlierSupportMeasurer
    (more inliers first, then the smaller residual sum)."""
    return count.to(torch.float64) - rsum / (thr2 * (num.to(torch.float64) + 1.0)).reshape(
        (-1,) + (1,) * (count.dim() - 1))
