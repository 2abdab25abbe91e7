"""Global rotation averaging: robust cam_from_world rotations from the relative ones.

Method (GLOMAP's, vectorised over edges):
1. Keep the largest connected component of valid pairs.
2. Initialise from the maximum spanning tree (weights = inlier match counts), composing
   relative rotations outward from a central root by pointer doubling.
3. IRLS in the tangent space. With the world-frame perturbation R_i <- R_i Exp(d_i), the edge
   residual rotated into the world frame, r_ij = R_j^T Log(R_ij R_i R_j^T), linearises to
   r_ij + d_i - d_j. Every edge block is +-I, so the normal matrix is the weighted graph
   Laplacian (x) I_3: one sparse N x N system with three right-hand sides; the gauge is fixed by
   pinning the root. A few L1-approximating rounds (weights 1/|r|) make the start robust to
   a spanning tree that went through a bad edge, then Geman-McClure reweighting (sigma 5 deg).
4. Drop edges whose residual exceeds `max_rotation_error_deg` (10 deg) and keep the largest
   component; repeat the estimation `num_rounds` times (GLOMAP runs it twice).

Linear solver: "dense" is a dense Cholesky in torch on the input's device; "cholesky" factorises
the sparse Laplacian with scipy's SuperLU on the host (exact; the system is N x N with N the
number of images, so only O(E) weights and O(N) right-hand sides cross to the host per
iteration, in one copy); "cg" is torchsfm's PCG (torchsfm.solver.pcg) on a torch sparse CSR
Laplacian with a Jacobi preconditioner, on the input's device. "auto": dense up to
`dense_max_images` (1000 on the CPU, where a scipy factorisation then pays; 8000 on CUDA, where a
dense factorisation of that size takes milliseconds), then cholesky on the CPU and cg on CUDA.
On chain-like graphs (video) the Laplacian's condition number grows like N^2 and CG needs
thousands of iterations (3,000-image chain: 1.2 s direct vs 30 s CG on one CPU thread).

Host synchronisation: one read per IRLS iteration (the step size, with the factorisation's
status; the scipy path's single copy to the host is that read), plus one per further block of
CG iterations on the cg path (PCG's convergence flag is read with the step size).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..data.model import Reconstruction
from ..geometry import so3
from ..runtime import host_read
from ..solver import pcg
from .graph import (
    REASON_COMPONENT,
    REASON_ROTATION,
    active_images,
    compose_along_tree,
    largest_component,
    mark_images,
    maximum_spanning_tree,
    stage_copy,
)

log = logging.getLogger(__name__)


@dataclass
class RotationAveragingOptions:
    max_rotation_error_deg: float = 10.0  # edges with a larger residual are dropped after a round
    num_rounds: int = 2  # estimate -> filter -> keep largest component, this many times
    l1_iterations: int = 10  # IRLS steps with L1 weights before Geman-McClure
    irls_iterations: int = 100  # Geman-McClure IRLS steps at most
    gm_sigma_deg: float = 5.0
    step_tolerance: float = 1e-5  # radians: stop when the mean update is smaller (GLOMAP: 1e-3)
    weight_by_inliers: bool = False  # scale edge weights by sqrt(inlier matches)
    # "auto": dense up to dense_max_images images, then cholesky on the CPU, cg on CUDA | "dense"
    # (torch) | "cholesky" (scipy, host) | "cg" (torch, on device). A scipy factorisation costs
    # ~5 ms of set-up per IRLS step, most of rotation averaging's time on small graphs.
    linear_solver: str = "auto"
    dense_max_images: int | None = None  # default: 1000 on the CPU, 8000 on CUDA
    cg_max_iterations: int = 1000
    cg_tolerance: float = 1e-10


@dataclass
class RotationAveragingReport:
    num_images_in: int = 0
    num_images_registered: int = 0
    num_edges_in: int = 0
    num_edges_used: int = 0
    num_edges_dropped: int = 0
    root: int = -1  # image row whose rotation is the identity (the gauge)
    residual_deg: Tensor | None = None  # (E,) final residual of each pair, NaN where unused
    rounds: list[dict] = field(default_factory=list)


def relative_rotations(rec: Reconstruction) -> Tensor:
    """cam_j_from_cam_i rotation matrices (E, 3, 3) of the view graph."""
    return so3.quat_to_matrix(rec.view_graph.rel_quat)


def edge_residuals(R: Tensor, R_rel: Tensor, pairs: Tensor) -> Tensor:
    """Axis-angle of R_ij R_i R_j^T per edge (E, 3), in camera j's frame."""
    i, j = pairs[:, 0], pairs[:, 1]
    return so3.log(R_rel @ R[i] @ R[j].transpose(-1, -2))


