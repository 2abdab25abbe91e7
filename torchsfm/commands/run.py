"""`torchsfm run IMAGES OUTPUT`: front end and mapper in one go, with automatic choices."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import CLIError
from .map import add_mapper_arguments, mapper_options


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run", help="images -> features -> matches -> global mapping -> COLMAP model, in one command",
        description="Extracts SIFT features, matches pairs (exhaustive up to --exhaustive-max images, retrieval "
        "beyond), verifies them, and runs the global mapper. OUTPUT gets database.db, sparse/K, report.json and "
        "config.json. Rerunning resumes: images and pairs already in the database are skipped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  torchsfm run ../shared/data/templeRing/images out/temple",
    )
    p.add_argument("images", type=Path, help="folder of photos (searched recursively)")
    p.add_argument("output", type=Path, help="output folder")
    p.add_argument("--camera-mode", default="auto", choices=["auto", "single", "per_folder", "per_image"])
    p.add_argument("--camera-model", default="SIMPLE_RADIAL")
    p.add_argument("--match-mode", default="auto", choices=["auto", "exhaustive", "sequential", "retrieval"])
    p.add_argument("--exhaustive-max", type=int, default=300, help="auto: exhaustive matching up to this many images")
    add_mapper_arguments(p)
    return p


def run(args) -> int:
    from ..api import map_database
    from ..frontend import ExtractOptions, IngestError, MatchOptions, extract, match
    from ..frontend.colmap_db import DatabaseError
    from ..report import RunReport, format_summary, log_to_file

    if not args.images.is_dir():
        raise CLIError(f"image folder {args.images} does not exist")
    opt = mapper_options(args)  # option and --device errors before the front end runs
    args.output.mkdir(parents=True, exist_ok=True)
    db = args.output / "database.db"
    report = RunReport(command="run")
    with log_to_file(args.output / "torchsfm.log"):  # front end too; map_database reuses it
        try:
            with report.stage("extract") as st:
                ex = extract(args.images, db,
                             ExtractOptions(camera_mode=args.camera_mode, camera_model=args.camera_model))
                st.counts["images"] = ex.summary()
                report.skipped.extend({"file": s.name, "reason": s.reason, "detail": s.detail} for s in ex.skipped)
            mode = args.match_mode
            if mode == "auto":
                mode = "exhaustive" if ex.num_images <= args.exhaustive_max else "retrieval"
            with report.stage("match") as st:
                mr = match(db, MatchOptions(mode=mode))
                st.counts["pairs"] = mr.summary()
        except (IngestError, DatabaseError, ValueError) as e:
            raise CLIError(str(e)) from e
        try:
            _, report = map_database(db, args.output, opt, args.images, args.output_format, report)
        except (ValueError, RuntimeError) as e:
            raise CLIError(str(e)) from e
    print(format_summary(report))
    return 0
