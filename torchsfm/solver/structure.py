"""Sparsity bookkeeping for the Schur complement, computed once per problem (numpy, vectorised).

Everything here depends only on which camera block and which eliminated block each residual
block touches, never on values, so it is built once and reused by every LM iteration.

- Camera segments: the residual blocks of each camera, padded to fixed-length segments, so that
  per-camera sums of outer products (U = sum J^T J, the Schur-Jacobi diagonal) are batched GEMMs
  with a long contraction instead of scatters of 81-wide blocks.
- Pair segments (explicit Schur complement only): every pair (a, b) of residual blocks on the same
  point with cam[a] <= cam[b], grouped by their camera-pair block and padded into segments the
  same way. Only the upper block triangle is formed; the strict upper part is mirrored on
  assembly.
- Reduced-system numbering: `param_map` sends local camera parameters to reduced unknowns (-1 =
  constant; repeated = shared); `pmap` is the same with constants sent to a trash slot n.
- Preconditioner groups: reduced unknowns owned by one camera block form that block's group;
  unknowns shared by several blocks (a camera's intrinsics shared by many images) form one group
  per first owner.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def count_pairs(cam_index: Tensor, point_index: Tensor, num_points: int) -> int:
    """Upper-triangle observation pairs of the explicit Schur complement: sum_p k_p (k_p + 1) / 2."""
    k = torch.bincount(point_index.detach().cpu(), minlength=num_points).to(torch.float64)
    return int((k * (k + 1) / 2).sum())


def _segments(group: np.ndarray, num_groups: int, length: int, small: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Cut the items of each group (items sorted by group) into segments.

    Returns [(item_index (nseg*L,) with -1 for padding, segment_group (nseg,), L), ...]: first
    full segments of `length`, then the remainders in segments of `small` (less padding).
    """
    n = group.size
    counts = np.bincount(group, minlength=num_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n) - starts[group]
    nbig = counts // length
    out = []
    big = rank < (nbig * length)[group]
    if big.any():
        seg_first = np.concatenate([[0], np.cumsum(nbig)[:-1]])
        pos = seg_first[group[big]] * length + rank[big]
        idx = np.full(int(nbig.sum()) * length, -1, dtype=np.int64)
        idx[pos] = np.nonzero(big)[0]
        out.append((idx, np.repeat(np.arange(num_groups), nbig), length))
    rest = ~big
    if rest.any():
        rem = counts - nbig * length
        nsm = (rem + small - 1) // small
        seg_first = np.concatenate([[0], np.cumsum(nsm)[:-1]])
        g = group[rest]
        pos = seg_first[g] * small + (rank[rest] - (nbig * length)[g])
        idx = np.full(int(nsm.sum()) * small, -1, dtype=np.int64)
        idx[pos] = np.nonzero(rest)[0]
        out.append((idx, np.repeat(np.arange(num_groups), nsm), small))
    return out


