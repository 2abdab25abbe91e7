"""`torchsfm extract IMAGES --database DB`: image folder -> COLMAP database with SIFT features."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data.camera_models import MODELS


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract",
        help="scan an image folder and extract SIFT features into a COLMAP database.db",
        description="Scan IMAGES recursively, skip what is not a usable image (listed in the report), group "
        "images into cameras, and store cameras, images and SIFT features in DB. Rerunning resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  torchsfm extract photos/ --database work/database.db --camera-mode single\n"
        "  torchsfm match --database work/database.db --mode exhaustive",
    )
    p.add_argument("images", type=Path, metavar="IMAGES", help="image folder (searched recursively)")
    p.add_argument("--database", type=Path, required=True, metavar="DB", help="COLMAP database.db to create or resume")
    p.add_argument("--camera-mode", default="auto", choices=["auto", "single", "per-folder", "per-image"],
                   help="which images share intrinsics (default: auto = same EXIF make/model/focal and size)")
    p.add_argument("--camera-model", default="SIMPLE_RADIAL", type=str.upper, choices=list(MODELS),
                   help="camera model (default: SIMPLE_RADIAL)")
    p.add_argument("--max-image-size", type=int, default=3200, help="SIFT runs on images downscaled to this size (default: 3200)")
    p.add_argument("--max-features", type=int, default=8192, help="most SIFT features per image (default: 8192)")
    p.add_argument("--focal-factor", type=float, default=1.2,
                   help="focal length without EXIF = factor * max(width, height) (default: 1.2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="SIFT device; auto uses CUDA only when the installed pycolmap has it")
    p.add_argument("--workers", type=int, default=0, help="extraction processes (default: one per core, at most 8)")
    p.add_argument("--report", type=Path, default=None,
                   help="run report JSON (default: DB with suffix .extract.json next to the database)")
    return p


def run(args) -> int:
    from . import CLIError
    from ..frontend import ExtractOptions, IngestError, extract
    from ..frontend.colmap_db import DatabaseError

    try:
        options = ExtractOptions(
            camera_mode=args.camera_mode, camera_model=args.camera_model, max_image_size=args.max_image_size,
            max_num_features=args.max_features, default_focal_length_factor=args.focal_factor, device=args.device,
            num_workers=args.workers, progress=not getattr(args, "quiet", False),
        )
        report = extract(args.images, args.database, options)
    except (IngestError, DatabaseError, ValueError) as e:
        partial = getattr(e, "report", None)
        if partial is not None and args.report is not None:
            partial.write_json(args.report)
        raise CLIError(str(e)) from e
    path = args.report or args.database.with_suffix(".extract.json")
    report.write_json(path)
    print(report.summary() + f"; report: {path}")
    return 0
