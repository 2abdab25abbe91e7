"""The sparse LM solver layer on BAL-style problems (its own residual, no camera module)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import shared_data, tol
from torchsfm.ba import bal
from torchsfm.solver import SolverOptions, check_jacobians, losses, pcg, solve
from torchsfm.solver.autodiff import AutodiffProblem
from torchsfm.solver.checks import reduced_jacobian
from torchsfm.solver.lm import _defaults
from torchsfm.solver.problem import compact_param_map, identity_param_map
from torchsfm.solver.schur import ReducedSystem
from torchsfm.solver.structure import SchurStructure


def small_bal(num_cams=8, num_points=120, k=4.0, seed=0, noise=0.5, perturb=1e-2):
    return bal.synthetic_bal(num_cams, num_points, k, seed=seed, noise_px=noise, perturb=perturb)


def shared_intrinsics_map(num_cams: int, device=None) -> torch.Tensor:
    """Poses per camera, (f, k1, k2) shared by all cameras; camera 0 constant (gauge-ish)."""
    pm = identity_param_map(num_cams, 9, device=device)
    pm[:, 6:] = num_cams * 9 + torch.arange(3, device=device)
    pm[0, :6] = -1
    return compact_param_map(pm)[0]


# --------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("loss", ["trivial", "huber", "cauchy", "soft_l1"])
def test_loss_derivatives_match_finite_differences(loss):
    s = torch.tensor([0.0, 0.3, 0.9, 1.0, 1.7, 4.0, 25.0, 400.0], dtype=torch.float64)
    a = 1.3
    rho, rho1, rho2 = losses.evaluate(s, loss, a)
    h = 1e-6
    rp, r1p, _ = losses.evaluate(s + h, loss, a)
    rm, r1m, _ = losses.evaluate((s - h).clamp_min(0), loss, a)
    inner = s > 2 * h
    assert torch.allclose(((rp - rm) / (2 * h))[inner], rho1[inner], rtol=1e-6, atol=1e-8)
    kink = (s - a * a).abs() < 1e-3  # Huber's rho'' jumps at s = a^2
    sel = inner & ~kink
    assert torch.allclose(((r1p - r1m) / (2 * h))[sel], rho2[sel], rtol=1e-5, atol=1e-8)
    # quadratic near zero, so a small residual costs the same under every loss
    assert float(rho[0]) == 0.0 and abs(float(rho1[1]) - 1.0) < 0.25
    if loss != "trivial":
        assert float(rho1[-1]) < 0.2  # large residuals are down-weighted


def test_robustify_is_irls_and_triggs_correction(monkeypatch):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(50, 2, generator=g, dtype=torch.float64) * 3
    J = torch.randn(50, 2, 5, generator=g, dtype=torch.float64)
    rr, (JJ,) = losses.robustify(r, [J], "huber", 1.0)
    w = losses.weights(r, "huber", 1.0)
    assert torch.allclose(rr, r * w.sqrt()[:, None]) and torch.allclose(JJ, J * w.sqrt()[:, None, None])
    assert float(w.min()) < 0.5 and float(w.max()) == 1.0
    # A loss with rho'' > 0 takes Ceres' second-order branch: J~^T J~ = J^T (rho' + 2 rho'' r r^T) J
    # and J~^T r~ = rho' J^T r (the Gauss-Newton model of the robust cost).
    monkeypatch.setattr(losses, "evaluate", lambda s, loss, a: (s + 0.25 * s * s, 1 + 0.5 * s, 0.5 * torch.ones_like(s)))
    rr, (JJ,) = losses.robustify(r, [J], "custom", 1.0)
    s = r.square().sum(1)
    H = JJ.transpose(1, 2) @ JJ
    Href = J.transpose(1, 2) @ ((1 + 0.5 * s)[:, None, None] * torch.eye(2, dtype=r.dtype) + 2 * 0.5 * r[:, :, None] * r[:, None, :]) @ J
    assert torch.allclose(H, Href, rtol=1e-10, atol=1e-9)
    assert torch.allclose((JJ.transpose(1, 2) @ rr[:, :, None])[..., 0], (1 + 0.5 * s)[:, None] * (J.transpose(1, 2) @ r[:, :, None])[..., 0])


# --------------------------------------------------------------------------------------------
# Jacobians


def test_bal_jacobians_match_finite_differences(device):
    p = bal.BALProblem(small_bal(num_cams=5, num_points=40), device=device)
    chk = check_jacobians(p, eps=1e-6)
    assert chk.max_rel_error_cam < 1e-6 and chk.max_rel_error_point < 1e-6, chk


def test_autodiff_problem_jacobians_and_solve(device):
    """A residual with no hand-written Jacobian (BAL camera, additive angle-axis) via torch.func."""
    from torchsfm.geometry import so3

    d = small_bal(num_cams=4, num_points=30, noise=0.0, perturb=1e-3)

    def residual(cam, X, obs):
        R = so3.exp(cam[:3])
        P = R @ X + cam[3:6]
        p = -P[:2] / P[2]
        n = (p * p).sum()
        return cam[6] * (1 + cam[7] * n + cam[8] * n * n) * p - obs

    T = lambda x: torch.as_tensor(x, dtype=torch.float64, device=device)  # noqa: E731
    prob = AutodiffProblem(residual, T(d.cameras), T(d.points), T(d.cam_index).long(), T(d.point_index).long(),
                           aux=(T(d.observations),), cam_param_map=None)
    chk = check_jacobians(prob, eps=1e-6)
    assert chk.max_rel_error_cam < 1e-6 and chk.max_rel_error_point < 1e-6, chk
    s = solve(prob, SolverOptions(max_iterations=30))
    assert s.final_cost < 1e-6 * s.initial_cost


# --------------------------------------------------------------------------------------------
# the reduced system


def _dense_step(problem, radius, opt):
    """Reference: the damped normal equations of the full (reduced cams + points) system, solved
    in float64 (from the problem's linearisation in its own precision)."""
    lin = problem.linearize().as_rows()
    r = lin.residuals.reshape(-1).double()
    Jr = reduced_jacobian(problem, lin.jac_cam).double()
    N, d, n = Jr.shape
    P, k = problem.num_points, problem.point_dim
    Jpt = torch.zeros(N, d, P * k, dtype=r.dtype, device=r.device)
    cols = problem.point_index[:, None] * k + torch.arange(k, device=r.device)
    Jpt.scatter_(2, cols[:, None, :].expand(N, d, k), lin.jac_point.double())
    J = torch.cat([Jr, Jpt], 2).reshape(N * d, n + P * k)
    H = J.T @ J
    D = H.diagonal().clamp(opt.min_lm_diagonal, opt.max_lm_diagonal)
    delta = torch.linalg.solve(H + torch.diag(D / radius), -(J.T @ r))
    return delta[:n], delta[n:].reshape(P, k)


@pytest.mark.parametrize("method", ["dense", "sparse", "pcg", "pcg_explicit"])
@pytest.mark.parametrize("mapping", ["identity", "constant_camera", "shared_intrinsics"])
def test_schur_step_equals_full_normal_equations(device, dtype, method, mapping):
    if method == "sparse" and device.type != "cpu":
        pytest.skip("the sparse direct solver is CPU only")
    p = bal.BALProblem(small_bal(), device=device, dtype=dtype)
    if mapping == "constant_camera":
        p = bal.BALProblem(small_bal(), device=device, dtype=dtype, constant_cameras=torch.tensor([0, 3]))
    elif mapping == "shared_intrinsics":
        p.cam_param_map = shared_intrinsics_map(p.num_cams, device=p.cam_index.device)
    opt = _defaults(SolverOptions(pcg_eta=1e-12, pcg_max_iterations=500), p.cam_index.device)
    st = SchurStructure(p.cam_index, p.point_index, p.num_cams, p.num_points, 9, 3, p.cam_param_map,
                        explicit=method != "pcg", segment_length=4, device=p.cam_index.device)
    lin = p.linearize().as_soa()
    system = ReducedSystem(st, lin.residuals, lin.jac_cam, lin.jac_point, opt, method)
    radius = 1e3
    step, info = system.step(radius)
    x_ref, dp_ref = _dense_step(p, radius, opt)
    assert bool(info.ok)
    # CG stops at a relative residual of 1e-12 (float64); float32 solves to its own precision
    direct = method in ("dense", "sparse")
    t = tol(dtype, 1e-8 if direct else 1e-5, 1e-2 if direct else 5e-2)
    scale = float(x_ref.abs().max())
    assert float((step.reduced.double() - x_ref).abs().max()) < t * scale
    assert float((step.points.double() - dp_ref).abs().max()) < t * max(float(dp_ref.abs().max()), 1e-12)
    assert float(info.model_cost_change) > 0


def test_structure_built_in_chunks_of_points_is_the_same(monkeypatch):
    """The observation pairs are unranked a chunk of points at a time (bounded work arrays);
    any chunk size gives the same blocks and the same pair segments, in the same order."""
    p = bal.BALProblem(small_bal(num_cams=6, num_points=80), device="cpu", dtype=torch.float64)

    def build():
        st = SchurStructure(p.cam_index, p.point_index, p.num_cams, p.num_points, 9, 3, p.cam_param_map,
                            explicit=True, segment_length=4, device=torch.device("cpu"))
        return st.block_row, st.block_col, st.num_pairs, st.pair_segments

    ref = build()
    monkeypatch.setattr(SchurStructure, "PAIR_CHUNK", 7)  # many chunks (a chunk holds whole points)
    got = build()
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]) and ref[2] == got[2]
    assert len(ref[3]) == len(got[3])
    for a, b in zip(ref[3], got[3]):
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]


