"""Which image pairs to match. All generators work on image rows 0..n-1 of a fixed image order
and return an int64 (E, 2) tensor of unique rows (i, j) with i < j, sorted."""
from __future__ import annotations

import torch
from torch import Tensor


def canonical_pairs(i: Tensor, j: Tensor) -> Tensor:
    """Unique undirected pairs without self-pairs, as sorted rows (min, max)."""
    keep = i != j
    p = torch.stack([torch.minimum(i, j), torch.maximum(i, j)], dim=1)[keep]
    return torch.unique(p.long().cpu(), dim=0) if p.numel() else p.new_zeros((0, 2)).long().cpu()


def exhaustive_pairs(n: int) -> Tensor:
    return torch.triu_indices(n, n, offset=1).T.contiguous()


def sequential_offsets(n: int, overlap: int, quadratic_overlap: bool = True) -> Tensor:
    """Forward index offsets: 1..overlap, plus 2^k for k < overlap (COLMAP's quadratic overlap,
    which adds a few long-range links that help close loops)."""
    off = torch.arange(1, overlap + 1)
    if quadratic_overlap:
        k = torch.arange(min(overlap, max(1, n).bit_length() + 1))
        off = torch.cat([off, 2**k])
    return torch.unique(off[(off > 0) & (off < max(n, 1))])


def sequential_pairs(n: int, overlap: int = 10, quadratic_overlap: bool = True, loop_closure: bool = False) -> Tensor:
    """Video order: i with i + offset. With loop_closure the order is a cycle (turntables,
    walks that return to the start), so the last images are also matched with the first."""
    if n < 2:
        return torch.zeros((0, 2), dtype=torch.long)
    i = torch.arange(n)[:, None]
    j = i + sequential_offsets(n, overlap, quadratic_overlap)[None, :]
    i, j = i.expand_as(j).reshape(-1), j.reshape(-1)
    if loop_closure:
        j = j % n
    else:
        i, j = i[j < n], j[j < n]
    return canonical_pairs(i, j)


def top_k_pairs(desc: Tensor, k: int, block: int = 4096, exclude_within: int = 0, queries: Tensor | None = None) -> Tensor:
    """Pairs (query, its k most similar images by cosine similarity of L2-normalised global
    descriptors), symmetrised. `exclude_within` drops candidates whose row differs from the
    query's by at most that much (loop detection looks beyond the sequential window)."""
    n = desc.shape[0]
    rows = torch.arange(n, device=desc.device) if queries is None else queries.to(desc.device)
    out_i, out_j = [], []
    all_rows = torch.arange(n, device=desc.device)
    for s in range(0, rows.numel(), block):
        q = rows[s : s + block]
        sim = desc[q] @ desc.T  # (b, n)
        sim[(q[:, None] - all_rows[None, :]).abs() <= exclude_within] = float("-inf")
        kk = min(k, n - 1)
        if kk <= 0:
            continue
        val, idx = sim.topk(kk, dim=1)
        ok = torch.isfinite(val)
        out_i.append(q[:, None].expand_as(idx)[ok])
        out_j.append(idx[ok])
    if not out_i:
        return torch.zeros((0, 2), dtype=torch.long)
    return canonical_pairs(torch.cat(out_i), torch.cat(out_j))


def merge_pairs(*pair_sets: Tensor) -> Tensor:
    p = torch.cat([ps.long().cpu().reshape(-1, 2) for ps in pair_sets])
    return torch.unique(p, dim=0) if p.numel() else p
