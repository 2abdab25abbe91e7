"""`torchsfm demo`: reconstruct the embedded synthetic default and print accuracy vs ground truth."""
from __future__ import annotations

import argparse
from pathlib import Path

from .map import add_mapper_arguments, mapper_options


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="reconstruct a built-in synthetic scene (no download) and print accuracy vs ground truth",
        description="Generates a seeded synthetic scene (noisy keypoints, 20%% outlier matches) as a COLMAP "
        "database, maps it with torchsfm and with pycolmap's global mapper (GLOMAP), and prints pose AUC "
        "against the ground truth for both.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  torchsfm demo\n  torchsfm demo --num-images 100 --device cuda --no-compare",
    )
    p.add_argument("--output", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    p.add_argument("--num-images", type=int, default=40)
    p.add_argument("--num-points", type=int, default=2000)
    p.add_argument("--layout", default="ring", choices=["ring", "sphere", "forward", "random"])
    p.add_argument("--pixel-noise", type=float, default=0.5)
    p.add_argument("--outlier-ratio", type=float, default=0.2)
    p.add_argument("--no-compare", action="store_true", help="skip the GLOMAP baseline")
    add_mapper_arguments(p)
    return p


def run(args) -> int:
    from ..demo import DemoOptions, demo, format_table
    from ..report import format_summary

    opt = DemoOptions(args.num_images, args.num_points, args.layout, args.pixel_noise, args.outlier_ratio,
                      args.seed, not args.no_compare)
    res = demo(args.output, opt, mapper_options(args))
    print(format_summary(res["report"]))
    print(f"\nAccuracy against ground truth ({opt.num_images} images, {opt.layout}, {opt.pixel_noise} px noise, "
          f"{opt.outlier_ratio:.0%} outlier matches; AUC in percent):")
    print(format_table(res))
    print(f"\nmodel: {args.output / 'sparse' / '0'}   report: {args.output / 'report.json'}")
    return 0
