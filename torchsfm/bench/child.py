"""One mapper run in a fresh process: `python torchsfm/bench/child.py --method M --database DB --out DIR ...`.

Run by file path (not `-m`), so that the package `__init__` (which imports PyTorch) is not loaded:
a pycolmap baseline process then holds pycolmap and the standard library only, and its memory
is its own. Only the stdlib is imported at module level; each method imports what it needs.

Before mapping, the database's content hash is computed and must equal `--expected-hash` (the
harness never compares runs on different inputs). The peak resident set is reset just before
the mapper starts and read just after (torchsfm/runtime/peak_memory.py), so the recorded peak is the
mapper's, on top of what the interpreter and libraries already hold (`rss_start_mb`); torchsfm's
runs also record each stage's peak (`stage_memory`).

Writes DIR/result.json: status, seconds, per-stage seconds, peak memory, the model's folder,
versions, seed, threads and the options used. A crash leaves no result.json; the harness then
records the exit code and the log's tail.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sqlite3
import sys
import time
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # run by path: keep this folder's modules from shadowing top-level ones

METHODS = ("colmap", "glomap", "torchsfm")
SCHEMA = 1


# ---------------------------------------------------------------------------------------------
# Input identity


def _encode(v) -> bytes:
    if v is None:
        return b"N"
    if isinstance(v, bytes):
        return b"B%d:" % len(v) + v
    if isinstance(v, (int, float)):
        return b"V" + repr(v).encode() + b";"
    s = str(v).encode()
    return b"S%d:" % len(s) + s


def database_hash(path: str | os.PathLike) -> str:
    """sha256 of a SQLite database's content: every table's name, columns and rows (by rowid).

    Unlike a hash of the file's bytes, it does not change with SQLite's page layout, free pages
    or journal mode, only with what a mapper can read."""
    h = hashlib.sha256()
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    con = sqlite3.connect(uri, uri=True)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        for t in tables:
            cur = con.execute(f'SELECT * FROM "{t}" ORDER BY rowid')
            h.update(b"T" + t.encode() + b"|" + ",".join(d[0] for d in cur.description).encode() + b"\n")
            for row in cur:
                h.update(b"R" + b"".join(_encode(v) for v in row))
    finally:
        con.close()
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Memory: torchsfm/runtime/peak_memory.py, loaded by path (it imports only the standard library)


def _load_peak_memory():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "runtime" / "peak_memory.py"
    spec = importlib.util.spec_from_file_location("_torchsfm_peak_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


peak_memory = _load_peak_memory()


def startup_peak(result: dict) -> None:
    """Peak and current RSS before the mapper starts (imports, CUDA context)."""
    kb = peak_memory._hwm_kb()
    result["startup_peak_rss_mb"] = None if kb is None else kb / 1024.0
    result["rss_start_mb"] = peak_memory.rss_mb()


# ---------------------------------------------------------------------------------------------
# Methods: each returns (model folder or None, stage seconds dict, options dict, extra dict)


def _pycolmap_best(recs: dict, out: Path):
    """Write the model with the most registered images to out/model; pycolmap's own output
    folders keep all of them."""
    if not recs:
        return None, 0
    best = max(recs.values(), key=lambda r: r.num_reg_images())
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    best.write_binary(str(model))
    return model, len(recs)


def _options_dict(o) -> dict:
    try:
        return json.loads(json.dumps(o.todict(), default=str))
    except Exception:  # noqa: BLE001 - options are recorded for reference only
        return {"summary": str(o)}


def _timed_pycolmap(mapping, args, out: Path, image_dir: Path, o):
    """(models, seconds of the mapping call, options) of a pycolmap mapper on the run's database."""
    work = out / "pycolmap"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recs = mapping(str(args.database), str(image_dir), str(work), o)
    return recs, time.perf_counter() - t0, _options_dict(o)


def run_colmap(args, out: Path, image_dir: Path):
    import pycolmap

    o = pycolmap.IncrementalPipelineOptions()
    o.num_threads = args.threads
    o.random_seed = args.seed
    o.extract_colors = args.images is not None
    return _timed_pycolmap(pycolmap.incremental_mapping, args, out, image_dir, o)


def run_glomap(args, out: Path, image_dir: Path):
    import pycolmap

    o = pycolmap.GlobalPipelineOptions()
    o.num_threads = args.threads
    o.random_seed = args.seed
    o.mapper.num_threads = args.threads
    o.mapper.random_seed = args.seed
    return _timed_pycolmap(pycolmap.global_mapping, args, out, image_dir, o)


