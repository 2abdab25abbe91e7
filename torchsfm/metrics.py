"""Accuracy metrics against a ground-truth model: relative pose AUC, Sim(3)-aligned absolute errors,
reprojection error.

The relative-pose AUC follows COLMAP's reconstruction benchmark
(benchmark/reconstruction/evaluation/utils.py: `compute_rel_pose_error`, `compute_auc`):
- per image pair, the rotation error is the geodesic angle between the estimated and the GT
  relative rotation, the translation error the angle between the relative translation directions;
  the pair's error is the larger of the two;
- a pair with an unregistered image is a failure (infinite error here; COLMAP writes 180 deg, which
  is the same for every threshold up to 180);
- the AUC is the area under the recall-vs-error curve up to each threshold, divided by the
  threshold, in percent, with no extra rescaling (InstantSfM divides by 1.1; we do not).

Pairs: by default the unordered pairs i < j (the relative translation of cam_j_from_cam_i).
COLMAP's benchmark scores the ordered pairs (both i->j and j->i); `both_directions=True` does that
too. The rotation error is the same either way; the translation-direction error is not, since
cam_i_from_cam_j's translation lives in camera i's frame.

Angles are computed with atan2 (never arccos), so that identical poses give errors of exactly or
almost exactly zero instead of ~1e-6 deg of arccos round-off.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .geometry import so3

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (1.0, 3.0, 5.0, 10.0)


# ---------------------------------------------------------------------------------------------
# small angle helpers


def rotation_angle(R: Tensor) -> Tensor:
    """Rotation angle (radians) of matrices (..., 3, 3), accurate near 0 (atan2 of sin and cos)."""
    s = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    sin = 0.5 * s.norm(dim=-1)
    cos = 0.5 * (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1)
    return torch.atan2(sin, cos)


def vector_angle(a: Tensor, b: Tensor) -> Tensor:
    """Angle (radians) between vectors (..., 3); 0 if either is zero (callers mask those)."""
    return torch.atan2(torch.linalg.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1))


def _quat_angle(qa: Tensor, qb: Tensor) -> Tensor:
    """Angle (radians) of the rotation between unit quaternions, accurate everywhere.

    With qa.qb = cos(theta/2) >= 0 (sign fixed), |qa - qb| = 2 sin(theta/4) and
    |qa + qb| = 2 cos(theta/4)."""
    s = torch.where((qa * qb).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(qa.dtype)
    return 4 * torch.atan2((qa - s * qb).norm(dim=-1), (qa + s * qb).norm(dim=-1))


# ---------------------------------------------------------------------------------------------
# relative pose errors over all pairs


def pair_indices(num_images: int, device=None) -> Tensor:
    """The (P, 2) pairs (i, j), i < j, in the order `relative_pose_errors` reports them
    (row-major upper triangle, the order of torch.triu_indices)."""
    return torch.triu_indices(num_images, num_images, 1, device=device).T


def _pair_chunks(num_images: int, chunk: int, device):
    """Yield (i, j) index tensors of the i < j pairs, row-major, at most ~`chunk` pairs at a time."""
    n = num_images
    counts = torch.arange(n - 1, -1, -1, dtype=torch.long)  # pairs that start at row i: n-1-i
    ends = torch.cumsum(counts, 0)
    a = 0
    while a < n - 1:
        # Largest b such that rows a..b-1 hold at most `chunk` pairs (always at least one row).
        start = int(ends[a - 1]) if a > 0 else 0
        b = int(torch.searchsorted(ends, start + chunk, right=True))
        b = min(max(b, a + 1), n)
        rows = torch.arange(a, b, device=device)
        cnt = (n - 1 - rows)
        i = torch.repeat_interleave(rows, cnt)
        first = torch.cumsum(cnt, 0) - cnt
        j = i + 1 + torch.arange(i.numel(), device=device) - torch.repeat_interleave(first, cnt)
        yield i, j
        a = b


class RelativePoseErrors(NamedTuple):
    """Per-pair errors in degrees, pairs in `pair_indices` order (then the reversed pairs when
    `both_directions`). Failures are +inf."""

    rotation: Tensor  # (P,)
    translation: Tensor  # (P,)

    def max(self) -> Tensor:
        """The benchmark's per-pair error: max(rotation, translation)."""
        return torch.maximum(self.rotation, self.translation)


