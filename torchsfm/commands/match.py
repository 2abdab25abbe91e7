"""`torchsfm match DATABASE`: match and verify image pairs in a COLMAP database."""
from __future__ import annotations

import argparse

import dataclasses

from ..frontend.options import MatchOptions, RefineOptions
from . import CLIError
from .arguments import DATABASE, IMAGES, PathArg, add_paths
from .frontend_stages import MATCH_EXCLUDE, MATCH_FLAGS, REFINE_EXCLUDE, REFINE_FLAGS
from .options import add_options

REPORT = PathArg("report", ("--report",), "run report JSON (default: DATABASE with suffix .match.json)",
                 required=False, positional=False)
REFINE_IMAGES = dataclasses.replace(IMAGES, help="image folder the database was extracted from (--refine-keypoints "
                                    "reads the images)", required=False, positional=False)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "match",
        help="match SIFT features between image pairs and verify them geometrically (F/E/H)",
        description="Choose candidate pairs (exhaustive, sequential for video, or retrieval for large "
        "collections), match them with pycolmap and store matches and verified two-view geometries in DATABASE. "
        "Pairs already verified are skipped, so an interrupted run resumes.",
        epilog="examples:\n  torchsfm match work/database.db --mode exhaustive\n"
        "  torchsfm match --database work/database.db --mode sequential --overlap 10 --loop-closure\n"
        "  torchsfm match --database_path work/database.db --mode retrieval --neighbors 30\n"
        "  torchsfm match work/database.db --matcher lightglue --refine-keypoints --image_path photos/",
    )
    add_paths(p, [DATABASE, REPORT, REFINE_IMAGES])
    add_options(p.add_argument_group("matching and verification (MatchOptions)"), "match", MatchOptions(),
                MATCH_FLAGS, exclude=MATCH_EXCLUDE)
    add_options(p.add_argument_group("sub-pixel keypoint refinement (RefineOptions)"), "refine", RefineOptions(),
                REFINE_FLAGS, exclude=REFINE_EXCLUDE, auto=False)
    return p


def run(args) -> int:
    from ..report import RunReport, format_summary
    from .frontend_stages import frontend_options, match_stage, refine_stage
    from .options import options_from_args

    _, options = frontend_options(args, match=MatchOptions())
    refine = options_from_args(args, "refine", RefineOptions(), min_num_inliers=options.min_num_inliers,
                               device=options.device)
    if refine.enabled and (args.images is None or not args.images.is_dir()):
        raise CLIError("--refine-keypoints reads the images: give their folder with --image_path"
                       + ("" if args.images is None else f" ({args.images} is not a folder)"))
    report = RunReport(command="match")
    mr = match_stage(report, args.database, options)
    if refine.enabled:
        refine_stage(report, args.images, args.database, refine)
    report.device = mr.device
    path = args.report or args.database.with_suffix(".match.json")
    report.write_json(path)
    print(format_summary(report) + f"\n  report: {path}")
    return 0
