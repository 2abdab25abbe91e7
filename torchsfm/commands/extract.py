"""`torchsfm extract IMAGES DATABASE`: image folder -> COLMAP database with SIFT features."""
from __future__ import annotations

import argparse

from ..frontend.options import ExtractOptions
from .arguments import DATABASE, IMAGES, PathArg, add_paths
from .frontend_stages import EXTRACT_EXCLUDE, EXTRACT_FLAGS
from .options import add_options

REPORT = PathArg("report", ("--report",), "run report JSON (default: DATABASE with suffix .extract.json)",
                 required=False, positional=False)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract",
        help="scan an image folder and extract SIFT features into a COLMAP database.db",
        description="Scan IMAGES recursively, skip what is not a usable image (listed in the report), group "
        "images into cameras, and store cameras, images and SIFT features in DATABASE (like colmap "
        "feature_extractor). Rerunning resumes.",
        epilog="examples:\n  torchsfm extract photos/ work/database.db --camera-mode single\n"
        "  torchsfm extract --image_path photos/ --database_path work/database.db --image-list subset.txt\n"
        "  torchsfm match work/database.db --mode exhaustive",
    )
    add_paths(p, [IMAGES, DATABASE, REPORT])
    add_options(p.add_argument_group("extraction (ExtractOptions)"), "extract", ExtractOptions(), EXTRACT_FLAGS,
                exclude=EXTRACT_EXCLUDE)
    return p


def run(args) -> int:
    from ..report import RunReport, format_summary
    from .frontend_stages import extract_stage, frontend_options

    options, _ = frontend_options(args, extract=ExtractOptions())
    report = RunReport(command="extract")
    path = args.report or args.database.with_suffix(".extract.json")
    try:
        ex = extract_stage(report, args.images, args.database, options)
    except Exception as e:
        if args.report is not None:  # asked for: the report says what was skipped and why it failed
            report.summary["error"] = str(e)
            report.write_json(path)
        raise
    report.device = ex.device
    report.write_json(path)
    print(format_summary(report) + f"\n  report: {path}")
    return 0
