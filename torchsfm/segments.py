"""Segment operations on flat, grouped items: CSR offsets, row ids, pairs and strided subsets.

The data model stores variable-length lists (keypoints per image, matches per pair, observations
per track) as one flat array plus CSR `offsets`, or as items sorted by their group. These helpers
work on such layouts with whole-tensor operations (no Python loop over groups). They know nothing
of cameras or images, so every layer may use them (`torchsfm.data.model` re-exports them).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def offsets_from_counts(counts: Tensor) -> Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def group_pairs(group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """All unordered pairs (a, b), a < b, of items in the same group; `group` must be sorted
    (e.g. observations by track). Vectorised: each item pairs with the items after it."""
    dev = group.device
    length = torch.bincount(group, minlength=num_groups)
    start = offsets_from_counts(length)[:-1]
    pos = torch.arange(group.numel(), device=dev) - start[group]
    partners = length[group] - 1 - pos
    a = torch.repeat_interleave(torch.arange(group.numel(), device=dev), partners)
    first = offsets_from_counts(partners)[:-1]
    b = a + 1 + (torch.arange(a.numel(), device=dev) - first[a])
    return a, b


def spread_subset(group: Tensor, num_groups: int, max_per_group: int) -> Tensor:
    """Bool mask keeping at most about `max_per_group` items of each group, evenly strided
    (so a track keeps its first and far-apart views); `group` (M,) must be sorted."""
    count = torch.bincount(group, minlength=num_groups)
    start = torch.cumsum(count, 0) - count
    rank = torch.arange(group.numel(), device=group.device) - start[group]
    stride = (count + max_per_group - 1) // max_per_group
    return rank % stride.clamp_min(1)[group] == 0


def rows_of(offsets: Tensor) -> Tensor:
    """For CSR offsets (N+1,), the row index of every item (offsets[-1],)."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts)


def segment_median(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """(num_groups,) lower median of `values` per group (inf for empty groups)."""
    out = torch.full((num_groups,), math.inf, dtype=values.dtype, device=values.device)
    if values.numel() == 0:
        return out
    o = torch.argsort(values, stable=True)
    o = o[torch.argsort(group[o], stable=True)]
    count = torch.bincount(group, minlength=num_groups)
    start = torch.cumsum(count, 0) - count
    has = count > 0
    out[has] = values[o][(start + (count - 1) // 2)[has]]
    return out


def first_per_key(key: Tensor, score: Tensor) -> Tensor:
    """(N,) bool keeping, for every distinct key, the item with the smallest score (the first on ties)."""
    if key.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=key.device)
    o = torch.argsort(score, stable=True)
    o = o[torch.argsort(key[o], stable=True)]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[o][1:] != key[o][:-1]
    keep = torch.zeros_like(first)
    keep[o[first]] = True
    return keep


def rank_in_runs(key: Tensor) -> Tensor:
    """For a sorted key, the position of each item within its run of equal keys."""
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    pos = torch.arange(key.numel(), device=key.device)
    return pos - torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
