"""COLMAP 4.2's two-view configuration rules, batched over pairs.

Follows `src/colmap/estimators/two_view_geometry.cc`: EstimateUncalibratedTwoViewGeometry (F and
H), EstimateCalibratedTwoViewGeometry (E, F and H) and DetectWatermarkMatches. Inlier ratios are
float divisions as in C++ (x / 0 is inf, 0 / 0 is NaN and fails every comparison).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...data.model import (TWO_VIEW_CALIBRATED, TWO_VIEW_DEGENERATE, TWO_VIEW_PLANAR_OR_PANORAMIC,
                           TWO_VIEW_UNCALIBRATED, TWO_VIEW_WATERMARK)
from .options import VerificationOptions


@dataclass
class Estimate:
    """One model's RANSAC outcome per pair (zeros / False where it did not run)."""

    success: Tensor  # (P,) bool
    num: Tensor  # (P,) int64 inliers
    inliers: Tensor  # (P, M) bool


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    return a.to(torch.float64) / b.to(torch.float64)


def _pick(use: Tensor, est: Estimate, num: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    return torch.where(use, est.num, num), torch.where(use[:, None], est.inliers, mask)


def decide_uncalibrated(F: Estimate, H: Estimate, num_matches: Tensor, opt: VerificationOptions
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(config, num_inliers, inlier mask) of EstimateUncalibratedTwoViewGeometry. COLMAP checks
    min_inlier_ratio only in the other two paths; we check it here too (0, off, by default), so
    that LightGlue's gate holds for pairs of cameras without a known focal length."""
    m = opt.min_num_inliers
    degenerate = (~F.success & ~H.success) | ((F.num < m) & (H.num < m))
    planar = _ratio(H.num, F.num) > opt.max_H_inlier_ratio
    config = torch.where(planar, TWO_VIEW_PLANAR_OR_PANORAMIC, TWO_VIEW_UNCALIBRATED)
    num, mask = _pick(planar & (H.num >= F.num), H, F.num, F.inliers)
    return _degenerate(config, num, mask, _too_few(degenerate, num, num_matches, opt))


def decide_calibrated(E: Estimate, F: Estimate, H: Estimate, num_matches: Tensor, opt: VerificationOptions
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(config, num_inliers, inlier mask) of EstimateCalibratedTwoViewGeometry."""
    m = opt.min_num_inliers
    degenerate = ((~E.success & ~F.success & ~H.success)
                  | ((E.num < m) & (F.num < m) & (H.num < m)))
    calib = E.success & (_ratio(E.num, F.num) > opt.min_E_F_inlier_ratio) & (E.num >= m)
    uncal = ~calib & F.success & (F.num >= m)
    only_h = ~calib & ~uncal & H.success & (H.num >= m)
    degenerate = degenerate | (~calib & ~uncal & ~only_h)
    # calibrated: the larger of E and F; uncalibrated: F
    num, mask = _pick(calib & (E.num >= F.num), E, F.num, F.inliers)
    planar_c = calib & (_ratio(H.num, E.num) > opt.max_H_inlier_ratio)
    planar_u = uncal & (_ratio(H.num, F.num) > opt.max_H_inlier_ratio)
    planar = planar_c | planar_u | only_h
    num, mask = _pick(planar & (H.num > num) | only_h, H, num, mask)
    config = torch.where(planar, TWO_VIEW_PLANAR_OR_PANORAMIC,
                         torch.where(calib, TWO_VIEW_CALIBRATED, TWO_VIEW_UNCALIBRATED))
    return _degenerate(config, num, mask, _too_few(degenerate, num, num_matches, opt))


def decide_shared_focal(SF: Estimate, H: Estimate, num_matches: Tensor, opt: VerificationOptions
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(config, num_inliers, inlier mask) of EstimateSharedFocalTwoViewGeometry: the shared-focal
    model when it has min_num_inliers and H does not explain more than max_H_inlier_ratio of
    its inliers, else H alone (PLANAR_OR_PANORAMIC, whatever the two counts), else degenerate."""
    m = opt.min_num_inliers
    degenerate = (~SF.success & ~H.success) | ((SF.num < m) & (H.num < m))
    use_sf = SF.success & (SF.num >= m) & (_ratio(H.num, SF.num) <= opt.max_H_inlier_ratio)
    use_h = ~use_sf & H.success & (H.num >= m)
    degenerate = degenerate | (~use_sf & ~use_h)
    config = torch.where(use_sf, TWO_VIEW_UNCALIBRATED, TWO_VIEW_PLANAR_OR_PANORAMIC)
    num, mask = _pick(use_h, H, SF.num, SF.inliers)
    return _degenerate(config, num, mask, _too_few(degenerate, num, num_matches, opt))


def _too_few(degenerate: Tensor, num: Tensor, num_matches: Tensor, opt: VerificationOptions) -> Tensor:
    """Also degenerate: the model explains less than min_inlier_ratio of the matches."""
    if opt.two_view_min_inlier_ratio > 0:
        return degenerate | (_ratio(num, num_matches) < opt.two_view_min_inlier_ratio)
    return degenerate


def _degenerate(config: Tensor, num: Tensor, mask: Tensor, degenerate: Tensor):
    config = torch.where(degenerate, TWO_VIEW_DEGENERATE, config).long()
    num = torch.where(degenerate, torch.zeros_like(num), num)
    return config, num, mask & ~degenerate[:, None]


def watermark(xy1: Tensor, xy2: Tensor, inliers: Tensor, num_inliers: Tensor, w1: Tensor, h1: Tensor, w2: Tensor,
              h2: Tensor, opt: VerificationOptions, max_hypotheses: int = 64) -> Tensor:
    """(P,) bool: DetectWatermarkMatches. Most inliers lie in the border band of both images
    (outside the inner box shrunk by watermark_border_size x the diagonal) and a pure
    translation explains >= watermark_min_inlier_ratio of the inliers. The translation is
    searched over the displacements of the first `max_hypotheses` inliers (COLMAP samples them
    at random) and refined by averaging its inliers."""
    dt = xy1.dtype

    def outside(xy: Tensor, w: Tensor, h: Tensor) -> Tensor:
        W, Hh = w.to(dt)[:, None], h.to(dt)[:, None]
        b = opt.watermark_border_size * torch.sqrt(W * W + Hh * Hh)
        inside = (xy[..., 0] >= b) & (xy[..., 0] <= W - b) & (xy[..., 1] >= b) & (xy[..., 1] <= Hh - b)
        return ~inside

    border = (inliers & outside(xy1, w1, h1) & outside(xy2, w2, h2)).sum(1)
    cand = (num_inliers > 0) & (_ratio(border, num_inliers) >= opt.watermark_min_inlier_ratio)
    if not bool(cand.any()):
        return cand
    idx = torch.nonzero(cand).flatten()
    d = (xy2[idx] - xy1[idx])  # (Pw, M, 2) displacements
    inl = inliers[idx]
    thr2 = opt.watermark_detection_max_error ** 2
    K = min(max_hypotheses, d.shape[1])
    first = torch.argsort((~inl).to(torch.int8), dim=1, stable=True)[:, :K]  # the first K inliers
    hyp = torch.gather(d, 1, first[..., None].expand(-1, -1, 2))  # (Pw, K, 2)
    hyp_ok = torch.gather(inl, 1, first)
    err = ((d[:, None] - hyp[:, :, None]) ** 2).sum(-1)  # (Pw, K, M)
    count = ((err <= thr2) & inl[:, None]).sum(-1).masked_fill(~hyp_ok, -1)
    t = hyp[torch.arange(idx.numel(), device=d.device), count.argmax(1)]
    best = count.amax(1)
    for _ in range(2):  # local optimisation: the mean displacement of the inliers
        m = ((((d - t[:, None]) ** 2).sum(-1) <= thr2) & inl)
        t_new = (d * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        c_new = ((((d - t_new[:, None]) ** 2).sum(-1) <= thr2) & inl).sum(1)
        t = torch.where((c_new > best)[:, None], t_new, t)
        best = torch.maximum(best, c_new)
    out = cand.clone()
    out[idx] = _ratio(best, num_inliers[idx]) >= opt.watermark_min_inlier_ratio
    return out


def apply_watermark(config: Tensor, is_watermark: Tensor) -> Tensor:
    return torch.where(is_watermark & (config != TWO_VIEW_DEGENERATE), TWO_VIEW_WATERMARK, config)
