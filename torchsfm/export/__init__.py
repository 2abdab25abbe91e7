"""Exports of a sparse model for the tools people use next.

- `colmap-bin` / `colmap-txt`: COLMAP model folder (export_colmap);
- `ply`: coloured binary PLY point cloud (export_ply);
- `nerfstudio`: transforms.json + sparse_pc.ply (+ images/) (export_nerfstudio);
- `undistorted`: PINHOLE images + model for pinhole-only tools (export_undistorted).

Every output is written atomically: a reader sees the old output or the complete new one.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data.model import Reconstruction
from .colmap import export_colmap
from .common import FORMATS, ExportError, check_output
from .nerfstudio import NerfstudioOptions, export_nerfstudio, transforms_json
from .ply import export_ply, sample_point_colors, write_ply
from .undistort import UndistortOptions, export_undistorted


def export_model(
    rec: Reconstruction,
    format: str,
    output: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    model_path: str | os.PathLike | None = None,
    nerfstudio: NerfstudioOptions | None = None,
    undistort: UndistortOptions | None = None,
) -> Path:
    """Export `rec` in one of FORMATS. `model_path` (where `rec` was read from) is protected:
    an output that would replace it (except a COLMAP export with `overwrite`, i.e. an in-place
    conversion) or a folder holding it is refused, and so is one holding `image_dir`."""
    protect = (model_path,) if model_path is not None else ()
    if format in ("colmap-bin", "colmap-txt"):
        return export_colmap(
            rec, output, format=format.split("-")[1], overwrite=overwrite, protect=(image_dir,), replaceable=protect
        )
    if format == "ply":
        check_output(output, overwrite, protect=(*protect, image_dir))
        return export_ply(rec, output, image_dir)
    if format == "nerfstudio":
        return export_nerfstudio(rec, output, image_dir, nerfstudio, overwrite=overwrite, protect=protect)
    if format == "undistorted":
        return export_undistorted(rec, image_dir, output, undistort, overwrite=overwrite, protect=protect)
    raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")


__all__ = [
    "FORMATS", "ExportError", "NerfstudioOptions", "UndistortOptions", "export_colmap", "export_model",
    "export_nerfstudio", "export_ply", "export_undistorted", "sample_point_colors", "transforms_json", "write_ply",
]
