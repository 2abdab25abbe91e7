"""The shared-focal relative pose of pairs whose two images share one camera without a focal prior.

COLMAP 4.2 verifies such pairs with a 6-point shared-focal solver (EstimateSharedFocalTwoViewGeometry
in src/colmap/estimators/two_view_geometry.cc, PoseLib's relpose_6pt_shared_focal): a 6-dof model
(pose + one focal) finds fewer chance inliers than the 7-dof F on small pairs, and labels the pair
UNCALIBRATED with F = K^-T E K^-1. A batched 6-point solver needs a 15x15 eigen solve per sample;
here each 7-point F hypothesis becomes a shared-focal one instead: its focal from Bougnoux's closed
form, then the nearest essential matrix at that focal (`linalg.shared_focal_projection`). Local
optimisation refits F by IRLS and projects again; the final model is polished on the essential
manifold at its focal.

Frame: n = (xy - principal point) / f0 with f0 the camera's focal, so the model's focal is rho f0.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .linalg import shared_focal_projection
from .options import VerificationOptions
from .ransac import ModelKind, RansacResult, _refit_epipolar
from .refine import polish_essential
from .scoring import Frames, epipolar_residuals, epipolar_support
from .solvers import seven_point

_refit_f = _refit_epipolar(False)


def _solve(x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
    F, valid = seven_point(x1, x2)
    G, _, ok = shared_focal_projection(F)
    return G, valid & ok


def _refit(frames: Frames, w: Tensor, den: Tensor, model: Tensor) -> Tensor:
    return shared_focal_projection(_refit_f(frames, w, den, model))[0]


SF_KIND = ModelKind("SF", 7, 4, _solve, epipolar_support, epipolar_residuals, _refit, 5)


def shared_focal_frames(xy1: Tensor, xy2: Tensor, valid: Tensor, num: Tensor, f0: Tensor, principal: Tensor) -> Frames:
    """Frames of the shared-focal RANSAC: pixels about the principal point over the camera's focal."""
    zero = torch.zeros((), dtype=xy1.dtype, device=xy1.device)
    n1 = torch.where(valid[..., None], (xy1 - principal[:, None]) / f0[:, None, None], zero)
    n2 = torch.where(valid[..., None], (xy2 - principal[:, None]) / f0[:, None, None], zero)
    s = (1.0 / f0)[:, None].expand(-1, 2)
    return Frames(n1, n2, s, s, valid, num)


def finish_shared_focal(frames: Frames, result: RansacResult, f0: Tensor, principal: Tensor,
                        opt: VerificationOptions) -> tuple[RansacResult, Tensor, Tensor, Tensor]:
    """Polish the shared-focal models on the essential manifold at their focal. Returns (result in
    the SF frame, focal (P,), E (P, 3, 3) in the calibrated frame of that focal, F (P, 3, 3) in
    pixels)."""
    _, rho, ok = shared_focal_projection(result.model)
    ok = ok & result.success
    rho = torch.where(ok, rho, 1.0)
    k = torch.stack([rho, rho, torch.ones_like(rho)], -1)
    E = result.model * k[:, :, None] * k[:, None, :]
    s = (1.0 / (rho * f0))[:, None].expand(-1, 2)
    cal = Frames(frames.n1 / rho[:, None, None], frames.n2 / rho[:, None, None], s, s, frames.valid, frames.num)
    res = polish_essential(cal, RansacResult(E, result.num_inliers, result.inliers, result.num_trials, ok), rho * f0,
                           rho * f0, opt)
    E = res.model / res.model.flatten(1).norm(dim=1).clamp_min(1e-300)[:, None, None]
    f = rho * f0
    K = torch.zeros_like(E)
    K[:, 0, 0] = K[:, 1, 1] = f
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = principal[:, 0], principal[:, 1], 1.0
    Ki = torch.linalg.inv(K)
    F = Ki.transpose(1, 2) @ E @ Ki
    out = RansacResult(torch.where(ok[:, None, None], E, 0.0), res.inliers.sum(1) * ok, res.inliers & ok[:, None],
                       result.num_trials, ok)
    return out, f, torch.where(ok[:, None, None], F, 0.0), rho
