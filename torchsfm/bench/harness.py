"""The benchmark harness: every mapper on the same database, each in a fresh process.

For each dataset the input database is made once (inputs.prepare) and its content hash taken.
Each method then runs in its own process (child.py) on a private copy of that database; the
process checks the copy's hash before mapping and records it, and the harness refuses to put
runs with different hashes side by side (check_comparable), also when results of several
machines are merged (merge_results). The parent reads each model back and measures all
methods the same way: registered images, points, mean track length, mean reprojection error
(our projection, over all observations), and against the ground truth (or, without one, against
COLMAP's incremental model) AUC@1/3/5/10 and median relative rotation/translation errors.

Peak memory: the child's VmHWM over the mapping call (reset when it starts; the interpreter and
libraries already loaded are included) and over its start-up; GPU: torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .child import METHODS
from .inputs import DATA_ROOT, REAL_DATASETS, PreparedInput, prepare, resolve_spec
from .machine import git_revision, machine_info, machine_label, now_iso

log = logging.getLogger(__name__)

CHILD = Path(__file__).resolve().parent / "child.py"
SCHEMA = 1
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCHSFM_THREADS")
METHOD_LABELS = {"colmap": "COLMAP incremental", "glomap": "GLOMAP (COLMAP global)", "torchsfm": "torchsfm"}
ACCURACY_KEYS = ("auc@1", "auc@3", "auc@5", "auc@10", "median_rotation_error_deg", "median_translation_error_deg",
                 "num_images", "num_registered", "abs_median_position_error")

# Suites: (table datasets, scaling datasets); an entry "name=m1+m2" limits the methods there.
SUITES = {
    "smoke": (["ring12", "dtu_scan24-sub0-n8"], []),  # the subset: the robustness benchmark in small
    "cpu": (["ring50", "turntable200", "colmapsphere50", "templeRing", "dtu_scan24", "kitchen"],
            ["corridor100", "corridor300", "corridor1000"]),
    "gpu": (["ring50", "turntable200", "corridor1000=glomap+torchsfm"],
            ["corridor100", "corridor1000", "corridor3000", "corridor5000"]),
    # 10 seeded subsets of 12-20 images of each real scene (bench/subsets.py, bench/robustness.py),
    # and the full scenes (no loss there)
    "robustness": ([f"{name}-sub{k}" for name in REAL_DATASETS for k in range(10)] + list(REAL_DATASETS), []),
    # issue 19: the large scenes (hours on 2 cores): the corridor from 300 to 10,000 images and
    # the unordered 5,000-image loop scene, GLOMAP against torchsfm
    "scale": (["loops5000=glomap+torchsfm"], ["corridor300", "corridor1000", "corridor3000", "corridor10000"]),
}


class InputMismatch(ValueError):
    """Runs on different inputs were about to be compared."""


@dataclass
class BenchOptions:
    datasets: list[str] = field(default_factory=list)  # NAME or NAME=m1+m2
    scaling: list[str] = field(default_factory=list)  # datasets of the scaling curve
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    scaling_methods: list[str] = field(default_factory=lambda: ["glomap", "torchsfm"])
    threads: int = 1  # every mapper gets the same number of threads
    seed: int = 0  # mapper seed (the synthetic data seed is fixed: 0)
    repeats: int = 1  # runs per method, seeds seed, seed+1, ...
    device: str = "cpu"  # torchsfm's device; the pycolmap baselines run on the CPU
    work_dir: str = "out/bench"
    data_root: str = str(DATA_ROOT)
    time_cap: float = 900.0  # seconds per run; a run over it is killed and recorded as timeout
    scaling_time_cap: float | None = None  # the same for datasets only on the scaling curve (default time_cap)
    budget: float | None = None  # seconds in all; runs not started within it are recorded as skipped
    prepare_threads: int = -1  # front end / verification threads (not timed); -1 = all cores
    note: str = ""  # printed under the tables (e.g. "shared 2-core box")
    keep_runs: bool = False  # keep each run's database copy and model (default: model only)
    mapper_config: str | None = None  # torchsfm's options as a JSON file (`torchsfm map --config`); None: defaults


# ---------------------------------------------------------------------------------------------
# running one method


def _wait(proc: subprocess.Popen, cap: float) -> tuple[int, float, bool]:
    """Wait for the child with a time cap; returns (exit code, wall seconds, timed out)."""
    t0 = time.perf_counter()
    timed_out = False
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > cap:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status = os.waitpid(proc.pid, 0)
            break
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # already reaped: keep Popen from waiting again
    return code, time.perf_counter() - t0, timed_out


_GLOMAP_STAGE = re.compile(r"\] (Rotation averaging|Track establishment|Global positioning|Iterative bundle adjustment|"
                           r"Iterative retriangulation and refinement) done in ([0-9.eE+-]+) seconds")


def stages_from_log(text: str) -> dict[str, float]:
    """GLOMAP's per-stage seconds from its log (summed over components)."""
    out: dict[str, float] = {}
    for name, sec in _GLOMAP_STAGE.findall(text):
        out[name] = out.get(name, 0.0) + float(sec)
    return out


