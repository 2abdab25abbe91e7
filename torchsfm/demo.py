"""The embedded default: a seeded synthetic scene (noisy keypoints, wrong raw matches, ground
truth) written as a COLMAP database whose matches are verified as `torchsfm match --verifier
colmap` verifies real ones (pycolmap's two-view geometry estimation), mapped by torchsfm and,
for comparison, by pycolmap's global mapper (GLOMAP) on the identical database; accuracy of
both against the ground truth."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import metrics
from .api import map_database
from .frontend.options import MatchOptions
from .frontend.raw_matches import verify_raw_matches
from .mapper.pipeline import MapperOptions
from .report import RunReport
from .synthetic import SyntheticOptions, synthesize, write_synthetic_database

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    num_images: int = 40
    num_points: int = 2000
    layout: str = "ring"
    pixel_noise: float = 0.5
    outlier_ratio: float = 0.2
    seed: int = 0
    compare_glomap: bool = True
    num_threads: int = -1  # verification threads (-1: all cores)


def run_glomap(database: Path, output: Path) -> tuple[object | None, float]:
    import pycolmap

    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        recs = pycolmap.global_mapping(database_path=str(database), image_path=str(output), output_path=str(output))
    except Exception as e:  # noqa: BLE001 - the baseline failing is a result, not our error
        log.warning("pycolmap global_mapping failed: %s", e)
        return None, time.perf_counter() - t0
    dt = time.perf_counter() - t0
    if not recs:
        return None, dt
    best = max(recs.values(), key=lambda r: r.num_reg_images())
    return best, dt


def demo(output: str | Path, options: DemoOptions | None = None, mapper: MapperOptions | None = None) -> dict:
    opt = options or DemoOptions()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    scene = synthesize(SyntheticOptions(num_images=opt.num_images, num_points=opt.num_points, layout=opt.layout,
                                        pixel_noise=opt.pixel_noise, outlier_ratio=opt.outlier_ratio, seed=opt.seed))
    db = out / "database.db"
    if db.exists():
        db.unlink()
    write_synthetic_database(scene, db)
    # the raw matches (wrong ones included) verified like a real front end's: both mappers read
    # honestly verified inliers, never the generator's labels
    names = scene.gt.images.name
    verify_raw_matches(db, [(names[i], names[j]) for i, j in scene.view_graph.pairs.tolist()],
                       MatchOptions(seed=opt.seed, num_threads=opt.num_threads, progress=False))
    t0 = time.perf_counter()
    models, report = map_database(db, out, mapper or MapperOptions(seed=opt.seed), report=RunReport(command="demo"))
    t_ours = time.perf_counter() - t0
    rows = {"torchsfm": {**metrics.evaluate(models[0].to("cpu"), scene.gt), "seconds": t_ours}}
    if opt.compare_glomap:
        from .io.colmap_model import from_pycolmap

        rec, t = run_glomap(db, out / "glomap")
        if rec is not None:
            rows["GLOMAP (pycolmap)"] = {**metrics.evaluate(from_pycolmap(rec), scene.gt), "seconds": t}
        else:
            rows["GLOMAP (pycolmap)"] = {"num_registered": 0, "seconds": t}
    return {"scene": {"images": opt.num_images, "points": opt.num_points, "layout": opt.layout,
                      "pixel_noise": opt.pixel_noise, "outlier_ratio": opt.outlier_ratio, "seed": opt.seed},
            "results": rows, "report": report}


def format_table(result: dict) -> str:
    cols = ["num_registered", "auc@1", "auc@3", "auc@5", "auc@10", "median_rotation_error_deg", "seconds"]
    head = f"{'mapper':<20}" + "".join(f"{c.replace('median_rotation_error_deg', 'med rot err (deg)'):>18}" for c in cols)
    lines = [head]
    for name, r in result["results"].items():
        cells = []
        for c in cols:
            v = r.get(c, float("nan"))
            cells.append(f"{v:>18.4g}" if isinstance(v, float) else f"{v!s:>18}")
        lines.append(f"{name:<20}" + "".join(cells))
    return "\n".join(lines)
