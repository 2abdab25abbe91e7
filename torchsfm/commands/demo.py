"""`torchsfm demo [OUTPUT]`: reconstruct the embedded synthetic default and print accuracy vs ground truth."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .arguments import OUTPUT, add_paths
from .map import add_mapper_arguments, mapper_options

DEMO_OUTPUT = dataclasses.replace(OUTPUT, required=False, help="output folder (default: out/demo)")


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="reconstruct a built-in synthetic scene (no download) and print accuracy vs ground truth",
        description="Generates a seeded synthetic scene (noisy keypoints, 20% wrong matches), verifies its matches "
        "as `torchsfm match --verifier colmap` verifies real ones, writes the COLMAP database, maps it with torchsfm and with "
        "pycolmap's global mapper (GLOMAP), and prints pose AUC against the ground truth for both.",
        epilog="examples:\n  torchsfm demo\n  torchsfm demo out/demo100 --num-images 100 --device cuda --no-compare",
    )
    add_paths(p, [DEMO_OUTPUT])
    g = p.add_argument_group("scene")
    g.add_argument("--num-images", type=int, default=40, help="images on the layout")
    g.add_argument("--num-points", type=int, default=2000, help="3D points")
    g.add_argument("--layout", default="ring", choices=["ring", "sphere", "forward", "random"], help="camera layout")
    g.add_argument("--pixel-noise", type=float, default=0.5, help="keypoint noise, pixels (standard deviation)")
    g.add_argument("--outlier-ratio", type=float, default=0.2, help="share of wrong matches among the raw matches")
    g.add_argument("--no-compare", action="store_true", help="skip the GLOMAP baseline")
    add_mapper_arguments(p)
    return p


def run(args) -> int:
    from ..demo import DemoOptions, demo, format_table
    from ..report import format_summary
    from .arguments import writable_folder

    out = writable_folder(args.output or Path("out/demo"))
    mapper = mapper_options(args)
    opt = DemoOptions(args.num_images, args.num_points, args.layout, args.pixel_noise, args.outlier_ratio,
                      mapper.seed, not args.no_compare, num_threads=args.threads or -1)
    res = demo(out, opt, mapper)
    print(format_summary(res["report"]))
    print(f"\nAccuracy against ground truth ({opt.num_images} images, {opt.layout}, {opt.pixel_noise} px noise, "
          f"{opt.outlier_ratio:.0%} wrong raw matches, verified; AUC in percent):")
    print(format_table(res))
    print(f"\nmodel: {out / 'sparse' / '0'}   report: {out / 'report.json'}")
    return 0
