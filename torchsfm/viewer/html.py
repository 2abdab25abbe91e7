"""A self-contained HTML viewer for sparse models: one file, inline JavaScript, opens offline.

Camera frusta are coloured by component (one model folder = one component, so `sparse/0
sparse/1` shows both with different colours), points by their stored colour, image names (and
thumbnails, with an image folder) on hover. Points above `max_points` are subsampled at random
(fixed seed) to keep the file small: ~23 bytes per point in the page.
"""
from __future__ import annotations

import base64
import errno
import html
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cameras.models import focal_xy, principal_point
from ..data.model import Reconstruction
from ..io.atomic import atomic_write_text
from ..report import progress_bar
from .template import TEMPLATE

logger = logging.getLogger(__name__)

# Bright enough on the dark background; component k gets PALETTE[k % len].
PALETTE = ["#ff6b6b", "#4dabf7", "#51cf66", "#fcc419", "#cc5de8", "#ff922b", "#22b8cf", "#f06595", "#94d82d", "#845ef7"]
MODEL_FILES = ("cameras", "images", "points3D")


@dataclass
class ViewerOptions:
    max_points: int = 200_000  # subsample above this many points (file size ~23 bytes per point)
    thumbnail_size: int = 160  # longest side of hover thumbnails (with an image folder); 0: none
    max_thumbnails: int = 1000  # no thumbnails beyond this many cameras (file size)
    frustum_scale: float | None = None  # frustum depth in world units; None: from camera spacing
    point_size: int = 2  # pixels
    pitch_degrees: float = 30.0  # initial elevation of the view above the cameras' horizon
    seed: int = 0  # subsampling seed
    title: str | None = None


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and any(all((path / f"{n}.{e}").is_file() for n in MODEL_FILES) for e in ("bin", "txt"))


