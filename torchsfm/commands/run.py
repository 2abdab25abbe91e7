"""`torchsfm run IMAGES OUTPUT`: front end and mapper in one go, with automatic choices."""
from __future__ import annotations

import argparse
import dataclasses

from ..frontend.options import MATCH_MODES, ExtractOptions, FallbackOptions, MatchOptions, RefineOptions
from . import CLIError
from .arguments import IMAGES, OUTPUT, add_paths
from .frontend_stages import (EXECUTOR_FIELDS, EXTRACT_EXCLUDE, EXTRACT_FLAGS, FALLBACK_FLAGS, MATCH_EXCLUDE,
                              MATCH_FLAGS, REFINE_EXCLUDE, REFINE_FLAGS)
from .map import add_mapper_arguments, mapper_options
from .options import add_options, choice

WORKSPACE = dataclasses.replace(OUTPUT, flags=OUTPUT.flags + ("--workspace_path",),
                                help="output folder: database.db, sparse/K, report.json, config.json, torchsfm.log")


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run", help="images -> features -> matches -> global mapping -> COLMAP model, in one command",
        description="Extracts SIFT features, matches pairs (exhaustive up to --exhaustive-max images, retrieval "
        "beyond), verifies them, and runs the global mapper (like colmap automatic_reconstructor). OUTPUT gets "
        "database.db, sparse/K, report.json, config.json and torchsfm.log. Rerunning resumes: images and pairs "
        "already in the database are skipped. Every option of `extract`, `match` and `map` is accepted; the "
        "front end's devices are --extract-device and --match-device, --seed seeds every stage.",
        epilog="examples:\n  torchsfm run ../shared/data/templeRing/images out/temple\n"
        "  torchsfm run --image_path photos/ --workspace_path out/ --camera-mode single --max-features 4096\n"
        "  torchsfm run photos/ out/ --image-list subset.txt --mask-path masks/ --refine-principal-point never",
    )
    add_paths(p, [IMAGES, WORKSPACE])
    add_options(p.add_argument_group("extraction (ExtractOptions)"), "extract", ExtractOptions(), EXTRACT_FLAGS,
                exclude=EXTRACT_EXCLUDE, rename={"device": "--extract-device"})
    g = p.add_argument_group("matching and verification (MatchOptions)")
    g.add_argument("--match-mode", default="auto", type=choice(("auto",) + MATCH_MODES),
                   metavar="{" + ",".join(("auto",) + MATCH_MODES) + "}",
                   help="pair selection; auto: exhaustive up to --exhaustive-max images, retrieval beyond")
    g.add_argument("--exhaustive-max", type=int, default=300, help="auto: exhaustive matching up to this many images")
    # one --executor / --ray-* for both stages: the extraction group's flags, copied to matching
    add_options(g, "match", MatchOptions(), MATCH_FLAGS, exclude=MATCH_EXCLUDE + ("mode", "seed") + EXECUTOR_FIELDS,
                rename={"device": "--match-device"})
    add_options(p.add_argument_group("learned features where SIFT is weak (FallbackOptions)"), "fallback",
                FallbackOptions(), FALLBACK_FLAGS, auto=False)
    add_options(p.add_argument_group("sub-pixel keypoint refinement (RefineOptions)"), "refine", RefineOptions(),
                REFINE_FLAGS, exclude=REFINE_EXCLUDE, auto=False)
    add_mapper_arguments(p)
    return p


def run(args) -> int:
    from ..api import map_database, write_failure_report
    from ..report import RunReport, format_summary, log_to_file
    from .arguments import writable_folder
    from .frontend_stages import extract_stage, fallback_stage, frontend_options, match_stage, refine_stage
    from .options import options_from_args

    if not args.images.is_dir():
        raise CLIError(f"image folder {args.images} does not exist")
    opt = mapper_options(args)  # option and --device errors before the front end runs
    # the mapper needs min_component_size images: fewer is an error of the front end, naming it
    ex_opt, ma_opt = frontend_options(args, extract=ExtractOptions(), match=MatchOptions(),
                                      fixed_extract={"min_images": max(2, opt.min_component_size)},
                                      fixed_match={"seed": opt.seed})
    fb_opt = options_from_args(args, "fallback", FallbackOptions())
    rf_opt = options_from_args(args, "refine", RefineOptions())
    if fb_opt.features != "none" and ex_opt.features != "sift":
        raise CLIError(f"--fallback-features adds learned features to SIFT's; this run extracts {ex_opt.features} "
                       "(drop --fallback-features or --features)")
    if fb_opt.features != "none":  # before SIFT's work, not after it
        from ..frontend import IngestError
        from ..frontend.learned import check_installed

        try:
            check_installed(fb_opt.features, f"--fallback-features {fb_opt.features}")
        except IngestError as e:
            raise CLIError(str(e)) from e
    try:
        ma_opt = dataclasses.replace(ma_opt, executor=ex_opt.executor)
        rf_opt = dataclasses.replace(rf_opt, min_num_inliers=ma_opt.min_num_inliers, device=ma_opt.device)
    except ValueError as e:
        raise CLIError(str(e)) from e
    writable_folder(args.output)
    db = args.output / "database.db"
    report = RunReport(command="run")
    with log_to_file(args.output / "torchsfm.log"):  # front end too; map_database reuses it
        try:
            ex = extract_stage(report, args.images, db, ex_opt)
            mode = args.match_mode
            if mode == "auto":
                mode = "exhaustive" if ex.num_images <= args.exhaustive_max else "retrieval"
            ma_opt = dataclasses.replace(ma_opt, mode=mode)
            match_stage(report, db, ma_opt)
            if fb_opt.features != "none":
                fallback_stage(report, args.images, db, fb_opt, ex_opt, ma_opt)
            if rf_opt.enabled:  # after the fallback: its learned keypoints are refined too
                refine_stage(report, args.images, db, rf_opt)
        except CLIError as e:
            write_failure_report(args.output, report, opt, e)
            raise
        finally:
            if ex_opt.executor.kind == "ray":  # the mapper runs here: Ray's idle workers would hold memory
                from ..frontend.ray_executor import disconnect

                disconnect()
        try:
            _, report = map_database(db, args.output, opt, args.images, args.output_format, report)
        except (ValueError, RuntimeError) as e:
            raise CLIError(str(e)) from e
    print(format_summary(report))
    return 0
