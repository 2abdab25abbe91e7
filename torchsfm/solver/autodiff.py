"""A SparseProblem whose Jacobians come from forward-mode autodiff (torch.func).

For new residual types before an analytic Jacobian exists: give a per-residual-block function
`residual_fn(cam (nc,), point (k,), *aux_i) -> (d,)` over Euclidean parameters (updates are
additive), and the solver can run on it unchanged. jacfwd over vmap evaluates all blocks at once;
analytic Jacobians are faster, so hot residuals (reprojection, BAL) have their own. Check any new
residual with `checks.check_jacobians`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .problem import Linearization, Step


class AutodiffProblem:
    def __init__(
        self,
        residual_fn: Callable[..., Tensor],
        cam_params: Tensor,  # (C, nc)
        points: Tensor,  # (P, k)
        cam_index: Tensor,  # (N,)
        point_index: Tensor,  # (N,)
        aux: tuple[Tensor, ...] = (),  # per-residual-block data, each (N, ...)
        cam_param_map: Tensor | None = None,
    ):
        self.fn = residual_fn
        self.cams = cam_params.clone()
        self.points = points.clone()
        self.cam_index, self.point_index = cam_index, point_index
        self.aux = aux
        self.num_cams, self.cam_dim = cam_params.shape
        self.num_points, self.point_dim = points.shape
        self.cam_param_map = cam_param_map
        batched = torch.func.vmap(residual_fn)
        self._eval = batched
        self._jac = torch.func.vmap(torch.func.jacfwd(residual_fn, argnums=(0, 1)))

    def _args(self, cams, points):
        return (cams[self.cam_index], points[self.point_index], *self.aux)

    def linearize(self) -> Linearization:
        args = self._args(self.cams, self.points)
        r = self._eval(*args)
        Jc, Jp = self._jac(*args)
        return Linearization(r, Jc, Jp)

    def residuals(self, step: Step | None = None) -> Tensor:
        if step is None:
            return self._eval(*self._args(self.cams, self.points))
        return self._eval(*self._args(self.cams + step.cams, self.points + step.points))

    def accept(self, step: Step) -> None:
        self.cams = self.cams + step.cams
        self.points = self.points + step.points

    def parameter_norm(self) -> Tensor:
        return torch.sqrt(self.cams.square().sum() + self.points.square().sum())
