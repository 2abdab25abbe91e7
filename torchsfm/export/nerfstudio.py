"""nerfstudio datasets: `transforms.json` (+ `sparse_pc.ply`, + `images/`) from a sparse model.

Conventions follow nerfstudio's own COLMAP conversion (`colmap_to_json` in
nerfstudio/process_data/colmap_utils.py), so `ns-train ... nerfstudio-data --data OUT` reads the
result as if `ns-process-data` had written it:
- `transform_matrix`: camera-to-world in OpenGL camera axes (x right, y up, looking along -z),
  i.e. COLMAP's world_from_cam with its y and z columns negated;
- unless `keep_world`, the world is re-axed to z-up by `applied_transform` = rows (x, z, -y),
  which is also applied to the `sparse_pc.ply` points;
- COLMAP camera models map to nerfstudio's OPENCV (pinhole and radial-tangential ones) or
  OPENCV_FISHEYE; one camera -> intrinsics at the top level, several -> per frame;
- `file_path` is `images/<name>` relative to the output folder.

nerfstudio's dataparser takes one `camera_model` per dataset (the top-level key), so a model
mixing perspective and fisheye cameras cannot be expressed: it is refused with the fix
(`--format undistorted`, then export that). The top-level `camera_model` is also written in the
several-camera case, where nerfstudio's converter omits it and fisheye data would silently be
read as perspective.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.camera_models import model_info
from ..data.model import Reconstruction
from ..geometry import so3
from ..io.atomic import atomic_dir
from .common import ExportError, check_output, image_paths, link_or_copy
from .ply import point_cloud, write_ply

logger = logging.getLogger(__name__)

# COLMAP model -> nerfstudio camera_model and the distortion keys written (nerfstudio's names).
NERFSTUDIO_MODELS = {
    "SIMPLE_PINHOLE": "OPENCV",
    "PINHOLE": "OPENCV",
    "SIMPLE_RADIAL": "OPENCV",
    "RADIAL": "OPENCV",
    "OPENCV": "OPENCV",
    "OPENCV_FISHEYE": "OPENCV_FISHEYE",
}
_DISTORTION_KEYS = {"OPENCV": ("k1", "k2", "p1", "p2"), "OPENCV_FISHEYE": ("k1", "k2", "k3", "k4")}
# Where each COLMAP model's distortion parameters go among those keys (missing ones are 0).
_DISTORTION_SOURCES = {
    "SIMPLE_PINHOLE": {},
    "PINHOLE": {},
    "SIMPLE_RADIAL": {"k1": "k"},
    "RADIAL": {"k1": "k1", "k2": "k2"},
    "OPENCV": {"k1": "k1", "k2": "k2", "p1": "p1", "p2": "p2"},
    "OPENCV_FISHEYE": {"k1": "k1", "k2": "k2", "k3": "k3", "k4": "k4"},
}

# World re-axing of nerfstudio's converter: (x, y, z) -> (x, z, -y), so that COLMAP's usual
# "y down" worlds come out z-up.
APPLIED_TRANSFORM = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0]]


@dataclass
class NerfstudioOptions:
    keep_world: bool = False  # no applied_transform: keep the model's world axes
    point_cloud: bool = True  # write sparse_pc.ply and ply_file_path (initialises splatfacto)
    copy_images: bool = True  # with an image folder: hard-link or copy the images into OUT/images
    ply_name: str = "sparse_pc.ply"


def camera_intrinsics(rec: Reconstruction, rows: list[int] | None = None) -> dict[int, dict]:
    """nerfstudio intrinsics per camera row: w, h, fl_x, fl_y, cx, cy, distortion, camera_model.

    Raises ExportError for camera models nerfstudio cannot express.
    """
    cams = rec.cameras
    rows = range(len(cams)) if rows is None else rows
    params = cams.params.detach().cpu().to(torch.float64)
    out = {}
    for r in rows:
        info = model_info(int(cams.model_id[r]))
        ns_model = NERFSTUDIO_MODELS.get(info.name)
        if ns_model is None:
            raise ExportError(
                f"camera {int(cams.camera_id[r])} uses the {info.name} model, which nerfstudio's transforms.json "
                f"cannot express (it supports {', '.join(NERFSTUDIO_MODELS)}). Export an undistorted PINHOLE "
                "dataset instead: --format undistorted --images DIR, then export that model to nerfstudio."
            )
        p = params[r].tolist()
        named = dict(zip(info.params, p))
        fx = p[info.focal[0]]
        fy = p[info.focal[-1]]
        d = {"w": int(cams.width[r]), "h": int(cams.height[r]), "fl_x": fx, "fl_y": fy,
             "cx": p[info.principal[0]], "cy": p[info.principal[1]]}
        src = _DISTORTION_SOURCES[info.name]
        for key in _DISTORTION_KEYS[ns_model]:
            d[key] = float(named[src[key]]) if key in src else 0.0
        d["camera_model"] = ns_model
        out[r] = d
    return out


def opengl_camera_to_world(quat: torch.Tensor, trans: torch.Tensor, keep_world: bool = False) -> torch.Tensor:
    """cam_from_world (w-first quaternions (N, 4), translations (N, 3)) -> nerfstudio
    `transform_matrix` (N, 4, 4): OpenGL camera axes, re-axed world unless `keep_world`."""
    R = so3.quat_to_matrix(quat.to(torch.float64))
    t = trans.to(torch.float64)
    c2w = torch.zeros(R.shape[0], 4, 4, dtype=torch.float64, device=R.device)
    c2w[:, :3, :3] = R.transpose(-1, -2)
    c2w[:, :3, 3] = -(R.transpose(-1, -2) @ t[..., None])[..., 0]
    c2w[:, 3, 3] = 1
    c2w[:, :3, 1:3] *= -1  # OpenCV (y down, z forward) -> OpenGL (y up, z backward)
    if not keep_world:
        A = torch.tensor(APPLIED_TRANSFORM + [[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64, device=R.device)
        c2w = A @ c2w
    return c2w


def transforms_json(rec: Reconstruction, options: NerfstudioOptions | None = None) -> dict:
    """The transforms.json content for the registered images (no files are touched)."""
    options = options or NerfstudioOptions()
    reg = torch.nonzero(rec.images.registered.cpu(), as_tuple=True)[0]
    if reg.numel() == 0:
        raise ExportError("the model has no registered images; there is nothing to export to nerfstudio")
    ims = rec.images
    cam_rows = ims.camera.cpu()[reg]
    used = sorted(set(cam_rows.tolist()))
    intr = camera_intrinsics(rec, used)
    ns_models = sorted({d["camera_model"] for d in intr.values()})
    if len(ns_models) > 1:
        by_model = {m: [int(rec.cameras.camera_id[r]) for r in used if intr[r]["camera_model"] == m] for m in ns_models}
        raise ExportError(
            "nerfstudio's transforms.json holds one camera_model per dataset, but this model mixes "
            + " and ".join(f"{m} (cameras {ids})" for m, ids in by_model.items())
            + ". Export an undistorted PINHOLE dataset instead: --format undistorted --images DIR, "
            "then export that model to nerfstudio."
        )
    c2w = opengl_camera_to_world(ims.quat.cpu()[reg], ims.trans.cpu()[reg], options.keep_world).tolist()
    single = len(used) == 1
    out: dict = dict(intr[used[0]]) if single else {"camera_model": ns_models[0]}
    frames = []
    for k, (i, c) in enumerate(zip(reg.tolist(), cam_rows.tolist())):
        frame = {"file_path": f"images/{ims.name[i]}", "transform_matrix": c2w[k], "colmap_im_id": int(ims.image_id[i])}
        if not single:
            frame.update(intr[c])
        frames.append(frame)
    out["frames"] = frames
    if not options.keep_world:
        out["applied_transform"] = [row[:] for row in APPLIED_TRANSFORM]
    return out


def export_nerfstudio(
    rec: Reconstruction,
    output: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    options: NerfstudioOptions | None = None,
    overwrite: bool = False,
    protect: tuple = (),
) -> Path:
    """Write a nerfstudio dataset folder atomically: transforms.json, sparse_pc.ply (model
    points, re-axed like the poses) and, with `image_dir`, images/ (hard links or copies).
    Point colours come from the images when `image_dir` is given, else from the model."""
    options = options or NerfstudioOptions()
    out_path = check_output(output, overwrite, protect=(image_dir, *protect))
    meta = transforms_json(rec, options)
    names = [f["file_path"][len("images/"):] for f in meta["frames"]]
    srcs = image_paths(image_dir, names) if image_dir is not None else None
    points = None
    if options.point_cloud and len(rec.points3D):
        xyz, rgb = point_cloud(rec, image_dir)
        if not options.keep_world:
            A = torch.tensor(APPLIED_TRANSFORM, dtype=torch.float64)
            xyz = xyz @ A[:, :3].T + A[:, 3]
        points = (xyz, rgb)
        meta["ply_file_path"] = options.ply_name
    with atomic_dir(out_path) as tmp:
        if points is not None:
            write_ply(tmp / options.ply_name, *points)
        if srcs is not None and options.copy_images:
            for name, src in zip(names, srcs):
                link_or_copy(src, tmp / "images" / name)
        (tmp / "transforms.json").write_text(json.dumps(meta, indent=4), encoding="utf-8")
    if image_dir is None or not options.copy_images:
        logger.warning("transforms.json refers to images/<name>: put the images in %s/images before training", out_path)
    logger.info("wrote nerfstudio dataset %s (%d frames)", out_path, len(names))
    return out_path
