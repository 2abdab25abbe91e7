"""Mutual nearest-neighbour descriptor matching for many image pairs at once, with COLMAP's rules.

A match a -> b (b in image j) needs: L2 distance <= max_distance * descriptor_norm (COLMAP:
512 for SIFT's uint8 descriptors), distance < max_ratio * (distance to the second-nearest
descriptor *of image j*), and with cross_check the same test from b back to a.

Two engines apply the same rules:
- `exact`: batched matrix products over chunks of pairs, padded per chunk (fp16 on CUDA). Exact
  nearest neighbours; what a GPU should run.
- `ivf`: one inverted file over all descriptors of a block of images. A k-means codebook splits
  the descriptors into lists; each descriptor is compared with the members of its `ivf_probes`
  nearest lists only (all pairs of the block in a few batched matrix products), keeps the
  `ivf_candidates` nearest per list, and the best and second best per (descriptor, other image)
  are taken from those candidates. Approximate in the same way as COLMAP's own CPU matcher (a
  faiss inverted file per image, 8 probes), but one pass serves all pairs of the block: on the
  2-core CPU, DTU's 1,176 exhaustive pairs take a few seconds instead of pycolmap's 12 s.

Pair sets that are sparse inside a block (sequential or retrieval pairs of a large scene) would
waste the inverted file's work, so `match_descriptors` cuts the images into blocks, runs `ivf`
on block pairs with many candidate pairs and `exact` on the rest.
"""
from __future__ import annotations

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
    ivf_candidates: int = 16  # nearest kept per (descriptor, list)
    ivf_kmeans_iterations: int = 5
    # re-check every inverted-file match against all descriptors of the other image (exact
    # nearest and second-nearest): what it outputs, exact brute force outputs too
    ivf_exact_check: bool = True
    ivf_min_pairs: int = 64  # a block pair with fewer candidate pairs goes to `exact`
    ivf_min_density: float = 0.25  # ... or with a smaller share of its image pairs as candidates
    block_images: int = 128  # images per block of the inverted file
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


# --------------------------------------------------------------------------------------------
# exact engine


