"""Whole runs, photos to model, side by side on the same images and cores (issue 15's table).

For each dataset of ../shared/data (dtu_scan24 and templeRing by default), each in a fresh
process, back to back:
- pycolmap: extract_features -> match_exhaustive -> calibrate_view_graph -> global_mapping
  (the COLMAP 4.2 global pipeline, GLOMAP), all pycolmap defaults, all cores;
- `torchsfm run IMAGES OUT` (the default front end: SIFT, torch matching and verification);
- optionally `torchsfm run --verifier colmap` (`--with-colmap-verifier`);
and, on the features torchsfm extracted (one shared camera), matching + verification alone:
pycolmap's `match_exhaustive` against `torchsfm match` (torch verifier) on copies of the same
database, with the pairs' accept/reject agreement and the inlier-set Jaccard between the two.

Wall times include each process's start-up (imports), as a user waits for them. AUC against
the dataset's ground truth. Writes docs/bench_frontend.{json,md}.

    python benchmarks/bench_frontend.py [--datasets dtu_scan24,templeRing] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

PYCOLMAP_PIPELINE = textwrap.dedent("""
    import json, sys, time
    import pycolmap
    db, images, out = sys.argv[1:4]
    pycolmap.logging.minloglevel = 2
    t = {}
    t0 = time.perf_counter()
    pycolmap.extract_features(db, images)
    t["extract"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pycolmap.match_exhaustive(db)
    t["match"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pycolmap.calibrate_view_graph(db)
    recs = pycolmap.global_mapping(db, images, out)
    t["map"] = time.perf_counter() - t0
    best = max(recs.values(), key=lambda r: r.num_reg_images())
    best.write_binary(out)
    print(json.dumps(t))
""")

PYCOLMAP_MATCH = textwrap.dedent("""
    import sys, time
    import pycolmap
    pycolmap.logging.minloglevel = 2
    t0 = time.perf_counter()
    pycolmap.match_exhaustive(sys.argv[1])
    print(time.perf_counter() - t0)
""")


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({p.returncode}): {p.stderr[-2000:]}")
    return wall, p.stdout


def _evaluate(model_dir: Path, gt: Path) -> dict:
    from torchsfm import metrics
    from torchsfm.io.colmap_model import read_model

    ev = metrics.evaluate(read_model(model_dir, device="cpu"), read_model(gt, device="cpu"))
    return {k: round(float(ev[k]), 2) for k in ("auc@1", "auc@3", "auc@5", "auc@10")} | {
        "registered": int(ev["num_registered"]), "images": int(ev["num_images"])}


def _geometries(db: Path) -> dict[int, tuple[int, set]]:
    with sqlite3.connect(str(db)) as c:
        rows = c.execute("SELECT pair_id, config, rows, data FROM two_view_geometries").fetchall()
    out = {}
    for pid, cfg, n, data in rows:
        m = np.frombuffer(data, np.uint32).reshape(-1, 2) if n else np.zeros((0, 2), np.uint32)
        out[pid] = (cfg, set(map(tuple, m.tolist())))
    return out


def _agreement(a: Path, b: Path, min_inliers: int = 15) -> dict:
    """Accept/reject agreement and inlier Jaccard of two verified databases over the same pairs."""
    ga, gb = _geometries(a), _geometries(b)
    pids = sorted(set(ga) & set(gb))
    acc_a = np.array([ga[p][0] >= 2 and len(ga[p][1]) >= min_inliers for p in pids])
    acc_b = np.array([gb[p][0] >= 2 and len(gb[p][1]) >= min_inliers for p in pids])
    both = [p for p, x, y in zip(pids, acc_a, acc_b) if x and y]
    jac = [len(ga[p][1] & gb[p][1]) / max(1, len(ga[p][1] | gb[p][1])) for p in both]
    return {"pairs": len(pids), "accepted_a": int(acc_a.sum()), "accepted_b": int(acc_b.sum()),
            "agreement": round(float((acc_a == acc_b).mean()) if pids else 0.0, 4),
            "jaccard_median": round(float(np.median(jac)) if jac else 0.0, 3),
            "jaccard_mean": round(float(np.mean(jac)) if jac else 0.0, 3)}


def _copy_db(src: Path, dst: Path) -> None:
    """A consistent copy through SQLite's backup API: copying the file alone would miss what its
    write-ahead log still holds (a copy that kept the deleted matches was the first bug here)."""
    for p in (dst, Path(f"{dst}-wal"), Path(f"{dst}-shm")):
        p.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(str(src))) as s, contextlib.closing(sqlite3.connect(str(dst))) as d:
        s.backup(d)


def bench_dataset(name: str, work: Path, env: dict, torchsfm_cmd: list[str], with_colmap_verifier: bool) -> dict:
    images, gt = DATA / name / "images", DATA / name / "gt"
    res: dict = {"dataset": name, "images": len(list(images.iterdir()))}
    # 1. pycolmap's global pipeline
    d = work / name / "pycolmap"
    d.mkdir(parents=True, exist_ok=True)
    wall, out = _run([sys.executable, "-c", PYCOLMAP_PIPELINE, str(d / "database.db"), str(images), str(d / "model")], env)
    (d / "model").mkdir(exist_ok=True)
    res["pycolmap"] = {"wall_s": round(wall, 1), "stages_s": {k: round(v, 1) for k, v in json.loads(out).items()},
                       "accuracy": _evaluate(d / "model", gt)}
    # 2. torchsfm run (and optionally with COLMAP's verifier)
    variants = [("torchsfm", [])] + ([("torchsfm_colmap_verifier", ["--verifier", "colmap"])] if with_colmap_verifier else [])
    for key, extra in variants:
        d = work / name / key
        wall, _ = _run([*torchsfm_cmd, "run", str(images), str(d), *extra], env)
        rep = json.loads((d / "report.json").read_text())
        res[key] = {"wall_s": round(wall, 1), "stages_s": _stage_times(rep), "accuracy": _evaluate(d / "sparse" / "0", gt)}
    # 3. matching + verification alone, same features and pairs (torchsfm's shared-camera database)
    feats = work / name / "torchsfm" / "database.db"
    clean = work / name / "features.db"
    _copy_db(feats, clean)
    with contextlib.closing(sqlite3.connect(str(clean))) as c, c:
        c.execute("DELETE FROM matches")
        c.execute("DELETE FROM two_view_geometries")
    a, b = work / name / "match_pycolmap.db", work / name / "match_torch.db"
    _copy_db(clean, a)
    _copy_db(clean, b)
    wall_a, out_a = _run([sys.executable, "-c", PYCOLMAP_MATCH, str(a)], env)
    wall_b, _ = _run([*torchsfm_cmd, "match", "--database", str(b), "--mode", "exhaustive"], env)
    res["match_verify"] = {"pycolmap_wall_s": round(wall_a, 1), "pycolmap_call_s": round(float(out_a), 1),
                           "torchsfm_wall_s": round(wall_b, 1), "ratio": round(wall_b / wall_a, 3),
                           "agreement": _agreement(a, b)}
    res["run_ratio"] = round(res["torchsfm"]["wall_s"] / res["pycolmap"]["wall_s"], 3)
    return res


def _stage_times(report: dict) -> dict:
    """Seconds per stage from a torchsfm run report (front end and mapper stages)."""
    out = {}
    for s in report.get("stages", []):
        if isinstance(s, dict) and "name" in s:
            out[s["name"]] = round(float(s.get("seconds", 0.0)), 2)
    return out


def _table(results: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}. Each pipeline in a fresh process, back to back; wall time includes start-up.", "",
             "| dataset | pipeline | wall | AUC@1 / 3 / 5 / 10 | registered |", "|---|---|---:|---|---|"]
    for r in results:
        for key, label in (("pycolmap", "pycolmap: extract, match_exhaustive, calibrate_view_graph, global_mapping"),
                           ("torchsfm", "`torchsfm run`"), ("torchsfm_colmap_verifier", "`torchsfm run --verifier colmap`")):
            if key in r:
                a = r[key]["accuracy"]
                lines.append(f"| {r['dataset']} | {label} | {r[key]['wall_s']:.1f} s | {a['auc@1']:.1f} / {a['auc@3']:.1f} / "
                             f"{a['auc@5']:.1f} / {a['auc@10']:.1f} | {a['registered']} / {a['images']} |")
    lines += ["", "Matching + verification alone, the same features and pairs (torchsfm's one-camera database):", "",
              "| dataset | pycolmap match_exhaustive | torchsfm match | ratio | accept/reject agreement | inlier Jaccard median / mean |",
              "|---|---:|---:|---:|---:|---|"]
    for r in results:
        m = r["match_verify"]
        g = m["agreement"]
        lines.append(f"| {r['dataset']} | {m['pycolmap_wall_s']:.1f} s | {m['torchsfm_wall_s']:.1f} s | {m['ratio']:.2f} | "
                     f"{100 * g['agreement']:.1f} % ({g['accepted_a']} vs {g['accepted_b']} pairs) | "
                     f"{g['jaccard_median']:.2f} / {g['jaccard_mean']:.2f} |")
    lines += ["", "Whole run, torchsfm / pycolmap wall time: " + ", ".join(f"{r['dataset']} {r['run_ratio']:.2f}" for r in results)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="dtu_scan24,templeRing")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--with-colmap-verifier", action="store_true", help="also time `torchsfm run --verifier colmap`")
    ap.add_argument("--output", default=str(ROOT / "docs" / "bench_frontend"), help="writes OUTPUT.json and OUTPUT.md")
    args = ap.parse_args(argv)
    if not DATA.exists():
        print(f"shared data {DATA} is absent: nothing to benchmark", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TORCHSFM_THREADS=str(args.threads))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-frontend-"))
    torchsfm_cmd = [sys.executable, "-m", "torchsfm", "-q", "--threads", str(args.threads)]
    results = [bench_dataset(n, work, env, torchsfm_cmd, args.with_colmap_verifier) for n in args.datasets.split(",")]
    machine = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, {args.threads} threads"
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"),
                                                    "results": results}, indent=2))
    out.with_suffix(".md").write_text(_table(results, machine))
    print(_table(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
