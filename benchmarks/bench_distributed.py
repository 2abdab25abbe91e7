"""The front end on Ray against the local executor (issue 20): equality, accuracy, speed, and the
numbers of docs/distributed.md's speed-up model. Three parts, each a reproducible command:

    python benchmarks/bench_distributed.py compare [--datasets templeRing,dtu_scan24] [--threads 2]
        `torchsfm run IMAGES OUT` with --executor local and with --executor ray (a local Ray
        runtime with --threads CPUs), each in a fresh process, back to back: wall time (start-up
        included), per-stage times, the databases compared row for row (keypoints,
        descriptors, raw matches, two-view geometries with their inliers), AUC against GT.
    python benchmarks/bench_distributed.py commit [--pairs 20000]
        The driver's commit rate with synthetic results (no matching): verified pairs per second
        written by the driver's PairWriter, COLMAP's blobs and one transaction per chunk; and
        milliseconds per image of extraction's writes (8,192 features, one transaction each).
    python benchmarks/bench_distributed.py scaling [--dataset templeRing] [--nodes 1,2]
        A local multi-node cluster (`ray.cluster_utils.Cluster`, one CPU per node): extraction and
        matching of one dataset with 1..N single-CPU nodes; worker seconds per image and per pair,
        the driver's seconds per image and per pair, object-store bytes per pair, and whether the
        database equals the one-node run's.

Each writes docs/bench_distributed_PART.json (and prints a table). Times on a shared machine
are provisional: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_frontend import _evaluate, _run, _stage_times  # noqa: E402

TABLES = ("cameras", "images", "keypoints", "descriptors", "matches", "two_view_geometries")


def _rows(db: Path) -> dict:
    with contextlib.closing(sqlite3.connect(str(db))) as c:
        return {t: sorted(c.execute(f"SELECT * FROM {t}").fetchall()) for t in TABLES}


def _machine(threads: int) -> str:
    return f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, {threads} threads"


def compare(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TORCHSFM_THREADS=str(args.threads))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-distributed-"))
    cmd = [sys.executable, "-m", "torchsfm", "-q", "--threads", str(args.threads), "run"]
    results = []
    for name in args.datasets.split(","):
        images, gt = DATA / name / "images", DATA / name / "gt"
        res = {"dataset": name}
        for key, extra in (("local", []), ("ray", ["--executor", "ray"])):
            out = work / name / key
            shutil.rmtree(out, ignore_errors=True)
            wall, _ = _run([*cmd, str(images), str(out), *extra], env)
            rep = json.loads((out / "report.json").read_text())
            res[key] = {"wall_s": round(wall, 1), "stages_s": _stage_times(rep), "accuracy": _evaluate(out / "sparse" / "0", gt)}
            for st in rep.get("stages", []):
                c = st.get("counts", {})
                if "num_workers" in c:
                    res[key].setdefault("executor", {})[st["name"]] = {k: c.get(k) for k in
                                                                        ("executor", "num_tasks", "num_workers", "num_retries")}
        a, b = _rows(work / name / "local" / "database.db"), _rows(work / name / "ray" / "database.db")
        res["equal_tables"] = {t: a[t] == b[t] for t in TABLES}
        res["wall_ratio"] = round(res["ray"]["wall_s"] / res["local"]["wall_s"], 3)
        results.append(res)
        print(json.dumps(res, indent=1), flush=True)
    lines = [f"Machine: {_machine(args.threads)}; {time.strftime('%Y-%m-%d')}", "",
             "| dataset | executor | wall | extract | match | AUC@1 / 3 / 5 / 10 | registered | database |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for r in results:
        for key in ("local", "ray"):
            x, a = r[key], r[key]["accuracy"]
            same = "equal to local" if all(r["equal_tables"].values()) else "DIFFERS: " + ", ".join(
                t for t, ok in r["equal_tables"].items() if not ok)
            lines.append(f"| {r['dataset']} | {key} | {x['wall_s']:.1f} s | {x['stages_s'].get('extract', 0):.1f} s | "
                         f"{x['stages_s'].get('match', 0):.1f} s | {a['auc@1']:.1f} / {a['auc@3']:.1f} / {a['auc@5']:.1f} / "
                         f"{a['auc@10']:.1f} | {a['registered']} / {a['images']} | {'' if key == 'local' else same} |")
    return {"machine": _machine(args.threads), "date": time.strftime("%Y-%m-%d"), "results": results,
            "table": "\n".join(lines)}


def commit(args) -> dict:
    """Synthetic verified pairs through the driver's writer into a COLMAP database."""
    from torchsfm.frontend.colmap_db import FrontendDatabase
    from torchsfm.frontend.match_units import VerifiedBatch
    from torchsfm.frontend.torch_matcher import PairWriter

    work = Path(tempfile.mkdtemp(prefix="bench-commit-"))
    db = work / "database.db"
    n_img = int(np.ceil((1 + np.sqrt(1 + 8 * args.pairs)) / 2))
    with FrontendDatabase(db) as fdb, fdb.transaction():
        cam = fdb.add_camera(2, 1000, 800, np.array([1000.0, 500, 400, 0]), False)
        ids = np.array([fdb.add_image(f"{i:06d}.jpg", cam) for i in range(n_img)])
    rng = np.random.default_rng(0)
    a, b = np.triu_indices(n_img, 1)
    a, b = a[: args.pairs], b[: args.pairs]
    out = {"pairs": int(args.pairs), "raw_matches_per_pair": args.raw, "inliers_per_pair": args.inliers,
           "chunk_size": args.chunk_size}
    with contextlib.closing(sqlite3.connect(str(db), isolation_level=None, timeout=60.0)) as conn:
        writer = PairWriter(conn, ids[a], ids[b], args.chunk_size)
        step = 512  # results arrive per verification batch
        raw = [rng.integers(0, 8000, (args.raw, 2)) for _ in range(step)]
        t0 = time.perf_counter()
        for s in range(0, len(a), step):
            n = min(step, len(a) - s)
            v = VerifiedBatch(np.full(n, 2), rng.normal(size=(n, 3, 3)), rng.normal(size=(n, 3, 3)),
                              np.zeros((n, 3, 3)), rng.normal(size=(n, 4)), rng.normal(size=(n, 3)), np.ones(n, bool),
                              np.zeros(0, bool))
            writer.add(np.arange(s, s + n), raw[:n], [r[: args.inliers] for r in raw[:n]], v)
        writer.flush()
        total = time.perf_counter() - t0
    out.update(seconds=round(total, 3), write_seconds=round(writer.time_s, 3),
               pairs_per_s=round(len(a) / total, 1), database_mb=round(db.stat().st_size / 2**20, 1))
    # extraction's writes: one image's keypoints and descriptors per transaction, as the driver
    # commits them (`--images` images of 8,192 SIFT features)
    kp = rng.random((8192, 6)).astype(np.float32)
    de = rng.integers(0, 256, (8192, 128), dtype=np.uint8)
    with FrontendDatabase(db) as fdb:
        t0 = time.perf_counter()
        for i in ids[: args.images]:
            fdb.write_features(int(i), kp, de)
        out["image_write_ms"] = round(1000 * (time.perf_counter() - t0) / min(args.images, len(ids)), 2)
    shutil.rmtree(work)
    out["table"] = (f"driver commit rate: {out['pairs_per_s']:.0f} verified pairs/s ({args.raw} raw matches, "
                    f"{args.inliers} inliers, F/E/pose per pair; {args.chunk_size} pairs per transaction; "
                    f"{out['database_mb']} MB written); one image's 8,192 features: {out['image_write_ms']} ms "
                    f"on {_machine(1)}")
    return out


