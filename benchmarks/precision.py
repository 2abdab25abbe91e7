"""float32 against float64: the mapper's accuracy and time in both precisions (issue 18).

Each dataset's database is made once with the benchmark's inputs (torchsfm.bench.inputs: the
same front end and cache as `torchsfm bench`), then mapped in float64 and float32 on the same
device, alternating the order over repeats, and compared with the ground truth (relative-pose
AUC, COLMAP's definition).

    python benchmarks/precision.py                                  # templeRing, dtu_scan24 on the CPU
    python benchmarks/precision.py --datasets ring50,templeRing --device cuda --repeats 3 --md out/p.md

The BAL side of the comparison (final cost in float32 against float64) is
`benchmarks/bench_ba.py --dtype float32` against `--dtype float64`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="templeRing,dtu_scan24", help="comma list (torchsfm bench's names)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per precision (times: the median)")
    ap.add_argument("--work-dir", type=Path, default=Path("out/bench"), help="cached inputs (as torchsfm bench)")
    ap.add_argument("--data-root", type=Path, default=None, help="folder of templeRing/, dtu_scan24/, ... "
                    "(default: ../shared/data)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from torchsfm import metrics
    from torchsfm.api import map_database
    from torchsfm.bench.inputs import DATA_ROOT, prepare, resolve_spec
    from torchsfm.io.colmap_model import read_model
    from torchsfm.mapper.pipeline import MapperOptions
    from torchsfm.runtime import configure_threads

    configure_threads(args.threads)
    rows = []
    for name in [d for d in args.datasets.split(",") if d]:
        prep = prepare(resolve_spec(name, args.data_root or DATA_ROOT), args.work_dir)
        if prep.gt is None:
            print(f"[skip] {name}: no ground truth", flush=True)
            continue
        gt = read_model(prep.gt)
        runs: dict[str, list] = {"float64": [], "float32": []}
        for rep in range(args.repeats):
            for dtype in (("float64", "float32") if rep % 2 == 0 else ("float32", "float64")):
                opt = MapperOptions(device=args.device, dtype=dtype)
                opt.relative_pose.num_threads = args.threads
                opt.relative_pose.progress = False
                with tempfile.TemporaryDirectory() as out:
                    t0 = time.perf_counter()
                    models, _ = map_database(prep.database, out, opt)
                    seconds = time.perf_counter() - t0
                ev = metrics.evaluate(models[0].to("cpu", torch.float64), gt)
                runs[dtype].append((seconds, ev))
                print(f"{name} {dtype} run {rep + 1}: {seconds:.2f} s, AUC@3 {ev['auc@3']:.2f}", flush=True)
        for dtype, rs in runs.items():
            ev = rs[0][1]
            rows.append({"dataset": name, "dtype": dtype, "device": args.device,
                         "seconds": statistics.median(s for s, _ in rs),
                         **{k: ev[k] for k in ("num_registered", "num_images", "auc@1", "auc@3", "auc@5", "auc@10")}})
    lines = ["| dataset | dtype | registered | AUC@1 / 3 / 5 / 10 | ΔAUC@3 vs float64 | time (s, median) |",
             "|---|---|---|---|---|---|"]
    ref = {r["dataset"]: r for r in rows if r["dtype"] == "float64"}
    for r in rows:
        d = r["auc@3"] - ref[r["dataset"]]["auc@3"]
        lines.append(f"| {r['dataset']} | {r['dtype']} | {r['num_registered']} / {r['num_images']} | "
                     f"{r['auc@1']:.1f} / {r['auc@3']:.1f} / {r['auc@5']:.1f} / {r['auc@10']:.1f} | {d:+.2f} | "
                     f"{r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
