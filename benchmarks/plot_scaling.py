"""The scaling plot from one or more benchmark results (each result drawn as its own lines).

    python benchmarks/plot_scaling.py docs/bench_cpu.json docs/bench_gpu.json -o docs/scaling.png
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchsfm.bench.harness import load_json  # noqa: E402
from torchsfm.bench.plot import plot_scaling  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="benchmark JSON files (torchsfm bench --json)")
    ap.add_argument("-o", "--output", type=Path, default=Path("docs/scaling.png"))
    a = ap.parse_args()
    if plot_scaling([load_json(p) for p in a.results], a.output) is None:
        sys.exit("no scaling points in these results")
    print(f"wrote {a.output}")
