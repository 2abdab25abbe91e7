"""`torchsfm map`: verified view graph in a database -> COLMAP models."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import CLIError
from ..config import load, merge
from ..mapper.pipeline import MapperOptions
from ..report import format_summary
from ..runtime import resolve_device


def add_mapper_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mapper")
    g.add_argument("--device", default="auto", help="auto (GPU when present) | cpu | cuda[:N]")
    g.add_argument("--seed", type=int, default=0, help="random seed (global positioning start)")
    g.add_argument("--config", type=Path, help="JSON file of mapper options (as written to OUTPUT/config.json)")
    g.add_argument("--output-format", choices=["bin", "txt"], default="bin", help="COLMAP model format")
    g.add_argument("--skip-retriangulation", action="store_true", help="no retriangulation round")
    g.add_argument("--refine-principal-point", action="store_true", help="also refine principal points in BA")


def mapper_options(args) -> MapperOptions:
    try:
        opt = load(MapperOptions, args.config) if args.config else MapperOptions()
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read --config {args.config}: {e}") from e
    over = {"device": args.device, "seed": args.seed}
    if args.skip_retriangulation:
        over["skip_retriangulation"] = True
    opt = merge(opt, over)
    try:  # an unusable --device fails here, before any work (never a silent CPU fallback)
        resolve_device(opt.device)
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e)) from e
    if args.refine_principal_point:
        opt.bundle_adjustment.refine_principal_point = True
    return opt


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "map", help="global mapping of a database's verified view graph into COLMAP models",
        description="Runs view-graph calibration, relative poses, rotation averaging, tracks, global positioning, "
        "bundle adjustment rounds and retriangulation; writes OUTPUT/sparse/0 (largest component), 1, ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  torchsfm map --database work/database.db --images photos/ --output work/",
    )
    p.add_argument("--database", type=Path, required=True, help="COLMAP database.db (torchsfm, COLMAP or hloc)")
    p.add_argument("--images", type=Path, help="image folder (for point colours)")
    p.add_argument("--output", type=Path, required=True, help="output folder (sparse/K, report.json, config.json)")
    add_mapper_arguments(p)
    return p


def run(args) -> int:
    from ..api import map_database

    if not args.database.is_file():
        raise CLIError(f"database {args.database} does not exist; create it with `torchsfm extract` and `torchsfm match`")
    opt = mapper_options(args)
    try:
        _, report = map_database(args.database, args.output, opt, args.images, args.output_format)
    except (ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    print(format_summary(report))
    return 0
