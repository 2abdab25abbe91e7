"""How well the data determine each camera's intrinsics: marginal standard deviations with every
pose and point eliminated, so their correlation with the intrinsics is included.

At a converged model the Gauss-Newton information of the reprojection errors is J^T J / sigma^2.
Eliminating the points (3x3 blocks, per track) gives the reduced camera system over poses and
intrinsics,

    S = Jc^T Jc - C C^T,   C = Jc^T Jp L^-T per observation (V = Jp^T Jp = L L^T per point),

and eliminating the poses gives the intrinsics' marginal information

    M = S_ii - S_ip S_pp^-1 S_pi,    covariance = sigma^2 M^-1.

S is the solver's undamped Schur complement (`solver.reduced_information`: blocks for the pairs
of images that share points, then one dense matrix over the reduced unknowns). S_pp is singular
along the 7-dof similarity gauge; the intrinsics are invariant under it, so a tiny damping
suffices. A camera with more than `max_images` registered images is measured on its
`max_images` best-observed ones (and the points those see twice): less data can only widen the
intervals, so a principal point determined there is determined.

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
from ..segments import rank_in_runs
from ..solver import reduced_information
from .triangulation import noise_sigma, reprojection_errors


def model_noise_sigma(rec: Reconstruction) -> float:
    """Per-coordinate keypoint noise of a converged model (`triangulation.noise_sigma`)."""
    err, _ = reprojection_errors(rec, rec.points3D.xyz, rec.tracks)
    return noise_sigma(err, rec.tracks.point, len(rec.points3D))


def best_observed(rec: Reconstruction, max_images: int) -> Reconstruction:
    """The model restricted to the `max_images` registered images of each camera with the most
    observations (the others unregistered), and to the points those see at least twice. `rec`
    itself when no camera has more images."""
    reg = rec.images.registered
    cam = rec.images.camera
    n_obs = torch.bincount(rec.tracks.image, minlength=len(rec.images)).masked_fill(~reg, -1)
    # rank of each image among its camera's by observations (most first): sort by count, then camera
    order = torch.argsort(n_obs, descending=True, stable=True)
    order = order[torch.argsort(cam[order], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = rank_in_runs(cam[order])
    keep_img = reg & (rank < max_images)
    if bool((keep_img == reg).all()):
        return rec
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
    rec = best_observed(rec, max_images)
    problem = ReprojectionProblem(rec, options)
    std = torch.full_like(rec.cameras.params, math.nan)
    if problem.obs.numel() == 0 or not math.isfinite(sigma):
        return std
    S = reduced_information(problem, dataclasses.replace(options.solver, loss="trivial"))
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
