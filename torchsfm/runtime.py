"""Process-wide runtime settings: threads, device choice, seeds."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads. Default: TORCHSFM_THREADS, else OMP_NUM_THREADS, else
    min(cores, 8). On a small shared box, oversubscribed torch threads were measured 7-23x slower
    per op, so the default never exceeds the cores this process may use."""
    if num_threads is None:
        env = os.environ.get("TORCHSFM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = int(env) if env else max(1, min(cores, 8))
    torch.set_num_threads(max(1, int(num_threads)))
    return torch.get_num_threads()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error, never a silent
    fallback."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was requested but no CUDA GPU is available; use --device cpu")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