def _pad_rows(offsets: Tensor, images: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(P, width) flat descriptor rows of each image's first `width` descriptors, and the valid mask."""
    n = offsets[images + 1] - offsets[images]
    col = torch.arange(width, device=offsets.device)
    valid = col[None] < n[:, None]
    rows = torch.where(valid, offsets[images][:, None] + col[None], torch.zeros_like(col)[None])
    return rows, valid


def _exact_chunk(desc: Tensor, sq: Tensor, offsets: Tensor, pairs: Tensor, pair_index: Tensor,
                 options: DescriptorMatchOptions, n1: int, n2: int) -> RawMatches:
    r1, v1 = _pad_rows(offsets, pairs[:, 0], n1)
    r2, v2 = _pad_rows(offsets, pairs[:, 1], n2)
    if desc.device.type == "cuda":
        # fp16 products of unit-scaled descriptors (|dot| <= 1); squared norms stay exact in fp32
        s = 1.0 / options.descriptor_norm
        a, b = (desc[r1] * s).half(), (desc[r2] * s).half()
        dot = torch.bmm(a, b.transpose(1, 2)).float() * (options.descriptor_norm**2)
    else:
        dot = torch.bmm(desc[r1], desc[r2].transpose(1, 2))
    d2 = (sq[r1][:, :, None] + sq[r2][:, None, :] - 2 * dot).clamp_min_(0)
    d2.masked_fill_(~(v1[:, :, None] & v2[:, None, :]), float("inf"))
    k2 = min(2, n2)
    k1 = min(2, n1)
    v12, i12 = torch.topk(d2, k2, dim=2, largest=False)  # (P, n1, k)
    v21, i21 = torch.topk(d2, k1, dim=1, largest=False)  # (P, k, n2)
    inf1 = torch.full_like(v12[..., 0], float("inf"))
    inf2 = torch.full_like(v21[:, 0], float("inf"))
    sec12 = v12[..., 1] if k2 > 1 else inf1
    sec21 = v21[:, 1] if k1 > 1 else inf2
    ok12 = _passes(v12[..., 0], sec12, options) & v1
    m12 = torch.where(ok12, i12[..., 0], -1)  # (P, n1)
    ok21 = _passes(v21[:, 0], sec21, options) & v2
    m21 = torch.where(ok21, i21[:, 0], -1)  # (P, n2)
    keep = ok12
    if options.cross_check:
        back = m21.gather(1, m12.clamp_min(0))
        keep = keep & (back == torch.arange(n1, device=desc.device)[None])
    p, i = torch.nonzero(keep, as_tuple=True)
    j = m12[p, i]
    ratio = (v12[p, i, 0] / sec12[p, i]).sqrt()
    return RawMatches(pair_index[p], i, j, ratio)


def iter_exact(desc: Tensor, offsets: Tensor, pairs: Tensor, options: DescriptorMatchOptions,
               pair_index: Tensor | None = None):
    """Exact mutual nearest neighbours, chunk by chunk: batched products over pairs of similar
    feature counts, each chunk within `memory_budget_mb`. Yields (pair indices, RawMatches)."""
    device = desc.device
    if pair_index is None:
        pair_index = torch.arange(len(pairs), device=device)
    if len(pairs) == 0:
        return
    desc = desc.float()
    sq = (desc * desc).sum(1)
    counts = offsets[1:] - offsets[:-1]
    size = torch.maximum(counts[pairs[:, 0]], counts[pairs[:, 1]]).clamp_min(1)
    order = torch.argsort(size, descending=True)
    sizes = size[order].tolist()
    budget = max(1, options.memory_budget_mb * 2**20 // 16)  # d2 + top-k temporaries: ~4 float copies
    s = 0
    while s < len(order):  # one iteration per chunk: pairs sorted by size, padded to the first's
        w = sizes[s]
        e = min(len(order), s + max(1, budget // (w * w)))
        sel = order[s:e]
        yield pair_index[sel], _exact_chunk(desc, sq, offsets, pairs[sel], pair_index[sel], options, w, w)
        s = e


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


def _ivf_candidates(x: Tensor, img: Tensor, allowed: Tensor, options: DescriptorMatchOptions,
                    generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(query, candidate, squared distance) triples: for every descriptor, the `ivf_candidates`
    nearest allowed descriptors of each of its `ivf_probes` nearest lists."""
    n, device = len(x), x.device
    k = max(1, min(n, round(n / max(options.ivf_list_size, 1))))
    cent = _kmeans(x, k, options.ivf_kmeans_iterations, generator)
    nprobe = min(options.ivf_probes, k)
    probe = ((cent * cent).sum(1)[None] - 2 * x @ cent.T).topk(nprobe, dim=1, largest=False).indices
    sq = (x * x).sum(1)
    # members (database side) by primary list; query entries by probed list
    member_order = torch.argsort(probe[:, 0], stable=True)
    msize = torch.bincount(probe[:, 0], minlength=k)
    moff = torch.cat([msize.new_zeros(1), msize.cumsum(0)])
    qlist = probe.reshape(-1)
    query_order = torch.argsort(qlist, stable=True)
    query_of = torch.arange(n, device=device).repeat_interleave(nprobe, output_size=n * nprobe)[query_order]
    qsize = torch.bincount(qlist, minlength=k)
    qoff = torch.cat([qsize.new_zeros(1), qsize.cumsum(0)])
    by_size = torch.argsort(msize * qsize, descending=True)
    ms, qs = msize[by_size].tolist(), qsize[by_size].tolist()
    cap = max(1, options.memory_budget_mb * 2**20 // 32)  # d2, masks, an index: ~32 bytes per element
    nb = len(allowed)
    dense = bool(allowed.sum() == nb * (nb - 1))  # every other image allowed: a cheaper mask
    out_q, out_c, out_d = [], [], []
    s = 0
    while s < k:
        if ms[s] == 0 or qs[s] == 0:
            s += 1
            continue
        bm, bq, e = ms[s], qs[s], s + 1
        while e < k and ms[e] and qs[e] and 2 * ms[e] >= bm and 2 * qs[e] >= bq \
                and (e - s + 1) * max(bm, ms[e]) * max(bq, qs[e]) <= cap:
            bm, bq, e = max(bm, ms[e]), max(bq, qs[e]), e + 1
        lists = by_size[s:e]
        s = e
        cm = torch.arange(bm, device=device)
        cq = torch.arange(bq, device=device)
        mvalid = cm[None] < msize[lists][:, None]
        qvalid = cq[None] < qsize[lists][:, None]
        mem = member_order[torch.where(mvalid, moff[lists][:, None] + cm[None], 0)]  # (L, bm)
        qry = query_of[torch.where(qvalid, qoff[lists][:, None] + cq[None], 0)]  # (L, bq)
        # padded members get an infinite norm, so their distances are infinite without a mask
        sq_mem = torch.where(mvalid, sq[mem], float("inf"))
        d2 = torch.baddbmm(sq[qry][:, :, None] + sq_mem[:, None, :], x[qry], x[mem].transpose(1, 2), alpha=-2)
        if dense:
            bad = img[qry][:, :, None] == img[mem][:, None, :]
        else:
            bad = ~allowed.view(-1)[(img[qry] * len(allowed))[:, :, None] + img[mem][:, None, :]]
        d2 = d2.clamp_min_(0).masked_fill_(bad, float("inf"))
        kk = min(options.ivf_candidates, bm)
        v, j = torch.topk(d2, kk, dim=2, largest=False)
        q = qry[:, :, None].expand(-1, -1, kk)
        keep = torch.isfinite(v) & qvalid[:, :, None]
        out_q.append(q[keep])
        out_c.append(mem.gather(1, j.reshape(len(lists), -1)).reshape(j.shape)[keep])
        out_d.append(v[keep])
    if not out_q:
        z = torch.zeros(0, dtype=torch.long, device=device)
        return z, z.clone(), torch.zeros(0, device=device)
    return torch.cat(out_q), torch.cat(out_c), torch.cat(out_d)


def _one_way_best(q: Tensor, c: Tensor, d2: Tensor, img: Tensor, num_images: int,
                  options: DescriptorMatchOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Per (query, image of the candidate): the nearest candidate if it passes COLMAP's tests.
    Returns (query, candidate, ratio) of the passing ones."""
    group = q * num_images + img[c]
    o = torch.argsort(d2, stable=True)
    o = o[torch.argsort(group[o], stable=True)]
    group, q, c, d2 = group[o], q[o], c[o], d2[o]
    first = torch.ones_like(group, dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    fi = torch.nonzero(first).squeeze(1)
    nxt = (fi + 1).clamp_max(len(group) - 1)
    has_second = (fi + 1 < len(group)) & ~first[nxt]
    second = torch.where(has_second, d2[nxt], torch.full_like(d2[fi], float("inf")))
    best = d2[fi]
    ok = _passes(best, second, options)
    fi = fi[ok]
    return q[fi], c[fi], (best[ok] / second[ok]).sqrt()


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
    q, c, d2 = _ivf_candidates(x, img, allowed, options, generator)
    q, c, ratio = _one_way_best(q, c, d2, img, nb, options)
    if options.cross_check:
        fwd = q * total + c
        key = torch.sort(fwd).values
        back = c * total + q
        pos = torch.searchsorted(key, back).clamp_max(max(len(key) - 1, 0))
        mutual = key[pos] == back if len(key) else torch.zeros_like(back, dtype=torch.bool)
        q, c, ratio = q[mutual], c[mutual], ratio[mutual]
        first_side = img[q] < img[c]  # each mutual match once, from the lower local image
        # keep the larger ratio of the two directions (COLMAP's match passes both tests)
        q, c, ratio = q[first_side], c[first_side], ratio[first_side]
    if options.ivf_exact_check:
        q, c, ratio = _exact_recheck(x, img, start, q, c, options)
    # pair index of (image q, image c), oriented as given
    pid = torch.full((nb, nb), -1, dtype=torch.long, device=device)
    pid[li, lj] = pair_index
    pid[lj, li] = pair_index
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


def iter_matches(desc: Tensor, offsets: Tensor, pairs: Tensor, options: DescriptorMatchOptions | None = None):
    """Raw matches for `pairs` ((E, 2) image rows) of the flat descriptors `desc` ((N, D), rows
    of image i at offsets[i]:offsets[i+1]), unit by unit (an inverted-file block or a chunk of
    exact pairs), so that a caller can verify and write each unit before the next is matched.
    Yields (pair indices covered, RawMatches of those pairs). Device follows `desc`."""
    options = options or DescriptorMatchOptions()
    device = desc.device
    engine = resolve_engine(options.engine, device)
    pairs = pairs.to(device).long()
    offsets = offsets.to(device).long()
    counts = offsets[1:] - offsets[:-1]
    has = (counts[pairs[:, 0]] > 0) & (counts[pairs[:, 1]] > 0)
    if not bool(has.all()):  # an image without descriptors matches nothing
        none = torch.nonzero(~has).squeeze(1)
        yield none, _empty(device)
    keep = torch.nonzero(has).squeeze(1)
    if len(keep) == 0:
        return
    if engine == "auto":
        engine = "exact" if device.type == "cuda" else "ivf"
    if engine == "exact":
        yield from iter_exact(desc, offsets, pairs[keep], options, pair_index=keep)
        return
    groups, rest = _block_plan(pairs[keep], len(offsets) - 1, options)
    for imgs, sel in groups:
        # a generator per block, seeded by the block's first image: the result of a block does
        # not depend on which other blocks are matched in the same run
        gen = torch.Generator(device="cpu").manual_seed(options.seed * 1_000_003 + int(imgs[0]))
        yield keep[sel], match_ivf_block(desc, offsets, imgs, pairs[keep[sel]], keep[sel], options, gen)
    if len(rest):
        yield from iter_exact(desc, offsets, pairs[keep[rest]], options, pair_index=keep[rest])


def match_descriptors(desc: Tensor, offsets: Tensor, pairs: Tensor, options: DescriptorMatchOptions | None = None) -> RawMatches:
    """All raw matches of `iter_matches` at once, sorted by pair, best first."""
    return concat_matches([m for _, m in iter_matches(desc, offsets, pairs, options)], desc.device)


def estimate_memory_mb(num_descriptors: int, dim: int = 128) -> float:
    """Host/device memory of the inverted file for a block of `num_descriptors` (float copies)."""
    return num_descriptors * (dim * 4 + 64) / 2**20 + math.sqrt(num_descriptors)
