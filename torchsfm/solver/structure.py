"""Sparsity bookkeeping for the Schur complement, computed once per problem on its device.

Everything here depends only on which camera block and which eliminated block each residual
block touches, never on values, so it is built once (torch ops on the problem's device; the
host reads sizes only here) and reused by every LM iteration, which then needs no host
decision about the structure.

- Camera segments: the residual blocks of each camera, padded to fixed-length segments, so that
  per-camera sums of outer products (U = sum J^T J, the Schur-Jacobi diagonal) are batched GEMMs
  with a long contraction instead of scatters of 81-wide blocks.
- Pair segments (explicit Schur complement only): every pair (a, b) of residual blocks on the same
  point with cam[a] <= cam[b], grouped by their camera-pair block and padded into segments the
  same way. Only the upper block triangle is formed; the strict upper part is mirrored on
  assembly (`dense_chunks`: the flat indices of both, in chunks).
- Reduced-system numbering: `param_map` sends local camera parameters to reduced unknowns (-1 =
  constant; repeated = shared); `pmap` is the same with constants sent to a trash slot n.
- Preconditioner groups: reduced unknowns owned by one camera block form that block's group;
  unknowns shared by several blocks (a camera's intrinsics shared by many images) form one group
  per first owner.
- Implicit Schur complement (`implicit_pattern`): the fixed CSR patterns of E (one row per
  observation and point coordinate, holding Y_a = K_a^T Jc_a), its transpose, and Q (the sum of
  observations per point), whose values are gathered from the Y rows each LM step.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def count_pairs(cam_index: Tensor, point_index: Tensor, num_points: int) -> int:
    """Upper-triangle observation pairs of the explicit Schur complement: sum_p k_p (k_p + 1) / 2."""
    k = torch.bincount(point_index, minlength=num_points).to(torch.float64)
    return int((k * (k + 1) / 2).sum())


def envelope_blocks(block_row: Tensor, block_col: Tensor, num_cams: int) -> int:
    """Blocks in the envelope of the camera-block pattern (lower triangle, diagonal included) in
    reverse Cuthill-McKee order: an upper bound on the blocks a Cholesky factor of the reduced
    system fills in that order (minimum-degree orderings fill less; the shared-intrinsics rows
    aside). Host side (scipy), once per problem. A sequence of images (each block near the
    diagonal) has an envelope of about images x neighbours; loop closures widen it."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    r, c = block_row.cpu().numpy(), block_col.cpu().numpy()
    A = sp.coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(num_cams, num_cams)).tocsr()
    perm = reverse_cuthill_mckee((A + A.T).tocsr(), symmetric_mode=True)
    pos = np.empty_like(perm)
    pos[perm] = np.arange(perm.size, dtype=perm.dtype)
    pr, pc = pos[r], pos[c]
    first = np.arange(num_cams)  # the first column of each row of the lower triangle
    np.minimum.at(first, np.maximum(pr, pc), np.minimum(pr, pc))
    return int((np.arange(num_cams) - first).sum()) + num_cams


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def _segments(group: Tensor, num_groups: int, length: int, small: int) -> list[tuple[Tensor, Tensor, int]]:
    """Cut the items of each group (items sorted by group) into segments.

    Returns [(item_index (nseg*L,) with -1 for padding, segment_group (nseg,), L), ...]: first
    full segments of `length`, then the remainders in segments of `small` (less padding).
    """
    dev = group.device
    n = group.numel()
    counts = torch.bincount(group, minlength=num_groups)
    rank = torch.arange(n, device=dev) - _exclusive_cumsum(counts)[group]
    nbig = counts // length
    big = rank < (nbig * length)[group]
    out = []
    groups = torch.arange(num_groups, device=dev)
    rest = counts - nbig * length
    parts = ((big, nbig, length, torch.zeros_like(counts)), (~big, (rest + small - 1) // small, small, nbig * length))
    for sel, nseg, L, offset in parts:  # (items, segments per group, segment length, ranks before)
        items = torch.nonzero(sel)[:, 0]
        if items.numel() == 0:
            continue
        total = int(nseg.sum())
        g = group[items]
        pos = _exclusive_cumsum(nseg)[g] * L + rank[items] - offset[g]
        idx = torch.full((total * L,), -1, dtype=torch.int64, device=dev)
        idx[pos] = items
        out.append((idx, torch.repeat_interleave(groups, nseg, output_size=total), L))
    return out


class SchurStructure:
    PAIR_CHUNK = 1 << 25  # observation pairs unranked at a time (_build_pairs)

    def __init__(
        self,
        cam_index: Tensor,
        point_index: Tensor,
        num_cams: int,
        num_points: int,
        cam_dim: int,
        point_dim: int,
        param_map: Tensor | None,
        *,
        explicit: bool,
        segment_length: int,
        device: torch.device,
    ):
        ci = cam_index.detach().to(device=device, dtype=torch.int64)
        pi = point_index.detach().to(device=device, dtype=torch.int64)
        N = ci.numel()
        C, P, nc = int(num_cams), int(num_points), int(cam_dim)
        self.num_obs, self.num_cams, self.num_points = N, C, P
        self.cam_dim, self.point_dim = nc, int(point_dim)
        self.device = device
        L = int(segment_length)
        Ls = max(1, L // 4)
        self.cam_index = ci
        self.point_index = pi
        self._buffers: dict[str, Tensor] = {}  # work tensors reused across LM iterations
        self._chunks: dict[int, list] = {}

        def pad(a: Tensor) -> Tensor:  # padding -> row N of per-observation rows, which is zero
            return torch.where(a < 0, N, a)

        # --- reduced numbering --------------------------------------------------------------
        if param_map is None:
            pm = torch.arange(C * nc, device=device).reshape(C, nc)
        else:
            pm = param_map.detach().to(device=device, dtype=torch.int64).reshape(C, nc)
        n = int(pm.max()) + 1 if pm.numel() and int(pm.max()) >= 0 else 0
        used = torch.zeros(n, dtype=torch.bool, device=device)
        used[pm[pm >= 0]] = True
        if not bool(used.all()):
            raise ValueError("cam_param_map must number the reduced unknowns 0..n-1 without gaps")
        self.n = n
        self.param_map = pm
        self.pmap = torch.where(pm < 0, n, pm)  # constants -> trash slot n

        # --- camera segments (per-camera Gram matrices) ---------------------------------------
        order_c = torch.argsort(ci, stable=True)
        self.cam_segments = [
            (pad(torch.where(idx < 0, -1, order_c[idx.clamp_min(0)])), sg, ln)
            for idx, sg, ln in _segments(ci[order_c], C, L, Ls)
        ]

        # --- preconditioner groups ------------------------------------------------------------
        free = pm >= 0
        owners = torch.bincount(pm[free], minlength=n)
        cam_of = torch.arange(C, device=device)[:, None].expand(C, nc)
        first = torch.full((n,), C, dtype=torch.int64, device=device)
        first.scatter_reduce_(0, pm[free], cam_of[free], "amin")
        key = torch.where(owners > 1, C, 0) + first
        ukeys, grp = torch.unique(key, return_inverse=True)
        ng = ukeys.numel()
        gorder = torch.argsort(grp, stable=True)
        gcount = torch.bincount(grp, minlength=ng)
        gpos = torch.empty(n, dtype=torch.int64, device=device)
        gpos[gorder] = torch.arange(n, device=device) - _exclusive_cumsum(gcount)[grp[gorder]]
        bmax = int(gcount.max()) if n else 1
        self.num_groups, self.group_size = ng, bmax
        self.unknown_slot = grp * bmax + gpos  # (n,) row in the (ng*bmax) flattening
        # local (c, i, j) of a camera's diagonal block -> flat index in (ng+1, bmax, bmax); trash ng
        if n:
            safe = pm.clamp_min(0)
            gi = torch.where(free, grp[safe], -1)
            pi_ = torch.where(free, gpos[safe], 0)
        else:
            gi, pi_ = torch.full_like(pm, -1), torch.zeros_like(pm)
        same = (gi[:, :, None] == gi[:, None, :]) & (gi[:, :, None] >= 0)
        flat = (gi[:, :, None] * bmax + pi_[:, :, None]) * bmax + pi_[:, None, :]
        self.precond_index = torch.where(same, flat, ng * bmax * bmax).reshape(-1)
        pad_slots = torch.ones(ng, bmax, dtype=torch.bool, device=device)
        pad_slots[grp, gpos] = False
        self.precond_pad = pad_slots

        # --- explicit Schur complement: pair segments ---------------------------------------
        self.explicit = bool(explicit)
        self.num_pairs = 0
        self.num_blocks = 0
        if explicit:
            self._build_pairs(ci, pi, C, P, L, Ls, pad)
        self._implicit: dict | None = None

    def _build_pairs(self, ci, pi, C, P, L, Ls, pad):
        dev = ci.device

        def sel(t: Tensor, i: Tensor) -> Tensor:
            return torch.index_select(t, 0, i)

        # Every unordered pair (r1 < r2) of each point's observations, by triangular unranking.
        # Upper block triangle: off the diagonal one orientation, cam[a] < cam[b], suffices (the
        # block is mirrored); within a diagonal block every ordered pair a != b (a camera may see
        # a point twice): those pairs are added again swapped, after all others. The pairs (a, a)
        # are left to the camera segments. Only int32 observation indices and block keys are kept,
        # each work array is freed once used, and the int64 work arrays of the unranking are made
        # for a chunk of points at a time (about PAIR_CHUNK pairs: large enough that they are
        # mmapped and handed back, so the kept arrays do not fragment the heap). corridor3000
        # (17.9M pairs): peak 2.58 GB -> 1.61 GB while the structure is built.
        it = torch.int32 if self.num_obs < 2**31 - 1 else torch.int64
        kt = torch.int32 if (C + 1) * (C + 1) < 2**31 - 1 else torch.int64
        order = torch.argsort(pi, stable=True)
        cnt = torch.bincount(pi, minlength=P)
        npair = cnt * (cnt - 1) // 2
        first_obs = _exclusive_cumsum(cnt)
        ends = torch.cumsum(npair, 0)
        tot = int(ends[-1]) if P else 0
        # point ranges of about pair_chunk pairs each (one host read, at set-up)
        cuts = torch.searchsorted(ends, torch.arange(1, tot // self.PAIR_CHUNK + 1, device=dev) * self.PAIR_CHUNK)
        bounds = [0] + sorted(set(int(c) + 1 for c in cuts.tolist()) - {0}) + [P]
        parts, dups = [], []
        for p0, p1 in zip(bounds[:-1], bounds[1:]):
            if p1 <= p0:
                continue
            np_c = npair[p0:p1]
            tot_c = int(ends[p1 - 1] - (ends[p0 - 1] if p0 else 0))
            if tot_c == 0:
                continue
            pt = torch.repeat_interleave(torch.arange(p0, p1, device=dev), np_c, output_size=tot_c)
            t = torch.arange(tot_c, device=dev) - sel(_exclusive_cumsum(np_c), pt - p0)  # = r2 (r2 - 1) / 2 + r1
            r2 = ((1 + torch.sqrt(1 + 8 * t.to(torch.float64))) / 2).floor().to(torch.int64)
            r2 -= (r2 * (r2 - 1) // 2 > t).to(torch.int64)  # exact despite the rounding of the root
            r2 += ((r2 + 1) * r2 // 2 <= t).to(torch.int64)
            base = sel(first_obs, pt)
            x, y = sel(order, base + t - r2 * (r2 - 1) // 2), sel(order, base + r2)
            del pt, t, r2, base
            cx, cy = sel(ci, x), sel(ci, y)
            swap = cx > cy
            ia, ib = torch.where(swap, y, x).to(it), torch.where(swap, x, y).to(it)
            key = (torch.minimum(cx, cy) * C + torch.maximum(cx, cy)).to(kt)
            same = torch.nonzero(cx == cy)[:, 0]
            parts.append((ia, ib, key))
            dups.append((sel(ib, same), sel(ia, same), sel(key, same)))
            del x, y, cx, cy, swap, same
        # every camera with observations gets its diagonal block, even without pairs
        has_obs = torch.nonzero(torch.bincount(ci, minlength=C))[:, 0]
        ia = torch.cat([p[0] for p in parts + dups] or [ci.new_zeros(0).to(it)])
        ib = torch.cat([p[1] for p in parts + dups] or [ci.new_zeros(0).to(it)])
        n_real = ia.numel()
        key = torch.cat([p[2] for p in parts + dups] + [(has_obs * (C + 1)).to(kt)])
        del parts, dups
        perm = torch.argsort(key, stable=True)  # one sort: blocks in order
        ukey, counts = torch.unique_consecutive(sel(key, perm), return_counts=True)
        ukey = ukey.to(torch.int64)
        del key
        keep = torch.nonzero(perm < n_real)[:, 0]  # the pairs (not the diagonal markers), in block order
        blk = sel(torch.repeat_interleave(torch.arange(ukey.numel(), device=dev), counts, output_size=perm.numel()),
                  keep)
        real = sel(perm, keep)
        del perm, keep
        ia, ib = sel(ia, real), sel(ib, real)
        del real
        self.num_pairs = int(ia.numel()) + int(ci.numel())  # + the (a, a) pairs of the camera segments
        self.num_blocks = int(ukey.numel())
        br, bc = ukey // C, ukey % C
        self.block_row, self.block_col = br, bc
        self.block_strict = torch.nonzero(br < bc)[:, 0]
        diag = torch.full((C,), -1, dtype=torch.int64, device=dev)
        isd = torch.nonzero(br == bc)[:, 0]
        diag[br[isd]] = isd
        self.cam_diag_block = diag
        self.diag_cams = torch.nonzero(diag >= 0)[:, 0]  # cameras with a diagonal block, and theirs
        self.diag_blocks_of = diag[self.diag_cams]
        self.pair_segments = []
        for idx, sg, ln in _segments(blk, self.num_blocks, L, Ls):
            a = pad(torch.where(idx < 0, -1, ia[idx.clamp_min(0)])).to(it)
            b = pad(torch.where(idx < 0, -1, ib[idx.clamp_min(0)])).to(it)
            self.pair_segments.append((a, b, sg, ln))
        padded = sum(int(s[0].numel()) for s in self.pair_segments)
        logger.debug("Schur structure: %d pairs (%d padded) in %d blocks", self.num_pairs, padded, self.num_blocks)

    def dense_chunks(self, chunk_blocks: int) -> list[tuple[int, int, Tensor]]:
        """[(first block, end block, positions of the strict upper blocks in the chunk), ...]:
        the explicit blocks in chunks, with what the mirror needs known without a host read."""
        if chunk_blocks not in self._chunks:
            out = []
            for s0 in range(0, self.num_blocks, chunk_blocks):
                s1 = min(self.num_blocks, s0 + chunk_blocks)
                out.append((s0, s1, torch.nonzero(self.block_row[s0:s1] < self.block_col[s0:s1])[:, 0]))
            self._chunks[chunk_blocks] = out
        return self._chunks[chunk_blocks]

    @property
    def implicit_pattern(self) -> dict:
        """CSR patterns of E (N k x C nc), E^T and Q (P x N), and the gather of E^T's values
        (built on first use)."""
        if self._implicit is None:
            self._implicit = self._build_implicit()
        return self._implicit

    def _build_implicit(self) -> dict:
        N, C, P, k, nc, dev = self.num_obs, self.num_cams, self.num_points, self.point_dim, self.cam_dim, self.device
        it = torch.int64 if N * k * nc >= 2**31 - 1 else torch.int32  # int32 takes MKL's kernels on the CPU
        ci, pi = self.cam_index, self.point_index
        # E: row (a, i) holds Y_a[i, :] in columns ci[a] * nc + j; values are the Y rows as stored
        cols = (ci[:, None, None] * nc + torch.arange(nc, device=dev)).expand(N, k, nc).reshape(-1).to(it)
        crow = torch.arange(0, N * k * nc + 1, nc, device=dev).to(it)
        # E^T: row (c, j) holds Y_a[i, j] for the observations a of camera c, (a, i) ascending.
        # With m the rank of a in camera order (stable) and s_c, n_c camera c's first rank and
        # count, entry (m, j, i) sits at (s_c nc + j n_c) k + (m - s_c) k + i: placed, not sorted.
        order = torch.argsort(ci, stable=True)
        count = torch.bincount(ci, minlength=C)
        first = torch.cumsum(count, 0) - count
        c = ci[order]
        m = torch.arange(N, device=dev)
        base = ((first[c] * (nc - 1) + m) * k)[:, None, None]  # s_c nc k + (m - s_c) k
        jj = torch.arange(nc, device=dev)[None, :, None]
        ii = torch.arange(k, device=dev)[None, None, :]
        pos = (base + jj * (count[c] * k)[:, None, None] + ii).reshape(-1)
        a = order[:, None, None]
        tvals = torch.empty(N * nc * k, dtype=torch.int64, device=dev)
        tvals[pos] = ((a * k + ii) * nc + jj).reshape(-1)  # index into E's values
        tcols = torch.empty(N * nc * k, dtype=it, device=dev)
        tcols[pos] = (a * k + ii).expand(N, nc, k).reshape(-1).to(it)
        tcrow = torch.cat([count.new_zeros(1), torch.cumsum(count.repeat_interleave(nc, output_size=C * nc) * k, 0)])
        # Q: row p holds a 1 for each observation of point p
        qcrow = torch.cat([pi.new_zeros(1), torch.cumsum(torch.bincount(pi, minlength=P), 0)])
        return {"E": (crow, cols), "ET": (tcrow.to(it), tcols, tvals),
                "Q": (qcrow.to(it), torch.argsort(pi, stable=True).to(it))}

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> Tensor:
        """A work tensor reused across LM iterations (contents undefined)."""
        b = self._buffers.get(name)
        if b is None or b.shape != torch.Size(shape) or b.dtype != dtype:
            b = torch.empty(shape, dtype=dtype, device=self.device)
            self._buffers[name] = b
        return b

    # ------------------------------------------------------------------------------------------
    def to_reduced(self, v: Tensor) -> Tensor:
        """Per-camera-block vectors (C, nc) -> reduced vector (n,) (P^T v: shared entries add)."""
        out = v.new_zeros(self.n + 1)
        out.index_add_(0, self.pmap.reshape(-1), v.reshape(-1))
        return out[: self.n]

    def from_reduced(self, x: Tensor) -> Tensor:
        """Reduced vector (n,) -> per-camera-block (C, nc) (P x: constants are zero)."""
        return torch.cat([x, x.new_zeros(1)])[self.pmap]

    def dense_index(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Flat indices into the (n+1)^2 dense matrix of block entries (B, nc, nc)."""
        r = self.pmap[rows]
        c = self.pmap[cols]
        return r[:, :, None] * (self.n + 1) + c[:, None, :]
