"""Levenberg-Marquardt with Ceres' trust-region rules over a Schur-complemented sparse system.

The loop follows ceres::TrustRegionMinimizer with the LEVENBERG_MARQUARDT strategy:
- damping D/radius with D = clamp(diag(J^T J)) (Marquardt);
- a step is *invalid* when the linear solve fails (e.g. Cholesky of the gauge-singular system
  with tiny damping) or the linear model predicts no decrease: radius /= nu, nu *= 2;
- after evaluating the candidate: parameter tolerance, then function tolerance, then the step is
  accepted when (actual / predicted decrease) > min_relative_decrease, with radius /=
  max(1/3, 1 - (2 rho - 1)^3) and nu = 2; otherwise radius /= nu, nu *= 2;
- the gradient tolerance is tested at every new linearisation.
One difference: when the function tolerance fires on a candidate that lowers the cost, the
candidate is kept (Ceres reports the previous point).

Host synchronisation. Everything an iteration computes stays on the problem's device; the host
reads one small status vector per iteration (step validity, model and candidate cost, step and
parameter norms, CG iterations, and the gradient norm of the linearisation the step came from)
and makes every decision from it: acceptance, radius, termination. The gradient test of a new
linearisation is therefore read with the next iteration's status; when it fires, that
iteration's step is discarded uncounted (one wasted step at termination, instead of a second
read per iteration). Timing uses CUDA events, read once at the end, not synchronisations.

PCG runs in blocks of iterations (pcg.next_block: the first as long as the last step's solve
and an eighth, then half the iterations so far). The first block's "still running?" flag is
read with the status, so a step whose PCG converges within it costs that one read. Otherwise
the candidate is discarded and PCG goes on in blocks, reading only its flag after each, and the
final candidate is evaluated once with a second status read: reads = blocks + 1 then, and at
most two candidate evaluations per step.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor

from ..runtime import host_read, tune_cpu_allocator
from . import losses, pcg
from .options import LINEAR_SOLVERS, IterationRecord, SolverOptions, SolverSummary
from .problem import SparseProblem
from .schur import ReducedSystem
from .separable import solve_separable
from .structure import SchurStructure, count_pairs, envelope_blocks

logger = logging.getLogger(__name__)


class _Timer:
    """Seconds per phase without stalling the device: perf_counter on the CPU; on CUDA, event
    pairs recorded on the stream and read once, in `totals()`."""

    def __init__(self, device: torch.device):
        self.t: dict[str, float] = {}
        self.device = device
        self.events: list = []

    @contextmanager
    def __call__(self, key: str):
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self.events.append((key, start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        if self.events:
            self.events[-1][2].synchronize()
            for key, start, end in self.events:
                self.t[key] = self.t.get(key, 0.0) + start.elapsed_time(end) / 1000.0
            self.events.clear()
        return dict(self.t)


def choose_linear_solver(num_unknowns: int, device: torch.device, options: SolverOptions,
                         num_pairs: int | None = None, num_observations: int | None = None) -> str:
    """The reduced-system solver for `linear_solver="auto"`:

    - dense Cholesky while n <= dense_max_size (2000 on the CPU: a 2000^2 Cholesky is ~0.1 s;
      12000 on CUDA);
    - CPU: sparse direct (scipy splu of the explicit S) while n <= sparse_max_size;
    - then PCG with Schur-Jacobi: on the explicit S while its pair list fits
      (explicit_max_pairs; a CG step then costs a block-sparse matvec instead of a pass over all
      observations), else implicit (S never formed, memory linear in observations);
    - implicit PCG at any size when tracks are long: with more than
      explicit_max_pairs_per_observation pairs per observation, forming S costs more than the
      CG passes over the observations (a 200-image turntable with 47-view tracks: 25 pairs per
      observation, 0.43 s per iteration for dense against 0.12 s for implicit PCG).
    """
    if options.linear_solver not in LINEAR_SOLVERS:
        raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {options.linear_solver!r}")
    if options.linear_solver != "auto":
        if options.linear_solver == "sparse" and device.type != "cpu":
            raise ValueError("the sparse direct solver (scipy) runs on the CPU only; use dense or pcg on CUDA")
        return options.linear_solver
    dense_max = options.dense_max_size or (12000 if device.type == "cuda" else 2000)
    if (num_pairs is not None and num_observations
            and num_pairs > options.explicit_max_pairs_per_observation * num_observations):
        return "pcg"
    if num_unknowns <= dense_max:
        return "dense"
    if device.type == "cpu" and num_unknowns <= options.sparse_max_size:
        return "sparse"
    if num_pairs is not None and num_pairs <= options.explicit_max_pairs:
        return "pcg_explicit"
    return "pcg"


def _structure(problem, pm, method: str, opt: SolverOptions, device: torch.device) -> SchurStructure:
    return SchurStructure(
        problem.cam_index, problem.point_index, problem.num_cams, problem.num_points, problem.cam_dim,
        problem.point_dim, pm, explicit=method in ("dense", "sparse", "pcg_explicit"),
        segment_length=opt.segment_length, device=device,
    )


def _defaults(options: SolverOptions, device: torch.device) -> SolverOptions:
    cpu = device.type == "cpu"
    return replace(
        options,
        chunk_bytes=options.chunk_bytes or ((4 << 20) if cpu else (512 << 20)),
        segment_length=options.segment_length or (8 if cpu else 32),
    )


def _linearize(problem: SparseProblem, st: SchurStructure, opt: SolverOptions, method: str):
    """(cost as a () float64 tensor, the reduced system) at the problem's current parameters."""
    lin = problem.linearize().as_soa()
    r, Jc, Jp = lin.residuals, lin.jac_cam, lin.jac_point  # (d, N), (d, nc, N), (d, k, N)
    cost = losses.cost_tensor(r.T, opt.loss, opt.loss_scale)
    r, (Jc, Jp) = losses.robustify(r, [Jc, Jp], opt.loss, opt.loss_scale, soa=True)
    return cost, ReducedSystem(st, r, Jc, Jp, opt, method)