STAGE_GROUPS = ("relative_poses", "rotation_averaging", "tracks", "global_positioning", "bundle_adjustment",
                "retriangulation", "other")
_GLOMAP_GROUP = {"Rotation averaging": "rotation_averaging", "Track establishment": "tracks",
                 "Global positioning": "global_positioning", "Iterative bundle adjustment": "bundle_adjustment",
                 "Iterative retriangulation and refinement": "retriangulation"}


_AFTER_RETRIANGULATION = ("retriangulation", "final_", "image_keeping", "intrinsics_selection", "noise_filter")


def stage_group(method: str, name: str) -> str | None:
    """The common group of one of a method's stages (None: 'other')."""
    if method == "glomap":
        return _GLOMAP_GROUP.get(name)
    base = name.split("/")[-1]
    if base.startswith(_AFTER_RETRIANGULATION):  # the steps from retriangulation on
        return "retriangulation"
    if "bundle_adjustment" in base or "filter" in base:  # BA rounds and their filtering
        return "bundle_adjustment"
    return base if base in STAGE_GROUPS else None


def stage_groups(method: str, stages: dict[str, float], total: float) -> dict[str, float]:
    """Per-stage seconds in common groups; 'other' is the rest of the total (loading, writing,
    calibration, component handling). COLMAP incremental interleaves its stages: total only."""
    g = {k: 0.0 for k in STAGE_GROUPS}
    if method == "colmap" or not stages:
        return {"other": total}
    for name, sec in stages.items():
        key = stage_group(method, name)
        if key is not None:
            g[key] += sec
    g["other"] = max(0.0, total - sum(v for k, v in g.items() if k != "other"))
    return g


def stage_group_peaks(method: str, stage_memory: dict[str, dict], key: str = "peak_rss_mb") -> dict[str, float]:
    """The largest per-stage peak (MB; `key`: peak_rss_mb or cuda_peak_mb) in each common group
    ('other': loading, calibration, writing, ...); empty where the run recorded no per-stage
    memory (the pycolmap baselines)."""
    g: dict[str, float] = {}
    for name, mem in (stage_memory or {}).items():
        if mem.get(key) is None:
            continue
        grp = stage_group(method, name) or "other"
        g[grp] = max(g.get(grp, 0.0), mem[key])
    return g


def run_method(method: str, prep: PreparedInput, run_dir: Path, opt: BenchOptions, seed: int,
               cap: float | None = None) -> dict:
    """One mapper on a private copy of the dataset's database, in a fresh process, killed after
    `cap` seconds (default opt.time_cap)."""
    cap = opt.time_cap if cap is None else cap
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    db = run_dir / "database.db"
    shutil.copyfile(prep.database, db)
    cmd = [sys.executable, str(CHILD), "--method", method, "--database", str(db), "--expected-hash", prep.input_hash,
           "--out", str(run_dir), "--threads", str(opt.threads), "--seed", str(seed), "--device", opt.device]
    if prep.image_dir is not None:
        cmd += ["--images", str(prep.image_dir)]
    if method == "torchsfm" and opt.mapper_config:
        cmd += ["--config", str(Path(opt.mapper_config).resolve())]
    env = {**os.environ, **{k: str(opt.threads) for k in THREAD_ENV}, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[2])  # torchsfm importable without an install
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    log_path = run_dir / "log.txt"
    log.info("%s / %s: running (cap %.0f s)", prep.spec.name, method, cap)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        code, wall, timed_out = _wait(proc, cap)
    res_path = run_dir / "result.json"
    text = log_path.read_text(errors="replace")
    if res_path.is_file() and not timed_out:
        res = json.loads(res_path.read_text())
    else:
        res = {"method": method, "seed": seed, "threads": opt.threads, "device": opt.device}
        res["status"] = "timeout" if timed_out else "crashed"
        res["error"] = (f"killed after the {cap:.0f} s cap" if timed_out
                        else f"exit code {code}: " + " | ".join(text.strip().splitlines()[-5:])[-800:])
    if code != 0 and res.get("status") == "ok":
        res["status"], res["error"] = "crashed", f"exit code {code} after writing its result"
    # (wait4's ru_maxrss is not recorded: Linux carries the parent's peak over a fork into it)
    res.update(exit_code=code, process_seconds=wall, cap_seconds=cap, log=str(log_path), run_dir=str(run_dir),
               expected_hash=prep.input_hash)
    if method == "glomap" and res.get("status") == "ok":
        res["stages"] = stages_from_log(text)
    if "seconds" in res:
        res["stage_groups"] = stage_groups(method, res.get("stages", {}), res["seconds"])
    if not opt.keep_runs and db.exists():
        db.unlink()
    log.info("%s / %s: %s%s", prep.spec.name, method, res["status"],
             f" in {res['seconds']:.1f} s" if "seconds" in res else f" ({res.get('error', '')})")
    return res