def find_models(paths: list[str | os.PathLike]) -> list[Path]:
    """Model folders from the arguments: a model folder itself, or a folder of models (e.g.
    `sparse/` holding `0/`, `1/`), expanded in numeric order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_model_dir(p):
            out.append(p)
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"model folder {p} does not exist")
        subs = sorted((q for q in p.iterdir() if is_model_dir(q)),
                      key=lambda q: (0, int(q.name), "") if q.name.isdigit() else (1, 0, q.name))
        if not subs:
            raise FileNotFoundError(
                f"{p} is neither a COLMAP model (cameras, images, points3D as .bin or .txt) nor a folder of models"
            )
        out.extend(subs)
    return out


def default_output(models: list[str | os.PathLike]) -> Path:
    """Next to the model, never inside it: MODEL.html for one model folder (or one folder of
    models); for several, viewer.html in their common parent."""
    paths = [Path(m).absolute() for m in models]
    if len(paths) == 1:
        return paths[0].parent / f"{paths[0].name}.html"
    return Path(os.path.commonpath([str(m) for m in paths])) / "viewer.html"


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _thumbnail(path: Path, size: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=70)  # JPEG: small, and safe next to pycolmap's zlib
    except OSError as e:
        logger.warning("no thumbnail for %s: %s", path, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _auto_frustum_scale(centers: np.ndarray, radius: float) -> float:
    """Half the median distance to the nearest other camera, kept within 0.5-8% of the scene
    radius (single cameras and dense video tracks alike stay visible)."""
    lo, hi = 0.005 * radius, 0.08 * radius
    if centers.shape[0] < 2:
        return 0.04 * radius or 1.0
    c = torch.from_numpy(centers)
    if c.shape[0] > 4000:  # nearest neighbours of a random subset are enough for a median
        c = c[torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(0))[:4000]]
    d = torch.cdist(c, c)
    d.fill_diagonal_(float("inf"))
    nn = float(d.min(1).values.median())
    s = 0.5 * nn if math.isfinite(nn) and nn > 0 else 0.04 * radius
    return float(min(max(s, lo), hi)) if radius > 0 else (s or 1.0)


def build_scene(
    recs: list[Reconstruction],
    names: list[str] | None = None,
    image_dir: str | os.PathLike | None = None,
    options: ViewerOptions | None = None,
) -> dict:
    """The JSON-serialisable scene the page renders (arrays base64-encoded, float32 positions
    relative to `origin` so that georeferenced coordinates keep their precision)."""
    o = options or ViewerOptions()
    names = names or [f"model {k}" for k in range(len(recs))]
    if len(names) != len(recs):
        raise ValueError(f"{len(names)} names for {len(recs)} models")
    xyz, rgb, pcomp = [], [], []
    centers, corners, ups, ccomp, cam_names, cam_ids, cam_obs, cam_models = [], [], [], [], [], [], [], []
    components = []
    for k, rec in enumerate(recs):
        color = PALETTE[k % len(PALETTE)]
        pts = rec.points3D.xyz.detach().cpu().to(torch.float64).numpy()
        col = rec.points3D.rgb.detach().cpu().numpy().astype(np.uint8)
        if col.size and col.max() == 0:  # a model without colours: show its points in a light component colour
            col = np.broadcast_to((0.5 * _hex_rgb(color) + 127.5).astype(np.uint8), col.shape).copy()
        xyz.append(pts)
        rgb.append(col)
        pcomp.append(np.full(pts.shape[0], k, dtype=np.uint16))

        ims = rec.images
        reg = torch.nonzero(ims.registered.cpu(), as_tuple=True)[0]
        R = ims.rotation.detach().cpu().to(torch.float64)[reg]
        C = ims.centers.detach().cpu().to(torch.float64)[reg]
        cam = ims.camera.cpu()[reg]
        cams = rec.cameras.to(device="cpu", dtype=torch.float64)
        f, c = focal_xy(cams)[cam], principal_point(cams)[cam]
        w, h = cams.width[cam].to(torch.float64), cams.height[cam].to(torch.float64)
        zero = torch.zeros_like(w)
        u = torch.stack([zero, w, w, zero], -1)  # image corners: top-left, top-right, bottom-right, bottom-left
        v = torch.stack([zero, zero, h, h], -1)
        rays = torch.stack([(u - c[:, :1]) / f[:, :1], (v - c[:, 1:]) / f[:, 1:], torch.ones_like(u)], -1)  # (n, 4, 3)
        corners.append((rays @ R).numpy())  # world directions R^T ray, as row vectors
        centers.append(C.numpy())
        ups.append(-R[:, 1, :].numpy())  # image up (-y) in world coordinates
        ccomp.append(np.full(reg.numel(), k, dtype=np.uint16))
        regl = reg.tolist()
        cam_names += [ims.name[i] for i in regl]
        cam_ids += ims.image_id.cpu()[reg].tolist()
        cam_obs += torch.bincount(rec.tracks.image.cpu(), minlength=len(ims))[reg].tolist()
        model_names = rec.cameras.model_names
        cam_models += [model_names[r] for r in cam.tolist()]
        components.append({"name": names[k], "color": color, "images": reg.numel(), "points": int(pts.shape[0])})

    xyz_all = np.concatenate(xyz) if xyz else np.zeros((0, 3))
    rgb_all = np.concatenate(rgb) if rgb else np.zeros((0, 3), np.uint8)
    pcomp_all = np.concatenate(pcomp) if pcomp else np.zeros(0, np.uint16)
    C_all = np.concatenate(centers) if centers else np.zeros((0, 3))
    D_all = np.concatenate(corners) if corners else np.zeros((0, 4, 3))
    if xyz_all.shape[0] == 0 and C_all.shape[0] == 0:
        raise ValueError("the model(s) have neither registered images nor 3D points: nothing to show")

    origin = np.median(xyz_all if xyz_all.shape[0] else C_all, axis=0)
    dp = np.linalg.norm(xyz_all - origin, axis=1) if xyz_all.shape[0] else np.zeros(0)
    dc = np.linalg.norm(C_all - origin, axis=1) if C_all.shape[0] else np.zeros(0)
    radius = max(float(np.quantile(dp, 0.9)) if dp.size else 0.0, float(np.quantile(dc, 0.9)) if dc.size else 0.0)
    radius = radius if radius > 0 else 1.0
    fscale = o.frustum_scale if o.frustum_scale else _auto_frustum_scale(C_all, radius)

    total = xyz_all.shape[0]
    if total > o.max_points:
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(o.seed))[: o.max_points]
        keep = torch.sort(keep).values.numpy()
        xyz_all, rgb_all, pcomp_all = xyz_all[keep], rgb_all[keep], pcomp_all[keep]
        logger.info("viewer shows %d of %d points (max_points)", o.max_points, total)

    # Up: the cameras' mean "up" (-y in COLMAP's camera axes); side: from the scene towards the cameras.
    up = np.array([0.0, -1.0, 0.0])
    if C_all.shape[0]:
        m = np.concatenate(ups).mean(0)
        if np.linalg.norm(m) > 1e-6:
            up = m / np.linalg.norm(m)
    side = (C_all.mean(0) - origin) if C_all.shape[0] else np.array([1.0, 0.0, 0.0])
    side = side - up * (side @ up)
    if np.linalg.norm(side) < 1e-6 * radius and C_all.shape[0]:
        side = C_all[0] - origin
        side = side - up * (side @ up)
    if np.linalg.norm(side) < 1e-9:
        side = np.cross(up, [1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.cross(up, [0.0, 1.0, 0.0])
    side = side / np.linalg.norm(side)

    thumbs = None
    if image_dir is not None and o.thumbnail_size > 0:
        if len(cam_names) > o.max_thumbnails:
            logger.warning("%d cameras: no hover thumbnails above max_thumbnails=%d", len(cam_names), o.max_thumbnails)
        else:
            root = Path(image_dir)
            thumbs = [_thumbnail(root / n, o.thumbnail_size) if (root / n).is_file() else None
                      for n in progress_bar(cam_names, desc="thumbnails", unit="image", leave=False)]
            if any(t is None for t in thumbs):
                logger.warning("%d of %d images not found under %s: no thumbnail for them",
                               sum(t is None for t in thumbs), len(thumbs), root)

    half_fov = math.radians(25.0)
    return {
        "title": o.title or ", ".join(names),
        "origin": origin.tolist(),
        "components": components,
        "points": {
            "xyz": _b64((xyz_all - origin).astype("<f4")),
            "rgb": _b64(rgb_all.astype(np.uint8)),
            "component": _b64(pcomp_all.astype("<u2")),
            "total": int(total),
        },
        "cameras": {
            "names": cam_names,
            "image_ids": cam_ids,
            "observations": cam_obs,
            "models": cam_models,
            "center": _b64((C_all - origin).astype("<f4")),
            "corners": _b64((D_all * fscale).astype("<f4")),
            "component": _b64(np.concatenate(ccomp).astype("<u2") if ccomp else np.zeros(0, "<u2")),
            "thumbnails": thumbs,
        },
        "view": {
            "target": [0.0, 0.0, 0.0],
            "distance": 1.1 * radius / math.sin(half_fov),
            "up": up.tolist(),
            "side": side.tolist(),
            "pitch": o.pitch_degrees,
            "point_size": o.point_size,
            "frustum_scale": fscale,
        },
    }


def render_html(scene: dict) -> str:
    """The page for a scene from `build_scene`."""
    # "<" escaped inside the JSON: no image name can close the <script> element.
    data = json.dumps(scene, separators=(",", ":")).replace("<", "\\u003c")
    head, rest = TEMPLATE.split("__TITLE__", 1)  # split, not replace: a title or name may hold the markers
    middle, tail = rest.split("__SCENE_JSON__", 1)
    return head + html.escape(f"torchsfm viewer: {scene['title']}") + middle + data + tail


def write_viewer(
    models: list[Reconstruction | str | os.PathLike],
    output: str | os.PathLike | None = None,
    names: list[str] | None = None,
    image_dir: str | os.PathLike | None = None,
    options: ViewerOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the viewer page atomically and return its path. `models` are Reconstructions or
    model folders (a folder of models expands to its members, one component each); the
    default output is `default_output(models)`. An existing file is replaced only with
    `overwrite`."""
    from ..io.colmap_model import read_model

    paths: list[Path] = []
    if all(isinstance(m, Reconstruction) for m in models):
        recs = list(models)
        if output is None:
            raise ValueError("output is required when models are given as Reconstructions")
    elif any(isinstance(m, Reconstruction) for m in models):
        raise TypeError("give either Reconstructions or model folders, not both")
    else:
        paths = find_models(list(models))
        recs = [read_model(p) for p in paths]
        names = names or _component_names(paths)
    out = Path(output) if output is not None else default_output(models)
    if out.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "the viewer page exists (replace it with overwrite / --overwrite)",
                              str(out))
    scene = build_scene(recs, names, image_dir, options)
    text = render_html(scene)
    atomic_write_text(out, text)
    logger.info("wrote viewer %s (%.1f MB)", out, len(text) / 1e6)
    return out


def _component_names(paths: list[Path]) -> list[str]:
    """Short unique labels: the folder name, with its parent when names repeat (run1/0, run2/0)."""
    base = [p.name or str(p) for p in paths]
    if len(set(base)) == len(base):
        parent = {p.absolute().parent.name for p in paths}
        return [f"{next(iter(parent))}/{b}" if len(parent) == 1 and re.fullmatch(r"\d+", b) else b for b in base]
    return [f"{p.absolute().parent.name}/{p.name}" for p in paths]
