"""`torchsfm match --database DB --mode ...`: match and verify image pairs in a COLMAP database."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "match",
        help="match SIFT features between image pairs and verify them geometrically (F/E/H)",
        description="Choose candidate pairs (exhaustive, sequential for video, or retrieval for large "
        "collections), match them with pycolmap and store matches and verified two-view geometries in DB. "
        "Pairs already verified are skipped, so an interrupted run resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  torchsfm match --database work/database.db --mode exhaustive\n"
        "  torchsfm match --database work/database.db --mode sequential --overlap 10 --loop-closure\n"
        "  torchsfm match --database work/database.db --mode retrieval --neighbors 30",
    )
    p.add_argument("--database", type=Path, required=True, metavar="DB", help="COLMAP database.db made by `torchsfm extract`")
    p.add_argument("--mode", default="exhaustive", choices=["exhaustive", "sequential", "retrieval"],
                   help="pair selection (default: exhaustive; sequential for video; retrieval for large collections)")
    p.add_argument("--overlap", type=int, default=10, help="sequential: neighbours matched on each side (default: 10)")
    p.add_argument("--no-quadratic-overlap", dest="quadratic_overlap", action="store_false",
                   help="sequential: do not add the i+2^k links")
    p.add_argument("--loop-closure", action="store_true",
                   help="sequential: the sequence is a closed loop (turntable, ring); match the end with the start")
    p.add_argument("--loop-detection", action="store_true",
                   help="sequential: every --loop-period images, add retrieval neighbours outside the overlap window")
    p.add_argument("--loop-period", type=int, default=10, help="sequential: loop-detection period (default: 10)")
    p.add_argument("--neighbors", type=int, default=20,
                   help="retrieval / loop detection: neighbours per image (default: 20)")
    p.add_argument("--num-words", type=int, default=64, help="retrieval: VLAD codebook size (default: 64)")
    p.add_argument("--min-inliers", type=int, default=15, help="verified pairs need this many inliers (default: 15)")
    p.add_argument("--max-error", type=float, default=4.0, help="RANSAC threshold in pixels (default: 4)")
    p.add_argument("--max-ratio", type=float, default=0.8, help="SIFT ratio test (default: 0.8)")
    p.add_argument("--seed", type=int, default=0, help="RANSAC seed (default: 0)")
    p.add_argument("--num-threads", type=int, default=-1, help="matcher threads (default: all cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="matching / retrieval device")
    p.add_argument("--report", type=Path, default=None,
                   help="run report JSON (default: DB with suffix .match.json next to the database)")
    return p


def run(args) -> int:
    from . import CLIError
    from ..frontend import IngestError, MatchOptions, match
    from ..frontend.colmap_db import DatabaseError

    try:
        options = MatchOptions(
            mode=args.mode, overlap=args.overlap, quadratic_overlap=args.quadratic_overlap,
            loop_closure=args.loop_closure, loop_detection=args.loop_detection, loop_period=args.loop_period,
            num_neighbors=args.neighbors, num_words=args.num_words, min_num_inliers=args.min_inliers,
            max_error=args.max_error, max_ratio=args.max_ratio, seed=args.seed, num_threads=args.num_threads,
            device=args.device, progress=not getattr(args, "quiet", False),
        )
        report = match(args.database, options)
    except (IngestError, DatabaseError, ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    path = args.report or args.database.with_suffix(".match.json")
    report.write_json(path)
    print(report.summary() + f"; report: {path}")
    return 0
