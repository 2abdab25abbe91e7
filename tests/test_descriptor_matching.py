"""Descriptor matching: COLMAP's rules (distance, ratio, cross-check), exact engine against a
per-pair reference, inverted-file engine against the exact one on planted matches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchsfm.frontend.descriptor_matching import DescriptorMatchOptions, match_descriptors


def _sift_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 descriptors with L2 norm ~512, like COLMAP's SIFT."""
    d = np.abs(rng.normal(size=(n, 128))) ** 2
    d = d / np.linalg.norm(d, axis=1, keepdims=True) * 512
    return np.clip(np.round(d), 0, 255).astype(np.uint8)


def _scene(num_images: int, n: int, shared: float, noise: float, seed: int = 0):
    """Images whose descriptors are noisy copies of one common pool (the planted matches) plus
    image-specific ones. Returns flat descriptors, offsets and each descriptor's pool id (-1: none)."""
    rng = np.random.default_rng(seed)
    pool = _sift_like(n, rng).astype(np.float64)
    descs, owners = [], []
    for _ in range(num_images):
        k = int(shared * n)
        ids = rng.choice(n, size=k, replace=False)
        d = np.clip(pool[ids] + rng.normal(scale=noise, size=(k, 128)), 0, 255)
        own = _sift_like(n - k, rng).astype(np.float64)
        allid = np.concatenate([ids, -np.ones(n - k, int)])
        perm = rng.permutation(n)
        descs.append(np.concatenate([d, own])[perm])
        owners.append(allid[perm])
    desc = np.round(np.concatenate(descs)).astype(np.uint8)
    offsets = np.arange(num_images + 1) * n
    return torch.from_numpy(desc), torch.from_numpy(offsets), np.concatenate(owners)


def _reference(desc: np.ndarray, offsets: np.ndarray, pairs: np.ndarray, o: DescriptorMatchOptions) -> set:
    """COLMAP's brute-force rules, one pair at a time in numpy (float64)."""
    out = set()
    max_d = o.max_distance * o.descriptor_norm
    for p, (i, j) in enumerate(pairs):
        a = desc[offsets[i]:offsets[i + 1]].astype(np.float64)
        b = desc[offsets[j]:offsets[j + 1]].astype(np.float64)
        d = np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0))

        def one_way(m):
            s = np.sort(m, axis=1)
            best = m.argmin(1)
            second = s[:, 1] if m.shape[1] > 1 else np.full(len(m), np.inf)
            ok = (s[:, 0] <= max_d) & (s[:, 0] < o.max_ratio * second)
            return np.where(ok, best, -1)

        m12, m21 = one_way(d), one_way(d.T)
        for x, y in enumerate(m12):
            if y >= 0 and (not o.cross_check or m21[y] == x):
                out.add((p, x, int(y)))
    return out


def _as_set(m) -> set:
    return set(zip(m.pair.tolist(), m.idx1.tolist(), m.idx2.tolist()))


@pytest.mark.parametrize("cross_check", [True, False])
def test_exact_equals_reference(device, cross_check):
    desc, off, _ = _scene(5, 150, 0.5, 6.0)
    pairs = torch.triu_indices(5, 5, 1).T
    o = DescriptorMatchOptions(engine="exact", cross_check=cross_check, memory_budget_mb=1)  # several chunks
    got = match_descriptors(desc.to(device), off, pairs, o)
    ref = _reference(desc.numpy(), off.numpy(), pairs.numpy(), o)
    assert len(ref) > 200
    if device.type == "cpu":
        assert _as_set(got) == ref
    else:  # fp16 products on CUDA: a few borderline ratios may flip
        assert len(_as_set(got) ^ ref) <= 0.01 * len(ref)
    # sorted by pair, then ratio (best first), ratios below max_ratio
    p, r = got.pair.cpu(), got.ratio.cpu()
    assert torch.all(p[1:] >= p[:-1]) and bool((r < 0.8 + 1e-6).all())
    same = p[1:] == p[:-1]
    assert torch.all(r[1:][same] >= r[:-1][same])


def test_rules_distance_and_ratio():
    """A descriptor with two equally near candidates fails the ratio test; one beyond
    max_distance fails the distance test; an unambiguous one matches."""
    base = torch.zeros(4, 128)
    for k in range(4):  # orthogonal blocks of 16 x 128: norm 512, as SIFT's uint8 descriptors
        base[k, 16 * k:16 * k + 16] = 128
    a = base[[0, 1, 2]].clone()
    b = torch.stack([base[0], base[1] * 0.5 + base[3] * 0.5, base[1] * 0.5 + base[3] * 0.5 + 1e-3, base[3]])
    b = (b / b.norm(dim=1, keepdim=True) * 512).round()
    desc = torch.cat([a, b]).to(torch.uint8)
    off = torch.tensor([0, 3, 7])
    m = match_descriptors(desc, off, torch.tensor([[0, 1]]), DescriptorMatchOptions(engine="exact"))
    assert _as_set(m) == {(0, 0, 0)}  # 1 has two ties (ratio 1), 2 is orthogonal to all (too far)


def test_ivf_recovers_planted_matches():
    desc, off, owner = _scene(12, 400, 0.6, 5.0, seed=1)
    pairs = torch.triu_indices(12, 12, 1).T
    exact = _as_set(match_descriptors(desc, off, pairs, DescriptorMatchOptions(engine="exact")))
    ivf_m = match_descriptors(desc, off, pairs, DescriptorMatchOptions(engine="ivf", ivf_list_size=64, ivf_min_pairs=1))
    ivf = _as_set(ivf_m)
    # planted: both descriptors come from the same pool entry
    planted = sum(1 for (p, x, y) in exact
                  if owner[off[pairs[p, 0]] + x] >= 0 and owner[off[pairs[p, 0]] + x] == owner[off[pairs[p, 1]] + y])
    assert planted > 0.9 * len(exact) > 1000
    assert len(ivf & exact) >= 0.9 * len(exact)
    assert ivf <= exact  # the exact re-check: every match is one exact search makes too
    loose = _as_set(match_descriptors(desc, off, pairs, DescriptorMatchOptions(
        engine="ivf", ivf_list_size=64, ivf_min_pairs=1, ivf_exact_check=False)))
    assert ivf <= loose  # the re-check only removes
    # deterministic
    again = _as_set(match_descriptors(desc, off, pairs, DescriptorMatchOptions(engine="ivf", ivf_list_size=64, ivf_min_pairs=1)))
    assert again == ivf


def test_sparse_pairs_go_to_exact_and_cover_only_given_pairs():
    desc, off, _ = _scene(10, 120, 0.6, 5.0, seed=2)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 3], [7, 9]])  # sequential-like, sparse in the block
    o = DescriptorMatchOptions(engine="ivf")
    got = match_descriptors(desc, off, pairs, o)
    ref = _reference(desc.numpy(), off.numpy(), pairs.numpy(), o)
    assert _as_set(got) == ref
    assert set(got.pair.tolist()) <= {0, 1, 2, 3}


def test_empty_images_and_pairs():
    desc = torch.zeros(0, 128, dtype=torch.uint8)
    m = match_descriptors(desc, torch.tensor([0, 0, 0]), torch.tensor([[0, 1]]))
    assert len(m) == 0
    m = match_descriptors(desc, torch.tensor([0, 0, 0]), torch.zeros(0, 2, dtype=torch.long))
    assert len(m) == 0
