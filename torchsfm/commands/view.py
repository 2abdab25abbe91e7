"""`torchsfm view MODEL [MODEL ...]`: a self-contained HTML page showing cameras and points."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .arguments import INPUT_MODEL, PathArg, add_paths

MODELS = dataclasses.replace(INPUT_MODEL, help="COLMAP model folder(s), or a folder of models such as sparse/",
                             many=True)
OUTPUT_PAGE = PathArg("output", ("--output", "--output_path", "--output-path", "-o"),
                      "page to write; .html is added when missing (default: MODEL.html next to the model; several "
                      "models: viewer.html in their common folder)", required=False, positional=False)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "view",
        help="write an interactive offline HTML viewer of sparse models",
        description="Write one self-contained HTML file (inline JavaScript, no network) showing camera frusta "
        "coloured by component (one model folder = one component) and the 3D points in their colours; "
        "hovering a camera shows its image name (and a thumbnail with --images). Open it in any browser. "
        "An existing page is replaced only with --overwrite.",
        epilog="examples:\n"
        "  torchsfm view scene/sparse/0                 # writes scene/sparse/0.html\n"
        "  torchsfm view scene/sparse                   # all models in sparse/, one colour each: scene/sparse.html\n"
        "  torchsfm view scene/sparse/0 scene/sparse/1 --images scene/images --output scene/view.html",
    )
    add_paths(p, [MODELS, OUTPUT_PAGE, PathArg("images", ("--images", "--image_path", "--image-path"),
                                               "image folder: thumbnails on hover", required=False, positional=False)])
    p.add_argument("--overwrite", "--force", action="store_true", help="replace an existing page")
    p.add_argument("--max-points", type=int, default=200_000, help="subsample points above this count to keep the "
                   "file small")
    p.add_argument("--thumbnail-size", type=int, default=160, help="thumbnail size in pixels, 0: none")
    p.add_argument("--frustum-scale", type=float, default=None,
                   help="frustum depth in model units (default: from the camera spacing)")
    p.add_argument("--point-size", type=int, default=2, help="initial point size in pixels")
    p.add_argument("--title", default=None, help="page title (default: the model names)")
    return p


def html_path(path: Path) -> Path:
    """`path` with .html added unless it already ends in .html or .htm."""
    return path if path.suffix.lower() in (".html", ".htm") else path.with_name(path.name + ".html")


def run(args) -> int:
    from ..viewer import ViewerOptions, default_output, write_viewer
    from . import CLIError

    if args.max_points < 0:
        raise CLIError("--max-points must be >= 0")
    if args.images is not None and not args.images.is_dir():
        raise CLIError(f"--images {args.images} is not a folder")
    if args.output is not None and args.output.is_dir():
        raise CLIError(f"--output {args.output} is a folder; give a file name such as {args.output / 'viewer.html'}")
    out = html_path(args.output) if args.output is not None else default_output(args.input)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite (or --force) to replace it, or --output another file")
    options = ViewerOptions(max_points=args.max_points, thumbnail_size=args.thumbnail_size,
                            frustum_scale=args.frustum_scale, point_size=args.point_size, title=args.title)
    try:
        out = write_viewer(args.input, out, image_dir=args.images, options=options, overwrite=True)
    except (FileNotFoundError, NotImplementedError, ValueError) as e:
        raise CLIError(str(e)) from e
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); open it in a browser: file://{out.absolute()}")
    return 0
