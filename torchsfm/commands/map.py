"""`torchsfm map DATABASE OUTPUT`: verified view graph in a database -> COLMAP models."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..mapper.pipeline import MapperOptions
from . import CLIError
from .arguments import DATABASE, OUTPUT, PathArg, add_paths
from .options import Flag, add_options

MAPPER_FLAGS = [
    Flag("device", "--device", help="auto (the GPU when there is one), cpu, cuda or cuda:N", metavar="DEVICE"),
    Flag("seed", "--seed", help="random seed of every stage; the same seed on the same device gives identical files"),
    Flag("refine_principal_point", "--refine-principal-point",
         help="principal points: auto = freed in a last bundle adjustment and kept only when the data constrain "
         "them (a nested-model test), always = freed, never = kept at the image centre",
         choices=("auto", "always", "never")),
    Flag("skip_view_graph_calibration", "--skip-view-graph-calibration", ("--skip_view_graph_calibration",),
         "no focal-length calibration from the view graph"),
    Flag("skip_retriangulation", "--skip-retriangulation", ("--skip_retriangulation",), "no retriangulation round"),
    Flag("min_component_size", "--min-component-size", ("--Mapper.min_model_size",),
         "images; smaller connected components of the view graph are not reconstructed"),
    Flag("max_num_models", "--max-num-models", ("--Mapper.max_num_models",), "most models written"),
    Flag("ba_round_max_reprojection", "--ba-max-reprojection", help="pixels: filter threshold after each bundle "
         "adjustment round, one value per round", metavar="PX"),
    Flag("bundle_adjustment.refine_focal_length", "--refine-focal-length", ("--Mapper.ba_refine_focal_length",),
         "refine focal lengths in bundle adjustment"),
    Flag("bundle_adjustment.refine_extra_params", "--refine-extra-params", ("--Mapper.ba_refine_extra_params",),
         "refine distortion parameters in bundle adjustment"),
    Flag("bundle_adjustment.solver.max_iterations", "--ba-max-iterations",
         ("--Mapper.ba_global_max_num_iterations",), "iterations of each bundle adjustment"),
    Flag("global_positioning.solver.max_iterations", "--gp-max-iterations", help="iterations of global positioning"),
    Flag("min_triangulation_angle", help="degrees: points seen under a smaller angle are filtered"),
    Flag("filter_noise_sigmas", help="the last filter's threshold is capped at this many keypoint-noise sigmas "
         "(estimated from the reprojection errors; 0: no cap)"),
    Flag("filter_min_reprojection", help="pixels: the capped threshold is not below this"),
    Flag("ba_round_skip_max_removed", help="a bundle adjustment round is skipped when the last one converged and "
         "the filters since removed at most this share of its observations"),
    Flag("min_images_for_principal_point", help="auto principal points: every camera needs this many images"),
    Flag("principal_point_min_gain", help="auto principal points: likelihood-ratio threshold per freed parameter"),
    Flag("principal_point_min_relative_gain", help="auto principal points: the cost must fall by this fraction"),
    Flag("principal_point_test_iterations", help="auto principal points: bundle adjustment iterations of the test"),
    Flag("max_principal_point_offset", help="auto principal points: largest offset from the image centre, as a "
         "fraction of the image size"),
    Flag("normalize_extent", help="the output is centred and scaled so that the 10-90% box of the cameras has "
         "this diagonal"),
    Flag("max_nonfinite_fraction", help="a stage giving NaN/Inf for more than this share of the images is an "
         "error"),
]


def add_mapper_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mapper (MapperOptions; every nested option with --config)")
    g.add_argument("--config", type=Path, metavar="JSON",
                   help="mapper options as written to OUTPUT/config.json; flags given override it")
    g.add_argument("--output-format", choices=["bin", "txt"], default="bin", help="COLMAP model format")
    add_options(g, "mapper", MapperOptions(), MAPPER_FLAGS)


def mapper_options(args) -> MapperOptions:
    """--config, then the flags given; an unusable --device fails here, before any work."""
    from ..config import load
    from ..runtime import resolve_device
    from .options import options_from_args

    try:
        base = load(MapperOptions, args.config) if args.config else MapperOptions()
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read --config {args.config}: {e}") from e
    opt = options_from_args(args, "mapper", base)
    if opt.refine_principal_point not in ("auto", "always", "never"):
        raise CLIError(f"refine_principal_point must be auto, always or never, not {opt.refine_principal_point!r}")
    try:  # never a silent CPU fallback
        resolve_device(opt.device)
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e)) from e
    return opt


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "map", help="global mapping of a database's verified view graph into COLMAP models",
        description="Runs view-graph calibration, relative poses, rotation averaging, tracks, global positioning, "
        "bundle adjustment rounds and retriangulation on DATABASE (made by torchsfm, COLMAP or hloc); writes "
        "OUTPUT/sparse/0 (the largest model), 1, ..., report.json, config.json and torchsfm.log.",
        epilog="examples:\n  torchsfm map work/database.db work/ --images photos/\n"
        "  torchsfm map --database_path work/database.db --output_path work/ --refine-principal-point never",
    )
    add_paths(p, [DATABASE, OUTPUT, PathArg("images", ("--images", "--image_path", "--image-path"),
                                            "image folder: point colours", required=False, positional=False)])
    add_mapper_arguments(p)
    return p


def run(args) -> int:
    from ..api import map_database
    from ..report import format_summary
    from .arguments import writable_folder

    if not args.database.is_file():
        raise CLIError(f"database {args.database} does not exist; create it with `torchsfm extract` and `torchsfm match`")
    opt = mapper_options(args)
    writable_folder(args.output)
    try:
        _, report = map_database(args.database, args.output, opt, args.images, args.output_format)
    except (ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    print(format_summary(report))
    return 0
