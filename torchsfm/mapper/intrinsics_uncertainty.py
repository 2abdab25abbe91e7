"""How well the data determine each camera's intrinsics: marginal standard deviations with every
pose and point eliminated, so their correlation with the intrinsics is included.

At a converged model the Gauss-Newton information of the reprojection errors is J^T J / sigma^2.
Eliminating the points (3x3 blocks, per track) gives the reduced camera system over poses and
intrinsics,

    S = Jc^T Jc - C C^T,   C = Jc^T Jp L^-T per observation (V = Jp^T Jp = L L^T per point),

and eliminating the poses gives the intrinsics' marginal information

    M = S_ii - S_ip S_pp^-1 S_pi,    covariance = sigma^2 M^-1.

S is assembled densely: Jc^T Jc from per-observation blocks, C C^T from dense chunks of points, so
memory stays bounded. S_pp is singular along the 7-dof similarity gauge; the intrinsics are
invariant under it, so a tiny damping suffices. Scenes with more than `max_images` registered
images are measured on their `max_images` best-observed images (and the points those see twice):
less data can only widen the intervals, so a principal point determined there is determined.

This is what a likelihood-ratio test on the fitted cost does not see: on a ring of cameras that
share the vertical axis, a horizontal principal-point shift is nearly a yaw of every camera, and
two-view tracks along horizontal baselines constrain only vertical errors. The cost then falls
when the principal point moves, yet its marginal standard deviation is several pixels: the data
do not determine it.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..ba.bundle_adjustment import BundleAdjustmentOptions, ReprojectionProblem
from ..data.model import Reconstruction, Tracks
from .triangulation import noise_sigma, reprojection_errors


def model_noise_sigma(rec: Reconstruction) -> float:
    """Per-coordinate keypoint noise of a converged model (`triangulation.noise_sigma`)."""
    err, _ = reprojection_errors(rec, rec.points3D.xyz, rec.tracks)
    return noise_sigma(err, rec.tracks.point, len(rec.points3D))


def reduced_information(problem: ReprojectionProblem, chunk_entries: int = 1 << 24) -> Tensor:
    """The dense reduced camera system S (n, n) of `problem` at its current state, in the
    numbering of problem.cam_param_map (poses first, then intrinsics)."""
    lin = problem.linearize().as_rows()
    J, Jp = lin.jac_cam, lin.jac_point  # (O, 2, k), (O, 2, 3)
    O, _, k = J.shape
    dt, dev = J.dtype, J.device
    n = int(problem.cam_param_map.max()) + 1 if problem.cam_param_map.numel() else 0
    P = problem.num_points
    idx = problem.cam_param_map[problem.cam_index]  # (O, k) reduced unknown, -1 for constants
    valid = idx >= 0
    slot = torch.where(valid, idx, torch.full_like(idx, n))  # constants go to a scratch row/column
    S = torch.zeros(n + 1, n + 1, dtype=dt, device=dev)
    S.index_put_((slot[:, :, None].expand(O, k, k), slot[:, None, :].expand(O, k, k)),
                 J.transpose(1, 2) @ J, accumulate=True)
    pi = problem.point_index
    V = torch.zeros(P, 3, 3, dtype=dt, device=dev).index_add_(0, pi, Jp.transpose(1, 2) @ Jp)
    eye = torch.eye(3, dtype=dt, device=dev)
    V = V + 1e-12 * V.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-300)[:, None, None] * eye
    Linv_t = torch.linalg.inv(torch.linalg.cholesky(V)).transpose(1, 2)  # L^-T per point
    Cv = J.transpose(1, 2) @ Jp @ Linv_t[pi]  # (O, k, 3)
    order = torch.argsort(pi, stable=True)
    per_chunk = max(1, chunk_entries // (3 * (n + 1)))  # points per dense chunk of C
    bounds = torch.searchsorted(pi[order], torch.arange(0, P + per_chunk, per_chunk, device=dev))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if a == b:
            continue
        o = order[a:b]
        p0 = int(pi[o[0]])
        C = torch.zeros(n + 1, 3 * per_chunk, dtype=dt, device=dev)
        col = (3 * (pi[o] - p0))[:, None, None] + torch.arange(3, device=dev)
        C.index_put_((slot[o][:, :, None].expand(-1, k, 3), col.expand(-1, k, 3)), Cv[o], accumulate=True)
        C[n] = 0
        S -= C @ C.T
    return S[:n, :n]


def _best_observed(rec: Reconstruction, max_images: int) -> Reconstruction:
    """The model restricted to its `max_images` registered images with the most observations, and
    to the points they see at least twice."""
    reg = rec.images.registered
    n_obs = torch.bincount(rec.tracks.image, minlength=len(rec.images)).masked_fill(~reg, -1)
    keep_img = torch.zeros_like(reg)
    keep_img[torch.argsort(n_obs, descending=True, stable=True)[:max_images]] = True
    keep_img &= reg
    t = rec.tracks
    sel = keep_img[t.image]
    length = torch.bincount(t.point[sel], minlength=len(rec.points3D))
    sel &= length[t.point] >= 2
    images = dataclasses.replace(rec.images, registered=keep_img)
    return dataclasses.replace(rec, images=images, tracks=Tracks(t.point[sel], t.image[sel], t.keypoint[sel]))


def intrinsics_std(rec: Reconstruction, options: BundleAdjustmentOptions, sigma: float | None = None,
                   max_images: int = 150) -> Tensor:
    """(C, MAX_CAMERA_PARAMS) marginal standard deviations (pixels for focal length and principal
    point) of the intrinsics `options` refines, NaN where not refined, at the model `rec`
    (assumed converged). sigma: the keypoint noise (default `model_noise_sigma(rec)`). The poses must be
    free (no gauge fixing): the intrinsics are invariant under the similarity gauge."""
    sigma = model_noise_sigma(rec) if sigma is None else sigma
    if int(rec.images.registered.sum()) > max_images:
        rec = _best_observed(rec, max_images)
    problem = ReprojectionProblem(rec, options)
    std = torch.full_like(rec.cameras.params, math.nan)
    if problem.obs.numel() == 0 or not math.isfinite(sigma):
        return std
    S = reduced_information(problem)
    n_pose, n = problem.n_pose, S.shape[0]
    if n <= n_pose:
        return std
    A, B, D = S[:n_pose, :n_pose], S[:n_pose, n_pose:], S[n_pose:, n_pose:]
    if n_pose:
        damp = 1e-10 * A.diagonal().mean().clamp_min(1e-300)
        D = D - B.T @ torch.linalg.solve(A + damp * torch.eye(n_pose, dtype=A.dtype, device=A.device), B)
    cov = torch.linalg.pinv(0.5 * (D + D.T)) * sigma * sigma
    std[problem.intr_unknown_cam, problem.intr_unknown_col] = cov.diagonal().clamp_min(0).sqrt()
    return std
