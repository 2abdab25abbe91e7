"""Normal equations with the eliminated (point) blocks Schur-complemented away.

Notation per residual block a (camera c = cam[a], point p = pt[a]): Jc_a (d x nc), Jp_a (d x k),
r_a (d). With V_p = sum_a Jp_a^T Jp_a + damping and V_p = L L^T, let M_p = L^-T (so that
M M^T = V^-1) and K_a = Jp_a M_p (d x k). Then

    W_a V_p^-1 W_b^T = Y_a^T Y_b      with   Y_a = K_a^T Jc_a   (k x nc)
    W_a V_p^-1 g_p   = Jc_a^T K_a z_p  with   z_p = M_p^T g_p
    dp_p = -M_p (z_p + sum_a K_a^T Jc_a dc_a)

so the reduced matrix S = U - sum_{a,b same point} Y_a^T Y_b needs only the per-block Y_a, and
every per-observation quantity is an elementwise product of short (d, k, nc) factors. Those are
evaluated "structure of arrays" (observations on the last axis) so each torch op streams over
long contiguous vectors; the pairwise sums are batched GEMMs over pre-built pair segments
(structure.py).

Damping follows Ceres' LM: the diagonal D = clamp(diag(J^T J), min_lm_diagonal, max_lm_diagonal)
of the full (reduced-numbering) system is scaled by 1/radius and added to U and V.

Nothing here reads a value back to the host (the CPU-only `sparse` solver aside): a failed
factorisation, a non-finite step or a PCG breakdown is a flag in `StepInfo`, which the LM loop
reads together with its own status once per iteration. The radius is a device tensor.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

import warnings
from dataclasses import dataclass

from . import layout, pcg
from .problem import Step
from .sparse_direct import SparseAssembly
from .structure import SchurStructure

logger = logging.getLogger(__name__)


def _gram_segments(rows: Tensor, segments, out: Tensor, h: int, chunk_bytes: int, alpha: float = 1.0,
                   pairs: bool = False) -> None:
    """out[target] += alpha * sum over each segment of (rows[a] as h x w)^T (rows[b] as h x w).

    `segments` holds (idx_a[, idx_b], target, L): each segment of L row indices becomes one
    (L*h x w) matrix, so a segment's sum of outer products is a single GEMM. Gathers and products
    go to buffers reused across chunks (fresh multi-MB allocations page-fault on the CPU).
    """
    m = rows.shape[1]
    if m == 0 or h == 0:  # no eliminated coordinates (point_dim 0): nothing to add
        return
    w = m // h
    for seg in segments:
        if pairs:
            ia, ib, tgt, L = seg
        else:
            ia, tgt, L = seg
            ib = None
        nseg = tgt.numel()
        per = min(nseg, max(1, chunk_bytes // ((2 * L * m + w * w) * rows.element_size())))
        bufA = rows.new_empty(per * L, m)
        bufB = rows.new_empty(per * L, m) if ib is not None else None
        bufP = rows.new_empty(per, w, w)
        for s0 in range(0, nseg, per):
            s1 = min(nseg, s0 + per)
            ns = s1 - s0
            A = torch.index_select(rows, 0, ia[s0 * L : s1 * L], out=bufA[: ns * L]).view(ns, L * h, w)
            if ib is None:
                B = A
            else:
                B = torch.index_select(rows, 0, ib[s0 * L : s1 * L], out=bufB[: ns * L]).view(ns, L * h, w)
            prod = torch.bmm(A.transpose(1, 2), B, out=bufP[:ns])
            out.index_add_(0, tgt[s0:s1], prod, alpha=alpha)


def _chol_inv_factor(V: Tensor, k: int, tol: float) -> Tensor:
    """M with M M^T = V^-1 for SPD (k*k, P) blocks in SoA layout; returns (k, k, P), M upper.

    Closed form for k <= 3. A pivot below tol * its diagonal (a rank-deficient block that the
    damping could not lift, e.g. a point seen once) gets a zero inverse: that direction is left
    unchanged rather than sent to infinity.
    """
    P = V.shape[1]
    if k == 0:
        return V.new_zeros(0, 0, P)
    zero = V.new_zeros(P)

    def inv_sqrt(piv, diag):
        ok = piv > tol * diag.abs()
        return torch.where(ok, piv.clamp_min(torch.finfo(V.dtype).tiny).rsqrt(), zero)

    if k == 1:
        return inv_sqrt(V[0], V[0])[None, None]
    if k == 3:
        a00, a10, a20, a11, a21, a22 = V[0], V[3], V[6], V[4], V[7], V[8]
        i00 = inv_sqrt(a00, a00)
        l10, l20 = a10 * i00, a20 * i00
        i11 = inv_sqrt(a11 - l10 * l10, a11)
        l21 = (a21 - l20 * l10) * i11
        i22 = inv_sqrt(a22 - l20 * l20 - l21 * l21, a22)
        t10 = -l10 * i00 * i11
        t21 = -l21 * i11 * i22
        t20 = -(l20 * i00 + l21 * t10) * i22
        M = V.new_zeros(3, 3, P)
        M[0, 0], M[0, 1], M[0, 2] = i00, t10, t20
        M[1, 1], M[1, 2] = i11, t21
        M[2, 2] = i22
        return M
    Vb = V.T.reshape(P, k, k)
    L, info = torch.linalg.cholesky_ex(Vb)
    bad = info != 0
    L = torch.where(bad[:, None, None], torch.eye(k, dtype=V.dtype, device=V.device).expand_as(Vb), L)
    T = torch.linalg.solve_triangular(L, torch.eye(k, dtype=V.dtype, device=V.device).expand_as(Vb), upper=False)
    T = torch.where(bad[:, None, None], torch.zeros_like(T), T)
    return T.transpose(1, 2).permute(1, 2, 0).contiguous()  # M = T^T, as (k, k, P)


@dataclass
class StepInfo:
    """What the LM loop needs to judge a step, all on the device (read once per iteration)."""

    ok: Tensor  # () bool: the linear solve succeeded and the step is finite
    model_cost_change: Tensor  # () float64: decrease of the linear model's cost
    linear_iterations: Tensor  # () int64: CG iterations (0 for direct solvers)
    unfinished: Tensor  # () bool: PCG has not converged yet (run further)


class ReducedSystem:
    """One linearisation: gradient, U, V and everything else that does not depend on damping.

    `step(radius)` eliminates the points with the damping 1/radius, solves the reduced camera
    system and back-substitutes.
    """

    def __init__(self, st: SchurStructure, r: Tensor, Jc: Tensor, Jp: Tensor, options, method: str):
        """r (d, N), Jc (d, nc, N), Jp (d, k, N): robustified, structure-of-arrays layout."""
        self.st = st
        self.opt = options
        self.method = method
        d, N = r.shape
        nc, k = st.cam_dim, st.point_dim
        self.d, self.k, self.nc = d, k, nc
        dt = r.dtype
        self.dtype = dt
        dev = r.device
        ci, pi = st.cam_index, st.point_index
        C, P = st.num_cams, st.num_points
        self.chunk_bytes = options.chunk_bytes
        self.r, self.Jc, self.Jp = r, Jc, Jp
        # gradients g = J^T r per camera block and per point, and V = sum Jp^T Jp per point
        # (k*k, P), accumulated over chunks of observations (no (k*k, N) temporary)
        gc = torch.zeros(nc, C, dtype=dt, device=dev)
        self.gp = torch.zeros(k, P, dtype=dt, device=dev)  # (k, P)
        self.V = torch.zeros(k * k, P, dtype=dt, device=dev)
        for s, e in self._chunks(max(nc, k * k)):
            rc = r[:, None, s:e]
            gc.index_add_(1, ci[s:e], layout.sum_products(Jc[:, :, s:e], rc, 0))
            self.gp.index_add_(1, pi[s:e], layout.sum_products(Jp[:, :, s:e], rc, 0))
            Jpc = Jp[:, :, s:e]
            self.V.index_add_(1, pi[s:e], layout.sum_products(Jpc[:, :, None], Jpc[:, None], 0).reshape(k * k, e - s))
        self.gc = layout.transpose(gc)  # (C, nc)
        dV = self.V[:: k + 1]  # (k, P)
        self.DV = dV.clamp(options.min_lm_diagonal, options.max_lm_diagonal)
        # points without any information (constant, or all residuals switched off): V = I, so
        # their step is exactly zero instead of 0/0.
        self.empty_points = dV.abs().sum(0) == 0
        # U = sum Jc^T Jc per camera (C, nc, nc): per-camera segment GEMMs over Jacobian rows
        Jrows = self._rows(d * nc)
        layout.transpose(Jc.reshape(d * nc, N), out=Jrows[:N])
        Jrows[N] = 0
        self.U = torch.zeros(C, nc, nc, dtype=dt, device=dev)
        _gram_segments(Jrows, st.cam_segments, self.U, d, self.chunk_bytes)
        dU = torch.diagonal(self.U, dim1=1, dim2=2)  # (C, nc)
        self.DC = st.to_reduced(dU).clamp(options.min_lm_diagonal, options.max_lm_diagonal)  # (n,)
        self.g_reduced = st.to_reduced(self.gc)

    # ------------------------------------------------------------------------------------------
    def gradient_max_norm(self) -> Tensor:
        """max |g_i| over the free parameters, a () tensor on the device."""
        m = self.g_reduced.abs().amax() if self.g_reduced.numel() else self.g_reduced.new_zeros(())
        if self.gp.numel():
            m = torch.maximum(m, self.gp.abs().amax())
        return m

    def _eliminate(self, lam: Tensor):
        """Point-block factors for damping lam: M (k, k, P), K (d, k, N), z (k, P)."""
        st, k, d = self.st, self.k, self.d
        Vd = self.V.clone()
        Vd[:: k + 1] += lam * self.DV
        eye = torch.eye(k, dtype=self.dtype, device=Vd.device).reshape(k * k, 1)
        Vd = torch.where(self.empty_points[None, :], eye, Vd)
        tol = 1e-12 if self.dtype == torch.float64 else 1e-6
        M = _chol_inv_factor(Vd, k, tol)  # (k, k, P) upper
        N = st.num_obs
        Mt = layout.transpose(M.reshape(k * k, st.num_points))  # (P, k*k): rows to gather
        # K[:, c] = sum_{j<=c} Jp[:, j] M[j, c]   (M is upper triangular), in chunks of
        # observations: the gathered M per observation is never held whole
        K = torch.empty(d, k, N, dtype=self.dtype, device=M.device)
        for s, e in self._chunks(k * k):
            Mo = layout.gather_soa(Mt, st.point_index[s:e]).reshape(k, k, e - s)
            Jp = self.Jp[:, :, s:e]
            for c in range(k):
                kc = K[:, c, s:e]
                torch.mul(Jp[:, 0], Mo[0, c], out=kc)
                for j in range(1, c + 1):
                    kc.addcmul_(Jp[:, j], Mo[j, c])
        z = (M * self.gp[:, None, :]).sum(0)  # (k, P): z_c = sum_j M[j,c] g_j
        return M, K, z

    def _rows(self, width: int) -> Tensor:
        """An (N+1, width) work matrix of per-observation rows. The Jacobian rows (needed only
        while U is formed) and the Y rows (each step) share one buffer, reused across
        iterations: one linearisation and its step live at a time."""
        N = self.st.num_obs
        w = max(self.d, self.k) * self.nc
        return self.st.buffer("rows", ((N + 1) * w,), self.dtype)[: (N + 1) * width].view(N + 1, width)

    def _y_rows(self, K: Tensor) -> Tensor:
        """Y_a = K_a^T Jc_a as rows (N+1, k*nc), the last row zero (segment padding). Formed in
        chunks of observations, so the (k, nc, N) product is never held whole."""
        N, k, nc = K.shape[-1], self.k, self.nc
        Y = self._rows(k * nc)
        for s, e in self._chunks(k * nc):
            Ys = layout.sum_products(K[:, :, None, s:e], self.Jc[:, None, :, s:e], 0)  # (k, nc, n)
            layout.transpose(Ys.reshape(k * nc, e - s), out=Y[s:e])
        Y[N] = 0
        return Y

    def _chunks(self, width: int):
        """Observation ranges (s, e) such that a (width, e - s) temporary stays within
        chunk_bytes: per-observation gathers and products are never held for all N at once (at
        2M observations one (8, N) float64 gather is 128 MB, and its row copy as much again)."""
        N = self.st.num_obs
        per = max(1, self.chunk_bytes // (2 * max(width, 1) * self.r.element_size()))
        return [(s, min(N, s + per)) for s in range(0, N, per)]

    def _rhs(self, K: Tensor, z: Tensor) -> Tensor:
        """-(g_c - sum_a Jc_a^T K_a z_p) per camera block (C, nc)."""
        st = self.st
        zT = layout.transpose(z)  # (P, k)
        corr = torch.zeros(self.nc, st.num_cams, dtype=self.dtype, device=z.device)
        for s, e in self._chunks(self.nc):
            zo = layout.gather_soa(zT, st.point_index[s:e])  # (k, n)
            t = layout.sum_products(K[:, :, s:e], zo[None], 1)  # (d, n)
            corr.index_add_(1, st.cam_index[s:e], layout.sum_products(self.Jc[:, :, s:e], t[:, None, :], 0))
        return corr.T - self.gc

    def information(self) -> Tensor:
        """The undamped reduced matrix S = U - W V^-1 W^T, dense (n, n), in the reduced numbering:
        the information of the reduced unknowns with every eliminated block marginalised (for
        uncertainty, not for the LM step). Needs an explicit structure."""
        _, K, _ = self._eliminate(torch.zeros((), dtype=self.dtype, device=self.r.device))
        return self._dense_matrix(self._explicit_blocks(self._y_rows(K)), torch.zeros((), dtype=self.dtype,
                                                                                      device=self.r.device))

    # ------------------------------------------------------------------------------------------
    def start(self, radius: Tensor | float) -> "StepSolve":
        """The linear solve of the LM step for trust-region radius `radius`, to be advanced by
        the caller (iterative solvers run in blocks: `StepSolve.run`, then `StepSolve.result`)."""
        return StepSolve(self, radius)

    def step(self, radius: Tensor | float) -> tuple[Step, StepInfo]:
        """The step, solved to convergence (one host read per CG block): tests, simple callers."""
        s = self.start(radius)
        while True:
            s.run(pcg.next_block(s.iterations_run))
            if not bool(s.running()):
                return s.result()

    def _back_substitute(self, x: Tensor, M: Tensor, K: Tensor, z: Tensor) -> tuple[Step, Tensor]:
        """(Step for reduced unknowns x, the linear model's cost decrease as a () float64)."""
        st = self.st
        dc = st.from_reduced(x)  # (C, nc)
        w = z.clone()
        e = torch.empty(self.d, st.num_obs, dtype=self.dtype, device=x.device)  # Jc dc per observation
        for s, t in self._chunks(self.nc):
            e[:, s:t] = layout.sum_products(self.Jc[:, :, s:t], layout.gather_soa(dc, st.cam_index[s:t])[None], 1)
            w.index_add_(1, st.point_index[s:t], layout.sum_products(K[:, :, s:t], e[:, None, s:t], 0))  # K^T Jc dc
        dp = -(M * w[None, :, :]).sum(1)  # (k, P): dp_j = -sum_c M[j, c] w_c
        # linear model: f = J delta per residual block, cost change = -(r.f + |f|^2/2), summed in
        # float64 (in float32 it is a small difference of large sums)
        dpT = layout.transpose(dp)  # (P, k)
        f64 = torch.float64
        change = torch.zeros((), dtype=f64, device=x.device)
        for s, t in self._chunks(self.k):
            f = e[:, s:t] + layout.sum_products(self.Jp[:, :, s:t], layout.gather_soa(dpT, st.point_index[s:t])[None], 1)
            change -= (self.r[:, s:t] * f).sum(dtype=f64) + 0.5 * f.square().sum(dtype=f64)
        return Step(cams=dc, points=dpT, reduced=x), change

    # ------------------------------------------------------------------------------------------
    def _explicit_blocks(self, Yrows: Tensor) -> Tensor:
        """Upper-triangle blocks of S (undamped): U on the diagonal minus the pair sums."""
        st = self.st
        blocks = torch.zeros(st.num_blocks, self.nc, self.nc, dtype=self.dtype, device=Yrows.device)
        _gram_segments(Yrows, st.pair_segments, blocks, self.k, self.chunk_bytes, alpha=-1.0, pairs=True)
        diag = self.U.clone()  # U_c - sum_{a in c} Y_a^T Y_a: the (a, a) pairs, by camera segments
        _gram_segments(Yrows, st.cam_segments, diag, self.k, self.chunk_bytes, alpha=-1.0)
        blocks.index_add_(0, st.diag_blocks_of, diag.index_select(0, st.diag_cams))
        return blocks

    def _dense_matrix(self, blocks: Tensor, damp: Tensor) -> Tensor:
        st = self.st
        n1 = st.n + 1
        S = torch.zeros(n1 * n1, dtype=self.dtype, device=blocks.device)
        per = max(1, self.chunk_bytes // (self.nc * self.nc * 16))
        for s0, s1, strict in st.dense_chunks(per):
            br, bc = st.block_row[s0:s1], st.block_col[s0:s1]
            S.index_put_((st.dense_index(br, bc).reshape(-1),), blocks[s0:s1].reshape(-1), accumulate=True)
            # mirror the strict upper blocks: entry (i, j) also lands at (col j, row i)
            idx = st.dense_index(bc[strict], br[strict]).transpose(1, 2)
            S.index_put_((idx.reshape(-1),), blocks[s0:s1][strict].reshape(-1), accumulate=True)
        S = S.view(n1, n1)[: st.n, : st.n]
        S.diagonal().add_(damp)
        return S

    def _solve_dense(self, blocks: Tensor, b: Tensor, damp: Tensor) -> tuple[Tensor, Tensor]:
        S = self._dense_matrix(blocks, damp)
        L, info = torch.linalg.cholesky_ex(S)
        # not numerically SPD (gauge freedom + tiny damping): the LM loop rejects the step
        return torch.cholesky_solve(b[:, None], L)[:, 0], info == 0

    def _solve_sparse(self, blocks: Tensor, b: Tensor, damp: Tensor) -> tuple[Tensor, Tensor]:
        """scipy's SuperLU on the host: CPU only (chosen only there), outside the sync budget."""
        st = self.st
        if not hasattr(st, "_sparse_assembly"):
            st._sparse_assembly = _assembly(st, blocks.shape[1])
        asm = st._sparse_assembly
        A = asm.matrix(blocks.reshape(-1).cpu().numpy(), damp.expand(st.n).cpu().numpy())
        ok = True
        try:
            x = asm.solve(A, b.cpu().numpy())
        except RuntimeError:  # exactly singular
            x, ok = np.zeros(st.n), False
        return torch.as_tensor(x, dtype=self.dtype, device=b.device), torch.tensor(ok, device=b.device)

    # ------------------------------------------------------------------------------------------
    def _precond_blocks(self, diag_blocks: Tensor, damp: Tensor) -> Tensor:
        """Inverse of the Schur-Jacobi blocks in preconditioner-group numbering (ng, b, b)."""
        st = self.st
        ng, bsz = st.num_groups, st.group_size
        B = torch.zeros((ng + 1) * bsz * bsz, dtype=self.dtype, device=damp.device)
        B.index_add_(0, st.precond_index, diag_blocks.reshape(-1))
        B = B[: ng * bsz * bsz].view(ng, bsz, bsz).clone()
        diag = torch.zeros(ng * bsz, dtype=self.dtype, device=damp.device)
        diag.index_copy_(0, st.unknown_slot, damp)
        diag = diag.view(ng, bsz) + st.precond_pad.to(self.dtype)  # unused slots: identity
        B.diagonal(dim1=1, dim2=2).add_(diag)
        L, info = torch.linalg.cholesky_ex(B)
        # blocks that are not numerically SPD fall back to their diagonal
        dd = torch.diag_embed(B.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(self.dtype).tiny).sqrt())
        L = torch.where((info != 0)[:, None, None], dd, L)
        return torch.cholesky_inverse(L)

    def _apply_precond(self, Minv: Tensor, r: Tensor) -> Tensor:
        st = self.st
        ng, bsz = st.num_groups, st.group_size
        v = r.new_zeros(ng * bsz)
        v.index_copy_(0, st.unknown_slot, r)
        y = torch.bmm(Minv, v.view(ng, bsz, 1)).view(-1)
        return y.index_select(0, st.unknown_slot)

    def _pcg(self, matvec, Minv: Tensor, b: Tensor) -> pcg.PCG:
        o = self.opt
        return pcg.PCG(matvec, lambda r: self._apply_precond(Minv, r), b, max_iterations=o.pcg_max_iterations,
                       eta=o.pcg_eta, rtol=1e-12, min_iterations=o.pcg_min_iterations)

    def _pcg_explicit(self, blocks: Tensor, b: Tensor, damp: Tensor) -> pcg.PCG:
        st = self.st
        diag_blocks = torch.zeros_like(self.U)
        diag_blocks[st.diag_cams] = blocks[st.diag_blocks_of]
        Minv = self._precond_blocks(diag_blocks, damp)
        br, bc, strict = st.block_row, st.block_col, st.block_strict
        Bs = blocks[strict]
        brs, bcs = br[strict], bc[strict]

        def matvec(x):
            xc = st.from_reduced(x)  # (C, nc)
            y = torch.zeros_like(xc)
            y.index_add_(0, br, torch.bmm(blocks, xc[bc][:, :, None])[..., 0])
            y.index_add_(0, bcs, torch.bmm(Bs.transpose(1, 2), xc[brs][:, :, None])[..., 0])
            return st.to_reduced(y) + damp * x

        return self._pcg(matvec, Minv, b)

    def _pcg_implicit(self, K: Tensor, b: Tensor, damp: Tensor) -> pcg.PCG:
        # Schur-Jacobi preconditioner: U_c - sum_{a in c} Y_a^T Y_a
        Yrows = self._y_rows(K)
        diag_blocks = self.U.clone()
        _gram_segments(Yrows, self.st.cam_segments, diag_blocks, self.k, self.chunk_bytes, alpha=-1.0)
        Minv = self._precond_blocks(diag_blocks, damp)
        return self._pcg(self._implicit_matvec(Yrows, damp), Minv, b)

    def _implicit_matvec(self, Yrows: Tensor, damp: Tensor):
        """S x = U x - E^T Q^T Q E x with sparse CSR products (any device).

        E (k*N x C*nc) has one row per (observation a, coordinate) holding Y_a: its values are the
        Y rows as they are (no copy) and its pattern is fixed (structure.py); Q (P x N) sums
        observations per point. One CG step is two sparse matvecs over 2 * k * nc * N entries
        (MKL on the CPU with int32 indices, as fast as scipy; cuSPARSE on CUDA).
        """
        st = self.st
        pat = st.implicit_pattern
        k, nc, N, C, P = self.k, self.nc, st.num_obs, st.num_cams, st.num_points
        vals = Yrows[:N].reshape(-1)
        tvals = st.buffer("ET_values", (vals.numel(),), self.dtype)
        torch.index_select(vals, 0, pat["ET"][2], out=tvals)
        ones = st.buffer("Q_values", (N,), self.dtype).fill_(1)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            E = torch.sparse_csr_tensor(*pat["E"], vals, size=(N * k, C * nc), check_invariants=False)
            ET = torch.sparse_csr_tensor(*pat["ET"][:2], tvals, size=(C * nc, N * k), check_invariants=False)
            Q = torch.sparse_csr_tensor(*pat["Q"], ones, size=(P, N), check_invariants=False)
        pi, U = st.point_index, self.U

        def matvec(x: Tensor) -> Tensor:
            xc = st.from_reduced(x)  # (C, nc)
            t = E @ xc.reshape(-1)  # (N*k,)
            s = Q @ t.view(N, k)  # (P, k) per-point sums
            u = ET @ s.index_select(0, pi).reshape(-1)  # (C*nc,)
            y = torch.bmm(U, xc[:, :, None])[..., 0] - u.view(C, nc)
            return st.to_reduced(y) + damp * x

        return matvec


class StepSolve:
    """One LM step's linear solve: direct solvers finish at once; PCG advances in blocks of
    iterations (`run`), and `result` gives the step from the iterate so far, with
    `StepInfo.unfinished` telling whether PCG is still running (the LM loop reads that flag with
    its status)."""

    def __init__(self, system: ReducedSystem, radius: Tensor | float):
        self.system = system
        st = system.st
        lam = 1.0 / torch.as_tensor(radius, dtype=system.dtype, device=system.r.device)
        self.M, self.K, self.z = system._eliminate(lam)
        b = st.to_reduced(system._rhs(self.K, self.z))  # (n,)
        damp = lam * system.DC
        self.cg: pcg.PCG | None = None
        method = system.method
        if method in ("dense", "sparse", "pcg_explicit"):
            blocks = system._explicit_blocks(system._y_rows(self.K))
            if method == "dense":
                self.x, self.ok = system._solve_dense(blocks, b, damp)
            elif method == "sparse":
                self.x, self.ok = system._solve_sparse(blocks, b, damp)
            else:
                self.cg = system._pcg_explicit(blocks, b, damp)
        elif method == "pcg":
            self.cg = system._pcg_implicit(self.K, b, damp)
        else:
            raise ValueError(f"unknown linear solver {method!r}")

    @property
    def iterations_run(self) -> int:
        return 0 if self.cg is None else self.cg.done

    def run(self, iterations: int) -> None:
        """Up to `iterations` more CG iterations (nothing for direct solvers)."""
        if self.cg is not None:
            self.cg.run(iterations)

    def running(self) -> Tensor:
        """() bool on the device: PCG has iterations left and has not converged."""
        cg = self.cg
        if cg is None or cg.exhausted:
            return torch.zeros((), dtype=torch.bool, device=self.system.r.device)
        return cg.active.any()

    def result(self) -> tuple[Step, StepInfo]:
        """The step from the solution (or PCG's iterate) so far, and how to judge it."""
        cg = self.cg
        if cg is None:
            x, ok = self.x, self.ok
            its = torch.zeros((), dtype=torch.int64, device=x.device)
        else:
            res = cg.result()
            x, ok, its = res.x, res.ok, res.iterations
        step, change = self.system._back_substitute(x, self.M, self.K, self.z)
        ok = ok & torch.isfinite(x).all() & torch.isfinite(step.points).all()
        return step, StepInfo(ok, change, its, self.running())


def _assembly(st, nc: int) -> SparseAssembly:
    """The CSC assembly of the reduced matrix from the structure's blocks (B, nc, nc): every block
    entry at its position, the strict (upper) blocks also mirrored below the diagonal. int32
    throughout (24M contributions on a 10,000-image corridor)."""
    strict, per, B = st.block_strict, nc * nc, st.block_row.numel()
    i32 = torch.int32
    r, c = st.pmap[st.block_row].to(i32), st.pmap[st.block_col].to(i32)  # (B, nc) unknowns of each block
    rows = torch.cat([r[:, :, None].expand(B, nc, nc).reshape(-1), c[strict][:, None, :].expand(-1, nc, nc).reshape(-1)])
    cols = torch.cat([c[:, None, :].expand(B, nc, nc).reshape(-1), r[strict][:, :, None].expand(-1, nc, nc).reshape(-1)])
    it = i32 if B * per < 2**31 else torch.int64
    src = torch.cat([torch.arange(B * per, dtype=it, device=strict.device),
                     (strict.to(it)[:, None] * per + torch.arange(per, dtype=it, device=strict.device)).reshape(-1)])
    return SparseAssembly(st.n, rows.cpu().numpy(), cols.cpu().numpy(), src.cpu().numpy(), B * per)
