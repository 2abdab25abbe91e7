"""`torchsfm ba INPUT OUTPUT`: bundle adjustment of a COLMAP model (like `colmap bundle_adjuster`)."""
from __future__ import annotations

import argparse

from ..ba.bundle_adjustment import GAUGES, BundleAdjustmentOptions
from ..solver.losses import LOSSES
from ..solver.options import LINEAR_SOLVERS
from .arguments import INPUT_MODEL, OUTPUT, add_paths
from .options import Flag, add_options

BA_FLAGS = [
    Flag("refine_focal_length", "--refine-focal", ("--BundleAdjustment.refine_focal_length", "--refine-focal-length"),
         "refine focal lengths"),
    Flag("refine_principal_point", "--refine-principal-point", ("--BundleAdjustment.refine_principal_point",),
         "refine principal points"),
    Flag("refine_extra_params", "--refine-extra", ("--BundleAdjustment.refine_extra_params", "--refine-extra-params"),
         "refine distortion parameters"),
    Flag("refine_poses", "--refine-poses", help="refine poses"),
    Flag("refine_points", "--refine-points", help="refine 3D points"),
    Flag("min_track_length", "--min-track-length", help="leave out points seen by fewer images"),
    Flag("gauge", "--gauge", help="two_cams: fix the first image's pose and the scale along the second, as colmap "
         "bundle_adjuster does, so the model keeps its frame; none: leave the similarity freedom to the LM damping",
         choices=GAUGES),
    Flag("solver.max_iterations", "--max-iterations", ("--BundleAdjustment.max_num_iterations",), "LM iterations"),
    Flag("solver.function_tolerance", "--function-tolerance", ("--BundleAdjustment.function_tolerance",),
         "stop when the cost changes by less than this fraction"),
    Flag("solver.gradient_tolerance", "--gradient-tolerance", ("--BundleAdjustment.gradient_tolerance",),
         "stop when the largest gradient entry is below this"),
    Flag("solver.parameter_tolerance", "--parameter-tolerance", ("--BundleAdjustment.parameter_tolerance",),
         "stop when the step is below this fraction of the parameters"),
    Flag("solver.loss", "--loss", help="robust loss", choices=LOSSES),
    Flag("solver.loss_scale", "--loss-scale", help="pixels where the robust loss departs from L2"),
    Flag("solver.linear_solver", "--linear-solver", help="reduced camera system: dense Cholesky, sparse (scipy, "
         "CPU), pcg (implicit Schur), pcg_explicit; auto picks by size", choices=LINEAR_SOLVERS),
]


def ba_defaults() -> BundleAdjustmentOptions:
    """COLMAP bundle_adjuster's defaults: principal points fixed, the two-camera gauge."""
    return BundleAdjustmentOptions(gauge="two_cams")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ba",
        help="bundle-adjust a COLMAP model (poses, intrinsics, points)",
        description="Refine the registered poses, camera intrinsics and 3D points of a COLMAP model by "
        "minimising the (robust) reprojection error with sparse Levenberg-Marquardt, then write the model. "
        "Prints initial/final cost (0.5 * sum of squared pixel residuals, after the loss), iterations and time.",
        epilog="examples:\n  torchsfm ba sparse/0 sparse/0_ba --loss huber --loss-scale 1 --refine-principal-point\n"
        "  torchsfm ba --input_path sparse/0 --output_path sparse/0_ba --device cuda --max-iterations 50 "
        "--no-refine-extra",
    )
    add_paths(p, [INPUT_MODEL, OUTPUT])
    add_options(p.add_argument_group("what to refine and how (BundleAdjustmentOptions, COLMAP's defaults)"), "ba",
                ba_defaults(), BA_FLAGS, auto=False)
    g = p.add_argument_group("run")
    g.add_argument("--fixed-images", type=int, nargs="*", default=[], metavar="IMAGE_ID",
                   help="COLMAP image ids whose poses stay constant (default: none)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    g.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="arithmetic precision")
    g.add_argument("--output-format", default="bin", choices=["bin", "txt"], help="model file format")
    return p


def run(args) -> int:
    import time

    import torch

    from ..ba import bundle_adjust
    from ..io.colmap_model import read_model, write_model
    from ..runtime import resolve_device
    from . import CLIError
    from .arguments import writable_folder
    from .options import options_from_args

    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        raise CLIError(str(e)) from e
    options = options_from_args(args, "ba", ba_defaults())
    if args.output.exists() and not args.output.is_dir():  # the model folder would replace the file
        raise CLIError(f"output model {args.output} exists and is not a folder")
    writable_folder(args.output.parent, "folder of the output model")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    try:
        rec = read_model(args.input, device=device, dtype=dtype)
    except (FileNotFoundError, NotImplementedError, ValueError) as e:
        raise CLIError(str(e)) from e
    ids = rec.images.image_id.tolist()
    unknown = sorted(set(args.fixed_images) - set(ids))
    if unknown:
        raise CLIError(f"--fixed-images: no image with id {unknown} in {args.input}")
    rows = {i: r for r, i in enumerate(ids)}
    options.constant_images = [rows[i] for i in args.fixed_images]
    try:
        out, s = bundle_adjust(rec, options)
    except ValueError as e:
        raise CLIError(str(e)) from e
    write_model(out, args.output, format=args.output_format)
    line = f"initial cost {s.initial_cost:.6e}, final cost {s.final_cost:.6e}"
    n_obs = int(rec.images.registered[rec.tracks.image].sum())
    if options.solver.loss == "trivial" and n_obs:  # cost = 0.5 * sum |r|^2 over 2-vectors
        line += f" (rms {(s.initial_cost / n_obs) ** 0.5:.4f} -> {(s.final_cost / n_obs) ** 0.5:.4f} px)"
    print(line)
    print(f"iterations {s.iterations} ({s.successful_steps} successful), termination {s.termination}, "
          f"linear solver {s.linear_solver} ({s.num_reduced_unknowns} unknowns), device {device}")
    print(f"time: solve {s.total_time_s:.3f} s, total {time.perf_counter() - t0:.3f} s; wrote {args.output}")
    return 0