# ---------------------------------------------------------------------------------------------
# measuring a model


def _read(path: Path):
    from ..io.colmap_model import read_model

    return read_model(path, device="cpu")


def model_stats(model) -> dict:
    """Size and fit of a model, computed the same way for every method."""
    import torch

    from ..metrics import reprojection_errors

    n_pts = len(model.points3D)
    err = reprojection_errors(model) if n_pts else torch.zeros(0, dtype=torch.float64)
    err = err[~torch.isnan(err)]
    return {"images": len(model.images), "registered": int(model.images.registered.sum()), "points": n_pts,
            "observations": len(model.tracks), "mean_track_length": len(model.tracks) / n_pts if n_pts else math.nan,
            "mean_reprojection_error_px": float(err.mean()) if err.numel() else math.nan}


def evaluate_run(res: dict, reference, reference_kind: str | None) -> None:
    """Adds `model_stats` and `accuracy` (against the reference model) to a run record."""
    if res.get("status") != "ok":
        return
    from .. import metrics

    try:
        model = _read(Path(res["run_dir"]) / res["model"])
    except Exception as e:  # noqa: BLE001 - a model we cannot read is that run's failure
        res["status"], res["error"] = "failed", f"cannot read the model: {e}"
        return
    res["model_stats"] = model_stats(model)
    if reference is not None:
        try:
            ev = metrics.evaluate(model, reference)
        except Exception as e:  # noqa: BLE001 - recorded; the run's other measurements stand
            res["accuracy_error"] = f"{type(e).__name__}: {e}"
            return
        res["accuracy"] = {k: ev.get(k) for k in ACCURACY_KEYS}
        res["accuracy"]["reference"] = reference_kind


# ---------------------------------------------------------------------------------------------
# the benchmark


def parse_entry(entry: str, default_methods: list[str]) -> tuple[str, list[str]]:
    name, _, methods = entry.partition("=")
    ms = [m for m in methods.split("+") if m] if methods else list(default_methods)
    bad = [m for m in ms if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad} in {entry!r}; choose from {METHODS}")
    return name, ms


def plan(opt: BenchOptions) -> list[dict]:
    """Datasets in run order (table first, then the scaling curve), each once, with its groups
    and methods."""
    items: dict[str, dict] = {}
    for group, entries, defaults in (("table", opt.datasets, opt.methods), ("scaling", opt.scaling, opt.scaling_methods)):
        for e in entries:
            name, ms = parse_entry(e, defaults)
            it = items.setdefault(name, {"name": name, "groups": [], "methods": []})
            it["groups"].append(group)
            it["methods"] += [m for m in ms if m not in it["methods"]]
    for it in items.values():  # COLMAP first: it is the reference of datasets without GT
        it["methods"].sort(key=METHODS.index)
    return list(items.values())


