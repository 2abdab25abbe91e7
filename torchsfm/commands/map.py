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
    Flag("dtype", "--dtype", help="precision of the model and every solver: float32 is what GPUs run fast (the "
         "solvers keep their cost sums in float64)", choices=("float64", "float32")),
    Flag("seed", "--seed", help="random seed of every stage; the same seed on the same device gives identical files"),
    Flag("intrinsics.principal_point", "--refine-principal-point",
         help="principal points: auto = freed only where the data determine them (marginal standard deviation, "
         "cross-validation over tracks, significance), always = freed, never = kept at the image centre",
         choices=("auto", "always", "never")),
    Flag("focal_scan.mode", "--focal-scan",
         help="focal lengths by rotation closure, for the cameras view-graph calibration left unchanged: a scan of "
         "common scales of the focal lengths for the one at which the view graph's triangles of relative rotations "
         "close best (then every relative pose by RANSAC); auto = cameras without a prior focal length (no EXIF), "
         "always = every camera (an EXIF focal length that may be wrong), never",
         choices=("auto", "always", "never")),
    Flag("skip_view_graph_calibration", "--skip-view-graph-calibration", ("--skip_view_graph_calibration",),
         "no focal-length calibration from the view graph"),
    Flag("loop_consistency.mode", "--loop-consistency",
         help="drop image pairs whose relative rotation the triangles of the view graph contradict (wrong pairs "
         "of symmetric or repetitive scenes, which fold the model): auto = always on learned features, and on SIFT "
         "only when most triangles do not close; always; never", choices=("auto", "always", "never")),
    Flag("loop_consistency.max_cycle_error_deg", "--loop-max-cycle-error",
         help="degrees: a triangle of pairs is consistent when its composed rotation is within this of the "
         "identity", metavar="DEG"),
    Flag("recalibration.max_passes", "--recalibration-passes",
         help="mapping passes after the first, each from the focal lengths bundle adjustment found, run while they "
         "differ from those the global stages used by more than --recalibration-min-focal-change (0: one pass)",
         metavar="N"),
    Flag("recalibration.min_focal_change", "--recalibration-min-focal-change",
         help="relative focal-length change that makes the mapper run again", metavar="FRACTION"),
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
    Flag("intrinsics.min_images", "--principal-point-min-images",
         help="auto principal points: a camera seen by fewer registered images keeps it at the centre", metavar="N"),
    Flag("intrinsics.max_principal_point_std_deg", "--principal-point-max-std",
         help="auto principal points: degrees of viewing direction; freed only when its standard deviation "
         "(poses and points eliminated) is at most this", metavar="DEG"),
    Flag("intrinsics.min_shift_sigmas", "--principal-point-min-shift",
         help="auto principal points: the freed principal point must lie this many standard deviations from the "
         "centre", metavar="SIGMAS"),
    Flag("degeneracy.min_camera_observations", "--min-image-observations",
         help="a registered image keeping fewer observations (after completing its tracks from its matches) is "
         "dropped", metavar="N"),
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
    try:
        opt.intrinsics.validate()
        opt.recalibration.validate()
        opt.focal_scan.validate()
    except ValueError as e:
        raise CLIError(str(e)) from e
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