def relative_pose_errors(
    R_est: Tensor,
    t_est: Tensor,
    registered_est: Tensor,
    R_gt: Tensor,
    t_gt: Tensor,
    *,
    min_gt_baseline: float = 0.0,
    both_directions: bool = False,
    chunk_pairs: int = 1 << 22,
) -> RelativePoseErrors:
    """Relative rotation and translation-direction errors (deg) over all pairs of images.

    Poses are cam_from_world (R (I, 3, 3), t (I, 3)), estimate and GT matched by row;
    `registered_est` (I,) bool marks estimated images that have a pose. All GT poses are taken as
    valid (restrict to GT-registered images first).

    Special cases (documented choices):
    - a pair with an unregistered image: both errors +inf (a failure);
    - GT baseline |c_i - c_j| < `min_gt_baseline`, or zero (at the round-off level of the
      centres, 64 eps (|c_i| + |c_j|)): the translation direction is undefined, so only the
      rotation is scored (translation error 0), as COLMAP does with min_proj_center_dist;
    - estimated baseline zero (same test) while the GT one is not: translation error +inf (a
      failure; COLMAP's zero-vector normalisation gives 90 deg, which fails every usual threshold).

    Work is chunked over pairs so that memory stays O(chunk_pairs) whatever the image count.
    """
    n = R_est.shape[0]
    dtype, device = R_est.dtype, R_est.device
    R_gt = R_gt.to(device=device, dtype=dtype)
    t_gt = t_gt.to(device=device, dtype=dtype)
    t_est = t_est.to(dtype)
    registered_est = registered_est.to(device=device, dtype=torch.bool)
    # Replace absent poses by the identity so no NaN enters; their pairs are overwritten by inf.
    eye = torch.eye(3, dtype=dtype, device=device)
    R_e = torch.where(registered_est[:, None, None], R_est, eye)
    t_e = torch.where(registered_est[:, None], t_est, torch.zeros_like(t_est))

    # The relative rotation error of (i, j) is the angle between A_i and A_j, A_k = R_k_gt^T R_k_est,
    # (conjugation invariance), so one quaternion per image replaces a 3x3 product per pair.
    A = R_gt.transpose(-1, -2) @ R_e
    qA = so3.matrix_to_quat(A)
    c_e = -(R_e.transpose(-1, -2) @ t_e[..., None])[..., 0]
    c_g = -(R_gt.transpose(-1, -2) @ t_gt[..., None])[..., 0]
    rad2deg = 180.0 / math.pi
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)

    # "Zero" baselines are those at the round-off level of the centres: c = -R^T t is not exact.
    tiny = 64 * torch.finfo(dtype).eps
    n_e, n_g = c_e.norm(dim=-1), c_g.norm(dim=-1)

    def direction_error(k: Tensor, d_e: Tensor, d_g: Tensor, zero_e: Tensor, short_g: Tensor) -> Tensor:
        # Angle between R_k_est d_e and R_k_gt d_g = angle between A_k d_e and d_g.
        v = (A[k] @ d_e[..., None])[..., 0]
        err = torch.where(zero_e, inf, vector_angle(v, d_g) * rad2deg)
        return torch.where(short_g, torch.zeros_like(err), err)

    rot, trans, trans_rev = [], [], []
    for i, j in _pair_chunks(n, chunk_pairs, device):
        fail = ~(registered_est[i] & registered_est[j])
        r = _quat_angle(qA[i], qA[j]) * rad2deg
        rot.append(torch.where(fail, inf, r))
        # cam_j_from_cam_i translation is R_j (c_i - c_j).
        d_e, d_g = c_e[i] - c_e[j], c_g[i] - c_g[j]
        len_g = d_g.norm(dim=-1)
        zero_e = d_e.norm(dim=-1) <= tiny * (n_e[i] + n_e[j])
        short_g = (len_g < min_gt_baseline) | (len_g <= tiny * (n_g[i] + n_g[j]))
        trans.append(torch.where(fail, inf, direction_error(j, d_e, d_g, zero_e, short_g)))
        if both_directions:
            trans_rev.append(torch.where(fail, inf, direction_error(i, -d_e, -d_g, zero_e, short_g)))
    empty = torch.zeros(0, dtype=dtype, device=device)
    rot = torch.cat(rot) if rot else empty
    trans = torch.cat(trans) if trans else empty
    if both_directions:
        rot = torch.cat([rot, rot])
        trans = torch.cat([trans, torch.cat(trans_rev) if trans_rev else empty])
    return RelativePoseErrors(rot, trans)


