"""Host-synchronisation budget of the iterative solvers (issue 18): at most 3 device -> host
syncs (reads + data-dependent shapes) per LM iteration on the dense, PCG and separable (points
alone) paths, for every loss and both precisions, per LM iteration of global positioning and view-graph calibration, and per
IRLS iteration of rotation averaging.

Counted as ../shared/tools/count_syncs.py counts them (torchsfm.bench.syncs wraps the same torch
methods): two runs with 2 and 8 iterations and every tolerance 0, the difference divided by 6,
so the one-off set-up (structure, index sets) does not count. On the CPU these calls are cheap,
but the count is the same code path a GPU runs, where each one stalls the stream. The counting
runs in a child process (tests/sync_cases.py): patching torch.Tensor cannot be fully undone.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BUDGET = 3.0
HERE = Path(__file__).resolve().parent
BA = [f"ba-{m}-{lo}" for m in ("dense", "pcg", "pcg_explicit") for lo in ("trivial", "huber", "cauchy")]
OTHER = ["ba-points-trivial", "ba-points-huber", "bal-dense", "bal-pcg", "global_positioning", "view_graph_calibration"]
RA = ["rotation_averaging-dense", "rotation_averaging-cg", "rotation_averaging-cholesky"]


@pytest.fixture(scope="module")
def counts() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    env_path = str(HERE.parent)
    r = subprocess.run([sys.executable, str(HERE / "sync_cases.py"), *devices], capture_output=True, text=True,
                       env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check(counts: dict, case: str, device: torch.device, dtype: torch.dtype) -> None:
    key = f"{case}|{device.type}|{'f64' if dtype == torch.float64 else 'f32'}"
    per, reads, shapes = counts[key]
    assert per <= BUDGET, (key, per, reads, shapes)


@pytest.mark.parametrize("case", BA + OTHER)
def test_lm_syncs_per_iteration(counts, case, device, dtype):
    _check(counts, case, device, dtype)


@pytest.mark.parametrize("case", RA)
def test_rotation_averaging_syncs_per_irls_iteration(counts, case, device, dtype):
    if case.endswith("cholesky") and device.type != "cpu":
        pytest.skip("the scipy factorisation is the CPU path")
    _check(counts, case, device, dtype)


def test_patch_alignment_steps_never_sync(counts, device, dtype):
    """Keypoint refinement's Gauss-Newton steps (a fixed number, no convergence test) read nothing
    back and make no data-dependent shapes."""
    key = f"patch_alignment|{device.type}|{'f64' if dtype == torch.float64 else 'f32'}"
    assert counts[key][0] == 0, counts[key]


def test_focal_scan_scales_never_sync(counts, device, dtype):
    """The focal scan reads back once, after all its scales: each scale's pose refinement and
    closure measure add no read and no data-dependent shape."""
    key = f"focal_scan|{device.type}|{'f64' if dtype == torch.float64 else 'f32'}"
    assert counts[key][0] == 0, counts[key]


def test_the_count_sees_a_sync(counts):
    """The counter is not blind: a read and two data-dependent shapes inside its block count."""
    assert counts["self_check"] == {"reads": 1, "shapes": 2}