def initialize_from_spanning_tree(
    num_images: int, pairs: Tensor, R_rel: Tensor, weights: Tensor, mask: Tensor
) -> tuple[Tensor, int, Tensor]:
    """Rotations (I, 3, 3) composed along the maximum spanning tree, the root, and in_tree (I,)."""
    tree = maximum_spanning_tree(num_images, pairs, weights, mask)
    child = torch.nonzero(tree.parent >= 0, as_tuple=True)[0]
    e = tree.parent_edge[child]
    # Edge (i, j) holds j_from_i; child_from_parent is that or its transpose.
    forward = pairs[e, 1] == child
    Re = R_rel[e]
    local = torch.eye(3, dtype=R_rel.dtype, device=R_rel.device).repeat(num_images, 1, 1)
    local[child] = torch.where(forward[:, None, None], Re, Re.transpose(-1, -2))
    return compose_along_tree(tree.parent, local), tree.root, tree.in_tree


class _Laplacian:
    """The IRLS normal equations L d = rhs with d[root] = 0 (L: weighted graph Laplacian of the
    edges (i, j) over n nodes), for changing weights. Index sets are built once per refinement;
    `solve` returns (d (n, 3), the mean step size as a float): the one host read."""

    def __init__(self, n: int, i: Tensor, j: Tensor, root: int, solver: str, options: RotationAveragingOptions):
        self.n, self.i, self.j, self.root, self.solver, self.options = n, i, j, root, solver, options
        dev = i.device
        keep = torch.ones(n, dtype=torch.bool, device=dev)
        keep[root] = False
        self.keep = torch.nonzero(keep)[:, 0]  # the unknowns: every node but the root
        # node -> unknown (the root -> n - 1, a dropped slot)
        self.unknown = torch.full((n,), n - 1, dtype=torch.long, device=dev)
        self.unknown[self.keep] = torch.arange(n - 1, device=dev)
        self.expected_cg = 0
        if solver == "cholesky":
            self.ii, self.jj, self.keep_np = i.numpy(force=True), j.numpy(force=True), keep.numpy(force=True)
        elif solver == "cg":
            # CSR pattern of the unknowns' block (root row and column dropped): the diagonal, then
            # (i, j) and (j, i) per edge; duplicates merged, values gathered by `slot`
            ui, uj = self.unknown[i], self.unknown[j]
            diag = torch.arange(n - 1, device=dev)
            rows = torch.cat([diag, ui, uj])
            cols = torch.cat([diag, uj, ui])
            live = (rows < n - 1) & (cols < n - 1)
            key = torch.where(live, rows * n + cols, n * n)  # dropped entries -> a last slot
            ukey, self.slot = torch.unique(key, return_inverse=True)
            self.num_slots = ukey.numel()
            self.nnz = int((ukey < n * n).sum())
            r_, c_ = ukey[: self.nnz] // n, ukey[: self.nnz] % n
            self.crow = torch.cat([r_.new_zeros(1), torch.cumsum(torch.bincount(r_, minlength=n - 1), 0)]).to(torch.int32)
            self.col = c_.to(torch.int32)

    def solve(self, w: Tensor, rhs: Tensor) -> tuple[Tensor, float]:
        n, i, j = self.n, self.i, self.j
        if self.solver == "cholesky":
            return self._solve_host(w, rhs)
        if self.solver == "dense":  # small graphs: one dense Cholesky in torch, on any device
            L = torch.zeros(n, n, dtype=w.dtype, device=w.device)
            L.index_put_((i, i), w, accumulate=True).index_put_((j, j), w, accumulate=True)
            L.index_put_((i, j), -w, accumulate=True).index_put_((j, i), -w, accumulate=True)
            Lk = L.index_select(0, self.keep).index_select(1, self.keep)
            C, info = torch.linalg.cholesky_ex(Lk)
            d = torch.zeros_like(rhs).index_copy_(0, self.keep, torch.cholesky_solve(rhs.index_select(0, self.keep), C))
            step, bad = host_read(_mean_step(d, n), info != 0)
            if bad:
                raise RuntimeError("rotation averaging: the weighted view-graph Laplacian is not positive definite")
            return d, step
        return self._solve_cg(w, rhs)

    def _solve_host(self, w: Tensor, rhs: Tensor) -> tuple[Tensor, float]:
        from scipy.sparse import coo_matrix
        from scipy.sparse.linalg import splu

        n, E = self.n, w.numel()
        host = torch.cat([w.detach().reshape(-1), rhs.detach().reshape(-1)]).to(torch.float64).numpy(force=True)  # 1 read
        ww, b = host[:E], host[E:].reshape(n, -1)
        ii, jj, keep = self.ii, self.jj, self.keep_np
        rows = np.concatenate([ii, jj, ii, jj])
        cols = np.concatenate([ii, jj, jj, ii])
        vals = np.concatenate([ww, ww, -ww, -ww])
        L = coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsc()[keep][:, keep]
        x = np.zeros((n, b.shape[1]))
        x[keep] = splu(L.tocsc()).solve(b[keep])
        step = float(np.linalg.norm(x, axis=1).sum() / max(n - 1, 1))
        return torch.as_tensor(x, dtype=rhs.dtype, device=rhs.device), step  # an upload, not a read

    def _solve_cg(self, w: Tensor, rhs: Tensor) -> tuple[Tensor, float]:
        n, o = self.n, self.options
        deg = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, self.i, w).index_add_(0, self.j, w)
        vals = torch.zeros(self.num_slots, dtype=w.dtype, device=w.device)
        vals.index_add_(0, self.slot, torch.cat([deg.index_select(0, self.keep), -w, -w]))
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            L = torch.sparse_csr_tensor(self.crow, self.col, vals[: self.nnz], size=(n - 1, n - 1),
                                        check_invariants=False)
        inv_diag = 1.0 / deg.index_select(0, self.keep).clamp_min(torch.finfo(w.dtype).tiny)[:, None]
        rtol = max(o.cg_tolerance, 100 * torch.finfo(w.dtype).eps)  # float32 cannot reach 1e-10
        cg = pcg.PCG(lambda x: L @ x, lambda r: inv_diag * r, rhs.index_select(0, self.keep),
                     max_iterations=o.cg_max_iterations, rtol=rtol)
        block = pcg.next_block(0, self.expected_cg)
        while True:  # PCG's convergence flag is read with the step size
            cg.run(block)
            d = torch.zeros_like(rhs).index_copy_(0, self.keep, cg.x)
            step, active, its = host_read(_mean_step(d, n), cg.active.any(), cg.its.max())
            if not active or cg.exhausted:
                break
            block = pcg.next_block(cg.done)
        self.expected_cg = int(its)
        return d, step


