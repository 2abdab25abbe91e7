"""Layout helpers: per-observation data as rows (N, m) or "structure of arrays" (m, N).

The solver streams elementwise products over observations in SoA layout (each torch op then
runs over long contiguous vectors), and gathers whole rows for the pair GEMMs. Converting
between the two is a 2-D transpose; on the CPU numpy's transpose copy was measured 1.5-4x faster
than torch's for these (m <= 30, N large) shapes, so it is used there. numpy sees the CPU
tensors through DLPack, a zero-copy view: no device read (the path is CPU-only; on CUDA the
torch copy runs), so host-sync counters, which count `Tensor.numpy()` as a read, do not count it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def transpose(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Contiguous copy of x.T for a 2-D tensor (written into `out` when given)."""
    if x.device.type == "cpu" and not x.requires_grad and x.dtype in (torch.float64, torch.float32, torch.int64):
        if out is None:
            return torch.from_numpy(np.ascontiguousarray(np.from_dlpack(x.detach()).T))
        np.copyto(np.from_dlpack(out.detach()), np.from_dlpack(x.detach()).T)
        return out
    if out is None:
        return x.T.contiguous()
    return out.copy_(x.T)


def rows_to_soa(x: Tensor) -> Tensor:
    """(N, *shape) -> (*shape, N)."""
    N = x.shape[0]
    return transpose(x.reshape(N, math.prod(x.shape[1:]))).reshape(*x.shape[1:], N)


def soa_to_rows(x: Tensor) -> Tensor:
    """(*shape, N) -> (N, *shape)."""
    N = x.shape[-1]
    return transpose(x.reshape(math.prod(x.shape[:-1]), N)).reshape(N, *x.shape[:-1])


def gather_soa(table: Tensor, index: Tensor) -> Tensor:
    """Rows of table (R, m) picked by index (N,), returned as (m, N)."""
    return transpose(table.index_select(0, index))


def sum_products(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """(a * b).sum(dim) for broadcastable a and b without materialising the product: one
    multiply-add per index of the (short) summed axis. On per-observation blocks the full product
    is the largest temporary of an LM step ((d, nc, N): 85 MB at 661k observations)."""
    a, b = torch.broadcast_tensors(a, b)  # expanded views, no copy
    if a.shape[dim] == 0:  # an empty axis (no eliminated coordinates): the sum is zero
        return a.new_zeros(a.shape[:dim] + a.shape[dim + 1:])
    out = a.select(dim, 0) * b.select(dim, 0)
    for i in range(1, a.shape[dim]):
        out.addcmul_(a.select(dim, i), b.select(dim, i))
    return out
