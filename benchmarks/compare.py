"""Benchmark harness (issue 6): COLMAP incremental, GLOMAP and torchsfm on the same inputs.

The same as `torchsfm bench` (torchsfm/bench/); this file is the path the issue names.

    python benchmarks/compare.py --suite cpu          # regenerates docs/bench_cpu.{json,md} and docs/scaling.png
    python benchmarks/compare.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchsfm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[1:1] = ["bench"]
    sys.argv[0] = "torchsfm"  # the recorded command is the equivalent `torchsfm bench ...`
    sys.exit(main(sys.argv[1:]))
