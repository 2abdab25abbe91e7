"""Count device -> host synchronisations, the GPU-readiness figure of an iterative solver.

Two kinds are counted, both of which stall a CUDA stream (the counting is the same on the CPU,
where they are cheap, so the figure can be checked on any machine):
- reads: a host copy of a tensor (item, tolist, numpy, cpu, to('cpu'), bool/float/int/index
  conversion, formatting a tensor into a string);
- shapes: operations whose output size depends on the data (nonzero, boolean-mask indexing,
  masked_select, unique, argwhere, one-argument where, repeat_interleave without output_size).

    with SyncCounter() as c:
        solve(problem, options)
    c.total, c.counts  # {"reads": ..., "shapes": ...}

`per_iteration(run, n1, n2)` runs a callable with n1 and n2 iterations and divides the
difference, which removes the one-off set-up; `bal_syncs` and `rotation_averaging_syncs` apply it
to the LM solver on a BAL problem and to rotation averaging's IRLS. The methods are patched on
torch.Tensor / torch for the duration of the block (one counter at a time, not thread-safe), and
CPython cannot fully undo that for special methods (after a patched `__getitem__`, 0-d tensors
look like sequences to torch.tensor), so count in a process of its own: benchmarks/count_syncs.py
(`torchsfm ba` on a model as ../shared/tools/count_syncs.py counts it, and a table), or
tests/sync_cases.py for the tests. A measuring tool, never for production code.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__",
          "__repr__")
_SHAPES = ("nonzero", "masked_select", "unique", "argwhere")


def _to_cpu(*a, **k) -> bool:
    def cpu(x) -> bool:
        return (isinstance(x, str) and x == "cpu") or (isinstance(x, torch.device) and x.type == "cpu")

    return any(cpu(x) for x in (*a[1:], k.get("device")))


def _bool_index(self, idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _no_output_size(*a, **k) -> bool:
    return "output_size" not in k and len(a) < 4


class SyncCounter:
    def __init__(self):
        self.counts = {"reads": 0, "shapes": 0}
        self._saved: list[tuple[object, str, object]] = []

    @property
    def total(self) -> int:
        return self.counts["reads"] + self.counts["shapes"]

    def _wrap(self, owner, name: str, kind: str, when: Callable | None = None) -> None:
        orig = getattr(owner, name)
        counts = self.counts

        def wrapped(*a, **k):
            if when is None or when(*a, **k):
                counts[kind] += 1
            return orig(*a, **k)

        # what to undo: a method inherited from torch's C base class must be deleted again, not
        # set back (a Python-level __getitem__ on torch.Tensor would make 0-d tensors sequences)
        self._saved.append((owner, name, orig if name in vars(owner) else None))
        setattr(owner, name, wrapped)

    def __enter__(self) -> "SyncCounter":
        for n in _READS:
            self._wrap(torch.Tensor, n, "reads")
        self._wrap(torch.Tensor, "to", "reads", _to_cpu)
        for n in _SHAPES:
            self._wrap(torch.Tensor, n, "shapes")
            self._wrap(torch, n, "shapes")
        self._wrap(torch.Tensor, "__getitem__", "shapes", _bool_index)
        self._wrap(torch, "where", "shapes", lambda *a, **k: len(a) + len(k) == 1)
        self._wrap(torch, "repeat_interleave", "shapes", _no_output_size)
        self._wrap(torch.Tensor, "repeat_interleave", "shapes", _no_output_size)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self._saved):
            if orig is None:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)
        self._saved.clear()


def per_iteration(run: Callable[[int], int], n1: int = 2, n2: int = 12) -> tuple[float, dict]:
    """run(n) performs n iterations and returns how many it ran; -> (syncs per iteration, by kind)."""
    out = []
    for n in (n1, n2):
        with SyncCounter() as c:
            done = run(n)
        out.append((c.total, done, dict(c.counts)))
    (s1, i1, k1), (s2, i2, k2) = out
    if i2 <= i1:
        raise RuntimeError(f"iterations did not grow ({i1} -> {i2})")
    return (s2 - s1) / (i2 - i1), {k: (k2[k] - k1[k]) / (i2 - i1) for k in k1}


@functools.lru_cache(maxsize=2)
def _bal(path: str):
    from ..ba import bal

    return bal.drop_behind(bal.load_bal(path))


@functools.lru_cache(maxsize=2)
def _ring(num_images: int):
    from ..synthetic import SyntheticOptions, synthesize

    return synthesize(SyntheticOptions(num_images=num_images, num_points=2000, layout="ring", seed=1))


def bal_syncs(path: str, device: str = "cpu", dtype: str = "float64", linear_solver: str = "dense",
              loss: str = "trivial", n1: int = 2, n2: int = 12) -> tuple[float, dict]:
    """Syncs per LM iteration of the solver on a BAL problem (every tolerance 0)."""
    import torch

    from ..ba import bal
    from ..solver import SolverOptions, solve

    data = _bal(path)

    def run(iters: int) -> int:
        p = bal.BALProblem(data, device=device, dtype=getattr(torch, dtype))
        o = SolverOptions(linear_solver=linear_solver, loss=loss, max_iterations=iters, function_tolerance=0.0,
                          gradient_tolerance=0.0, parameter_tolerance=0.0)
        return solve(p, o).iterations

    return per_iteration(run, n1, n2)


def rotation_averaging_syncs(device: str = "cpu", dtype: str = "float64", linear_solver: str = "dense",
                             num_images: int = 200, n1: int = 2, n2: int = 12) -> tuple[float, dict]:
    """Syncs per IRLS iteration of rotation averaging on a synthetic ring (step tolerance 0)."""
    import torch

    from ..geometry import so3
    from ..mapper.rotation_averaging import RotationAveragingOptions, refine_rotations, relative_rotations

    sc = _ring(num_images)
    rec = sc.mapper_input().to(device, getattr(torch, dtype))
    g = torch.Generator().manual_seed(0)
    R0 = sc.gt.images.rotation @ so3.exp(0.05 * torch.randn(num_images, 3, generator=g, dtype=torch.float64))
    R0 = R0.to(device, getattr(torch, dtype))
    vg = rec.view_graph

    def run(iters: int) -> int:
        o = RotationAveragingOptions(linear_solver=linear_solver, l1_iterations=0, irls_iterations=iters,
                                     step_tolerance=0.0)
        return refine_rotations(R0, vg.pairs, relative_rotations(rec), vg.valid, 0, o)[1]

    return per_iteration(run, n1, n2)