def run_benchmark(opt: BenchOptions, output_json: Path | None = None, command: str = "",
                  suite: str | None = None) -> dict:
    """Run every planned dataset and method; writes `output_json` after each dataset."""
    t_start = time.perf_counter()
    work = Path(opt.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    from ..report import versions

    result = {"schema": SCHEMA, "created": now_iso(), "command": command, "suite": suite, "options": asdict(opt),
              "machine": machine, "machine_label": machine_label(machine), "versions": versions(),
              "git": git_revision(), "datasets": []}
    scaling_failed: dict[str, int] = {}  # method -> smallest scaling size at which it went over the cap

    def over_budget() -> bool:
        return opt.budget is not None and time.perf_counter() - t_start > opt.budget

    def run_cap(groups: list[str]) -> float:  # near the end of the budget a run gets what is left (>= 30 s)
        cap = opt.scaling_time_cap if groups == ["scaling"] and opt.scaling_time_cap else opt.time_cap
        if opt.budget is None:
            return cap
        return min(cap, max(30.0, opt.budget - (time.perf_counter() - t_start)))

    for item in plan(opt):
        entry = {"name": item["name"], "groups": item["groups"], "runs": []}
        result["datasets"].append(entry)
        if over_budget():
            entry["skipped"] = "over the benchmark's time budget"
            continue
        try:
            spec = resolve_spec(item["name"], Path(opt.data_root))
            prep = prepare(spec, work, opt.prepare_threads)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            log.warning("%s: skipped: %s", item["name"], e)
            entry["skipped"] = str(e)
            continue
        entry.update(prep.to_dict())
        gt = _read(prep.gt) if prep.gt is not None else None
        reference, ref_kind = gt, (prep.stats.get("reference", "ground truth") if gt is not None else None)
        n = prep.stats["images"]
        for method in item["methods"]:
            for r in range(opt.repeats):
                seed = opt.seed + r
                tag = method if opt.repeats == 1 else f"{method}-r{r}"
                skip = None
                if over_budget():
                    skip = "over the benchmark's time budget"
                elif "scaling" in item["groups"] and method in scaling_failed and n > scaling_failed[method]:
                    skip = f"went over its time cap at {scaling_failed[method]} images"
                if skip:
                    entry["runs"].append({"method": method, "seed": seed, "status": "skipped", "error": skip,
                                          "device": opt.device if method == "torchsfm" else "cpu"})
                    continue
                res = run_method(method, prep, work / item["name"] / "runs" / tag, opt, seed, run_cap(item["groups"]))
                res["machine"] = result["machine_label"]
                if res["status"] == "timeout" and "scaling" in item["groups"]:
                    scaling_failed[method] = min(scaling_failed.get(method, n), n)
                evaluate_run(res, reference, ref_kind)
                if gt is None and method == "colmap" and r == 0 and res["status"] == "ok":
                    # no GT: the others are measured by their agreement with COLMAP incremental
                    reference, ref_kind = _read(Path(res["run_dir"]) / res["model"]), "COLMAP incremental"
                entry["runs"].append(res)
        check_comparable(result)
        if output_json is not None:
            write_json(result, output_json)
    result["elapsed_seconds"] = time.perf_counter() - t_start
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    check_comparable(result)
    if output_json is not None:
        write_json(result, output_json)
    return result


# ---------------------------------------------------------------------------------------------
# comparing results


def check_comparable(result: dict) -> None:
    """Every run of a dataset must have read a database with the dataset's content hash."""
    for ds in result["datasets"]:
        h = ds.get("input_hash")
        for run in ds.get("runs", []):
            if run.get("status") in ("skipped", "refused"):  # no results to compare
                continue
            rh = run.get("input_hash") or run.get("expected_hash")
            if h is None or rh != h:
                raise InputMismatch(
                    f"dataset {ds['name']}: the {run.get('method')} run read input {str(rh)[:12]}, the dataset is "
                    f"{str(h)[:12]}: runs on different inputs are not compared")


def merge_results(results: list[dict]) -> dict:
    """Several benchmark results (e.g. the CPU and the GPU machine) as one, dataset by dataset;
    InputMismatch when one dataset name has different input hashes in them."""
    if not results:
        raise ValueError("nothing to merge")
    for r in results:
        check_comparable(r)
    out = json.loads(json.dumps(results[0]))
    out["sources"] = [{"created": r["created"], "machine": r.get("machine_label"), "command": r.get("command")}
                      for r in results]
    by_name = {ds["name"]: ds for ds in out["datasets"]}
    for r in results[1:]:
        for ds in r["datasets"]:
            mine = by_name.get(ds["name"])
            if mine is None:
                out["datasets"].append(json.loads(json.dumps(ds)))
                by_name[ds["name"]] = out["datasets"][-1]
                continue
            if ds.get("input_hash") and mine.get("input_hash") and ds["input_hash"] != mine["input_hash"]:
                raise InputMismatch(f"dataset {ds['name']} has input {ds['input_hash'][:12]} in one result and "
                                    f"{mine['input_hash'][:12]} in another: refusing to compare them")
            if not mine.get("input_hash"):
                mine.update({k: v for k, v in ds.items() if k != "runs"})
            mine["groups"] = sorted(set(mine.get("groups", [])) | set(ds.get("groups", [])))
            mine["runs"] = mine.get("runs", []) + json.loads(json.dumps(ds.get("runs", [])))
    check_comparable(out)
    return out


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(result), indent=1, default=_json_default))
    os.replace(tmp, path)


def _finite(o):
    """JSON has no NaN/Infinity: they become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def load_json(path: Path) -> dict:
    result = json.loads(Path(path).read_text())
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: benchmark schema {result.get('schema')}, expected {SCHEMA}")
    return result
