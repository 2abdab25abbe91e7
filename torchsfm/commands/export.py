"""`torchsfm export INPUT OUTPUT --format FORMAT`: a sparse model in the formats other
tools read (COLMAP .bin/.txt, PLY, nerfstudio, undistorted PINHOLE)."""
from __future__ import annotations

import argparse
import dataclasses

from ..export.common import FORMATS
from .arguments import INPUT_MODEL, OUTPUT, PathArg, add_paths


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a sparse model (COLMAP bin/txt, PLY, nerfstudio, undistorted PINHOLE)",
        description="Write a sparse model in another format (like colmap model_converter / image_undistorter). "
        "Outputs are written atomically: a folder or file appears complete or not at all. An existing output is "
        "replaced only with --overwrite.\n\n"
        "  colmap-bin, colmap-txt  COLMAP model folder (cameras, images, points3D, rigs, frames)\n"
        "  ply                     coloured point cloud, binary PLY (colours from --images when given)\n"
        "  nerfstudio              transforms.json + sparse_pc.ply (+ images/ with --images)\n"
        "  undistorted             PINHOLE images + sparse/0 model for pinhole-only tools (needs --images)",
        epilog="examples:\n"
        "  torchsfm export scene/sparse/0 scene/points.ply --format ply --images scene/images\n"
        "  torchsfm export scene/sparse/0 --format nerfstudio --output scene/ns --images scene/images\n"
        "  ns-train splatfacto --data scene/ns\n"
        "  torchsfm export scene/sparse/0 scene/undistorted --format undistorted --images scene/images\n"
        "  torchsfm export --input_path scene/sparse/0 --output_path scene/sparse_txt --format colmap-txt",
    )
    add_paths(p, [INPUT_MODEL, dataclasses.replace(OUTPUT, help="output folder (a .ply file for --format ply)"),
                  PathArg("images", ("--images", "--image_path", "--image-path"),
                          "image folder the model's image names are relative to: PLY/nerfstudio colours sampled "
                          "from it, nerfstudio images/ linked from it; required for --format undistorted",
                          required=False, positional=False)])
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="output format")
    p.add_argument("--overwrite", "--force", action="store_true", help="replace an existing output")
    n = p.add_argument_group("nerfstudio")
    n.add_argument("--keep-world", action="store_true",
                   help="no applied_transform: keep the model's world axes (nerfstudio re-axes to z-up by default)")
    n.add_argument("--no-point-cloud", dest="point_cloud", action="store_false", help="do not write sparse_pc.ply")
    n.add_argument("--no-copy-images", dest="copy_images", action="store_false",
                   help="do not link/copy the images into OUT/images")
    u = p.add_argument_group("undistorted")
    u.add_argument("--max-image-size", type=int, default=-1, help="longest side of the output images (-1: keep)")
    u.add_argument("--blank-pixels", type=float, default=0.0,
                   help="0: crop to valid pixels; 1: keep all source pixels with black borders")
    u.add_argument("--colmap-layout", action="store_true",
                   help="keep COLMAP's workspace (sparse/, stereo/) instead of images/ + sparse/0")
    u.add_argument("--model-format", default="bin", choices=["bin", "txt"], help="undistorted model format")
    return p


def run(args) -> int:
    from . import CLIError
    from ..export import ExportError, NerfstudioOptions, UndistortOptions, export_model
    from ..io.colmap_model import read_model

    if args.format == "undistorted" and args.images is None:
        raise CLIError("--format undistorted resamples the images: pass --images DIR")
    if args.images is not None and not args.images.is_dir():
        raise CLIError(f"--images {args.images} is not a folder")
    if args.format == "ply" and args.output.is_dir():
        raise CLIError(f"--output {args.output} is a folder; --format ply writes a file, e.g. {args.output / 'points.ply'}")
    try:
        rec = read_model(args.input)
    except (FileNotFoundError, NotImplementedError, ValueError) as e:
        raise CLIError(str(e)) from e
    try:
        out = export_model(
            rec, args.format, args.output, image_dir=args.images, overwrite=args.overwrite, model_path=args.input,
            nerfstudio=NerfstudioOptions(keep_world=args.keep_world, point_cloud=args.point_cloud,
                                         copy_images=args.copy_images),
            undistort=UndistortOptions(max_image_size=args.max_image_size, blank_pixels=args.blank_pixels,
                                       colmap_layout=args.colmap_layout, model_format=args.model_format),
        )
    except ExportError as e:
        raise CLIError(str(e)) from e
    s = rec.summary()
    print(f"wrote {args.format} export of {args.input} ({s['registered_images']} registered images, "
          f"{s['points3D']} points) to {out}")
    return 0