@torch.no_grad()
def reduced_information(problem: SparseProblem, options: SolverOptions | None = None) -> Tensor:
    """The Gauss-Newton information of the reduced unknowns at the problem's current parameters,
    with every eliminated (point) block marginalised: the undamped Schur complement, dense
    (n, n) in the numbering of problem.cam_param_map, robustified with options.loss. Its inverse
    is the reduced unknowns' covariance in units of the residuals' variance."""
    opt = _defaults(options or SolverOptions(), problem.cam_index.device)
    st = _structure(problem, problem.cam_param_map, "dense", opt, problem.cam_index.device)
    return _linearize(problem, st, opt, "dense")[1].information()


@torch.no_grad()
def solve(problem: SparseProblem, options: SolverOptions | None = None) -> SolverSummary:
    """Minimise 0.5 * sum rho(|r_i|^2) over the problem's parameters (in place)."""
    opt = options or SolverOptions()
    t_start = time.perf_counter()
    summary = SolverSummary()
    device = problem.cam_index.device
    opt = _defaults(opt, device)
    if device.type == "cpu" and opt.tune_cpu_allocator:
        tune_cpu_allocator()
    tm = _Timer(device)
    with tm("setup"):
        pm = problem.cam_param_map
        n_unknowns = int(pm.max()) + 1 if pm is not None and pm.numel() else problem.num_cams * problem.cam_dim
        if pm is not None and not bool((pm >= 0).any()):
            n_unknowns = 0
        if n_unknowns == 0:  # points against fixed cameras: each point its own problem
            summary.linear_solver = "separable"
            return solve_separable(problem, opt, summary, t_start)
        pairs = None
        if opt.linear_solver == "auto":
            pairs = count_pairs(problem.cam_index, problem.point_index, problem.num_points)
        method = choose_linear_solver(n_unknowns, device, opt, pairs, int(problem.cam_index.numel()))
        st = _structure(problem, pm, method, opt, device)
        if method == "sparse" and opt.linear_solver == "auto":
            blocks = envelope_blocks(st.block_row, st.block_col, problem.num_cams)
            factor_mb = blocks * problem.cam_dim ** 2 * 16 / 2 ** 20  # float64 L and U
            if factor_mb > opt.sparse_max_factor_mb:  # too much fill: iterate instead
                logger.debug("sparse factor up to %.0f MB > %.0f MB: PCG", factor_mb, opt.sparse_max_factor_mb)
                method = choose_linear_solver(n_unknowns, device, replace(opt, sparse_max_size=0), pairs,
                                              int(problem.cam_index.numel()))
                if method == "pcg":  # the explicit structure is not the implicit one
                    st = _structure(problem, pm, method, opt, device)
    summary.linear_solver = method
    summary.num_reduced_unknowns = st.n
    summary.setup_time_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    log = logger.info if opt.verbose else logger.debug

    def now() -> float:
        return time.perf_counter() - t0

    with tm("linearize"):
        cost_t, system = _linearize(problem, st, opt, method)
    cost, gnorm = host_read(cost_t, system.gradient_max_norm())
    summary.initial_cost = summary.final_cost = cost
    radius, nu = opt.initial_trust_region_radius, 2.0
    rec0 = IterationRecord(0, cost, cost, True, 0.0, radius, 0.0, gnorm, 0, now())
    summary.trace.append(rec0)
    if opt.callback:
        opt.callback(rec0)
    log("iter   0: cost %.6e |g| %.2e, %s solver, %d reduced unknowns", cost, gnorm, method, st.n)
    if not math.isfinite(cost):
        summary.termination, summary.message = "invalid_initial_cost", "initial cost is not finite"
        return _finish(summary, tm, t_start)
    if gnorm <= opt.gradient_tolerance:
        summary.termination = "gradient_tolerance"
        return _finish(summary, tm, t_start)

    invalid_in_row = 0
    termination = "max_iterations"
    gnorm_t = None  # gradient norm of a new linearisation, read with the next status
    expected_cg = 0
    it = 0
    while it < opt.max_iterations:
        if now() + summary.setup_time_s > opt.max_time_s:
            termination = "max_time"
            break
        it += 1
        with tm("linear_solve"):
            solve_ = system.start(radius)
            solve_.run(pcg.next_block(0, expected_cg))
        while True:  # direct solvers: once; PCG: at most twice (see the module doc)
            with tm("linear_solve"):
                step, info = solve_.result()
            with tm("evaluate"):
                new_r = problem.residuals(step)
                new_cost_t = losses.cost_tensor(new_r, opt.loss, opt.loss_scale)
            with tm("status"):
                ok, model_change, new_cost, step_norm, x_norm, cg_its, unfinished, g_new = host_read(
                    info.ok, info.model_cost_change, new_cost_t, step.norm(), problem.parameter_norm(),
                    info.linear_iterations, info.unfinished, gnorm_t if gnorm_t is not None else gnorm)
            if not unfinished or (gnorm_t is not None and g_new <= opt.gradient_tolerance):
                break
            with tm("linear_solve"):  # PCG goes on, reading only its flag, until it is done
                while True:
                    solve_.run(pcg.next_block(solve_.iterations_run))
                    if not host_read(solve_.running())[0]:
                        break
        cg_its = int(cg_its)
        expected_cg = cg_its
        summary.linear_iterations_run += solve_.iterations_run
        if gnorm_t is not None:
            gnorm, gnorm_t = g_new, None
            if gnorm <= opt.gradient_tolerance:  # the last linearisation is stationary: this step is void
                it -= 1
                termination = "gradient_tolerance"
                break
        summary.linear_iterations += cg_its
        if not ok or not (model_change > 0.0) or not math.isfinite(model_change):
            invalid_in_row += 1
            summary.invalid_steps += 1
            summary.unsuccessful_steps += 1
            radius, nu = radius / nu, nu * 2
            rec = IterationRecord(it, cost, math.nan, False, math.nan, radius, 0.0, gnorm, cg_its, now())
            summary.trace.append(rec)
            if opt.callback:
                opt.callback(rec)
            log("iter %3d: invalid step (%s), radius -> %.2e", it,
                "linear solver failed" if not ok else "no model decrease", radius)
            if invalid_in_row > opt.max_consecutive_invalid_steps:
                termination = "linear_solver_failure"
                break
            if radius < opt.min_trust_region_radius:
                termination = "min_trust_region_radius"
                break
            continue
        invalid_in_row = 0
        if not math.isfinite(new_cost):
            new_cost = math.inf
        rho = (cost - new_cost) / model_change
        done = None
        if step_norm <= opt.parameter_tolerance * (x_norm + opt.parameter_tolerance):
            done = "parameter_tolerance"
        elif abs(cost - new_cost) <= opt.function_tolerance * cost:
            done = "function_tolerance"
        accepted = done is None and rho > opt.min_relative_decrease
        if done is not None and new_cost < cost:
            accepted = True  # keep an improving last step
        if accepted:
            summary.successful_steps += 1
            with tm("accept"):
                problem.accept(step)
            cost = new_cost
            if done is None:
                radius = min(radius / max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), opt.max_trust_region_radius)
                nu = 2.0
                with tm("linearize"):
                    # the old linearisation and its step go first: they would otherwise live
                    # alongside the new one (at 2M observations, ~0.5 GB of Jacobians and factors)
                    system = solve_ = step = info = new_r = None
                    _, system = _linearize(problem, st, opt, method)
                    gnorm_t = system.gradient_max_norm()
        else:
            summary.unsuccessful_steps += 1
            if done is None:
                radius, nu = radius / nu, nu * 2
        rec = IterationRecord(it, cost, new_cost, accepted, rho, radius, step_norm, gnorm, cg_its, now())
        summary.trace.append(rec)
        if opt.callback:
            opt.callback(rec)
        log("iter %3d: cost %.6e candidate %.6e rho %.3f radius %.2e |step| %.2e cg %d", it, cost, new_cost,
            rho, radius, step_norm, cg_its)
        if done is not None:
            termination = done
            break
        if radius < opt.min_trust_region_radius:
            termination = "min_trust_region_radius"
            break
    summary.iterations = it
    summary.final_cost = cost
    summary.termination = termination
    return _finish(summary, tm, t_start)


def _finish(summary: SolverSummary, tm: _Timer, t_start: float) -> SolverSummary:
    summary.time_s = tm.totals()
    summary.total_time_s = time.perf_counter() - t_start
    logger.debug("solver: %s", summary.brief())
    return summary