def scaling(args) -> dict:
    """Extraction and matching of one dataset on 1..N single-CPU nodes of a local cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from torchsfm.frontend import ExtractOptions, MatchOptions, extract, match
    from torchsfm.frontend.options import ExecutorOptions

    images = DATA / args.dataset / "images"
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    rows = []
    for nodes in [int(n) for n in args.nodes.split(",")]:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="WARNING")
        ray_opts = ExecutorOptions(kind="ray")
        try:
            db = work / f"n{nodes}.db"
            ex = extract(images, db, ExtractOptions(executor=ray_opts, progress=False))
            ma = match(db, MatchOptions(executor=ray_opts, progress=False))
        finally:
            ray.shutdown()
            cluster.shutdown()
        row = {"nodes": nodes, "images": ex.num_extracted, "pairs": ma.num_matched,
               "extract_s": round(ex.elapsed_s, 2), "match_s": round(ma.elapsed_s, 2),
               "extract_worker_s_per_image": round(ex.task_seconds / max(ex.num_extracted, 1), 4),
               "extract_driver_s_per_image": round(ex.driver_seconds / max(ex.num_extracted, 1), 5),
               "match_worker_s_per_pair": round(ma.task_seconds / max(ma.num_matched, 1), 5),
               "match_driver_s_per_pair": round(ma.driver_seconds / max(ma.num_matched, 1), 6),
               "object_store_bytes_per_pair": int(ma.shipped_bytes / max(ma.num_matched, 1)),
               "tasks": {"extract": ex.num_tasks, "match": ma.num_tasks}, "workers": ma.num_workers,
               "stage_times": ma.stage_times}
        if rows:  # the database does not depend on the number of workers
            row["equal_to_1_node"] = _rows(db) == _rows(work / f"n{rows[0]['nodes']}.db")
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work)
    base = rows[0]
    lines = [f"{args.dataset} on a local `ray.cluster_utils.Cluster` (1 CPU per node), {_machine(1)}", "",
             "| nodes | extract | speed-up | match + verify | speed-up | worker s/image | driver s/image "
             "| worker s/pair | driver s/pair | object store B/pair |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['extract_s']:.1f} s | {base['extract_s'] / r['extract_s']:.2f}x | "
                     f"{r['match_s']:.1f} s | {base['match_s'] / r['match_s']:.2f}x | {r['extract_worker_s_per_image']:.3f} | "
                     f"{r['extract_driver_s_per_image']:.4f} | {r['match_worker_s_per_pair']:.4f} | "
                     f"{r['match_driver_s_per_pair']:.5f} | {r['object_store_bytes_per_pair']} |")
    return {"machine": _machine(1), "date": time.strftime("%Y-%m-%d"), "dataset": args.dataset, "rows": rows,
            "table": "\n".join(lines)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    c = sub.add_parser("compare", help="torchsfm run, local vs ray executor")
    c.add_argument("--datasets", default="templeRing,dtu_scan24")
    c.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    c.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    m = sub.add_parser("commit", help="the driver's commit rate with synthetic results")
    m.add_argument("--pairs", type=int, default=20000)
    m.add_argument("--raw", type=int, default=400, help="raw matches per pair")
    m.add_argument("--inliers", type=int, default=300, help="inlier matches per pair")
    m.add_argument("--chunk-size", type=int, default=256)
    m.add_argument("--images", type=int, default=100, help="images whose features are written one per transaction")
    s = sub.add_parser("scaling", help="1..N single-CPU nodes of a local Ray cluster")
    s.add_argument("--dataset", default="templeRing")
    s.add_argument("--nodes", default="1,2")
    for p in (c, m, s):
        p.add_argument("--output", default=None, help="JSON to write (default: docs/bench_distributed_PART.json)")
    args = ap.parse_args(argv)
    if args.part in ("compare", "scaling") and not DATA.exists():
        print(f"shared data {DATA} is absent: nothing to benchmark", file=sys.stderr)
        return 2
    res = {"compare": compare, "commit": commit, "scaling": scaling}[args.part](args)
    out = Path(args.output or ROOT / "docs" / f"bench_distributed_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(res["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