def test_chunk_size_does_not_change_the_step():
    p = bal.BALProblem(small_bal(num_cams=10, num_points=200))
    out = []
    for chunk, seg in ((None, None), (4096, 2)):
        opt = _defaults(SolverOptions(chunk_bytes=chunk, segment_length=seg), torch.device("cpu"))
        st = SchurStructure(p.cam_index, p.point_index, p.num_cams, p.num_points, 9, 3, None, explicit=True,
                            segment_length=opt.segment_length, device=torch.device("cpu"))
        lin = p.linearize().as_soa()
        out.append(ReducedSystem(st, lin.residuals, lin.jac_cam, lin.jac_point, opt, "dense").step(1e4)[0])
    assert torch.allclose(out[0].reduced, out[1].reduced, rtol=1e-10, atol=1e-12)


def test_failed_factorisation_is_a_rejected_step():
    """Gauge freedom + vanishing damping: Cholesky fails, LM shrinks the radius and carries on."""
    p = bal.BALProblem(small_bal(num_cams=6, num_points=60))
    opt = _defaults(SolverOptions(min_lm_diagonal=1e-30), torch.device("cpu"))
    st = SchurStructure(p.cam_index, p.point_index, p.num_cams, p.num_points, 9, 3, None, explicit=True,
                        segment_length=4, device=torch.device("cpu"))
    lin = p.linearize().as_soa()
    system = ReducedSystem(st, lin.residuals, lin.jac_cam, lin.jac_point, opt, "dense")
    blocks = system._explicit_blocks(system._y_rows(system._eliminate(1e-300)[1]))
    S = system._dense_matrix(blocks, torch.zeros(st.n, dtype=torch.float64))
    S[0, 0] = -1.0  # certainly not positive definite
    assert torch.linalg.cholesky_ex(S)[1] != 0
    system._dense_matrix = lambda blocks, damp: S  # noqa: E731
    _, info = system.step(1e4)
    assert not bool(info.ok)
    s = solve(bal.BALProblem(small_bal(num_cams=6, num_points=60)),
              SolverOptions(initial_trust_region_radius=1e30, max_trust_region_radius=1e30, min_lm_diagonal=1e-30,
                            max_consecutive_invalid_steps=40))
    assert s.unsuccessful_steps >= 1 and s.final_cost < 0.01 * s.initial_cost


