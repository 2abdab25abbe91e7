"""Cache-sized row chunks for long per-item chains of elementwise work on the CPU.

A chain of elementwise ops over millions of rows allocates a fresh temporary per op. Past the
allocator's mmap threshold (32 MB with glibc) each one is new memory the kernel must fault in
and zero, and none stays in cache: unprojecting 6.7M keypoints took 1,151 ns a point in one
piece and 113 ns in chunks of 65,536 rows (660k points: 401 against 109 ns). On a GPU one
kernel over all rows is what runs fast, so there the whole range is one chunk.
"""
from __future__ import annotations

import torch

CPU_CHUNK_ROWS = 1 << 16


def row_chunks(n: int, device: torch.device | str, rows: int | None = None) -> list[slice]:
    """Slices covering range(n): chunks of `rows` (default CPU_CHUNK_ROWS) on the CPU, one
    slice on any other device."""
    step = rows or CPU_CHUNK_ROWS
    if torch.device(device).type != "cpu" or n <= step:
        return [slice(0, n)]
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def rows_per_chunk(device: torch.device | str, n: int) -> int:
    """How many rows a chunked pass takes at a time: CPU_CHUNK_ROWS on the CPU, all `n` (at
    least 1) elsewhere."""
    return CPU_CHUNK_ROWS if torch.device(device).type == "cpu" else max(1, n)
