"""Seeded minimal samples: distinct match indices per pair and trial, without rejection.

Randomness is a counter-based integer hash of (seed, stream, pair seed, trial, draw), computed with
32-bit arithmetic inside int64 tensors, so a pair's samples are the same on every device and
whatever the chunking or the number of rounds (no generator state to carry).
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without int64 overflow (split x into 16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """An avalanching 32-bit integer hash (Wellons' lowbias32) on int64 tensors in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seed: int, stream: int, pair_seed: Tensor) -> Tensor:
    """(P,) 32-bit keys of one random stream per pair."""
    base = hash32(torch.tensor(((seed & _MASK32) ^ ((stream * _GOLDEN) & _MASK32)), device=pair_seed.device))
    lo = pair_seed & _MASK32
    hi = (pair_seed >> 32) & _MASK32
    return hash32(hash32(base ^ hash32(hi)) ^ lo)


def uniforms(keys: Tensor, trial: Tensor, num: int) -> Tensor:
    """(P, K, num) float64 uniforms in [0, 1) for keys (P,) and global trial indices (P, K)."""
    t = hash32((keys[:, None] + trial) & _MASK32)
    j = hash32(torch.arange(1, num + 1, device=keys.device, dtype=torch.long) * _GOLDEN & _MASK32)
    h = hash32(t[..., None] ^ j)
    return (h >> 8).to(torch.float64) * (1.0 / (1 << 24))


def sample_distinct(keys: Tensor, first_trial: Tensor, num_trials: int, size: int, pool: Tensor) -> Tensor:
    """`size` distinct indices in [0, pool) for each pair and trial: (P, K, size) int64, ascending.

    keys (P,) stream keys; first_trial (P,) global index of the first trial; pool (P, K) int64 the
    number of candidates (>= size) per trial. Draw j is uniform over the pool - j unused indices
    and is shifted past the earlier picks in ascending order, so all subsets are equally likely.
    """
    trial = first_trial[:, None] + torch.arange(num_trials, device=keys.device)
    u = uniforms(keys, trial, size)
    picks = None
    for j in range(size):
        r = torch.floor(u[..., j] * (pool - j).to(torch.float64)).long()
        if picks is not None:
            for k in range(j):  # picks sorted ascending: r counts the unused indices before it
                r = r + (r >= picks[..., k]).long()
            picks = torch.sort(torch.cat([picks, r[..., None]], -1), -1).values
        else:
            picks = r[..., None]
    return picks


def growth_pool(num: Tensor, trial: Tensor, size: int, growth_trials: int, growth_start: float) -> Tensor:
    """PROSAC-like pool sizes (P, K): trial t < growth_trials samples from the best
    n * (g0 + (1 - g0) t / T) matches (at least `size`), later trials from all n."""
    n = num[:, None].expand_as(trial)
    if growth_trials <= 0:
        return n.clone()
    frac = growth_start + (1.0 - growth_start) * trial.to(torch.float64) / growth_trials
    grown = torch.ceil(n.to(torch.float64) * frac.clamp(max=1.0)).long().clamp_min(size)
    return torch.minimum(grown, n)