# --------------------------------------------------------------------------------------------
# PCG


def test_pcg_solves_pinned_laplacian_in_blocks(device):
    g = torch.Generator().manual_seed(3)
    n = 60
    i = torch.randint(0, n, (400,), generator=g)
    j = torch.randint(0, n, (400,), generator=g)
    keep = i != j
    i, j = torch.cat([i[keep], torch.arange(n - 1)]), torch.cat([j[keep], torch.arange(1, n)])
    w = torch.rand(i.numel(), generator=g, dtype=torch.float64) + 0.1
    L = torch.zeros(n, n, dtype=torch.float64)
    L.index_put_((i, i), w, accumulate=True).index_put_((j, j), w, accumulate=True)
    L.index_put_((i, j), -w, accumulate=True).index_put_((j, i), -w, accumulate=True)
    b = torch.randn(n, 3, generator=g, dtype=torch.float64)
    b[0] = 0
    ref = torch.zeros(n, 3, dtype=torch.float64)
    ref[1:] = torch.linalg.solve(L[1:, 1:], b[1:])
    Ld, free = L.to(device), torch.ones(n, 1, dtype=torch.float64, device=device)
    free[0] = 0
    res = pcg.solve(lambda v: (Ld @ (v * free)) * free, lambda r: free / Ld.diagonal()[:, None] * r, b.to(device),
                    max_iterations=500, rtol=1e-12)
    assert torch.allclose(res.x.cpu(), ref, atol=1e-8)
    assert bool(res.ok) and 1 < int(res.iterations) < 500
    # blocks between host reads change nothing: a column that converged is frozen
    for expected in (1, 7, 499):
        again = pcg.solve(lambda v: (Ld @ (v * free)) * free, lambda r: free / Ld.diagonal()[:, None] * r,
                          b.to(device), max_iterations=500, rtol=1e-12, expected_iterations=expected)
        assert torch.equal(again.x, res.x) and int(again.iterations) == int(res.iterations)