class SchurStructure:
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
        ci = cam_index.detach().cpu().numpy().astype(np.int64)
        pi = point_index.detach().cpu().numpy().astype(np.int64)
        N = ci.size
        C, P, nc = int(num_cams), int(num_points), int(cam_dim)
        self.num_obs, self.num_cams, self.num_points = N, C, P
        self.cam_dim, self.point_dim = nc, int(point_dim)
        self.device = device
        L = int(segment_length)
        Ls = max(1, L // 4)
        as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
        pad = lambda a: np.where(a < 0, N, a)  # noqa: E731  (row N of per-observation rows is zero)

        self.cam_index = as_t(ci)
        self.point_index = as_t(pi)

        # --- reduced numbering --------------------------------------------------------------
        if param_map is None:
            pm = np.arange(C * nc, dtype=np.int64).reshape(C, nc)
        else:
            pm = param_map.detach().cpu().numpy().astype(np.int64).reshape(C, nc)
        n = int(pm.max()) + 1 if pm.size and pm.max() >= 0 else 0
        used = np.zeros(n, dtype=bool)
        used[pm[pm >= 0]] = True
        if not used.all():
            raise ValueError("cam_param_map must number the reduced unknowns 0..n-1 without gaps")
        self.n = n
        self.param_map = as_t(pm)
        self.pmap = as_t(np.where(pm < 0, n, pm))  # constants -> trash slot n
        self.identity_map = param_map is None or (
            bool((pm == np.arange(C * nc).reshape(C, nc)).all()) and n == C * nc
        )

        # --- camera segments (per-camera Gram matrices) ---------------------------------------
        order_c = np.argsort(ci, kind="stable")
        self.cam_segments = [
            (as_t(pad(np.where(idx < 0, -1, order_c[np.maximum(idx, 0)]))), as_t(sg), ln)
            for idx, sg, ln in _segments(ci[order_c], C, L, Ls)
        ]

        # --- preconditioner groups ------------------------------------------------------------
        owners = np.bincount(pm[pm >= 0], minlength=n)
        first = np.full(n, C, dtype=np.int64)
        cam_of = np.repeat(np.arange(C), nc).reshape(C, nc)
        np.minimum.at(first, pm[pm >= 0], cam_of[pm >= 0])
        key = np.where(owners > 1, C, 0) + first
        ukeys, grp = np.unique(key, return_inverse=True)
        ng = ukeys.size
        gorder = np.argsort(grp, kind="stable")
        gcount = np.bincount(grp, minlength=ng)
        gstart = np.concatenate([[0], np.cumsum(gcount)[:-1]])
        gpos = np.empty(n, dtype=np.int64)
        gpos[gorder] = np.arange(n) - gstart[grp[gorder]]
        bmax = int(gcount.max()) if n else 1
        self.num_groups, self.group_size = ng, bmax
        self.unknown_slot = as_t(grp * bmax + gpos)  # (n,) row in the (ng*bmax) flattening
        # local (c, i, j) of a camera's diagonal block -> flat index in (ng+1, bmax, bmax); trash ng
        safe = np.maximum(pm, 0) if n else np.zeros_like(pm)
        grp_, gpos_ = (grp, gpos) if n else (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
        gi = np.where(pm >= 0, grp_[safe], -1)
        pi_ = np.where(pm >= 0, gpos_[safe], 0)
        same = (gi[:, :, None] == gi[:, None, :]) & (gi[:, :, None] >= 0)
        flat = (gi[:, :, None] * bmax + pi_[:, :, None]) * bmax + pi_[:, None, :]
        self.precond_index = as_t(np.where(same, flat, ng * bmax * bmax).reshape(-1))
        pad_slots = np.ones((ng, bmax), dtype=bool)
        pad_slots[grp, gpos] = False
        self.precond_pad = as_t(pad_slots)

        # --- explicit Schur complement: pair segments ---------------------------------------
        self.explicit = bool(explicit)
        self.num_pairs = 0
        self.num_blocks = 0
        if explicit:
            self._build_pairs(ci, pi, C, P, L, Ls, as_t, pad)

    def _build_pairs(self, ci, pi, C, P, L, Ls, as_t, pad):
        order = np.argsort(pi, kind="stable")
        cnt = np.bincount(pi, minlength=P)
        start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        k2 = cnt * cnt
        tot = int(k2.sum())
        pt = np.repeat(np.arange(P), k2)
        local = np.arange(tot, dtype=np.int64) - np.repeat(np.cumsum(k2) - k2, k2)
        kk = cnt[pt]
        ia = order[start[pt] + local // kk]
        ib = order[start[pt] + local % kk]
        ca, cb = ci[ia], ci[ib]
        # Upper block triangle: off the diagonal one orientation suffices (the block is mirrored);
        # within a diagonal block every ordered pair a != b (a camera may see a point twice). The
        # pairs (a, a) are left to the camera segments (one gather per observation, not two).
        keep = (ca < cb) | ((ca == cb) & (ia != ib))
        ia, ib, ca, cb = ia[keep], ib[keep], ca[keep], cb[keep]
        # every camera with observations gets its diagonal block, even without pairs
        has_obs = np.unique(ci)
        key = np.concatenate([ca * C + cb, has_obs * C + has_obs])
        ia = np.concatenate([ia, np.full(has_obs.size, -1)])
        ib = np.concatenate([ib, np.full(has_obs.size, -1)])
        ukey, blk = np.unique(key, return_inverse=True)
        real = ia >= 0
        ia, ib, blk = ia[real], ib[real], blk[real]
        srt = np.argsort(blk, kind="stable")
        ia, ib, blk = ia[srt], ib[srt], blk[srt]
        self.num_pairs = int(ia.size) + int(ci.size)  # + the (a, a) pairs of the camera segments
        self.num_blocks = int(ukey.size)
        br, bc = ukey // C, ukey % C
        self.block_row = as_t(br)
        self.block_col = as_t(bc)
        self.block_strict = as_t(np.nonzero(br < bc)[0])
        diag = np.full(C, -1, dtype=np.int64)
        isd = br == bc
        diag[br[isd]] = np.nonzero(isd)[0]
        self.cam_diag_block = as_t(diag)
        self.pair_segments = []
        it = np.int32 if self.num_obs < 2**31 - 1 else np.int64  # halves the largest index arrays
        for idx, sg, ln in _segments(blk, self.num_blocks, L, Ls):
            a = pad(np.where(idx < 0, -1, ia[np.maximum(idx, 0)])).astype(it)
            b = pad(np.where(idx < 0, -1, ib[np.maximum(idx, 0)])).astype(it)
            self.pair_segments.append((as_t(a), as_t(b), as_t(sg), ln))
        padded = sum(int(s[0].numel()) for s in self.pair_segments)
        logger.debug("Schur structure: %d pairs (%d padded) in %d blocks", self.num_pairs, padded, self.num_blocks)

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
