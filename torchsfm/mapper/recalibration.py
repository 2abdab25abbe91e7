"""Mapping again from the focal lengths that bundle adjustment found.

Relative poses, rotation averaging and global positioning use the focal lengths the mapper
starts with: the prior (1.2 x the longer image side without EXIF) unless view-graph calibration
changes them, and the calibration check rightly refuses that on cameras fixating one point,
where fundamental matrices do not determine the focal length. Bundle adjustment then finds the
focal length, but from a start that the wrong one bent: on templeRing (a ring fixating a small
object, no EXIF) it moves 768 px to about 1,514, yet the same matches mapped from 1,514 give
ALIKED AUC@3 84.6 instead of 73.2 (starting 8% off the final focal already loses it).

So when any camera's focal length in the models differs from what the global stages used by
more than `min_focal_change`, the mapper runs again on the same input with those focal lengths
(principal point and distortion back at their initial values: bundle adjustment and
intrinsics selection decide them again), view-graph calibration skipped and every relative pose
estimated by RANSAC (the stored two-view poses were found with the old focal lengths).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..cameras.models import focal_length, scaled_focal_params
from ..data.model import Reconstruction
from .graph import stage_copy


@dataclass
class RecalibrationOptions:
    max_passes: int = 1  # mapping passes after the first (0: never map again)
    # relative difference between a camera's focal length in the models and the one the global
    # stages used that makes the mapper run again
    min_focal_change: float = 0.05
    # a focal length that moved by more than this factor either way is not trusted (a model that
    # diverged): the camera keeps the one the global stages used
    max_focal_ratio: float = 10.0

    def validate(self) -> None:
        if self.max_passes < 0:
            raise ValueError("recalibration.max_passes must be >= 0")
        if not self.min_focal_change > 0:
            raise ValueError("recalibration.min_focal_change must be > 0")
        if not self.max_focal_ratio > 1 + self.min_focal_change:
            raise ValueError("recalibration.max_focal_ratio must be > 1 + min_focal_change")


def model_focal_lengths(num_cameras: int, models: list[Reconstruction], like: Tensor) -> Tensor:
    """(C,) each camera's focal length in the largest model that registers an image of it
    (NaN for a camera in no model). `models` are sorted largest first."""
    out = torch.full((num_cameras,), float("nan"), dtype=like.dtype, device=like.device)
    for m in reversed(models):  # the largest model writes last
        used = torch.zeros(num_cameras, dtype=torch.bool, device=like.device)
        used[m.images.camera[m.images.registered]] = True
        out = torch.where(used, focal_length(m.cameras).to(out), out)
    return out


def recalibrated_input(rec: Reconstruction, used: Tensor, models: list[Reconstruction],
                       options: RecalibrationOptions) -> tuple[Reconstruction | None, dict]:
    """`rec` (the mapper's input) with the models' focal lengths, when one differs from `used`
    ((C,), the focal lengths the global stages used) by more than `min_focal_change`; else None.
    Also a report: the largest relative change and the cameras changed."""
    f = model_focal_lengths(len(rec.cameras), models, used)
    ratio = f / used
    known = torch.isfinite(ratio) & (ratio > 0)
    known &= (ratio <= options.max_focal_ratio) & (ratio >= 1 / options.max_focal_ratio)
    change = (ratio - 1).abs()
    largest = float(change[known].max()) if bool(known.any()) else 0.0
    report = {"max_focal_change": round(largest, 4), "cameras": int(known.sum()),
              "implausible": int((torch.isfinite(ratio) & ~known).sum())}
    if largest <= options.min_focal_change:
        return None, report
    f0 = focal_length(rec.cameras)
    scale = torch.where(known, f / f0, torch.ones_like(f0))
    out = stage_copy(rec, "cameras")
    out.cameras.params = scaled_focal_params(rec.cameras, scale)
    rows = torch.nonzero(known & (change > options.min_focal_change))[:, 0]
    report["changed"] = {int(rec.cameras.camera_id[i]): [round(float(used[i]), 1), round(float(f[i]), 1)]
                         for i in rows[:20].tolist()}
    return out, report
