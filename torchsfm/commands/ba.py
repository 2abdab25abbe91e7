"""`torchsfm ba INPUT_MODEL OUTPUT_MODEL`: bundle adjustment of a COLMAP model (like
`colmap bundle_adjuster`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..solver.losses import LOSSES
from ..solver.options import LINEAR_SOLVERS


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ba",
        help="bundle-adjust a COLMAP model (poses, intrinsics, points)",
        description="Refine the registered poses, camera intrinsics and 3D points of a COLMAP model by "
        "minimising the (robust) reprojection error with sparse Levenberg-Marquardt, then write the model. "
        "Prints initial/final cost (0.5 * sum of squared pixel residuals, after the loss), iterations and time.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  torchsfm ba sparse/0 sparse/0_ba --loss huber --loss-scale 1 --refine-principal-point\n"
        "  torchsfm ba sparse/0 sparse/0_ba --device cuda --max-iterations 50 --no-refine-extra",
    )
    p.add_argument("input", type=Path, metavar="INPUT_MODEL", help="COLMAP model folder (.bin or .txt)")
    p.add_argument("output", type=Path, metavar="OUTPUT_MODEL", help="folder to write the adjusted model to")
    p.add_argument("--loss", default="trivial", choices=LOSSES, help="robust loss (default: trivial)")
    p.add_argument("--loss-scale", type=float, default=1.0, help="pixels where the robust loss departs from L2 (default: 1)")
    g = p.add_argument_group("what to refine (COLMAP's defaults)")
    g.add_argument("--refine-focal", dest="refine_focal", action=argparse.BooleanOptionalAction, default=True,
                   help="refine focal lengths (default: on)")
    g.add_argument("--refine-principal-point", dest="refine_pp", action=argparse.BooleanOptionalAction, default=False,
                   help="refine principal points (default: off)")
    g.add_argument("--refine-extra", dest="refine_extra", action=argparse.BooleanOptionalAction, default=True,
                   help="refine distortion parameters (default: on)")
    g.add_argument("--refine-poses", action=argparse.BooleanOptionalAction, default=True, help="refine poses (default: on)")
    g.add_argument("--refine-points", action=argparse.BooleanOptionalAction, default=True,
                   help="refine 3D points (default: on)")
    g.add_argument("--fixed-images", type=int, nargs="*", default=[], metavar="IMAGE_ID",
                   help="COLMAP image ids whose poses stay constant")
    g.add_argument("--min-track-length", type=int, default=0, help="leave out points seen by fewer images (default: 0)")
    g.add_argument("--gauge", default="two_cams", choices=["none", "two_cams"],
                   help="two_cams: fix the first image's pose and the scale along the second, as colmap "
                   "bundle_adjuster does, so the model keeps its frame; none: leave the similarity freedom to "
                   "the LM damping (default: two_cams)")
    s = p.add_argument_group("solver")
    s.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    s.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="arithmetic precision (default: float64)")
    s.add_argument("--max-iterations", type=int, default=100, help="LM iterations (default: 100)")
    s.add_argument("--function-tolerance", type=float, default=1e-6, help="default: 1e-6")
    s.add_argument("--gradient-tolerance", type=float, default=1e-10, help="default: 1e-10")
    s.add_argument("--parameter-tolerance", type=float, default=1e-8, help="default: 1e-8")
    s.add_argument("--linear-solver", default="auto", choices=LINEAR_SOLVERS,
                   help="reduced camera system: dense Cholesky, sparse (scipy, CPU), pcg (implicit Schur), "
                   "pcg_explicit; auto picks by size (default: auto)")
    p.add_argument("--output-format", default="bin", choices=["bin", "txt"], help="model file format (default: bin)")
    return p


def run(args) -> int:
    import time

    import torch

    from ..ba import BundleAdjustmentOptions, bundle_adjust
    from . import CLIError
    from ..io.colmap_model import read_model, write_model
    from ..runtime import resolve_device
    from ..solver import SolverOptions

    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        raise CLIError(str(e)) from e
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
    options = BundleAdjustmentOptions(
        refine_focal_length=args.refine_focal, refine_principal_point=args.refine_pp,
        refine_extra_params=args.refine_extra, refine_poses=args.refine_poses, refine_points=args.refine_points,
        min_track_length=args.min_track_length, constant_images=[rows[i] for i in args.fixed_images], gauge=args.gauge,
        solver=SolverOptions(
            max_iterations=args.max_iterations, function_tolerance=args.function_tolerance,
            gradient_tolerance=args.gradient_tolerance, parameter_tolerance=args.parameter_tolerance,
            loss=args.loss, loss_scale=args.loss_scale, linear_solver=args.linear_solver,
        ),
    )
    try:
        out, s = bundle_adjust(rec, options)
    except ValueError as e:
        raise CLIError(str(e)) from e
    write_model(out, args.output, format=args.output_format)
    line = f"initial cost {s.initial_cost:.6e}, final cost {s.final_cost:.6e}"
    n_obs = int(rec.images.registered[rec.tracks.image].sum())
    if args.loss == "trivial" and n_obs:  # cost = 0.5 * sum |r|^2 over 2-vectors
        line += f" (rms {(s.initial_cost / n_obs) ** 0.5:.4f} -> {(s.final_cost / n_obs) ** 0.5:.4f} px)"
    print(line)
    print(f"iterations {s.iterations} ({s.successful_steps} successful), termination {s.termination}, "
          f"linear solver {s.linear_solver} ({s.num_reduced_unknowns} unknowns), device {device}")
    print(f"time: solve {s.total_time_s:.3f} s, total {time.perf_counter() - t0:.3f} s; wrote {args.output}")
    return 0
