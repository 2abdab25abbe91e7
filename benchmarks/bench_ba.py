"""Bundle adjustment: torchsfm's sparse LM against Ceres (pycolmap's C++ bundle adjuster).

Problems: the BAL problems in ../shared/data/bal (skipped with a message when absent) and
BAL-format synthetic ring scenes (--synthetic C,P,k: C cameras, P points, ~k observations per
point; 1000,200000,5 gives ~1M observations). A BAL camera is a COLMAP RADIAL camera in the
z-mirrored world (torchsfm/ba/bal.py), so Ceres minimises exactly our cost; observations with the
point behind the camera are dropped up front because COLMAP zeroes them and BAL does not.

Ceres runs with the same tolerances and thread count (LM, ftol 1e-6, gtol 1e-10, ptol 1e-8, Jacobi
scaling, SPARSE_SCHUR with SuiteSparse and ITERATIVE_SCHUR with SCHUR_JACOBI). Its per-iteration
trace is read from its progress output. The target is Ceres SPARSE_SCHUR's final cost * (1 + 1e-4);
"t->target" is the time from the start of the solve (setup/preprocessing included) until a solver
first reaches it. Reported: both final costs, iterations, total time, t->target and
ratio = ours / Ceres SPARSE_SCHUR in t->target.

    python benchmarks/bench_ba.py                               # 4 BAL problems, trivial + Huber
    python benchmarks/bench_ba.py --synthetic 1000,200000,5 --no-bal --loss trivial
    python benchmarks/bench_ba.py --device cuda --threads 16    # GPU solver vs 16-thread Ceres

Writes JSON (--json) and a markdown table (--md). Timings are only meaningful on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BAL_DIR = ROOT.parent / "shared" / "data" / "bal"
BAL_PROBLEMS = ["problem-49-7776-pre", "problem-73-11032-pre", "problem-21-11315-pre", "problem-39-18060-pre"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bal", nargs="*", default=None, help="BAL problem names or paths (default: the 4 in ../shared/data/bal)")
    ap.add_argument("--no-bal", action="store_true", help="skip the BAL problems")
    ap.add_argument("--synthetic", action="append", default=[], metavar="C,P,K", help="synthetic ring problem (repeatable)")
    ap.add_argument("--loss", default="trivial,huber", help="comma list of trivial,huber,cauchy,soft_l1")
    ap.add_argument("--loss-scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="threads for Ceres and torch (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--solvers", default="auto", help="comma list of our linear solvers (auto,dense,sparse,pcg,pcg_explicit)")
    ap.add_argument("--ceres", default="SPARSE_SCHUR,ITERATIVE_SCHUR", help="comma list of Ceres linear solvers ('' = none)")
    ap.add_argument("--max-iterations", type=int, default=100)
    ap.add_argument("--time-limit", type=float, default=600.0, help="per solve, seconds")
    ap.add_argument("--warmup", action="store_true", help="solve a tiny problem first (CUDA init, lazy imports)")
    ap.add_argument("--json", type=Path, default=Path("bench_ba.json"))
    ap.add_argument("--md", type=Path, default=Path("bench_ba.md"))
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Ceres through pycolmap


_TRACE = re.compile(r"^\s*(\d+)\s+([-+0-9.eE]+)\s+[-+0-9.eE]+\s+[-+0-9.eE]+\s+[-+0-9.eE]+\s+[-+0-9.eE]+"
                    r"\s+[-+0-9.eE]+\s+\d+\s+[-+0-9.eE]+\s+([-+0-9.eE]+)\s*$")


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def run_ceres(data, solver: str, loss: str, scale: float, threads: int, max_iterations: int, time_limit: float) -> dict:
    import pycolmap

    from torchsfm.ba import bal

    rec = bal.to_pycolmap(data)
    opts = pycolmap.BundleAdjustmentOptions()
    opts.refine_principal_point = False
    opts.print_summary = False
    co = opts.ceres
    co.auto_select_solver_type = False
    co.loss_function_type = getattr(pycolmap.LossFunctionType, loss.upper())
    co.loss_function_scale = scale
    so = co.solver_options
    so.function_tolerance, so.gradient_tolerance, so.parameter_tolerance = 1e-6, 1e-10, 1e-8
    so.max_num_iterations = max_iterations
    so.max_solver_time_in_seconds = time_limit
    so.num_threads = threads
    pc = pycolmap._core.pyceres
    so.linear_solver_type = getattr(pc.LinearSolverType, solver)
    so.preconditioner_type = pc.PreconditionerType.SCHUR_JACOBI if solver == "ITERATIVE_SCHUR" else pc.PreconditionerType.JACOBI
    so.sparse_linear_algebra_library_type = pc.SparseLinearAlgebraLibraryType.SUITE_SPARSE
    so.minimizer_progress_to_stdout = True  # with PER_MINIMIZER_ITERATION: the table on fd 1
    so.logging_type = pc.LoggingType.PER_MINIMIZER_ITERATION
    co.min_num_residuals_for_cpu_multi_threading = 0  # use the threads we were given
    cfg = pycolmap.BundleAdjustmentConfig()
    for i in rec.reg_image_ids():
        cfg.add_image(i)
    adjuster = pycolmap.create_default_ceres_bundle_adjuster(opts, cfg, rec)
    # Ceres prints its per-iteration table from C++: capture file descriptor 1.
    with tempfile.TemporaryFile(mode="w+") as tmp:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            wall0 = time.perf_counter()
            summary = adjuster.solve().ceres_summary
            wall = time.perf_counter() - wall0
        finally:
            sys.stdout.flush()
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read()
    trace = [(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in map(_TRACE.match, text.splitlines()) if m]
    return {
        "solver": f"ceres {solver}", "initial_cost": summary.initial_cost, "final_cost": summary.final_cost,
        "iterations": summary.num_successful_steps + summary.num_unsuccessful_steps,
        "successful_steps": summary.num_successful_steps, "termination": str(summary.termination_type).split(".")[-1],
        "total_time_s": summary.total_time_in_seconds, "wall_s": wall,
        "linear_solver_s": summary.linear_solver_time_in_seconds,
        "preprocessor_s": summary.preprocessor_time_in_seconds,
        "trace": [{"iter": i, "cost": c, "t": t} for i, c, t in trace],
    }


# ---------------------------------------------------------------------------------------------
# ours


def run_ours(data, method: str, loss: str, scale: float, device: str, dtype: str, max_iterations: int, time_limit: float) -> dict:
    import torch

    from torchsfm.ba import bal
    from torchsfm.solver import SolverOptions, solve

    problem = bal.BALProblem(data, device=device, dtype=getattr(torch, dtype))
    opts = SolverOptions(loss=loss, loss_scale=scale, linear_solver=method, max_iterations=max_iterations,
                         max_time_s=time_limit)
    wall0 = time.perf_counter()
    s = solve(problem, opts)
    wall = time.perf_counter() - wall0
    out = {
        "solver": f"torchsfm {s.linear_solver}" + (f" ({method})" if method == "auto" else ""),
        "initial_cost": s.initial_cost, "final_cost": s.final_cost, "iterations": s.iterations,
        "successful_steps": s.successful_steps, "termination": s.termination, "total_time_s": s.total_time_s,
        "wall_s": wall, "setup_s": s.setup_time_s, "cg_iterations": s.linear_iterations,
        "cg_iterations_run": s.linear_iterations_run,
        "breakdown_s": {k: round(v, 4) for k, v in s.time_s.items()},
        "trace": [{"iter": r.iteration, "cost": r.cost, "t": s.setup_time_s + r.time_s} for r in s.trace],
    }
    if device.startswith("cuda"):
        out["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    return out


def time_to(trace: list[dict], target: float) -> float | None:
    for rec in trace:
        if rec["cost"] <= target:
            return rec["t"]
    return None


# ---------------------------------------------------------------------------------------------


def load_problems(args):
    from torchsfm.ba import bal

    problems = []
    if not args.no_bal:
        names = args.bal if args.bal else BAL_PROBLEMS
        for name in names:
            path = Path(name)
            if not path.exists():
                path = BAL_DIR / f"{name}.txt.bz2"
            if not path.exists():
                print(f"[skip] BAL problem {name}: {path} not found (../shared/data/bal is absent?)", flush=True)
                continue
            problems.append(bal.drop_behind(bal.load_bal(path)))
    for spec in args.synthetic:
        c, p, k = spec.split(",")
        t0 = time.perf_counter()
        problems.append(bal.synthetic_bal(int(c), int(p), float(k)))
        print(f"synthetic {spec}: {problems[-1].num_observations} observations, generated in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return problems


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# BA benchmark: torchsfm vs Ceres ({meta['date']})",
        "",
        f"device {meta['device']}, {meta['threads']} thread(s) for Ceres and torch, torch {meta['torch']}, "
        f"pycolmap {meta['pycolmap']} (Ceres {meta['ceres']}), {meta['cpu']}. Target = Ceres SPARSE_SCHUR final "
        "cost x (1 + 1e-4); t->target includes setup/preprocessing; ratio = ours / Ceres SPARSE_SCHUR t->target.",
        "",
        "| problem | obs | loss | solver | final cost | rel. to Ceres SS | iters | total s | t->target s | ratio |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tt = "-" if r.get("t_target") is None else f"{r['t_target']:.2f}"
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['problem']} | {r['observations']} | {r['loss']} | {r['solver']} | {r['final_cost']:.6e} | "
            f"{r['rel_to_ceres']:+.2e} | {r['iterations']} | {r['total_time_s']:.2f} | {tt} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import platform

    import pycolmap
    import torch

    from torchsfm.runtime import tune_cpu_allocator

    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    losses = [x for x in args.loss.split(",") if x]
    ceres_solvers = [x for x in args.ceres.split(",") if x]
    our_solvers = [x for x in args.solvers.split(",") if x]
    problems = load_problems(args)
    if not problems:
        print("nothing to run", flush=True)
        return 1
    if args.warmup:
        from torchsfm.ba import bal

        tiny = bal.synthetic_bal(8, 300, 3, seed=1)
        for m in our_solvers:
            run_ours(tiny, m, "trivial", 1.0, args.device, args.dtype, 3, 60)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "threads": args.threads,
        "torch": torch.__version__, "pycolmap": pycolmap.__version__, "ceres": getattr(pycolmap, "__ceres_version__", "?"),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    rows = []
    for data in problems:
        for loss in losses:
            results = []
            for cs in ceres_solvers:
                print(f"{data.name} {loss}: ceres {cs} ...", flush=True)
                results.append(run_ceres(data, cs, loss, args.loss_scale, args.threads, args.max_iterations, args.time_limit))
            for m in our_solvers:
                print(f"{data.name} {loss}: torchsfm {m} ...", flush=True)
                results.append(run_ours(data, m, loss, args.loss_scale, args.device, args.dtype, args.max_iterations,
                                        args.time_limit))
            ref = next((r for r in results if r["solver"] == "ceres SPARSE_SCHUR"), None)
            ref_cost = ref["final_cost"] if ref else min(r["final_cost"] for r in results)
            target = ref_cost * (1 + 1e-4)
            ref_t = time_to(ref["trace"], target) if ref else None
            for r in results:
                r.update(problem=data.name, observations=data.num_observations, cameras=data.num_cameras,
                         points=data.num_points, loss=loss, target_cost=target, t_target=time_to(r["trace"], target),
                         rel_to_ceres=(r["final_cost"] - ref_cost) / ref_cost)
                r["ratio"] = (r["t_target"] / ref_t) if (r["t_target"] is not None and ref_t) else None
                short = {k: v for k, v in r.items() if k not in ("trace",)}
                print("  " + json.dumps({k: (round(v, 4) if isinstance(v, float) and k != "final_cost" else v)
                                         for k, v in short.items() if k in (
                                             "solver", "final_cost", "rel_to_ceres", "iterations", "total_time_s",
                                             "t_target", "ratio", "termination")}), flush=True)
                rows.append(r)
            # rewritten after every problem and loss: a run cut off by a time limit keeps what it measured
            args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    md = markdown(rows, meta)
    args.md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
