"""Undistorted PINHOLE datasets for tools that accept pinhole cameras only (3DGS, many MVS and
NeRF codes), through COLMAP's image undistorter (`pycolmap.undistort_images`).

The undistorter resamples every registered image to an ideal PINHOLE camera (cropping or
padding per `blank_pixels`), and maps the model's 2D observations through the same warp, so
the undistorted model's points reproject onto the undistorted images.

Layout (default): OUT/images/<name> and OUT/sparse/0/ (the layout 3DGS, gsplat and nerfstudio's
COLMAP reader hard-code). With `colmap_layout`, COLMAP's own workspace is kept instead
(OUT/images, OUT/sparse/, OUT/stereo/ and the patch-match scripts) for `colmap patch_match_stereo`.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pycolmap

from ..data.model import Reconstruction
from ..io.atomic import atomic_dir
from ..io.colmap_model import write_model
from .common import ExportError, check_output, image_paths

logger = logging.getLogger(__name__)


@dataclass
class UndistortOptions:
    max_image_size: int = -1  # longest side of the undistorted images; -1: keep the size
    blank_pixels: float = 0.0  # 0: crop to valid pixels only; 1: keep every source pixel (black borders)
    min_scale: float = 0.2  # bounds on the output/input size ratio
    max_scale: float = 2.0
    jpeg_quality: int = -1  # -1: COLMAP's default
    colmap_layout: bool = False  # keep COLMAP's workspace layout (sparse/, stereo/) instead of sparse/0
    model_format: str = "bin"  # format of the undistorted model: bin or txt
    num_threads: int = -1


def export_undistorted(
    rec: Reconstruction,
    image_dir: str | os.PathLike,
    output: str | os.PathLike,
    options: UndistortOptions | None = None,
    overwrite: bool = False,
    protect: tuple = (),
) -> Path:
    """Write an undistorted PINHOLE dataset (images + sparse model) atomically."""
    options = options or UndistortOptions()
    if image_dir is None:
        raise ExportError("the undistorted export resamples the images: pass the image folder (--images DIR)")
    if options.model_format not in ("bin", "txt"):
        raise ExportError(f"model_format must be bin or txt, not {options.model_format!r}")
    out_path = check_output(output, overwrite, protect=(image_dir, *protect))
    reg = rec.images.registered.cpu().tolist()
    names = [n for n, r in zip(rec.images.name, reg) if r]
    if not names:
        raise ExportError("the model has no registered images; there is nothing to undistort")
    image_paths(image_dir, names)  # a clear error before COLMAP would skip missing images

    uo = pycolmap.UndistortCameraOptions()
    uo.max_image_size = int(options.max_image_size)
    uo.blank_pixels = float(options.blank_pixels)
    uo.min_scale = float(options.min_scale)
    uo.max_scale = float(options.max_scale)
    with tempfile.TemporaryDirectory(prefix="torchsfm-undistort-") as td, atomic_dir(out_path) as tmp:
        model_in = Path(td) / "model"
        write_model(rec, model_in, format="bin")
        pycolmap.undistort_images(
            output_path=str(tmp), input_path=str(model_in), image_path=str(image_dir), output_type="COLMAP",
            undistort_options=uo, jpeg_quality=int(options.jpeg_quality), num_threads=int(options.num_threads),
        )
        undistorted = pycolmap.Reconstruction(str(tmp / "sparse"))
        if undistorted.num_reg_images() != len(names):
            raise ExportError(
                f"COLMAP's undistorter wrote {undistorted.num_reg_images()} of {len(names)} images (run with -v for "
                "its log)"
            )
        # cameras of registered images (a camera whose images all failed to register is left as it was)
        used = {undistorted.images[i].camera_id for i in undistorted.reg_image_ids()}
        bad = {undistorted.cameras[c].model.name for c in used} - {"PINHOLE", "SIMPLE_PINHOLE"}
        if bad:
            raise RuntimeError(f"the undistorted model still has {sorted(bad)} cameras")
        if not options.colmap_layout:
            shutil.rmtree(tmp / "stereo", ignore_errors=True)
            for script in tmp.glob("run-colmap-*.sh"):
                script.unlink()
            shutil.rmtree(tmp / "sparse")
            (tmp / "sparse").mkdir()
            write_model(undistorted, tmp / "sparse" / "0", format=options.model_format)
        elif options.model_format == "txt":
            write_model(undistorted, tmp / "sparse", format="txt")
    logger.info("wrote undistorted PINHOLE dataset %s (%d images)", out_path, len(names))
    return out_path