def source_hash(package_dir: Path) -> str:
    """sha256 of the package's .py files but the harness's own (bench/): the mapper code a run
    used, which git's 'uncommitted changes' does not pin down."""
    h = hashlib.sha256()
    for f in sorted(package_dir.rglob("*.py")):
        rel = f.relative_to(package_dir).as_posix()
        if not rel.startswith("bench/"):
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def run_torchsfm(args, out: Path, result: dict):
    import torch

    import torchsfm

    from torchsfm.api import map_database
    from torchsfm.config import to_dict
    from torchsfm.mapper.pipeline import MapperOptions
    from torchsfm.report import versions
    from torchsfm.runtime import configure_threads, resolve_device

    configure_threads(args.threads)
    if args.config is not None:
        from torchsfm.config import load

        opt = load(MapperOptions, args.config)
        opt.seed, opt.device = args.seed, args.device
    else:
        opt = MapperOptions(seed=args.seed, device=args.device)
    opt.relative_pose.num_threads = args.threads
    opt.relative_pose.progress = False
    dev = resolve_device(opt.device)
    result["versions"].update(versions())
    result["versions"]["torchsfm_source_sha256"] = source_hash(Path(torchsfm.__file__).resolve().parent)
    if dev.type == "cuda":  # context creation is a per-process cost, not the mapper's
        t0 = time.perf_counter()
        torch.zeros(1, device=dev)
        torch.cuda.synchronize(dev)
        result["device_init_seconds"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats(dev)
        result["device_name"] = torch.cuda.get_device_name(dev)
    startup_peak(result)
    # the package's own instance of the module: the stages' windows must nest in this one
    from torchsfm.runtime import peak_memory as package_peak_memory

    mem = package_peak_memory.begin()
    t0, c0 = time.perf_counter(), time.process_time()
    models, report = map_database(args.database, out, opt, image_dir=args.images)
    result["seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = time.process_time() - c0
    peaks = package_peak_memory.end(mem)
    result["peak_rss_mb"] = peaks["peak_rss_mb"]
    if dev.type == "cuda":
        result["gpu_peak_allocated_mb"] = peaks.get("cuda_peak_mb")
    result["device"] = str(dev)
    result["stages"] = {s.name: s.seconds for s in report.stages}
    result["stage_memory"] = {s.name: s.memory for s in report.stages if s.memory}
    result["stage_cpu_seconds"] = {s.name: s.cpu_seconds for s in report.stages}
    result["options"] = to_dict(opt)
    result["num_models"] = len(models)
    result["model"] = "sparse/0"
    result["summary"] = json.loads(json.dumps(report.summary, default=str))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--database", type=Path, required=True)
    ap.add_argument("--expected-hash", required=True, help="content hash the database must have (database_hash)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=None, help="image folder (point colours), if any")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="torchsfm only: cpu | cuda[:N]; the baselines run on the CPU")
    ap.add_argument("--config", type=Path, default=None, help="torchsfm only: mapper options JSON (as `torchsfm map --config`)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "schema": SCHEMA, "method": args.method, "status": "running", "seed": args.seed, "threads": args.threads,
        "device": "cpu", "database": str(args.database), "argv": sys.argv,
        "versions": {"python": sys.version.split()[0], "platform": platform.platform()},
    }
    t0 = time.perf_counter()
    result["input_hash"] = database_hash(args.database)
    result["hash_seconds"] = time.perf_counter() - t0
    if result["input_hash"] != args.expected_hash:
        result["status"] = "refused"
        result["error"] = (f"database content hash {result['input_hash'][:12]} differs from the expected "
                           f"{args.expected_hash[:12]}: refusing to run on a different input")
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
        print(result["error"], file=sys.stderr)
        return 3
    if args.method == "torchsfm":
        run_torchsfm(args, args.out, result)
    else:
        import pycolmap

        result["versions"]["pycolmap"] = pycolmap.__version__
        result["versions"]["pycolmap_has_cuda"] = bool(getattr(pycolmap, "has_cuda", False))
        # pycolmap needs an existing image folder even when it only reads colours from it.
        image_dir = args.images if args.images is not None else args.out / "no_images"
        image_dir.mkdir(parents=True, exist_ok=True)
        startup_peak(result)
        mem = peak_memory.begin()
        fn = run_colmap if args.method == "colmap" else run_glomap
        c0 = time.process_time()
        recs, result["seconds"], result["options"] = fn(args, args.out, image_dir)
        result["cpu_seconds"] = time.process_time() - c0
        result["peak_rss_mb"] = peak_memory.end(mem)["peak_rss_mb"]
        model, result["num_models"] = _pycolmap_best(recs, args.out)
        result["model"] = None if model is None else "model"
        # per-stage times come from pycolmap's log (harness: stages_from_log)
    result["status"] = "ok" if result.get("model") else "failed"
    if result["status"] == "failed":
        result["error"] = "the mapper produced no model"
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
