"""Shared fixtures: devices to parametrise over, the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TORCHSFM_THREADS", "1")))

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): the cuda case runs on a GPU machine"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device-sensitive test runs on the CPU and on CUDA (skipped, with the reason, without one)."""
    return torch.device(request.param)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request) -> torch.dtype:
    """The solver, BA, GP and mapper tests run in both precisions (device x dtype matrix), each
    with its own tolerance tier (see `tol`)."""
    return request.param


def tol(dtype: torch.dtype, f64: float, f32: float) -> float:
    """A test's tolerance for its precision."""
    return f64 if dtype == torch.float64 else f32


def shared_data(name: str) -> Path:
    """Path of a dataset under ../shared/data, or skip the test with a clear message."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"shared dataset {p} is absent (tests that need ../shared/data are skipped)")
    return p