def _mean_step(d: Tensor, n: int) -> Tensor:
    return d.norm(dim=-1).sum() / max(n - 1, 1)


def refine_rotations(
    R: Tensor, pairs: Tensor, R_rel: Tensor, mask: Tensor, root: int, options: RotationAveragingOptions,
    edge_weight: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Robust IRLS refinement of rotations R (I, 3, 3) over the edges in `mask`. Returns the
    rotations and the number of iterations run."""
    eidx = torch.nonzero(mask, as_tuple=True)[0]
    Rr = R_rel[eidx]
    base_w = None if edge_weight is None else edge_weight[eidx]
    # Solve over the images the edges touch only (isolated rows would make L singular).
    nodes, compact = torch.unique(pairs[eidx], return_inverse=True)
    i, j = compact[:, 0], compact[:, 1]
    n = nodes.numel()
    solver = options.linear_solver
    if solver == "auto":
        cuda = R.device.type == "cuda"
        dense_max = options.dense_max_images or (8000 if cuda else 1000)
        solver = "dense" if n <= dense_max else ("cg" if cuda else "cholesky")
    if solver not in ("dense", "cholesky", "cg"):
        raise ValueError(f"rotation averaging: linear_solver must be auto, dense, cholesky or cg, not {solver!r}")
    root_c = int(torch.searchsorted(nodes, torch.tensor(root, device=nodes.device)))
    if root_c >= n or int(nodes[root_c]) != root:
        raise ValueError("the gauge image is not part of the refined edges")
    lap = _Laplacian(n, i, j, root_c, solver, options)
    Rn = R[nodes]
    sigma2 = math.radians(options.gm_sigma_deg) ** 2
    total = options.l1_iterations + options.irls_iterations
    it = 0
    for it in range(1, total + 1):
        r = edge_residuals(Rn, Rr, compact)
        r_world = (Rn[j].transpose(-1, -2) @ r[..., None])[..., 0]
        ang2 = (r * r).sum(-1)
        if it <= options.l1_iterations:
            w = 1.0 / ang2.sqrt().clamp_min(1e-4)
        else:
            w = (sigma2 / (ang2 + sigma2)) ** 2
        if base_w is not None:
            w = w * base_w
        rhs = torch.zeros(n, 3, dtype=R.dtype, device=R.device)
        rhs.index_add_(0, i, -w[:, None] * r_world).index_add_(0, j, w[:, None] * r_world)
        d, step = lap.solve(w, rhs)
        Rn = Rn @ so3.exp(d)
        if it > options.l1_iterations and step < options.step_tolerance:
            break
    R = R.clone()
    R[nodes] = Rn
    return R, it


def rotation_averaging(
    rec: Reconstruction, options: RotationAveragingOptions | None = None
) -> tuple[Reconstruction, RotationAveragingReport]:
    """Global rotations for the largest consistent component of the view graph.

    Uses the valid pairs' `rel_quat` (cam_j_from_cam_i). Returns a new reconstruction whose
    images in the component have `quat` set (the root image is the identity), `registered`
    True and `trans` zero (positions come later); pairs dropped here get `valid` False and images
    outside the component get a reason in `meta["image_reason"]`.
    """
    options = options or RotationAveragingOptions()
    rec = stage_copy(rec, "images", "view_graph")
    vg, images = rec.view_graph, rec.images
    num_images = len(images)
    report = RotationAveragingReport(num_edges_in=int(vg.valid.sum()))
    R_rel = relative_rotations(rec)
    finite = torch.isfinite(R_rel).flatten(1).all(1)
    active = active_images(rec.meta, num_images, vg.pairs.device)
    valid = vg.valid & finite & active[vg.pairs].all(1)
    inliers = vg.num_matches().to(R_rel.dtype)
    edge_weight = inliers.clamp_min(1).sqrt() if options.weight_by_inliers else None

    comp, _ = largest_component(num_images, vg.pairs, valid)
    involved = torch.zeros(num_images, dtype=torch.bool, device=comp.device)
    involved[vg.pairs[valid].reshape(-1)] = True
    report.num_images_in = int(involved.sum())
    mark_images(rec.meta, num_images, involved & ~comp, REASON_COMPONENT)
    valid = valid & comp[vg.pairs].all(1)
    residual_deg = torch.full((len(vg),), float("nan"), dtype=R_rel.dtype, device=R_rel.device)
    if not bool(valid.any()):
        log.warning("rotation averaging: no valid pairs")
        vg.valid = valid
        images.registered = torch.zeros_like(images.registered)
        report.residual_deg = residual_deg
        return rec, report

    R, root, _ = initialize_from_spanning_tree(num_images, vg.pairs, R_rel, inliers, valid)
    report.root = root
    for rnd in range(options.num_rounds):
        R, iters = refine_rotations(R, vg.pairs, R_rel, valid, root, options, edge_weight)
        ang = torch.rad2deg(edge_residuals(R, R_rel, vg.pairs).norm(dim=-1))
        bad = valid & (ang > options.max_rotation_error_deg)
        before = comp
        valid = valid & ~bad
        comp, _ = largest_component(num_images, vg.pairs, valid)
        valid = valid & comp[vg.pairs].all(1)
        lost = before & ~comp
        mark_images(rec.meta, num_images, lost, REASON_ROTATION)
        used = ang[valid]
        report.rounds.append({
            "iterations": iters,
            "edges_dropped": int(bad.sum()),
            "images_dropped": int(lost.sum()),
            "median_residual_deg": float(used.median()) if used.numel() else float("nan"),
            "max_residual_deg": float(used.max()) if used.numel() else float("nan"),
        })
        log.info("rotation averaging round %d: %d iterations, %d edges dropped, %d images dropped, "
                 "median residual %.3f deg", rnd + 1, iters, int(bad.sum()), int(lost.sum()),
                 report.rounds[-1]["median_residual_deg"])
        if not bool(valid.any()):
            break
        if not bool(comp[root]):
            # The gauge image left the component: re-anchor on the new component's best node.
            _, root, _ = initialize_from_spanning_tree(num_images, vg.pairs, R_rel, inliers, valid)
            R = R @ R[root].transpose(-1, -2)
            report.root = root
        if int(bad.sum()) == 0:
            break

    residual_deg[valid] = torch.rad2deg(edge_residuals(R, R_rel[valid], vg.pairs[valid]).norm(dim=-1))
    report.residual_deg = residual_deg
    report.num_edges_used = int(valid.sum())
    report.num_edges_dropped = report.num_edges_in - report.num_edges_used
    report.num_images_registered = int(comp.sum())
    vg.valid = valid
    images.quat = torch.where(comp[:, None], so3.matrix_to_quat(R).to(images.quat.dtype), images.quat)
    images.trans = torch.where(comp[:, None], torch.zeros_like(images.trans), images.trans)
    images.registered = comp
    return rec, report