def test_pcg_breakdown_in_the_first_iteration_is_reported():
    A = -torch.eye(4, dtype=torch.float64)  # not positive definite
    res = pcg.solve(lambda v: A @ v, lambda r: r, torch.ones(4, dtype=torch.float64), max_iterations=10)
    assert not bool(res.ok)
    res = pcg.solve(lambda v: v, lambda r: r, torch.zeros(4, dtype=torch.float64), max_iterations=10)
    assert bool(res.ok) and int(res.iterations) == 0 and not bool(res.x.any())


# --------------------------------------------------------------------------------------------
# the LM loop


@pytest.mark.parametrize("method", ["dense", "pcg"])
def test_converges_to_ground_truth_without_noise(device, dtype, method):
    clean = bal.synthetic_bal(8, 150, 4.0, seed=3, noise_px=0.0, perturb=0.0)
    start = bal.synthetic_bal(8, 150, 4.0, seed=3, noise_px=0.0, perturb=3e-3)
    start.observations = clean.observations
    const = torch.tensor([0, 1])  # fixes the gauge (and everything of the two cameras)
    start.cameras[:2] = clean.cameras[:2]
    p = bal.BALProblem(start, device=device, dtype=dtype, constant_cameras=const)
    s = solve(p, SolverOptions(function_tolerance=1e-12, parameter_tolerance=1e-14, gradient_tolerance=1e-14,
                               linear_solver=method, pcg_eta=1e-6))
    # float32: the projections themselves are exact to ~1e-7 relative (~1e-4 px here)
    assert s.final_cost < tol(dtype, 1e-14, 1e-8) * s.initial_cost
    out = p.to_data()
    assert np.abs(out.points - clean.points).max() < tol(dtype, 1e-6, 1e-3)
    assert np.abs(out.cameras[:, 3:] - clean.cameras[:, 3:]).max() < tol(dtype, 1e-6, 1e-3)
    # rotations as matrices: near pi the angle-axis of one rotation has two signs
    assert np.abs(bal.rotations(out) - bal.rotations(clean)).max() < tol(dtype, 1e-6, 1e-5)


