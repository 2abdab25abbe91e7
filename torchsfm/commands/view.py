"""`torchsfm view MODEL [MODEL ...]`: a self-contained HTML page showing cameras and points."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "view",
        help="write an interactive offline HTML viewer of sparse models",
        description="Write one self-contained HTML file (inline JavaScript, no network) showing camera frusta "
        "coloured by component (one model folder = one component) and the 3D points in their colours; "
        "hovering a camera shows its image name (and a thumbnail with --images). Open it in any browser.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  torchsfm view scene/sparse/0                 # writes scene/sparse/0/viewer.html\n"
        "  torchsfm view scene/sparse                   # all models in sparse/, one colour each\n"
        "  torchsfm view scene/sparse/0 scene/sparse/1 --images scene/images --output scene/view.html",
    )
    p.add_argument("models", type=Path, nargs="+", metavar="MODEL",
                   help="COLMAP model folder(s), or a folder of models such as sparse/")
    p.add_argument("--output", "-o", type=Path, default=None, metavar="FILE.html",
                   help="default: MODEL/viewer.html (several models: viewer.html in their common parent)")
    p.add_argument("--images", type=Path, default=None, metavar="DIR", help="image folder: thumbnails on hover")
    p.add_argument("--max-points", type=int, default=200_000,
                   help="subsample points above this count to keep the file small (default: 200000)")
    p.add_argument("--thumbnail-size", type=int, default=160, help="thumbnail size in pixels, 0: none (default: 160)")
    p.add_argument("--frustum-scale", type=float, default=None,
                   help="frustum depth in model units (default: from the camera spacing)")
    p.add_argument("--point-size", type=int, default=2, help="initial point size in pixels (default: 2)")
    p.add_argument("--title", default=None, help="page title (default: the model names)")
    return p


def run(args) -> int:
    from . import CLIError
    from ..viewer import ViewerOptions, write_viewer

    if args.max_points < 0:
        raise CLIError("--max-points must be >= 0")
    if args.images is not None and not args.images.is_dir():
        raise CLIError(f"--images {args.images} is not a folder")
    if args.output is not None and args.output.is_dir():
        raise CLIError(f"--output {args.output} is a folder; give a file name such as {args.output / 'viewer.html'}")
    options = ViewerOptions(max_points=args.max_points, thumbnail_size=args.thumbnail_size,
                            frustum_scale=args.frustum_scale, point_size=args.point_size, title=args.title)
    try:
        out = write_viewer(args.models, args.output, image_dir=args.images, options=options)
    except (FileNotFoundError, NotImplementedError, ValueError) as e:
        raise CLIError(str(e)) from e
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); open it in a browser: file://{out.absolute()}")
    return 0
