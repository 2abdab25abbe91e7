"""Per-stage memory profile of torchsfm runs in a benchmark result (markdown on stdout).

    python benchmarks/memory_profile.py docs/bench_scale.json corridor3000 [corridor10000 ...]

For each dataset: every mapper stage of the torchsfm run with its wall and CPU seconds, the
process's peak resident memory during the stage and its resident size at the stage's end (both
MB, interpreter and libraries included), and on CUDA the GPU's peak; then the run's peak, GLOMAP's
peak on the same database and the memory added per million observations.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchsfm.bench.harness import load_json  # noqa: E402


def _f(v, fmt="{:.0f}"):
    return "–" if v is None else fmt.format(v)


def profile(result: dict, name: str) -> str:
    ds = next((d for d in result["datasets"] if d["name"] == name), None)
    if ds is None:
        raise SystemExit(f"{name}: not in this result")
    runs = {r["method"]: r for r in ds.get("runs", []) if r.get("status") == "ok"}
    tr = runs.get("torchsfm")
    if tr is None or not tr.get("stage_memory"):
        raise SystemExit(f"{name}: no torchsfm run with per-stage memory")
    obs = ds["stats"]["observations"]
    cuda = any("cuda_peak_mb" in m for m in tr["stage_memory"].values())
    head = ["stage", "time (s)", "CPU (s)", "peak RSS (MB)", "RSS at end (MB)"] + (["GPU peak (MB)"] if cuda else [])
    out = [f"### {name}: {ds['stats']['images']} images, {obs:,} observations, "
           f"{ds['stats']['verified_matches']:,} verified matches", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cpu = tr.get("stage_cpu_seconds", {})
    for stage, sec in tr["stages"].items():
        m = tr["stage_memory"].get(stage, {})
        row = [stage, _f(sec, "{:.1f}"), _f(cpu.get(stage), "{:.1f}"), _f(m.get("peak_rss_mb")), _f(m.get("rss_mb"))]
        if cuda:
            row.append(_f(m.get("cuda_peak_mb")))
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    for method, r in sorted(runs.items()):
        added = r["peak_rss_mb"] - r.get("rss_start_mb", 0)
        out.append(f"- {method}: peak {r['peak_rss_mb']:.0f} MB ({r.get('rss_start_mb', 0):.0f} MB at the start of "
                   f"mapping, {added:.0f} MB added: {added / obs * 1e6:.0f} MB per million observations), "
                   f"{r['seconds']:.0f} s")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", type=Path)
    ap.add_argument("datasets", nargs="+")
    a = ap.parse_args()
    res = load_json(a.result)
    print("\n".join(profile(res, n) for n in a.datasets))
