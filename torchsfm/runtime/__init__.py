"""Process-wide runtime settings: threads, device choice, seeds (`memory`: out-of-memory fallbacks,
`signals`: SIGTERM as Ctrl-C)."""
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


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory in the process instead of returning it to the OS (glibc only).

    The solvers allocate multi-MB per-observation temporaries on every iteration. glibc serves
    those with fresh mmap()s (or trims the heap after freeing them), so every iteration pays
    page faults and kernel zeroing; on the shared 2-core CPU this was up to 2-3x the arithmetic
    of the Schur-complement LM. Serving blocks up to glibc's largest mmap threshold (32 MiB)
    from the heap and never trimming it makes freed buffers reusable; larger blocks keep being
    mmapped (so thread arenas, which need mmap for them, still work). Process-wide and
    idempotent; freed heap memory is kept until exit. Set TORCHSFM_NO_MALLOC_TUNING=1 to skip.
    Returns whether the settings were applied.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("TORCHSFM_NO_MALLOC_TUNING"):
        return _ALLOCATOR_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    _ALLOCATOR_TUNED = ok
    return ok