# ---------------------------------------------------------------------------------------------
# AUC


def pose_auc(
    errors_deg: Tensor | RelativePoseErrors,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    min_error: float = 0.0,
) -> Tensor:
    """AUC (percent) of the recall-vs-error curve up to each threshold, COLMAP's definition.

    `errors_deg` is the per-pair error (a RelativePoseErrors is reduced with max(rot, trans)).
    Sorted errors e_1..e_N get recall k/N; the curve starts at (0, 0); it is integrated with the
    trapezoid rule over the points with error <= t, then from the last such point to t at that
    point's recall (a flat last segment, as in COLMAP's `compute_auc`), and divided by t.
    `min_error` > 0 reproduces COLMAP's option that counts every error below it as zero-area
    (the curve jumps to the recall at `min_error`). NaN errors count as failures (+inf).
    Returns a (T,) tensor on the errors' device.
    """
    if isinstance(errors_deg, RelativePoseErrors):
        errors_deg = errors_deg.max()
    e = errors_deg.reshape(-1)
    if not e.is_floating_point():
        e = e.to(torch.float64)
    n = e.numel()
    if n == 0:
        raise ValueError("pose_auc: no errors to evaluate")
    e = torch.where(torch.isnan(e), torch.full_like(e, float("inf")), e)
    e, _ = torch.sort(e)
    recall = torch.arange(1, n + 1, dtype=e.dtype, device=e.device) / n
    zero = e.new_zeros(1)
    if min_error > 0:
        k0 = int(torch.searchsorted(e, e.new_tensor([min_error]), right=True))
        r0 = e.new_tensor([k0 / n])
        curve_e = torch.cat([zero, e.new_tensor([min_error]), e[k0:]])
        curve_r = torch.cat([r0, r0, recall[k0:]])
    else:
        curve_e = torch.cat([zero, e])
        curve_r = torch.cat([zero, recall])
    # Cumulative trapezoid area up to each curve point; entries past an infinite error are
    # inf/NaN, but only prefixes that end at an error <= t (finite) are ever read.
    seg = (curve_e[1:] - curve_e[:-1]) * (curve_r[1:] + curve_r[:-1]) / 2
    area = torch.cat([zero, torch.cumsum(seg, 0)])
    t = torch.as_tensor(list(thresholds), dtype=e.dtype, device=e.device)
    if (t <= 0).any():
        raise ValueError("pose_auc: thresholds must be positive")
    last = torch.searchsorted(curve_e, t, right=True) - 1  # last curve point with error <= t
    total = area[last] + (t - curve_e[last]) * curve_r[last]
    return 100 * total / t


