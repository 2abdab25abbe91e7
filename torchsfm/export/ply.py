"""Coloured point clouds: binary PLY files and point colours sampled from the images.

The PLY layout is COLMAP's `ExportPLY` one without normals: binary little-endian, one `vertex`
element with `x y z` (float, or double for georeferenced coordinates) and `red green blue`
(uchar). MeshLab, CloudCompare, Open3D, nerfstudio and 3DGS read it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.model import Reconstruction
from ..io.atomic import atomic_write_bytes
from ..report import progress_bar
from .common import ExportError, image_paths

logger = logging.getLogger(__name__)


def ply_bytes(xyz, rgb, double: bool = False) -> bytes:
    """Encode (N, 3) positions and (N, 3) uint8 colours as a binary little-endian PLY."""
    xyz = np.asarray(xyz.detach().cpu() if isinstance(xyz, Tensor) else xyz, dtype=np.float64).reshape(-1, 3)
    rgb = np.asarray(rgb.detach().cpu() if isinstance(rgb, Tensor) else rgb).reshape(-1, 3)
    if xyz.shape[0] != rgb.shape[0]:
        raise ValueError(f"{xyz.shape[0]} positions but {rgb.shape[0]} colours")
    ftype, fcode = ("double", "<f8") if double else ("float", "<f4")
    rec = np.empty(xyz.shape[0], dtype=[("x", fcode), ("y", fcode), ("z", fcode), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    rec["r"], rec["g"], rec["b"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment written by torchsfm\n"
        f"element vertex {xyz.shape[0]}\n"
        f"property {ftype} x\nproperty {ftype} y\nproperty {ftype} z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    return header.encode("ascii") + rec.tobytes()


def write_ply(path: str | os.PathLike, xyz, rgb, double: bool = False) -> Path:
    """Write a coloured point cloud atomically; returns the path."""
    atomic_write_bytes(path, ply_bytes(xyz, rgb, double))
    return Path(path)


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))  # a writable copy for torch


def _bilinear(img: Tensor, xy: Tensor) -> Tensor:
    """Sample an (H, W, 3) image at continuous pixel positions (N, 2) in COLMAP's convention
    (pixel centres at +0.5), clamped to the border, like COLMAP's colour extraction."""
    H, W = img.shape[:2]
    x = (xy[:, 0] - 0.5).clamp(0, W - 1)
    y = (xy[:, 1] - 0.5).clamp(0, H - 1)
    x0 = x.floor().long().clamp(max=W - 2) if W > 1 else x.floor().long()
    y0 = y.floor().long().clamp(max=H - 2) if H > 1 else y.floor().long()
    x1 = (x0 + 1).clamp(max=W - 1)
    y1 = (y0 + 1).clamp(max=H - 1)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def sample_point_colors(rec: Reconstruction, image_dir: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Colour of every 3D point: the mean over its observations of the image colour at the
    observed pixel (bilinear). Returns (rgb (P, 3) uint8, colored (P,) bool); points without an
    observation in a registered image keep the model's stored colour.

    Images are read one at a time (I/O); sampling and averaging are vectorised over all
    observations. Images whose size differs from their camera's (e.g. a downscaled copy)
    are sampled at proportionally scaled positions.
    """
    P = len(rec.points3D)
    tr = rec.tracks
    reg = rec.images.registered
    use = reg[tr.image]
    obs_img, obs_pt = tr.image[use].cpu(), tr.point[use].cpu()
    obs_xy = rec.keypoints.xy[rec.keypoints.flat_index(tr.image[use], tr.keypoint[use])].cpu().to(torch.float64)
    order = torch.argsort(obs_img, stable=True)
    obs_img, obs_pt, obs_xy = obs_img[order], obs_pt[order], obs_xy[order]
    used_images = torch.unique_consecutive(obs_img)
    counts = torch.bincount(obs_img, minlength=len(rec.images))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    names = [rec.images.name[i] for i in used_images.tolist()]
    paths = image_paths(image_dir, names)
    cam = rec.images.camera.cpu()
    width, height = rec.cameras.width.cpu(), rec.cameras.height.cpu()

    samples = torch.empty(obs_xy.shape[0], 3, dtype=torch.float64)
    for i, path in progress_bar(list(zip(used_images.tolist(), paths)), desc="sampling colours", unit="image",
                                leave=False):
        img = torch.from_numpy(_load_rgb(path)).to(torch.float64)
        a, b = int(offsets[i]), int(offsets[i + 1])
        xy = obs_xy[a:b]
        c = int(cam[i])
        sx, sy = img.shape[1] / float(width[c]), img.shape[0] / float(height[c])
        if sx != 1 or sy != 1:
            logger.debug("image %s is %dx%d, its camera %dx%d: scaling positions", path, img.shape[1], img.shape[0],
                         int(width[c]), int(height[c]))
            xy = xy * xy.new_tensor([sx, sy])
        samples[a:b] = _bilinear(img, xy)

    total = torch.zeros(P, 3, dtype=torch.float64).index_add_(0, obs_pt, samples)
    n = torch.bincount(obs_pt, minlength=P)
    colored = n > 0
    rgb = rec.points3D.rgb.cpu().clone()
    mean = total[colored] / n[colored, None].to(torch.float64)
    rgb[colored] = mean.round().clamp(0, 255).to(torch.uint8)
    return rgb, colored


def point_cloud(rec: Reconstruction, image_dir: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """(xyz (P, 3) float64, rgb (P, 3) uint8): colours from the images when given, else stored."""
    xyz = rec.points3D.xyz.detach().cpu().to(torch.float64)
    if image_dir is None:
        return xyz, rec.points3D.rgb.cpu()
    rgb, colored = sample_point_colors(rec, image_dir)
    if not bool(colored.all()):
        logger.warning("%d of %d points have no observation in a registered image; they keep the stored colour",
                       int((~colored).sum()), len(colored))
    return xyz, rgb


def export_ply(
    rec: Reconstruction, output: str | os.PathLike, image_dir: str | os.PathLike | None = None, double: bool = False
) -> Path:
    """Write the model's 3D points as a coloured binary PLY (colours sampled from `image_dir`
    when given, else the model's stored colours)."""
    if len(rec.points3D) == 0:
        raise ExportError("the model has no 3D points; a PLY export would be empty")
    xyz, rgb = point_cloud(rec, image_dir)
    write_ply(output, xyz, rgb, double=double)
    logger.info("wrote %d points to %s", xyz.shape[0], output)
    return Path(output)
