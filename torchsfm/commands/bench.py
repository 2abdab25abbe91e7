"""`torchsfm bench`: COLMAP incremental, GLOMAP and torchsfm on the same inputs -> JSON, markdown, PNG."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import CLIError

_DEFAULTS = {  # per suite: threads, per-run cap (s), per-run cap on the scaling curve (s), total budget (s)
    "smoke": (1, 300.0, None, None),
    "cpu": (1, 900.0, 300.0, None),
    "gpu": (16, 300.0, 300.0, 420.0),
    "robustness": (1, 300.0, None, None),
    "scale": (1, 7200.0, 7200.0, None),
}


def _csv(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="benchmark torchsfm against COLMAP incremental and GLOMAP on the same databases",
        description="Each dataset's database is made once (synthetic scenes: generator + pycolmap verification; "
        "image folders: torchsfm's front end) and cached in --work-dir; every mapper then runs in its own process on "
        "a copy whose content hash is checked. Records time per stage, peak memory, model size and accuracy against "
        "the ground truth (or COLMAP incremental where there is none).",
        epilog="examples:\n"
        "  torchsfm bench --suite cpu                      # docs/bench_cpu.{json,md}, docs/scaling.png\n"
        "  torchsfm bench --suite robustness               # 10 subsets of 12-20 images per real scene: docs/bench_robustness.*\n"
        "  torchsfm bench --suite scale                    # corridor300-10000, loops5000 (hours): docs/bench_scale.*\n"
        "  torchsfm bench --datasets ring50,templeRing --methods glomap,torchsfm --json out/b.json --md out/b.md\n"
        "  torchsfm bench --datasets corridor2000 --device cuda --threads 16   # threads of every mapper\n"
        "  torchsfm bench --from-json docs/bench_cpu.json docs/bench_gpu.json --md out/both.md\n"
        "datasets: ringN, turntableN, corridorN, sphereN, loopsN (synthetic, N images; loopsN: unordered, retrieval\n"
        "  pairs, loop closures), colmapsphereN (pycolmap's synthetic scene rendered to images), templeRing,\n"
        "  dtu_scan24, kitchen, NAME-subK (seeded subset K of 12-20 images of a real scene; NAME-subK-nN: N images),\n"
        "  images:FOLDER[@GT_MODEL], database:DB[@GT_MODEL]; NAME=m1+m2 limits the methods for one dataset",
    )
    p.add_argument("--suite", choices=sorted(_DEFAULTS), help="a predefined set of datasets and settings")
    p.add_argument("--datasets", help="comma list of datasets for the main table (replaces the suite's)")
    p.add_argument("--scaling", help="comma list of datasets for the scaling curve (replaces the suite's)")
    p.add_argument("--methods", default="colmap,glomap,torchsfm", help="methods for the table datasets")
    p.add_argument("--scaling-methods", default="glomap,torchsfm", help="methods for the scaling datasets")
    p.add_argument("--seed", type=int, default=0, help="mapper seed (synthetic data always use seed 0)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method (seeds seed..seed+repeats-1); medians shown")
    p.add_argument("--device", default="cpu", help="torchsfm's device (cpu | cuda[:N]); baselines run on the CPU")
    p.add_argument("--work-dir", type=Path, default=Path("out/bench"), help="cached inputs and runs")
    p.add_argument("--data-root", type=Path, help="folder of templeRing/, dtu_scan24/, kitchen/ (default ../shared/data)")
    p.add_argument("--time-cap", type=float, help="seconds per run before it is killed (suite default; cpu: 900)")
    p.add_argument("--scaling-time-cap", type=float,
                   help="the same for datasets only on the scaling curve (cpu: 300); a method over it is not run on "
                   "larger scaling datasets")
    p.add_argument("--budget", type=float, help="seconds for the whole benchmark; later runs are skipped")
    p.add_argument("--prepare-threads", type=int, default=-1, help="threads of the (untimed) front end and verification")
    p.add_argument("--note", help="a line printed under the tables (e.g. the machine was shared)")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's copy of the database")
    p.add_argument("--mapper-config", type=Path, metavar="JSON",
                   help="torchsfm's mapper options (a file as written to OUTPUT/config.json; `torchsfm map --config`)")
    p.add_argument("--json", type=Path, help="result JSON (default docs/bench_SUITE.json, else out/bench/bench.json)")
    p.add_argument("--md", type=Path, help="markdown tables (default next to the JSON, .md)")
    p.add_argument("--plot", type=Path, help="scaling PNG (default docs/scaling.png for --suite cpu when it has points)")
    p.add_argument("--from-json", nargs="+", type=Path, metavar="JSON",
                   help="no runs: merge these results (inputs must match) and write --md / --plot / --json")
    return p


def run(args) -> int:
    import logging

    from ..bench.harness import BenchOptions, InputMismatch, SUITES, load_json, merge_results, run_benchmark, write_json
    from ..bench.inputs import DATA_ROOT
    from ..bench.plot import plot_scaling
    from ..bench.tables import to_markdown

    if args.from_json:
        try:
            results = [load_json(p) for p in args.from_json]
            # tables compare runs side by side: the inputs must match; the plot draws each
            # result as its own lines (machines differ), so it needs no merge
            merged = merge_results(results) if (args.json or args.md or not args.plot) else None
        except (OSError, ValueError) as e:  # InputMismatch is a ValueError
            raise CLIError(str(e)) from e
        if args.json:
            write_json(merged, args.json)
        if args.md:
            args.md.write_text(to_markdown(merged))
        if args.plot and plot_scaling(results, args.plot) is None:
            raise CLIError("no scaling points in the given results: no plot written")
        if merged is not None and not (args.json or args.md):
            print(to_markdown(merged))
        return 0

    suite = args.suite
    threads, cap, scap, budget = _DEFAULTS[suite] if suite else (1, 900.0, None, None)
    table, scaling = SUITES.get(suite, ([], []))
    if args.datasets is not None:
        table = _csv(args.datasets)
    if args.scaling is not None:
        scaling = _csv(args.scaling)
    if not table and not scaling:
        raise CLIError("nothing to run: give --suite, --datasets or --scaling (see --help)")
    opt = BenchOptions(
        datasets=table, scaling=scaling, methods=_csv(args.methods), scaling_methods=_csv(args.scaling_methods),
        threads=args.threads or threads, seed=args.seed, repeats=args.repeats, device=args.device,
        work_dir=str(args.work_dir), data_root=str(args.data_root or DATA_ROOT),
        time_cap=args.time_cap or cap, scaling_time_cap=args.scaling_time_cap or (None if args.time_cap else scap),
        budget=args.budget if args.budget is not None else budget,
        prepare_threads=args.prepare_threads, note=args.note or "",
        keep_runs=args.keep_runs, mapper_config=str(args.mapper_config) if args.mapper_config else None,
    )
    if args.mapper_config is not None:
        from ..config import load
        from ..mapper.pipeline import MapperOptions

        try:  # a bad file is the user's mistake: one line, before any run
            load(MapperOptions, args.mapper_config)
        except (OSError, ValueError, TypeError) as e:
            raise CLIError(f"cannot read --mapper-config {args.mapper_config}: {e}") from e
    out_json = args.json or (Path(f"docs/bench_{suite}.json") if suite in ("cpu", "gpu", "robustness", "scale")
                             else args.work_dir / "bench.json")
    out_md = args.md or out_json.with_suffix(".md")
    out_plot = args.plot or (Path("docs/scaling.png") if suite in ("cpu", "scale") else None)
    called = Path(sys.argv[0]).name in ("torchsfm", "__main__.py", "compare.py")
    command = ("torchsfm " + " ".join(shlex.quote(a) for a in sys.argv[1:])) if called else ""
    try:
        result = run_benchmark(opt, out_json, command=command, suite=suite)
    except (ValueError, InputMismatch) as e:
        raise CLIError(str(e)) from e
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(to_markdown(result))
    if out_plot is not None and plot_scaling([result], out_plot) is not None:
        logging.getLogger(__name__).info("scaling plot: %s", out_plot)
    print(f"wrote {out_json} and {out_md}" + (f" and {out_plot}" if out_plot and out_plot.exists() else ""))
    return 0
