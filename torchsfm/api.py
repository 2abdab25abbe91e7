"""High-level entry points shared by the CLI and Python users: map a database, run end to end.

Outputs are written atomically: `OUTPUT/sparse/K` (one model per connected component, largest
first), `OUTPUT/config.json` (the resolved options) and `OUTPUT/report.json` (times, counts,
skipped inputs, versions). An interrupted run leaves no half-written model.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .config import to_dict
from .data.model import Points3D, Reconstruction, Tracks
from .io.atomic import atomic_dir, atomic_write_text
from .io.colmap_model import write_model
from .io.database import read_view_graph
from .mapper.pipeline import MapperOptions, global_mapping
from .report import RunReport, format_summary

log = logging.getLogger(__name__)


def load_mapper_input(database: str | os.PathLike, device=None) -> Reconstruction:
    """A Reconstruction with cameras, unposed images, keypoints and the verified view graph."""
    cameras, images, keypoints, vg = read_view_graph(database, device=device)
    dt, dev = keypoints.xy.dtype, keypoints.xy.device
    pts = Points3D(torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, 3, dtype=dt, device=dev),
                   torch.zeros(0, 3, dtype=torch.uint8, device=dev), torch.zeros(0, dtype=dt, device=dev))
    e = torch.zeros(0, dtype=torch.long, device=dev)
    return Reconstruction(cameras, images, keypoints, pts, Tracks(e, e.clone(), e.clone()), vg)


def color_points(rec: Reconstruction, image_dir: str | os.PathLike | None) -> None:
    """Point colours: the mean of the observation pixels, read image by image (in place)."""
    if image_dir is None or len(rec.points3D) == 0:
        return
    from .frontend.ingest import load_uint8

    xy = rec.observation_xy().cpu()
    acc = torch.zeros(len(rec.points3D), 3, dtype=torch.float64)
    cnt = torch.zeros(len(rec.points3D), dtype=torch.float64)
    img, pt = rec.tracks.image.cpu(), rec.tracks.point.cpu()
    for i in torch.unique(img).tolist():  # one decode per image; pixels gathered vectorised
        path = Path(image_dir) / rec.images.name[i]
        try:
            arr = torch.from_numpy(load_uint8(path).copy()).to(torch.float64)
        except Exception as e:  # noqa: BLE001 - a missing image only costs colours
            log.warning("cannot read %s for point colours: %s", path, e)
            continue
        if arr.ndim == 2:
            arr = arr[..., None].expand(-1, -1, 3)
        sel = img == i
        u = xy[sel, 0].floor().long().clamp(0, arr.shape[1] - 1)
        v = xy[sel, 1].floor().long().clamp(0, arr.shape[0] - 1)
        acc.index_add_(0, pt[sel], arr[v, u, :3])
        cnt.index_add_(0, pt[sel], torch.ones(int(sel.sum()), dtype=torch.float64))
    has = cnt > 0
    rgb = (acc / cnt.clamp_min(1)[:, None]).round().clamp(0, 255).to(torch.uint8)
    rec.points3D.rgb = torch.where(has[:, None], rgb.to(rec.points3D.rgb.device), rec.points3D.rgb)


def write_outputs(models: list[Reconstruction], output: str | os.PathLike, report: RunReport, options,
                  image_dir=None, fmt: str = "bin") -> Path:
    """Write sparse/K for every model, config.json and report.json, each atomically."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out / "sparse") as tmp:
        for k, m in enumerate(models):
            color_points(m, image_dir)
            write_model(m.to("cpu"), tmp / str(k), format=fmt)
    atomic_write_text(out / "config.json", json.dumps(to_dict(options), indent=2))
    report.config = to_dict(options)
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2, default=str))
    return out


def map_database(database: str | os.PathLike, output: str | os.PathLike, options: MapperOptions | None = None,
                 image_dir: str | os.PathLike | None = None, fmt: str = "bin",
                 report: RunReport | None = None) -> tuple[list[Reconstruction], RunReport]:
    """`torchsfm map`: a COLMAP database (ours, COLMAP's, hloc's) -> OUTPUT/sparse/K."""
    opt = options or MapperOptions()
    report = report or RunReport(command="map")
    with report.stage("load_database") as st:
        rec = load_mapper_input(database)
        st.counts.update({"images": len(rec.images), "pairs": len(rec.view_graph), "keypoints": len(rec.keypoints)})
    models, report = global_mapping(rec, opt, report)
    with report.stage("write"):
        write_outputs(models, output, report, opt, image_dir, fmt)
    log.info("\n%s", format_summary(report))
    return models, report