def test_solver_paths_reach_the_same_cost(device, dtype):
    costs = {}
    for method in ("dense", "pcg", "pcg_explicit") + (("sparse",) if device.type == "cpu" else ()):
        p = bal.BALProblem(small_bal(num_cams=12, num_points=300, seed=5), device=device, dtype=dtype)
        s = solve(p, SolverOptions(linear_solver=method))
        assert s.linear_solver == method and s.converged, s.termination
        costs[method] = s.final_cost
    ref = costs["dense"]
    for c in costs.values():
        assert abs(c - ref) <= tol(dtype, 1e-6, 1e-4) * ref, costs


def test_envelope_bounds_the_fill_of_chains_and_loops():
    from torchsfm.solver.structure import envelope_blocks

    n = 200
    i = torch.arange(n - 3)
    chain = torch.cat([torch.stack([i, i + k]) for k in (1, 2, 3)], 1)  # each image with its 3 successors
    diag = torch.arange(n).expand(2, -1)
    rows, cols = torch.cat([chain, diag], 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # any numbering of the images
    e = envelope_blocks(perm[rows], perm[cols], n)
    nnz = n + 3 * n - 6  # the lower triangle's blocks: the least an envelope holds
    assert nnz <= e <= 1.1 * nnz  # RCM recovers the band (to a few blocks) from any numbering
    # every image also matched to the one half a loop away (a ladder): the band widens
    far = torch.stack([torch.arange(n // 2), torch.arange(n // 2) + n // 2])
    loop = envelope_blocks(torch.cat([rows, far[0]]), torch.cat([cols, far[1]]), n)
    assert loop > 3 * e


def test_auto_leaves_the_sparse_solver_when_its_factor_would_be_too_large():
    d = small_bal(num_cams=400, num_points=2000, seed=5)
    opt = SolverOptions(dense_max_size=100, max_iterations=3)
    assert solve(bal.BALProblem(d), opt).linear_solver == "sparse"
    s = solve(bal.BALProblem(d), SolverOptions(dense_max_size=100, max_iterations=3, sparse_max_factor_mb=0.01))
    assert s.linear_solver in ("pcg", "pcg_explicit") and s.final_cost < s.initial_cost


@pytest.mark.parametrize("loss", ["trivial", "huber"])
@pytest.mark.parametrize("method", ["dense", "pcg"])
def test_float32_reaches_the_float64_cost(device, loss, method):
    """float32 end to end (only the cost sums in float64): the same minimum to 1e-4."""
    d = small_bal(num_cams=8, num_points=200, seed=2)
    s64 = solve(bal.BALProblem(d, device=device), SolverOptions(loss=loss, linear_solver=method))
    s32 = solve(bal.BALProblem(d, device=device, dtype=torch.float32), SolverOptions(loss=loss, linear_solver=method))
    assert s32.converged and s32.final_cost < 0.05 * s32.initial_cost
    assert abs(s32.final_cost - s64.final_cost) < 1e-4 * s64.final_cost


def test_huber_down_weights_planted_outliers():
    clean = bal.synthetic_bal(10, 300, 4.0, seed=4, noise_px=0.3, perturb=0.0)
    d = bal.synthetic_bal(10, 300, 4.0, seed=4, noise_px=0.3, perturb=5e-3)
    rng = np.random.default_rng(0)
    bad = rng.choice(d.num_observations, d.num_observations // 20, replace=False)
    d.observations = clean.observations.copy()
    d.observations[bad] += rng.choice([-1, 1], (bad.size, 2)) * rng.uniform(20, 60, (bad.size, 2))
    errors = {}
    for loss in ("trivial", "huber", "cauchy"):
        p = bal.BALProblem(d, constant_cameras=torch.tensor([0, 1]))
        p.R[:2], p.t[:2] = bal.BALProblem(clean).R[:2], torch.as_tensor(clean.cameras[:2, 3:6])
        solve(p, SolverOptions(loss=loss, loss_scale=2.0))
        errors[loss] = float(np.median(np.linalg.norm(p.to_data().points - clean.points, axis=1)))
        if loss == "huber":
            w = losses.weights(p.residuals(), "huber", 2.0)
            is_bad = torch.zeros(d.num_observations, dtype=torch.bool)
            is_bad[torch.as_tensor(bad)] = True
            assert float(w[is_bad].median()) < 0.1 and float(w[~is_bad].median()) == 1.0
    assert errors["huber"] < 0.5 * errors["trivial"] and errors["cauchy"] < 0.5 * errors["trivial"], errors


def test_summary_trace_and_time_to_cost():
    s = solve(bal.BALProblem(small_bal()), SolverOptions())
    assert s.trace[0].cost == s.initial_cost and s.trace[-1].cost == s.final_cost
    costs = [t.cost for t in s.trace]
    assert all(b <= a for a, b in zip(costs, costs[1:]))  # accepted steps never increase the cost
    assert s.time_to_cost(s.final_cost) is not None and s.time_to_cost(0.0) is None
    assert s.iterations == len(s.trace) - 1 and s.successful_steps + s.unsuccessful_steps == s.iterations


# --------------------------------------------------------------------------------------------
# real BAL problems against Ceres' final costs (../shared/reference/ba-solver-notes.md, sec. 2)


@pytest.mark.data
@pytest.mark.parametrize("name,ceres_final", [("problem-21-11315-pre", 3.037865e04), ("problem-49-7776-pre", 1.330848e04)])
def test_bal_problem_reaches_ceres_final_cost(name, ceres_final):
    d = bal.drop_behind(bal.load_bal(shared_data("bal") / f"{name}.txt.bz2"))
    p = bal.BALProblem(d)
    s = solve(p, SolverOptions())
    assert abs(s.initial_cost - bal.cost_np(d)) <= 1e-12 * s.initial_cost
    assert s.final_cost <= ceres_final * (1 + 1e-4), (s.final_cost, ceres_final)
    assert math.isclose(bal.cost_np(p.to_data()), s.final_cost, rel_tol=1e-9)


@pytest.mark.parametrize("point_dim", [1, 2, 3, 4])
def test_generic_eliminated_block_size(point_dim, device):
    """Eliminated blocks of any size (1: per-observation scales as in global positioning)."""
    g = torch.Generator().manual_seed(point_dim)
    C, P, N, nc = 6, 40, 160, 4
    ci = torch.randint(0, C, (N,), generator=g)
    pi = torch.cat([torch.arange(P), torch.randint(0, P, (N - P,), generator=g)])
    A = torch.randn(N, 3, nc, generator=g, dtype=torch.float64)
    B = torch.randn(N, 3, point_dim, generator=g, dtype=torch.float64)
    y = torch.randn(N, 3, generator=g, dtype=torch.float64)

    def residual(cam, pt, a, b, obs):  # mildly nonlinear in both blocks
        return a @ cam + b @ pt + 0.1 * torch.tanh(cam[:3] * pt.sum()) - obs

    T = lambda x: x.to(device)  # noqa: E731
    prob = AutodiffProblem(residual, T(torch.zeros(C, nc, dtype=torch.float64)),
                           T(torch.zeros(P, point_dim, dtype=torch.float64)), T(ci), T(pi), aux=(T(A), T(B), T(y)))
    prob.cam_param_map = compact_param_map(torch.where(torch.arange(C)[:, None] == 0, -1,
                                                       identity_param_map(C, nc)).to(device))[0]
    opt = _defaults(SolverOptions(), prob.cam_index.device)
    st = SchurStructure(prob.cam_index, prob.point_index, C, P, nc, point_dim, prob.cam_param_map, explicit=True,
                        segment_length=4, device=prob.cam_index.device)
    lin = prob.linearize().as_soa()
    step, _ = ReducedSystem(st, lin.residuals, lin.jac_cam, lin.jac_point, opt, "dense").step(10.0)
    x_ref, dp_ref = _dense_step(prob, 10.0, opt)
    assert torch.allclose(step.reduced, x_ref, rtol=1e-9, atol=1e-11)
    assert torch.allclose(step.points, dp_ref, rtol=1e-9, atol=1e-11)
    s = solve(prob, SolverOptions(function_tolerance=1e-12))
    assert s.converged and s.final_cost < s.initial_cost


def _dense_from_contributions(n, rows, cols, sources, values, damp):
    S = np.zeros((n + 1) * (n + 1))
    np.add.at(S, rows * (n + 1) + cols, values[sources])
    S = S.reshape(n + 1, n + 1)[:n, :n]
    return S + np.diag(damp)


def test_sparse_assembly_sums_shared_entries_and_drops_constants():
    """The CSC matrix assembled once per pattern equals the dense sum of its contributions
    (mirrored entries, duplicates of shared unknowns, constant row/column n dropped)."""
    from torchsfm.solver.sparse_direct import SparseAssembly

    rng = np.random.default_rng(0)
    n, nv = 7, 40
    r = rng.integers(0, n + 1, 60)
    c = rng.integers(0, n + 1, 60)
    rows = np.concatenate([r, c, [3] * 5, np.arange(n)]).astype(np.int32)  # symmetric, duplicates
    cols = np.concatenate([c, r, [3] * 5, np.arange(n)]).astype(np.int32)
    sources = np.concatenate([rng.integers(0, nv, 60)] * 2 + [rng.integers(0, nv, 5 + n)]).astype(np.int32)
    values, damp = rng.normal(size=nv), rng.uniform(1, 2, n)
    dense = _dense_from_contributions(n, rows, cols, sources, values, damp)
    asm = SparseAssembly(n, rows, cols, sources, nv)
    A = asm.matrix(values, damp)
    np.testing.assert_allclose(A.toarray(), dense, atol=1e-12)
    # an unknown without any block (unknown 5 here) still gets its damped diagonal
    cut = (rows != 5) & (cols != 5)
    A = SparseAssembly(n, rows[cut], cols[cut], sources[cut], nv).matrix(values, damp)
    np.testing.assert_allclose(A.toarray(), _dense_from_contributions(n, rows[cut], cols[cut], sources[cut], values, damp),
                               atol=1e-12)
    A = asm.matrix(values, damp)
    A.has_canonical_format = False
    A.sum_duplicates()  # scipy finds nothing to sort or sum
    np.testing.assert_array_equal(A.indices, asm.indices)


def test_sparse_assembly_orders_a_band_naturally_and_a_scattered_graph_by_minimum_degree():
    from torchsfm.solver.sparse_direct import SparseAssembly

    def solve_with(pairs, n):
        r, c = pairs[:, 0], pairs[:, 1]
        rows = np.concatenate([r, c, np.arange(n)]).astype(np.int32)
        cols = np.concatenate([c, r, np.arange(n)]).astype(np.int32)
        asm = SparseAssembly(n, rows, cols, np.arange(rows.size, dtype=np.int32), rows.size)
        vals = np.concatenate([np.full(2 * len(pairs), -1.0), np.full(n, 1.0)])
        A = asm.matrix(vals, np.full(n, 2.0 * n))  # diagonally dominant: SPD
        b = np.arange(n, dtype=float)
        np.testing.assert_allclose(A @ asm.solve(A, b), b, atol=1e-9)
        return asm.ordering

    n = 200
    band = np.array([(i, j) for i in range(n) for j in range(i + 1, min(n, i + 4))])
    assert solve_with(band, n) == "NATURAL"
    rng = np.random.default_rng(1)
    scattered = rng.integers(0, n, (600, 2))
    scattered = scattered[scattered[:, 0] != scattered[:, 1]]
    assert solve_with(scattered, n) == "MMD_AT_PLUS_A"
