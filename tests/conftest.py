"""Shared fixtures: devices to parametrise over, the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TORCHSFM_THREADS", "1")))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device-sensitive test runs on the CPU and, when present, on CUDA."""
    return torch.device(request.param)


def shared_data(name: str) -> Path:
    """Path of a dataset under ../shared/data, or skip the test with a clear message."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"shared dataset {p} is absent (tests that need ../shared/data are skipped)")
    return p