def recall_at(errors_deg: Tensor | RelativePoseErrors, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Tensor:
    """Percentage of errors <= each threshold (COLMAP's `compute_recall`)."""
    if isinstance(errors_deg, RelativePoseErrors):
        errors_deg = errors_deg.max()
    e = errors_deg.reshape(-1)
    t = torch.as_tensor(list(thresholds), dtype=e.dtype if e.is_floating_point() else torch.float64, device=e.device)
    return 100 * (e[None, :] <= t[:, None]).to(t.dtype).mean(-1)


# ---------------------------------------------------------------------------------------------
# Sim(3) alignment


@dataclass
class Sim3:
    """x_dst = scale * R @ x_src + t. `inliers` (N,) marks the correspondences the fit kept."""

    scale: Tensor  # () scalar tensor
    R: Tensor  # (3, 3)
    t: Tensor  # (3,)
    inliers: Tensor | None = None

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Sim3":
        return Sim3(self.scale.to(device, dtype), self.R.to(device, dtype), self.t.to(device, dtype),
                    None if self.inliers is None else self.inliers.to(device))

    def apply(self, x: Tensor) -> Tensor:
        return self.scale * (x @ self.R.T) + self.t

    def transform_poses(self, R_cw: Tensor, t_cw: Tensor) -> tuple[Tensor, Tensor]:
        """cam_from_world poses of the source world -> cam_from_world poses of the target world.

        Centres map by `apply`, rotations become R_cw R^T; the translation is rescaled."""
        R_new = R_cw @ self.R.T
        c = -(R_cw.transpose(-1, -2) @ t_cw[..., None])[..., 0]
        t_new = -(R_new @ self.apply(c)[..., None])[..., 0]
        return R_new, t_new


def _umeyama_weighted(src: Tensor, dst: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched weighted Umeyama: src, dst (B, N, 3), w (B, N) >= 0 -> scale (B,), R (B,3,3), t (B,3)."""
    wsum = w.sum(-1, keepdim=True).clamp_min(torch.finfo(src.dtype).tiny)
    wn = (w / wsum)[..., None]
    mu_s = (wn * src).sum(-2)
    mu_d = (wn * dst).sum(-2)
    xs = src - mu_s[:, None]
    xd = dst - mu_d[:, None]
    cov = (wn * xd).transpose(-1, -2) @ xs  # (B, 3, 3): sum w d s^T
    var_s = (wn[..., 0] * (xs * xs).sum(-1)).sum(-1)
    U, D, Vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    S = torch.ones_like(D)
    S[:, 2] = sign
    R = U @ (S[..., None] * Vh)
    scale = (D * S).sum(-1) / var_s.clamp_min(torch.finfo(src.dtype).tiny)
    t = mu_d - scale[:, None] * (R @ mu_s[..., None])[..., 0]
    return scale, R, t


def _residuals(scale: Tensor, R: Tensor, t: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """(B,) hypotheses x (N, 3) points -> (B, N) distances."""
    pred = scale[:, None, None] * torch.einsum("bij,nj->bni", R, src) + t[:, None]
    return (pred - dst[None]).norm(dim=-1)


_LMEDS_SCORE_POINTS = 4096


def _umeyama_lmeds(src: Tensor, dst: Tensor, num_samples: int, seed: int) -> Sim3:
    """Least-median-of-squares over minimal 3-point samples, then refits on the inliers.

    LMedS needs no threshold in scene units and tolerates up to half the points being outliers.
    The inlier scale is the robust sigma 1.4826 (1 + 5/(N - 3)) sqrt(median r^2) (Rousseeuw);
    inliers are the points within 2.5 sigma, refitted twice.
    """
    n = src.shape[0]
    gen = torch.Generator().manual_seed(seed)
    # Three distinct indices per sample without an (S, N) table: draw from shrinking ranges and
    # skip the indices already taken.
    a = torch.randint(0, n, (num_samples,), generator=gen)
    b = torch.randint(0, n - 1, (num_samples,), generator=gen)
    b = b + (b >= a).long()
    c = torch.randint(0, n - 2, (num_samples,), generator=gen)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    c = c + (c >= lo).long()
    c = c + (c >= hi).long()
    samples = torch.stack([a, b, c], -1).to(src.device)
    ones = torch.ones(samples.shape, dtype=src.dtype, device=src.device)
    s, R, t = _umeyama_weighted(src[samples], dst[samples], ones)
    ok = torch.isfinite(s) & (s > 0) & torch.isfinite(R).all(-1).all(-1) & torch.isfinite(t).all(-1)
    # Score the hypotheses on at most `_LMEDS_SCORE_POINTS` points: the median of a random
    # subset is an accurate enough ranking and keeps memory at O(samples x subset).
    if n > _LMEDS_SCORE_POINTS:
        sub = torch.randperm(n, generator=gen)[:_LMEDS_SCORE_POINTS].to(src.device)
        res = _residuals(s, R, t, src[sub], dst[sub])
    else:
        res = _residuals(s, R, t, src, dst)
    med = torch.where(ok, res.median(dim=-1).values, torch.full_like(s, float("inf")))
    best = int(torch.argmin(med))
    extent = (dst - dst.mean(0)).norm(dim=-1).mean()
    floor = 1e-9 * extent + torch.finfo(src.dtype).tiny
    r = _residuals(s[best : best + 1], R[best : best + 1], t[best : best + 1], src, dst)[0]
    sb, Rb, tb = s[best : best + 1], R[best : best + 1], t[best : best + 1]
    for _ in range(2):
        sigma = 1.4826 * (1 + 5 / max(n - 3, 1)) * r.median()
        inl = r <= torch.maximum(2.5 * sigma, floor)
        if int(inl.sum()) < 3:
            break
        sb, Rb, tb = _umeyama_weighted(src[None], dst[None], inl.to(src.dtype)[None])
        r = _residuals(sb, Rb, tb, src, dst)[0]
    sigma = 1.4826 * (1 + 5 / max(n - 3, 1)) * r.median()
    inl = r <= torch.maximum(2.5 * sigma, floor)
    return Sim3(sb[0], Rb[0], tb[0], inl)


def _umeyama(src: Tensor, dst: Tensor, robust: bool, num_samples: int, seed: int) -> Sim3:
    if src.shape != dst.shape or src.ndim != 2 or src.shape[-1] != 3:
        raise ValueError(f"umeyama_sim3: expected two (N, 3) tensors, got {tuple(src.shape)} and {tuple(dst.shape)}")
    if src.shape[0] < 3:
        raise ValueError(f"umeyama_sim3: needs at least 3 correspondences, got {src.shape[0]}")
    dst = dst.to(device=src.device, dtype=src.dtype)
    if robust and src.shape[0] > 3:
        return _umeyama_lmeds(src, dst, num_samples, seed)
    s, R, t = _umeyama_weighted(src[None], dst[None], torch.ones(1, src.shape[0], dtype=src.dtype, device=src.device))
    return Sim3(s[0], R[0], t[0], torch.ones(src.shape[0], dtype=torch.bool, device=src.device))


def umeyama_sim3(
    src: Tensor, dst: Tensor, robust: bool = False, *, num_samples: int = 512, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares similarity with dst ~ s R src + t (Umeyama 1991), src/dst (N, 3), N >= 3.

    robust=True: LMedS over `num_samples` random 3-point samples (deterministic for a `seed`),
    then a least-squares refit on the inliers (see `_umeyama_lmeds`); tolerates < 50% outliers.
    Returns (scale () tensor, R (3, 3), t (3,)). Use float64 inputs for exact recovery.
    """
    sim = _umeyama(src, dst, robust, num_samples, seed)
    return sim.scale, sim.R, sim.t


def align_to_gt(
    centers_est: Tensor, centers_gt: Tensor, mask: Tensor | None = None, *, robust: bool = True, seed: int = 0
) -> Sim3:
    """Sim(3) taking the estimated world to the GT world, fitted on camera centres (I, 3).

    `mask` (I,) bool selects the images to fit on (registered in both). Robust (LMedS) by default
    so that a few badly placed cameras do not drag the alignment; the returned `inliers` is (I,)
    and False outside `mask`.
    """
    I = centers_est.shape[0]
    if mask is None:
        mask = torch.ones(I, dtype=torch.bool, device=centers_est.device)
    mask = mask.to(device=centers_est.device, dtype=torch.bool)
    idx = torch.nonzero(mask).squeeze(-1)
    sim = _umeyama(centers_est[idx], centers_gt.to(centers_est.device)[idx], robust, 512, seed)
    inliers = torch.zeros(I, dtype=torch.bool, device=centers_est.device)
    inliers[idx] = sim.inliers
    sim.inliers = inliers
    return sim


class AbsolutePoseErrors(NamedTuple):
    rotation: Tensor  # (I,) degrees, +inf where unregistered
    position: Tensor  # (I,) GT units, +inf where unregistered


def absolute_pose_errors(
    R_est: Tensor, t_est: Tensor, registered_est: Tensor, R_gt: Tensor, t_gt: Tensor, sim: Sim3 | None = None
) -> AbsolutePoseErrors:
    """Per-image errors after mapping the estimate into the GT frame with `sim` (identity if None):
    rotation angle between the cam_from_world rotations (deg) and camera-centre distance."""
    dtype, device = R_est.dtype, R_est.device
    R_gt = R_gt.to(device=device, dtype=dtype)
    t_gt = t_gt.to(device=device, dtype=dtype)
    registered_est = registered_est.to(device=device, dtype=torch.bool)
    if sim is not None:
        R_est, t_est = sim.to(device, dtype).transform_poses(R_est, t_est)
    rot = rotation_angle(R_gt.transpose(-1, -2) @ R_est) * (180.0 / math.pi)
    c_e = -(R_est.transpose(-1, -2) @ t_est[..., None])[..., 0]
    c_g = -(R_gt.transpose(-1, -2) @ t_gt[..., None])[..., 0]
    pos = (c_e - c_g).norm(dim=-1)
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    return AbsolutePoseErrors(torch.where(registered_est, rot, inf), torch.where(registered_est, pos, inf))


# ---------------------------------------------------------------------------------------------
# reprojection error


def reprojection_errors(rec) -> Tensor:
    """Pixel distance between each track observation and the projection of its 3D point (O,).

    NaN where the observing image is unregistered or the projection is invalid (point behind the
    camera, when the projection module reports validity); summarise with nanmean/nanmedian.
    """
    from .cameras.projection import project_world  # lazy: the projection module is optional here

    tr = rec.tracks
    dtype = rec.points3D.xyz.dtype
    if len(tr) == 0:
        return torch.zeros(0, dtype=dtype, device=rec.device)
    R = rec.images.rotation
    img = tr.image
    cam = rec.images.camera[img]
    proj = project_world(rec.cameras, cam, R[img], rec.images.trans[img], rec.points3D.xyz[tr.point])
    err = (proj.uv - rec.observation_xy().to(proj.uv.dtype)).norm(dim=-1)
    bad = ~rec.images.registered[img]
    valid = getattr(proj, "valid", None)
    if valid is not None:
        bad = bad | ~valid
    return torch.where(bad, torch.full_like(err, float("nan")), err)


# ---------------------------------------------------------------------------------------------
# full evaluation


def _match_by_name(est, gt) -> tuple[Tensor, Tensor]:
    """For each GT-registered image: its row in `gt` and its row in `est` (-1 when absent)."""
    est_row = {name: k for k, name in enumerate(est.images.name)}
    gt_rows = torch.nonzero(gt.images.registered.cpu()).squeeze(-1)
    names = gt.images.name
    est_rows = torch.tensor([est_row.get(names[int(k)], -1) for k in gt_rows], dtype=torch.long)
    return gt_rows, est_rows


def _stat(x: Tensor, fn) -> float:
    x = x[~torch.isnan(x)]
    return float(fn(x)) if x.numel() else float("nan")


def evaluate(
    est,
    gt,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    min_gt_baseline: float = 0.0,
    both_directions: bool = False,
    robust_alignment: bool = True,
) -> dict:
    """Compare an estimated Reconstruction with a GT one; images are matched by name.

    The evaluated set is the GT-registered images; an image missing from the estimate or not
    registered there is a failure. Estimated images absent from the GT are ignored. Returns plain
    Python numbers: counts, `auc@T` (percent, COLMAP definition) and `recall@T`, median relative
    rotation/translation errors (deg; inf when over half the pairs fail), Sim(3)-aligned absolute
    errors over the registered images (NaN with fewer than 3), mean/median reprojection error of
    the estimate (NaN if the projection module is unavailable).
    """
    device = est.device
    dt = torch.float64
    gt_rows, est_rows = _match_by_name(est, gt)
    present = est_rows >= 0
    safe = est_rows.clamp_min(0)
    reg = present & est.images.registered.cpu()[safe]
    gt_rows, safe, reg = gt_rows.to(device), safe.to(device), reg.to(device)

    R_e = so3.quat_to_matrix(est.images.quat.to(device, dt)[safe])
    t_e = est.images.trans.to(device, dt)[safe]
    R_g = so3.quat_to_matrix(gt.images.quat.to(device, dt)[gt_rows])
    t_g = gt.images.trans.to(device, dt)[gt_rows]

    out: dict = {"num_images": int(gt_rows.numel()), "num_registered": int(reg.sum())}
    if gt_rows.numel() >= 2:
        rel = relative_pose_errors(R_e, t_e, reg, R_g, t_g, min_gt_baseline=min_gt_baseline,
                                   both_directions=both_directions)
        aucs = pose_auc(rel, thresholds).tolist()
        recs = recall_at(rel, thresholds).tolist()
        out["num_pairs"] = int(rel.rotation.numel())
        out["median_rotation_error_deg"] = float(rel.rotation.median())
        out["median_translation_error_deg"] = float(rel.translation.median())
    else:
        aucs = recs = [float("nan")] * len(thresholds)
        out["num_pairs"] = 0
        out["median_rotation_error_deg"] = out["median_translation_error_deg"] = float("nan")
    for t, a, r in zip(thresholds, aucs, recs):
        key = f"{t:g}"
        out[f"auc@{key}"] = a
        out[f"recall@{key}"] = r

    nan = float("nan")
    out.update(abs_median_rotation_error_deg=nan, abs_median_position_error=nan, abs_mean_position_error=nan,
               abs_alignment_inliers=0)
    if int(reg.sum()) >= 3:
        c_e = -(R_e.transpose(-1, -2) @ t_e[..., None])[..., 0]
        c_g = -(R_g.transpose(-1, -2) @ t_g[..., None])[..., 0]
        sim = align_to_gt(c_e, c_g, reg, robust=robust_alignment)
        ab = absolute_pose_errors(R_e, t_e, reg, R_g, t_g, sim)
        out.update(
            abs_median_rotation_error_deg=float(ab.rotation[reg].median()),
            abs_median_position_error=float(ab.position[reg].median()),
            abs_mean_position_error=float(ab.position[reg].mean()),
            abs_alignment_inliers=int(sim.inliers.sum()),
            abs_alignment_scale=float(sim.scale),
        )

    try:
        err = reprojection_errors(est.to(dtype=dt))
        out["mean_reprojection_error"] = _stat(err, torch.mean)
        out["median_reprojection_error"] = _stat(err, torch.median)
    except ImportError as e:  # the projection module is not part of this build
        logger.warning("reprojection error skipped: %s", e)
        out["mean_reprojection_error"] = out["median_reprojection_error"] = nan
    return out
