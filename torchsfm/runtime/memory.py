"""Out-of-memory handling of solver stages: retry in smaller chunks, then on the CPU.

A stage is a function `(rec, options) -> rec`. When it runs out of memory (a CUDA
`torch.OutOfMemoryError`, the CPU allocator's "can't allocate memory", or a `MemoryError` from
numpy/scipy) it is retried, each time with less memory:

1. the solvers' chunk size (`SolverOptions.chunk_bytes`, the per-chunk temporaries of the Schur
   build and of the implicit products) divided by `chunk_divisor`;
2. additionally the implicit-Schur PCG (`linear_solver="pcg"`: the reduced matrix is never
   formed, memory is linear in the observations);
3. on a GPU: the whole stage on the CPU (result moved back to the GPU when it fits).
Only when the CPU attempt fails as well is it an error, giving the problem size. Each fallback is
logged as a warning and listed in the run report.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


class OutOfMemory(RuntimeError):
    """A stage ran out of memory even in its smallest configuration (on the CPU)."""


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg
                                            or ("out of memory" in msg.lower() and "CUDA" in msg))


@dataclass
class MemoryFallbackOptions:
    enabled: bool = True
    chunk_divisor: int = 16
    min_chunk_bytes: int = 64 << 10
    cpu_fallback: bool = True


def _solver_options(opt) -> list:
    """The solver options one level down in the options dataclass `opt`: the `solver` field of each
    of its fields (in a MapperOptions: bundle adjustment's and global positioning's)."""
    out = []
    for f in dataclasses.fields(opt):
        solver = getattr(getattr(opt, f.name), "solver", None)
        if solver is not None and hasattr(solver, "chunk_bytes"):
            out.append(solver)
    return out


def _default_chunk(device: torch.device) -> int:
    return (4 << 20) if device.type == "cpu" else (512 << 20)


def smaller(opt, device: torch.device, mf: MemoryFallbackOptions, implicit: bool):
    """A copy of the stage options with smaller solver chunks (and the implicit PCG)."""
    new = copy.deepcopy(opt)
    for s in _solver_options(new):
        s.chunk_bytes = max(mf.min_chunk_bytes, (s.chunk_bytes or _default_chunk(device)) // mf.chunk_divisor)
        if implicit:
            s.linear_solver = "pcg"
    return new


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _size(rec) -> str:
    return (f"{int(rec.images.registered.sum())} registered images, {len(rec.points3D)} points, "
            f"{len(rec.tracks)} observations")


def run_with_memory_fallback(stage: str, fn: Callable, rec, opt, mf: MemoryFallbackOptions | None = None,
                             events: list | None = None):
    """`fn(rec, opt)` with the out-of-memory retries above; `events` collects what was done."""
    mf = mf or MemoryFallbackOptions()
    if not mf.enabled:
        return fn(rec, opt)
    device = rec.device
    attempts = [("as configured", None, lambda: opt),
                (f"with solver chunks / {mf.chunk_divisor}", None, lambda: smaller(opt, device, mf, False)),
                ("with the implicit Schur PCG and small chunks", None, lambda: smaller(opt, device, mf, True))]
    if device.type != "cpu" and mf.cpu_fallback:
        attempts.append(("on the CPU", torch.device("cpu"), lambda: smaller(opt, torch.device("cpu"), mf, True)))
    last: BaseException | None = None
    for k, (what, where, make) in enumerate(attempts):
        try:
            out = fn(rec if where is None else rec.to(where), make())
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are retried
            if not is_oom(e):
                raise
            last = e
            del e
            _free(device)
            nxt = attempts[k + 1][0] if k + 1 < len(attempts) else None
            log.warning("%s: out of memory (%s); %s", stage, what,
                        f"retrying {nxt}" if nxt else "no smaller configuration left")
            if events is not None:
                events.append({"stage": stage, "attempt": what, "result": "out_of_memory"})
            continue
        if k > 0:
            if events is not None:
                events.append({"stage": stage, "attempt": what, "result": "ok"})
            log.warning("%s: completed %s after running out of memory", stage, what)
            if where is not None:
                try:
                    out = out.to(device)
                except Exception as e:  # noqa: BLE001
                    if not is_oom(e):
                        raise
                    log.warning("%s: result stays on the CPU (no room on %s); later stages run on the CPU",
                                stage, device)
        return out
    raise OutOfMemory(f"{stage} ran out of memory even {attempts[-1][0]} ({_size(rec)}): {last}. "
                      "Free memory, use a machine with more memory, or cap the problem size "
                      "(e.g. tracks.max_num_tracks in --config)") from None
