"""The interface between a least-squares problem and the sparse LM solver.

The solver knows nothing of cameras. A problem is a set of N residual blocks r_i (d values
each); block i depends on one "camera" block (cam_dim parameters, row `cam_index[i]`) and one
eliminated block (point_dim parameters, row `point_index[i]`). Eliminated blocks are removed by a
Schur complement (3x3 inverses for points; point_dim = 1 for per-observation scales works the
same way), leaving a reduced system over the camera-side unknowns.

Camera-side parameters may be shared or constant: `cam_param_map[c, j]` is the column of the
reduced system that local parameter j of camera block c refers to (-1 = constant). Two camera
blocks naming the same column share that parameter (e.g. one focal length for many images). By
the chain rule the reduced matrix is then P^T S P, with P the 0/1 map from reduced columns to
local ones, which the solver assembles from the per-block quantities.

Parameters live on manifolds: the solver only produces tangent steps, the problem retracts them
(e.g. R <- Exp(dw) R).

A problem with nothing to eliminate (every residual block touches camera-side parameters only,
e.g. view-graph calibration's pair residuals) uses point_dim = 0 with one empty eliminated block
per residual block (point_index = arange(N)).

The methods are called once or twice per LM iteration: they must not read device values back to
the host (`.item()`, `float(t)`, `bool(t)`, boolean-mask indexing, `nonzero`, ...), because the
solver's budget is one host read per iteration (see lm.py); precompute index sets in __init__.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class Linearization:
    """Residuals and Jacobians of all residual blocks.

    layout "rows": residuals (N, d), jac_cam (N, d, cam_dim), jac_point (N, d, point_dim).
    layout "soa" (observations last, what the solver computes with): (d, N), (d, cam_dim, N),
    (d, point_dim, N). Residual blocks that are switched off (e.g. a point behind its camera)
    carry zero residuals and zero Jacobians.
    """

    residuals: Tensor
    jac_cam: Tensor  # d r_i / d (tangent of camera block cam_index[i])
    jac_point: Tensor
    layout: str = "rows"

    def as_soa(self) -> "Linearization":
        if self.layout == "soa":
            return self
        from .layout import rows_to_soa

        return Linearization(rows_to_soa(self.residuals), rows_to_soa(self.jac_cam), rows_to_soa(self.jac_point), "soa")

    def as_rows(self) -> "Linearization":
        if self.layout == "rows":
            return self
        from .layout import soa_to_rows

        return Linearization(soa_to_rows(self.residuals), soa_to_rows(self.jac_cam), soa_to_rows(self.jac_point), "rows")


@dataclass
class Step:
    """A tangent step. `cams` is per camera block (shared parameters repeated, constants zero)."""

    cams: Tensor  # (num_cams, cam_dim)
    points: Tensor  # (num_points, point_dim)
    reduced: Tensor  # (num_reduced,) the reduced-system unknowns, in cam_param_map's numbering

    def norm(self) -> Tensor:
        """|step| as a () tensor on the step's device (no host read)."""
        return torch.sqrt(self.reduced.square().sum() + self.points.square().sum())


@runtime_checkable
class SparseProblem(Protocol):
    num_cams: int
    num_points: int
    cam_dim: int
    point_dim: int
    cam_index: Tensor  # (N,) long
    point_index: Tensor  # (N,) long
    # (num_cams, cam_dim) long or None (identity: column c*cam_dim + j, nothing constant)
    cam_param_map: Tensor | None

    def linearize(self) -> Linearization:
        """Residuals and Jacobians at the current parameters."""

    def residuals(self, step: Step | None = None) -> Tensor:
        """(N, d) residuals at the current parameters retracted by `step` (None: no step)."""

    def accept(self, step: Step) -> None:
        """Move the current parameters by `step` (the last one passed to `residuals`)."""

    def parameter_norm(self) -> Tensor:
        """|x| in Ceres' sense, for the parameter tolerance test: a () tensor, so that the solver
        reads it with its other per-iteration status rather than on its own."""


def identity_param_map(num_cams: int, cam_dim: int, device=None) -> Tensor:
    return torch.arange(num_cams * cam_dim, device=device).reshape(num_cams, cam_dim)


def compact_param_map(param_map: Tensor) -> tuple[Tensor, int]:
    """Renumber the non-negative entries of a map to 0..n-1 (keeping their order); -> (map, n)."""
    free = param_map >= 0
    ids = torch.unique(param_map[free])
    out = torch.full_like(param_map, -1)
    out[free] = torch.searchsorted(ids, param_map[free])
    return out, int(ids.numel())
