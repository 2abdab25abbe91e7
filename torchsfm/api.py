"""High-level entry points shared by the CLI and Python users: map a database, run end to end.

Outputs are written atomically: `OUTPUT/sparse/K` (one model per connected component, largest
first), `OUTPUT/config.json` (the resolved options), `OUTPUT/report.json` (times, counts,
skipped inputs, versions) and `OUTPUT/torchsfm.log` (every log record, DEBUG included, appended
as the run goes, not atomically). An interrupted run leaves no half-written model, and the mapper's per-stage
checkpoints (`OUTPUT/.checkpoints/`, removed after a successful write) let a rerun of the same
command on the same database resume from the last completed stage.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
from pathlib import Path

import torch

from .config import to_dict
from .data.model import Points3D, Reconstruction, Tracks
from .io.atomic import atomic_dir, atomic_write_text
from .io.colmap_model import write_model
from .io.database import read_view_graph
from .mapper.checkpoint import CheckpointStore, checkpoint_key
from .mapper.pipeline import MapperOptions, global_mapping
from .report import RunReport, format_summary, log_to_file, memory_summary
from .runtime import resolve_device

log = logging.getLogger(__name__)


def check_mapper_database(database: str | os.PathLike) -> None:
    """A clear DatabaseError for a file that is missing, empty, not SQLite, corrupt, or not a
    COLMAP database with matches."""
    from .frontend.colmap_db import DatabaseError, check_database

    path = Path(database)
    if not path.is_file():
        raise DatabaseError(f"database {path} does not exist; create it with `torchsfm extract` and `torchsfm match`")
    if path.stat().st_size == 0:
        raise DatabaseError(f"database {path} is an empty file, not a COLMAP database")
    check_database(path, frozenset({"cameras", "images", "keypoints", "two_view_geometries"}), allow_empty_schema=False,
                   integrity=False)  # read only: damage is reported where SQLite meets it (load_mapper_input)


def load_mapper_input(database: str | os.PathLike, device=None) -> Reconstruction:
    """A Reconstruction with cameras, unposed images, keypoints and the verified view graph."""
    from .frontend.colmap_db import corrupt_database_error

    check_mapper_database(database)
    try:
        cameras, images, keypoints, vg = read_view_graph(database, device=device)
    except sqlite3.DatabaseError as e:
        raise corrupt_database_error(Path(database), e) from e
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
    report.summary.update(memory_summary(report))
    report.write_json(out / "report.json")
    return out


def write_failure_report(output, report: RunReport, options, error: BaseException) -> None:
    """No model: still write report.json (what was skipped, and why the run failed in
    `summary.error`) next to torchsfm.log, unless an earlier run's model is there, whose report it
    would contradict."""
    out = Path(output)
    if (out / "sparse").exists():
        return
    try:
        report.summary["error"] = str(error)
        report.config = to_dict(options)
        report.write_json(out / "report.json")
    except OSError as e:  # the original error matters more
        log.warning("could not write %s: %s", out / "report.json", e)


def map_database(database: str | os.PathLike, output: str | os.PathLike, options: MapperOptions | None = None,
                 image_dir: str | os.PathLike | None = None, fmt: str = "bin",
                 report: RunReport | None = None, resume: bool = True,
                 keep_checkpoints: bool = False) -> tuple[list[Reconstruction], RunReport]:
    """`torchsfm map`: a COLMAP database (ours, COLMAP's, hloc's) -> OUTPUT/sparse/K.

    With `resume`, the mapper checkpoints every stage under OUTPUT/.checkpoints/<key> (key: a
    hash of the input read from the database, the options and the device) and continues from the latest
    checkpoint of an interrupted run with the same key; the result equals an uninterrupted run.
    Checkpoints are removed once the outputs are written (unless `keep_checkpoints`).
    Every log record of the run, DEBUG included, is appended to OUTPUT/torchsfm.log."""
    opt = options or MapperOptions()
    report = report or RunReport(command="map")
    with log_to_file(Path(output) / "torchsfm.log"):
        log.info("torchsfm %s: mapping %s into %s", report.command, database, output)
        return _map_database(database, output, opt, image_dir, fmt, report, resume, keep_checkpoints)


def _resolve_loop_consistency(opt: MapperOptions, database) -> MapperOptions:
    """`--loop-consistency auto` is `always` on learned features. LightGlue verifies wrong pairs
    between look-alike parts that SIFT's ratio test refuses; once the inlier-ratio gate has dropped
    most of them, most triangles close and auto alone would skip the check, yet the rest still
    fold templeRing (ALIKED AUC@3 30.9 with auto, 73.2 always). On SIFT graphs auto stays: always
    costs the 20 sparse robustness subsets 2 registered images and 13 points of AUC@3 (README)."""
    from .frontend.colmap_db import has_learned_descriptors

    if opt.loop_consistency.mode != "auto" or not has_learned_descriptors(database):
        return opt
    log.info("loop consistency: always (--loop-consistency auto on learned features)")
    return dataclasses.replace(opt, loop_consistency=dataclasses.replace(opt.loop_consistency, mode="always"))


def _map_database(database, output, opt: MapperOptions, image_dir, fmt: str, report: RunReport, resume: bool,
                  keep_checkpoints: bool) -> tuple[list[Reconstruction], RunReport]:
    try:
        with report.stage("load_database") as st:
            rec = load_mapper_input(database)
            st.counts.update({"images": len(rec.images), "pairs": len(rec.view_graph), "keypoints": len(rec.keypoints)})
        opt = _resolve_loop_consistency(opt, database)
        store = None
        if resume:
            key = checkpoint_key(rec, to_dict(opt), str(resolve_device(opt.device)))
            store = CheckpointStore.for_output(output, key)
            if store.remove_stale():
                log.info("removed checkpoints of a different database or options from %s", store.root)
        models, report = global_mapping(rec, opt, report, store)
    except (ValueError, RuntimeError) as e:
        write_failure_report(output, report, opt, e)
        raise
    with report.stage("write"):
        write_outputs(models, output, report, opt, image_dir, fmt)
    if store is not None and not keep_checkpoints:
        store.clear()
    log.debug("\n%s", format_summary(report))  # the log file keeps it; the CLI prints it once
    return models, report
