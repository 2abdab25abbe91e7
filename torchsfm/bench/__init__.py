"""Benchmark harness: COLMAP incremental, GLOMAP and torchsfm on the same inputs.

    torchsfm bench --suite cpu                       # the CPU table of the README (docs/bench_cpu.*)
    torchsfm bench --datasets ring50,templeRing --methods glomap,torchsfm
    torchsfm bench --from-json docs/bench_cpu.json --md docs/bench_cpu.md   # tables again, no runs

Modules: inputs (datasets -> cached databases with content hashes), child (one mapper in a fresh
process), harness (runs, measurement, comparability checks), tables (markdown), plot (PNG).
"""
from .harness import BenchOptions, InputMismatch, check_comparable, merge_results, run_benchmark

__all__ = ["BenchOptions", "InputMismatch", "check_comparable", "merge_results", "run_benchmark"]
