"""Mutual nearest-neighbour descriptor matching for many image pairs at once, with COLMAP's rules.

A match a -> b (b in image j) needs: L2 distance <= max_distance * descriptor_norm (COLMAP:
512 for SIFT's uint8 descriptors), distance < max_ratio * (distance to the second-nearest
descriptor *of image j*), and with cross_check the same test from b back to a.

Two engines apply the same rules:
- `exact`: batched matrix products over chunks of pairs, padded per chunk (fp16 on CUDA). Exact
  nearest neighbours; what a GPU should run.
- `ivf`: one inverted file over all descriptors of a block of images proposes, exact search
  confirms. A k-means codebook splits the descriptors into lists; each descriptor is compared
  with the members of its `ivf_probes` nearest lists only (all pairs of the block in a few
  batched matrix products), and its nearest member per other image becomes a proposal when the
  two are mutual. Each proposal is then re-checked against all descriptors of the other image
  (the exact nearest, the ratio against the exact second nearest, both directions), so every
  match is one exact brute force makes; the inverted file only decides which ones are looked
  at (COLMAP's own CPU matcher, a faiss inverted file per image with 8 probes, is approximate in
  the same way, without the re-check).

Pair sets that are sparse inside a block (sequential or retrieval pairs of a large scene) would
waste the inverted file's work, so `match_descriptors` cuts the images into blocks, runs `ivf`
on block pairs with many candidate pairs and `exact` on the rest.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

ENGINES = ("auto", "exact", "ivf")


@dataclass
class DescriptorMatchOptions:
    max_ratio: float = 0.8  # COLMAP SiftMatchingOptions.max_ratio
    max_distance: float = 0.7  # COLMAP SiftMatchingOptions.max_distance, in units of descriptor_norm
    cross_check: bool = True
    engine: str = "auto"  # auto: exact on CUDA, ivf on the CPU where pairs are dense enough
    descriptor_norm: float = 512.0  # L2 norm of a descriptor (COLMAP's uint8 SIFT: 512)
    ivf_list_size: int = 192  # mean descriptors per inverted list (codebook size = N / this)
    ivf_probes: int = 8  # lists each descriptor is compared with (COLMAP: nprobe 8)
    ivf_kmeans_iterations: int = 5
    ivf_cache_mb: int = 1024  # the first pass's distances are kept up to this size (skips recomputing them)
    ivf_min_pairs: int = 64  # a block pair with fewer candidate pairs goes to `exact`
    ivf_min_density: float = 0.25  # ... or with a smaller share of its image pairs as candidates
    # re-check the inverted file's matches by exact search in the other image (its nearest,
    # the ratio against its exact second nearest): only matches exact brute force makes, for
    # about twice the inverted file's time
    ivf_exact_check: bool = False
    block_images: int = 64  # images per block of the inverted file (a block pair: up to 128 images)
    memory_budget_mb: int = 512  # per batched product (distance matrices)
    seed: int = 0


@dataclass
class RawMatches:
    """Matches of many pairs, flat and sorted by pair, best (lowest ratio) first within a pair."""

    pair: Tensor  # (M,) int64 index into the pairs given
    idx1: Tensor  # (M,) int64 keypoint index in the pair's first image
    idx2: Tensor  # (M,) int64 keypoint index in the pair's second image
    ratio: Tensor  # (M,) float: distance / second-best distance (lower is more distinctive)

    def __len__(self) -> int:
        return int(self.pair.numel())

    def counts(self, num_pairs: int) -> Tensor:
        return torch.bincount(self.pair, minlength=num_pairs)


def _empty(device) -> RawMatches:
    z = torch.zeros(0, dtype=torch.long, device=device)
    return RawMatches(z, z.clone(), z.clone(), torch.zeros(0, device=device))


def _sorted(pair: Tensor, idx1: Tensor, idx2: Tensor, ratio: Tensor) -> RawMatches:
    """Sort by pair, then ratio, then idx1 (a total order: deterministic output)."""
    o = torch.argsort(idx1, stable=True)
    o = o[torch.argsort(ratio[o], stable=True)]
    o = o[torch.argsort(pair[o], stable=True)]
    return RawMatches(pair[o], idx1[o], idx2[o], ratio[o])


def concat_matches(parts: list[RawMatches], device) -> RawMatches:
    parts = [p for p in parts if len(p)]
    if not parts:
        return _empty(device)
    return _sorted(*(torch.cat([getattr(p, f) for p in parts]) for f in ("pair", "idx1", "idx2", "ratio")))


def resolve_engine(engine: str, device: torch.device) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown matching engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    return engine


def _passes(best: Tensor, second: Tensor, options: DescriptorMatchOptions) -> Tensor:
    """COLMAP's tests on squared L2 distances: best <= max_distance^2 and
    sqrt(best) < max_ratio * sqrt(second) (a missing second best is +inf)."""
    max_d2 = (options.max_distance * options.descriptor_norm) ** 2
    return (best <= max_d2) & (best < (options.max_ratio**2) * second)


def mutual_nearest(d2: Tensor, v1: Tensor, v2: Tensor, passes, cross_check: bool = True,
                   reverse_passes: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Nearest neighbours in batched squared distances d2 (P, n1, n2), invalid rows and columns
    (v1 (P, n1), v2 (P, n2) False) at +inf: per row its nearest column (P, n1), whether it is
    kept, and the best and second-best distances (a missing second is +inf). A row is kept when
    `passes(best, second)` (bool) holds and, with `cross_check`, it is also the nearest row of
    that column, whose own test must pass too unless not `reverse_passes`."""
    n1, n2 = d2.shape[1], d2.shape[2]
    v12, i12 = torch.topk(d2, min(2, n2), dim=2, largest=False)  # (P, n1, k)
    v21, i21 = torch.topk(d2, min(2, n1), dim=1, largest=False)  # (P, k, n2)
    sec12 = v12[..., 1] if n2 > 1 else torch.full_like(v12[..., 0], float("inf"))
    keep = passes(v12[..., 0], sec12) & v1
    m12 = torch.where(keep, i12[..., 0], -1)
    if cross_check:
        back_ok = v2
        if reverse_passes:
            sec21 = v21[:, 1] if n1 > 1 else torch.full_like(v21[:, 0], float("inf"))
            back_ok = back_ok & passes(v21[:, 0], sec21)
        m21 = torch.where(back_ok, i21[:, 0], -1)  # (P, n2)
        keep = keep & (m21.gather(1, m12.clamp_min(0)) == torch.arange(n1, device=d2.device)[None])
    return m12, keep, v12[..., 0], sec12


