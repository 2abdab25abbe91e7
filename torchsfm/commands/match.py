"""`torchsfm match DATABASE`: match and verify image pairs in a COLMAP database."""
from __future__ import annotations

import argparse

from ..frontend.options import MatchOptions
from .arguments import DATABASE, PathArg, add_paths
from .frontend_stages import MATCH_EXCLUDE, MATCH_FLAGS
from .options import add_options

REPORT = PathArg("report", ("--report",), "run report JSON (default: DATABASE with suffix .match.json)",
                 required=False, positional=False)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "match",
        help="match SIFT features between image pairs and verify them geometrically (F/E/H)",
        description="Choose candidate pairs (exhaustive, sequential for video, or retrieval for large "
        "collections), match them with pycolmap and store matches and verified two-view geometries in DATABASE. "
        "Pairs already verified are skipped, so an interrupted run resumes.",
        epilog="examples:\n  torchsfm match work/database.db --mode exhaustive\n"
        "  torchsfm match --database work/database.db --mode sequential --overlap 10 --loop-closure\n"
        "  torchsfm match --database_path work/database.db --mode retrieval --neighbors 30",
    )
    add_paths(p, [DATABASE, REPORT])
    add_options(p.add_argument_group("matching and verification (MatchOptions)"), "match", MatchOptions(),
                MATCH_FLAGS, exclude=MATCH_EXCLUDE)
    return p


def run(args) -> int:
    from ..report import RunReport, format_summary
    from .frontend_stages import frontend_options, match_stage

    _, options = frontend_options(args, match=MatchOptions())
    report = RunReport(command="match")
    mr = match_stage(report, args.database, options)
    report.device = mr.device
    path = args.report or args.database.with_suffix(".match.json")
    report.write_json(path)
    print(format_summary(report) + f"\n  report: {path}")
    return 0
