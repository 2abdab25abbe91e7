"""The sparse direct solve of the reduced camera system on the CPU (scipy's SuperLU).

The pattern is fixed for a problem, so it is assembled once (`SparseAssembly`): the CSC structure
of S and, per CSC entry, its run of contributions among the flat Schur block values (a block
entry above the diagonal also lands below it, entries that share a position, the shared
intrinsics, are summed, constant unknowns are dropped). Each LM iteration is then one gather, one
segmented sum, a damping add and the factorisation: rebuilding COO -> CSC (a sort) and concatenating the mirrored blocks every
iteration took 0.6 s of 1.6 s per iteration on a 10,000-image corridor.

The fill-reducing ordering is chosen once from the pattern: a sequence of images numbered
along the sequence has a narrow band, and its natural order factors with no fill beyond the
band. There SuperLU's minimum-degree ordering only costs time (corridor10000: 0.99 s against
0.35 s per factorisation, same fill); otherwise it is used.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spl

# natural order when its factor (the envelope of the lower triangle, twice, plus the diagonal)
# is at most this multiple of the matrix's own entries
NATURAL_MAX_FILL = 1.5


class SparseAssembly:
    """S (n, n) from the block values: `matrix(blocks_flat, damp)`; `solve(A, b)`."""

    def __init__(self, n: int, rows: np.ndarray, cols: np.ndarray, sources: np.ndarray, num_values: int):
        """rows, cols: the position of every contribution (int32; n is a constant unknown, dropped);
        sources: the index into the flat block values of each (the same index twice for a
        mirrored entry). Built with a few arrays of the contributions' size (corridor10000: 24M),
        freed as it goes: a generic COO -> CSR build raised that run's peak by 1.2 GB."""
        keep = (rows < n) & (cols < n)
        if not keep.all():
            rows, cols, sources = rows[keep], cols[keep], sources[keep]
        del keep
        key = cols.astype(np.int64) * n + rows  # column-major: CSC order
        del rows, cols
        order = np.argsort(key)
        key = key[order]
        self.src = sources[order].astype(np.int32 if num_values < 2**31 else np.int64)
        del order
        first = np.ones(key.size, dtype=bool)
        np.not_equal(key[1:], key[:-1], out=first[1:])
        self.starts = np.flatnonzero(first)  # where each CSC entry's run of contributions begins
        del first
        ukey = key[self.starts]
        del key
        diag = np.arange(n, dtype=np.int64) * (n + 1)
        self.runs_at = None  # where the runs' sums go when diagonal entries had to be added
        if not np.isin(diag, ukey, assume_unique=True).all():  # an unknown without a block: damping only
            full = np.union1d(ukey, diag)
            self.runs_at, ukey = np.searchsorted(full, ukey), full
        self.diag_pos = np.searchsorted(ukey, diag)
        it = np.int32 if max(n, ukey.size) < 2**31 else np.int64
        self.n = n
        self.indices = (ukey % n).astype(it)
        self.indptr = np.searchsorted(ukey // n, np.arange(n + 1)).astype(it)
        del ukey
        first_row = self.indices[self.indptr[:-1]]  # topmost row of each column (the diagonal is there)
        envelope = int((np.arange(n) - first_row.astype(np.int64)).sum())
        self.ordering = "NATURAL" if 2 * envelope + n <= NATURAL_MAX_FILL * self.indices.size else "MMD_AT_PLUS_A"

    def matrix(self, values: np.ndarray, damp: np.ndarray) -> sp.csc_matrix:
        data = np.add.reduceat(values.take(self.src), self.starts)
        if self.runs_at is not None:
            data, sums = np.zeros(self.indices.size), data
            data[self.runs_at] = sums
        data[self.diag_pos] += damp
        A = sp.csc_matrix((data, self.indices, self.indptr), shape=(self.n, self.n))
        A.has_canonical_format = True  # sorted, no duplicates: by construction
        return A

    def solve(self, A: sp.csc_matrix, b: np.ndarray) -> np.ndarray:
        return spl.splu(A, permc_spec=self.ordering, diag_pivot_thresh=0.0,
                        options={"SymmetricMode": True}).solve(b)