# --------------------------------------------------------------------------------------------
# exact engine


def _pad_rows(offsets: Tensor, images: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(P, width) flat descriptor rows of each image's first `width` descriptors, and the valid mask."""
    n = offsets[images + 1] - offsets[images]
    col = torch.arange(width, device=offsets.device)
    valid = col[None] < n[:, None]
    rows = torch.where(valid, offsets[images][:, None] + col[None], torch.zeros_like(col)[None])
    return rows, valid


def _exact_chunk(desc: Tensor, offsets: Tensor, pairs: Tensor, pair_index: Tensor,
                 options: DescriptorMatchOptions, n1: int, n2: int) -> RawMatches:
    r1, v1 = _pad_rows(offsets, pairs[:, 0], n1)
    r2, v2 = _pad_rows(offsets, pairs[:, 1], n2)
    a, b = desc[r1].float(), desc[r2].float()  # only the chunk's rows are converted
    sq1, sq2 = (a * a).sum(-1), (b * b).sum(-1)
    if desc.device.type == "cuda":
        # fp16 products of unit-scaled descriptors (|dot| <= 1); squared norms stay exact in fp32
        s = 1.0 / options.descriptor_norm
        dot = torch.bmm((a * s).half(), (b * s).half().transpose(1, 2)).float() * (options.descriptor_norm**2)
    else:
        dot = torch.bmm(a, b.transpose(1, 2))
    d2 = (sq1[:, :, None] + sq2[:, None, :] - 2 * dot).clamp_min_(0)
    d2.masked_fill_(~(v1[:, :, None] & v2[:, None, :]), float("inf"))
    m12, keep, best, second = mutual_nearest(d2, v1, v2, lambda b, s: _passes(b, s, options), options.cross_check)
    p, i = torch.nonzero(keep, as_tuple=True)
    j = m12[p, i]
    ratio = (best[p, i] / second[p, i]).sqrt()
    return RawMatches(pair_index[p], i, j, ratio)


def _plan_exact(offsets: Tensor, pairs: Tensor, pair_index: Tensor, options: DescriptorMatchOptions) -> list[MatchUnit]:
    """Chunks of pairs of similar feature counts (sorted by size, padded to the chunk's first),
    each within `memory_budget_mb`."""
    if len(pairs) == 0:
        return []
    counts = offsets[1:] - offsets[:-1]
    size = torch.maximum(counts[pairs[:, 0]], counts[pairs[:, 1]]).clamp_min(1)
    order = torch.argsort(size, descending=True)
    sizes = size[order].tolist()
    budget = max(1, options.memory_budget_mb * 2**20 // 16)  # d2 + top-k temporaries: ~4 float copies
    units, s = [], 0
    while s < len(order):
        w = sizes[s]
        e = min(len(order), s + max(1, budget // (w * w)))
        units.append(MatchUnit("exact", pair_index[order[s:e]], width=w))
        s = e
    return units


def iter_exact(desc: Tensor, offsets: Tensor, pairs: Tensor, options: DescriptorMatchOptions,
               pair_index: Tensor | None = None):
    """Exact mutual nearest neighbours, chunk by chunk: batched products over pairs of similar
    feature counts, each chunk within `memory_budget_mb`. Yields (pair indices, RawMatches)."""
    if pair_index is None:
        pair_index = torch.arange(len(pairs), device=desc.device)
    offsets = offsets.to(desc.device).long()
    pairs = pairs.to(desc.device).long()
    # the units index `pairs` by position; pair_index maps positions to the caller's indices
    for unit in _plan_exact(offsets, pairs, torch.arange(len(pairs), device=desc.device), options):
        m = match_unit(desc, offsets, pairs, unit, options)
        yield pair_index[unit.pair_index], RawMatches(pair_index[m.pair], m.idx1, m.idx2, m.ratio)


def match_exact(desc: Tensor, offsets: Tensor, pairs: Tensor, options: DescriptorMatchOptions,
                pair_index: Tensor | None = None) -> RawMatches:
    return concat_matches([m for _, m in iter_exact(desc, offsets, pairs, options, pair_index)], desc.device)


# --------------------------------------------------------------------------------------------
# inverted-file engine


def _kmeans(x: Tensor, k: int, iterations: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means on a sample of `x` (at most 32 points per centroid), seeded."""
    n = len(x)
    perm = torch.randperm(n, generator=generator, device="cpu").to(x.device)
    cent = x[perm[:k]].clone()
    sample = x[perm[: min(n, 32 * k)]]
    for _ in range(iterations):
        a = ((cent * cent).sum(1)[None] - 2 * sample @ cent.T).argmin(1)
        cnt = torch.bincount(a, minlength=k)
        acc = torch.zeros_like(cent).index_add_(0, a, sample)
        cent = torch.where((cnt > 0)[:, None], acc / cnt.clamp_min(1)[:, None].to(acc.dtype), cent)
    return cent


_MAX_BLOCK = 2**24  # descriptors of an inverted-file block: member ids are exact in float32


@dataclass
class _InvertedFile:
    """Which descriptors meet which: members (database side) by primary list, query entries by
    probed list, and the buckets of lists of similar sizes that share one batched product."""

    member_order: Tensor
    msize: Tensor
    moff: Tensor
    query_of: Tensor
    qsize: Tensor
    qoff: Tensor
    buckets: list  # (lists, bm, bq)


def _inverted_file(x: Tensor, options: DescriptorMatchOptions, generator: torch.Generator) -> _InvertedFile:
    n, device = len(x), x.device
    if n >= _MAX_BLOCK:
        raise ValueError(f"an inverted-file block holds at most {_MAX_BLOCK - 1} descriptors, got {n}")
    k = max(1, min(n, round(n / max(options.ivf_list_size, 1))))
    cent = _kmeans(x, k, options.ivf_kmeans_iterations, generator)
    nprobe = min(options.ivf_probes, k)
    probe = ((cent * cent).sum(1)[None] - 2 * x @ cent.T).topk(nprobe, dim=1, largest=False).indices
    member_order = torch.argsort(probe[:, 0], stable=True)
    msize = torch.bincount(probe[:, 0], minlength=k)
    qlist = probe.reshape(-1)
    query_of = torch.arange(n, device=device).repeat_interleave(nprobe, output_size=n * nprobe)[torch.argsort(qlist, stable=True)]
    qsize = torch.bincount(qlist, minlength=k)
    by_size = torch.argsort(msize * qsize, descending=True)
    ms, qs = msize[by_size].tolist(), qsize[by_size].tolist()
    cap = max(1, options.memory_budget_mb * 2**20 // 16)  # distances, masks, gathers: ~16 bytes an element
    buckets, s = [], 0
    while s < k:
        if ms[s] == 0 or qs[s] == 0:
            s += 1
            continue
        bm, bq, e = ms[s], qs[s], s + 1
        while e < k and ms[e] and qs[e] and 2 * ms[e] >= bm and 2 * qs[e] >= bq \
                and (e - s + 1) * max(bm, ms[e]) * max(bq, qs[e]) <= cap:
            bm, bq, e = max(bm, ms[e]), max(bq, qs[e]), e + 1
        buckets.append((by_size[s:e], bm, bq))
        s = e
    return _InvertedFile(member_order, msize, torch.cat([msize.new_zeros(1), msize.cumsum(0)]), query_of, qsize,
                         torch.cat([qsize.new_zeros(1), qsize.cumsum(0)]), buckets)


def _ivf_buckets(x: Tensor, sq: Tensor, img: Tensor, allowed: Tensor, ivf: _InvertedFile, skip: int = 0):
    """The inverted file's work, bucket by bucket: yields (query (L, bq), member (L, bm), d2
    (L, bq, bm)): squared distances of each query entry to the members of one of its probed
    lists, +inf where the member is padding, of the query's own image or of an image not paired
    with it. Padded query entries are query n (a row of their own in the callers' tables)."""
    n, nb, device = len(x), len(allowed), x.device
    dense = bool(allowed.sum() == nb * (nb - 1))  # every other image allowed: a cheaper mask
    allowed_ext = torch.cat([allowed, allowed.new_zeros(1, nb)])  # row nb: padded queries
    for lists, bm, bq in ivf.buckets[skip:]:
        cm = torch.arange(bm, device=device)
        cq = torch.arange(bq, device=device)
        mvalid = cm[None] < ivf.msize[lists][:, None]
        qvalid = cq[None] < ivf.qsize[lists][:, None]
        mem = ivf.member_order[torch.where(mvalid, ivf.moff[lists][:, None] + cm[None], 0)]  # (L, bm)
        qry = ivf.query_of[torch.where(qvalid, ivf.qoff[lists][:, None] + cq[None], 0)]  # (L, bq)
        sq_mem = torch.where(mvalid, sq[mem], float("inf"))
        qimg = torch.where(qvalid, img[qry], nb)
        d2 = torch.baddbmm(sq[qry][:, :, None] + sq_mem[:, None, :], x[qry], x[mem].transpose(1, 2), alpha=-2)
        if dense:
            bad = qimg[:, :, None] == img[mem][:, None, :]
        else:
            bad = ~allowed_ext.view(-1)[(qimg * nb)[:, :, None] + img[mem][:, None, :]]
        yield torch.where(qvalid, qry, n), mem, d2.clamp_min_(0).masked_fill_(bad, float("inf"))


def _ivf_proposals(x: Tensor, img: Tensor, allowed: Tensor, options: DescriptorMatchOptions,
                   generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Matches (q, c, ratio) by COLMAP's rules with the nearest and second-nearest descriptor of
    each other image searched among the members of the query's probed lists, as COLMAP's own
    inverted-file matcher searches them. Dense (descriptors x images) tables, filled in two
    passes over the inverted file: the nearest distance; then which member it is, the nearest
    distance but that member's, and ties. Each bucket first reduces along its members per
    (query entry, image), a scatter along the last dimension with a broadcast index, so the
    per-element work stays in float32."""
    n, nb, device = len(x), len(allowed), x.device
    ivf = _inverted_file(x, options, generator)
    sq = (x * x).sum(1)
    inf = float("inf")
    cols = torch.arange(nb, device=device)
    memf = torch.arange(n, device=device, dtype=x.dtype)  # member ids, exact in float32 below 2^24

    def cells(qry: Tensor) -> Tensor:
        return ((qry * nb)[:, :, None] + cols).reshape(-1)

    best = torch.full(((n + 1) * nb,), inf, dtype=x.dtype, device=device)
    cache, room = [], options.ivf_cache_mb * 2**20  # the first pass's distances, kept for the second
    for qry, mem, d2 in _ivf_buckets(x, sq, img, allowed, ivf):
        cell = img[mem][:, None, :].expand_as(d2)
        local = torch.full((*qry.shape, nb), inf, dtype=x.dtype, device=device).scatter_reduce_(2, cell, d2, "amin")
        best.scatter_reduce_(0, cells(qry), local.reshape(-1), "amin")
        room -= d2.numel() * d2.element_size()
        if room >= 0:
            cache.append((qry, mem, d2))
    arg = torch.full_like(best, inf)
    second = torch.full_like(best, inf)
    ties = torch.zeros_like(best)
    rest = _ivf_buckets(x, sq, img, allowed, ivf, skip=len(cache))
    for qry, mem, d2 in itertools.chain(cache, rest):
        cell = img[mem][:, None, :].expand_as(d2)
        # where a cell has no finite distance, "best" marks masked members too: harmless, the
        # cell fails the distance test
        is_best = d2 == best.view(n + 1, nb)[qry].gather(2, cell)
        shape = (*qry.shape, nb)
        loc_arg = torch.full(shape, inf, dtype=x.dtype, device=device).scatter_reduce_(
            2, cell, torch.where(is_best, memf[mem][:, None, :], inf), "amin")
        loc_sec = torch.full(shape, inf, dtype=x.dtype, device=device).scatter_reduce_(
            2, cell, d2.masked_fill_(is_best, inf), "amin")
        loc_cnt = torch.zeros(shape, dtype=x.dtype, device=device).scatter_add_(2, cell, is_best.to(x.dtype))
        idx = cells(qry)
        arg.scatter_reduce_(0, idx, loc_arg.reshape(-1), "amin")
        second.scatter_reduce_(0, idx, loc_sec.reshape(-1), "amin")
        ties.scatter_add_(0, idx, loc_cnt.reshape(-1))
    best, arg, second, ties = (t.view(n + 1, nb)[:n] for t in (best, arg, second, ties))
    second = torch.where(ties > 1, best, second)  # two members at the nearest distance: ratio 1, fails
    ok = torch.isfinite(best) & _passes(best, second, options)
    q, j = torch.nonzero(ok, as_tuple=True)
    c = arg[q, j].long()
    ratio = (best[q, j] / second[q, j]).sqrt()
    if options.cross_check:
        keep = ok[c, img[q]] & (arg[c, img[q]].long() == q) & (img[q] < img[c])  # mutual, each once
    else:
        keep = torch.ones_like(q, dtype=torch.bool)
    return q[keep], c[keep], ratio[keep]


def match_ivf_block(desc: Tensor, offsets: Tensor, images: Tensor, pairs: Tensor, pair_index: Tensor,
                    options: DescriptorMatchOptions, generator: torch.Generator) -> RawMatches:
    """Inverted-file matching of the given pairs, all of whose images are in `images` (rows)."""
    device = desc.device
    nb = len(images)
    local = torch.full((len(offsets) - 1,), -1, dtype=torch.long, device=device)
    local[images] = torch.arange(nb, device=device)
    counts = offsets[images + 1] - offsets[images]
    total = int(counts.sum())
    if total == 0 or len(pairs) == 0:
        return _empty(device)
    img = torch.arange(nb, device=device).repeat_interleave(counts, output_size=total)
    start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    rows = offsets[images].repeat_interleave(counts, output_size=total) + (torch.arange(total, device=device) - start[img])
    x = desc[rows].float()
    li, lj = local[pairs[:, 0]], local[pairs[:, 1]]
    allowed = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    allowed[li, lj] = True
    allowed[lj, li] = True
    q, c, ratio = _ivf_proposals(x, img, allowed, options, generator)
    # pair index of (image q, image c), oriented as given
    pid = torch.full((nb, nb), -1, dtype=torch.long, device=device)
    pid[li, lj] = pair_index
    pid[lj, li] = pair_index
    if not options.cross_check:  # one-way matching: from each pair's first image only
        first = local[pairs[pid[img[q], img[c]].clamp_min(0), 0]] == img[q]
        q, c, ratio = q[first], c[first], ratio[first]
    if options.ivf_exact_check:
        q, c, ratio = _exact_recheck(x, img, start, q, c, options)
    p = pid[img[q], img[c]]
    forward = local[pairs[p.clamp_min(0), 0]] == img[q]
    kq = rows[q] - offsets[images[img[q]]]
    kc = rows[c] - offsets[images[img[c]]]
    i1 = torch.where(forward, kq, kc)
    i2 = torch.where(forward, kc, kq)
    good = p >= 0
    return RawMatches(p[good], i1[good], i2[good], ratio[good])


def _exact_recheck(x: Tensor, img: Tensor, start: Tensor, q: Tensor, c: Tensor,
                   options: DescriptorMatchOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the proposed matches q -> c that exact search confirms: c is q's nearest descriptor in
    c's image and passes the ratio test against the exact second nearest there, and (with
    cross_check) the same from c back to q. Descriptors of one image are the rows
    start[i]:start[i+1] of x. All queries of one target image form one product; target images
    are batched in chunks within the memory budget."""
    n = len(q)
    device = x.device
    if n == 0:
        return q, c, torch.zeros(0, device=device)
    query = torch.cat([q, c]) if options.cross_check else q
    expect = torch.cat([c, q]) if options.cross_check else c
    target = img[expect]
    sq = (x * x).sum(1)
    order = torch.argsort(target, stable=True)
    tgt, cnt = torch.unique_consecutive(target[order], return_counts=True)
    qoff = torch.cat([cnt.new_zeros(1), cnt.cumsum(0)])
    nt = start[tgt + 1] - start[tgt]
    ok = torch.zeros(len(query), dtype=torch.bool, device=device)
    ratio = torch.ones(len(query), device=device)
    budget = max(1, options.memory_budget_mb * 2**20 // 16)
    by_size = torch.argsort(cnt * nt, descending=True)
    cs, ns = cnt[by_size].tolist(), nt[by_size].tolist()
    s = 0
    while s < len(by_size):  # one iteration per chunk of target images, padded to the chunk's largest
        wq, wn, e = cs[s], ns[s], s + 1
        while e < len(by_size) and (e - s + 1) * max(wq, cs[e]) * max(wn, ns[e]) <= budget:
            wq, wn, e = max(wq, cs[e]), max(wn, ns[e]), e + 1
        t = by_size[s:e]
        s = e
        aq, an = torch.arange(wq, device=device), torch.arange(wn, device=device)
        qvalid = aq[None] < cnt[t][:, None]
        nvalid = an[None] < nt[t][:, None]
        qrow = order[torch.where(qvalid, qoff[t][:, None] + aq[None], 0)]  # (T, wq) rows into query
        trow = torch.where(nvalid, start[tgt[t]][:, None] + an[None], 0)  # (T, wn) rows into x
        sq_t = torch.where(nvalid, sq[trow], float("inf"))
        d2 = torch.baddbmm(sq[query[qrow]][:, :, None] + sq_t[:, None, :], x[query[qrow]], x[trow].transpose(1, 2), alpha=-2)
        k = min(2, wn)
        v, j = torch.topk(d2.clamp_min_(0), k, dim=2, largest=False)
        second = v[..., 1] if k > 1 else torch.full_like(v[..., 0], float("inf"))
        best_row = trow.gather(1, j[..., 0])
        good = (best_row == expect[qrow]) & _passes(v[..., 0], second, options)
        ok[qrow[qvalid]] = good[qvalid]
        ratio[qrow[qvalid]] = (v[..., 0] / second).sqrt()[qvalid]
    keep = ok[:n] & ok[n:] if options.cross_check else ok
    return q[keep], c[keep], ratio[:n][keep]


def _block_plan(pairs: Tensor, num_images: int, options: DescriptorMatchOptions) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Split the pairs into (images, pair indices) groups for `ivf` and the rest for `exact`."""
    b = max(2, options.block_images)
    blk = pairs // b
    lo, hi = torch.minimum(blk[:, 0], blk[:, 1]), torch.maximum(blk[:, 0], blk[:, 1])
    nblk = (num_images + b - 1) // b
    key = lo * nblk + hi
    uniq, inv, cnt = torch.unique(key, return_inverse=True, return_counts=True)
    groups, rest = [], []
    for g, (k, n) in enumerate(zip(uniq.tolist(), cnt.tolist())):
        sel = torch.nonzero(inv == g).squeeze(1)
        u, v = divmod(k, nblk)
        imgs = torch.unique(pairs[sel].reshape(-1))
        possible = len(imgs) * (len(imgs) - 1) // 2
        if n >= options.ivf_min_pairs and n >= options.ivf_min_density * possible:
            groups.append((imgs, sel))
        else:
            rest.append(sel)
    rest_t = torch.cat(rest) if rest else torch.zeros(0, dtype=torch.long, device=pairs.device)
    return groups, rest_t


@dataclass
class MatchUnit:
    """One unit of matching work, planned from feature counts alone (no descriptors): what
    `match_unit` computes in one call, on any process that holds the unit's images."""

    engine: str  # "none" (an image without features), "exact" or "ivf"
    pair_index: Tensor  # (P,) indices into the pairs given to `plan_matches`
    width: int = 0  # exact: descriptors per image, padded
    images: Tensor | None = None  # ivf: the block's image rows, sorted
    seed: int = 0  # ivf: the k-means generator's seed

    def image_rows(self, pairs: Tensor) -> Tensor:
        """The image rows this unit reads (sorted)."""
        return self.images if self.images is not None else torch.unique(pairs[self.pair_index].reshape(-1))

    def to(self, device) -> "MatchUnit":
        images = None if self.images is None else self.images.to(device)
        return MatchUnit(self.engine, self.pair_index.to(device), self.width, images, self.seed)


def plan_matches(offsets: Tensor, pairs: Tensor, options: DescriptorMatchOptions | None = None,
                 device: torch.device | str | None = None) -> list[MatchUnit]:
    """The units of `iter_matches` for `pairs` ((E, 2) image rows), from the per-image feature
    counts in `offsets` only. `device`: where the units run (picks the `auto` engine)."""
    options = options or DescriptorMatchOptions()
    device = torch.device(device) if device is not None else offsets.device
    engine = resolve_engine(options.engine, device)
    pairs = pairs.to(offsets.device).long()
    offsets = offsets.long()
    counts = offsets[1:] - offsets[:-1]
    has = (counts[pairs[:, 0]] > 0) & (counts[pairs[:, 1]] > 0)
    units = []
    if not bool(has.all()):  # an image without descriptors matches nothing
        units.append(MatchUnit("none", torch.nonzero(~has).squeeze(1)))
    keep = torch.nonzero(has).squeeze(1)
    if len(keep) == 0:
        return units
    if engine == "auto":
        engine = "exact" if device.type == "cuda" else "ivf"
    if engine == "exact":
        return units + _plan_exact(offsets, pairs[keep], keep, options)
    groups, rest = _block_plan(pairs[keep], len(offsets) - 1, options)
    for imgs, sel in groups:
        # seeded by the block's first image: a block's result does not depend on which other
        # blocks are matched in the same run, nor on where it runs
        units.append(MatchUnit("ivf", keep[sel], images=imgs, seed=options.seed * 1_000_003 + int(imgs[0])))
    return units + _plan_exact(offsets, pairs[keep[rest]], keep[rest], options)


def match_unit(desc: Tensor, offsets: Tensor, pairs: Tensor, unit: MatchUnit,
               options: DescriptorMatchOptions | None = None) -> RawMatches:
    """Raw matches of one planned unit (pair indices as in the unit). `pairs` are the planned
    pairs' image rows of `desc`/`offsets`; only the unit's images are read. Device follows `desc`."""
    options = options or DescriptorMatchOptions()
    device = desc.device
    offsets = offsets.to(device).long()
    pairs = pairs.to(device).long()
    unit = unit.to(device)
    if unit.engine == "none" or len(unit.pair_index) == 0:
        return _empty(device)
    sel = pairs[unit.pair_index]
    if unit.engine == "exact":
        return _exact_chunk(desc, offsets, sel, unit.pair_index, options, unit.width, unit.width)
    gen = torch.Generator(device="cpu").manual_seed(unit.seed)
    return match_ivf_block(desc, offsets, unit.images, sel, unit.pair_index, options, gen)


def iter_matches(desc: Tensor, offsets: Tensor, pairs: Tensor, options: DescriptorMatchOptions | None = None):
    """Raw matches for `pairs` ((E, 2) image rows) of the flat descriptors `desc` ((N, D), rows
    of image i at offsets[i]:offsets[i+1]), unit by unit (an inverted-file block or a chunk of
    exact pairs: `plan_matches`), so that a caller can verify and write each unit before the
    next is matched. Yields (pair indices covered, RawMatches of those pairs). Device follows `desc`."""
    options = options or DescriptorMatchOptions()
    offsets = offsets.to(desc.device).long()
    pairs = pairs.to(desc.device).long()
    for unit in plan_matches(offsets, pairs, options, desc.device):
        yield unit.pair_index, match_unit(desc, offsets, pairs, unit, options)


def match_descriptors(desc: Tensor, offsets: Tensor, pairs: Tensor, options: DescriptorMatchOptions | None = None) -> RawMatches:
    """All raw matches of `iter_matches` at once, sorted by pair, best first."""
    return concat_matches([m for _, m in iter_matches(desc, offsets, pairs, options)], desc.device)


def estimate_memory_mb(num_descriptors: int, dim: int = 128) -> float:
    """Host/device memory of the inverted file for a block of `num_descriptors` (float copies)."""
    return num_descriptors * (dim * 4 + 64) / 2**20 + math.sqrt(num_descriptors)
