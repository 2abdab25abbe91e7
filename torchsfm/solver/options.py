"""Options and result records of the sparse Levenberg-Marquardt solver.

Defaults are Ceres' (`ceres::Solver::Options`) for the trust-region logic and tolerances, so that
iteration counts and final costs can be compared one to one with Ceres runs that use the same
settings (see benchmarks/bench_ba.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

LINEAR_SOLVERS = ("auto", "dense", "sparse", "pcg", "pcg_explicit")


@dataclass
class SolverOptions:
    # --- stopping ---------------------------------------------------------------------------
    max_iterations: int = 100
    function_tolerance: float = 1e-6  # |cost - new_cost| <= ftol * cost
    gradient_tolerance: float = 1e-10  # max |g_i| <= gtol
    parameter_tolerance: float = 1e-8  # |step| <= ptol * (|x| + ptol)
    max_time_s: float = math.inf
    max_consecutive_invalid_steps: int = 10  # failed factorisations / non-descent models in a row
    # --- trust region (Levenberg-Marquardt, Ceres' rules) -------------------------------------
    initial_trust_region_radius: float = 1e4
    max_trust_region_radius: float = 1e16
    min_trust_region_radius: float = 1e-32
    min_relative_decrease: float = 1e-3
    min_lm_diagonal: float = 1e-6
    max_lm_diagonal: float = 1e32
    # --- robust loss on each residual block -----------------------------------------------------
    loss: str = "trivial"  # trivial | huber | cauchy | soft_l1
    loss_scale: float = 1.0
    # --- reduced camera system ----------------------------------------------------------------
    # auto (lm.choose_linear_solver): dense Cholesky while the reduced system has <=
    # dense_max_size unknowns, sparse direct (scipy) on the CPU up to sparse_max_size, then PCG
    # on the explicit S while it has <= explicit_max_pairs observation pairs, implicit beyond.
    linear_solver: str = "auto"
    dense_max_size: int | None = None  # default: 2000 on the CPU, 12000 on CUDA
    # corridor10000's global positioning (30,000 unknowns): sparse direct 41 LM iterations, 76 s;
    # explicit PCG did not converge in 100 (291 s): CG on a long chain of images needs about as many
    # iterations as the chain is long. The factor's size is checked first (sparse_max_factor_mb).
    sparse_max_size: int = 100_000
    # auto: the sparse direct solver is kept only while its factor, bounded
    # by the envelope of the camera pattern in reverse Cuthill-McKee order (structure.envelope_blocks,
    # L and U), stays below this; else PCG. A sequence of 10,000 images: ~100 MB
    sparse_max_factor_mb: float = 2048.0
    explicit_max_pairs: int = 100_000_000  # beyond: implicit PCG (pair indices take 8 bytes/pair)
    explicit_max_pairs_per_observation: float = 16.0  # beyond (long tracks): implicit PCG at any size
    pcg_eta: float = 0.01  # Nash-Sofer forcing; 0.1 (Ceres' default) stalled on Ladybug-73
    pcg_max_iterations: int = 200
    pcg_min_iterations: int = 1
    # --- memory / speed ---------------------------------------------------------------------
    # Per-chunk temporaries stay below this many bytes; on the CPU, buffers above ~32 MB are
    # returned to the OS and page-faulted in again on every use (measured 2x on the Schur build).
    chunk_bytes: int | None = None  # default: 4 MiB on the CPU, 512 MiB on CUDA
    segment_length: int | None = None  # observation pairs per batched GEMM in the Schur build
    # keep freed heap memory for reuse (runtime.tune_cpu_allocator); measured 2-3x on the CPU
    tune_cpu_allocator: bool = True
    # --- reporting ----------------------------------------------------------------------------
    verbose: bool = False  # log every iteration at INFO (otherwise DEBUG)
    callback: Callable[["IterationRecord"], None] | None = None


@dataclass
class IterationRecord:
    iteration: int
    cost: float  # cost after this iteration (the accepted one)
    candidate_cost: float
    step_accepted: bool
    relative_decrease: float
    trust_region_radius: float
    step_norm: float
    gradient_max_norm: float  # of the linearisation this iteration's step was computed from
    linear_iterations: int
    time_s: float  # since solve() started


@dataclass
class SolverSummary:
    initial_cost: float = math.nan
    final_cost: float = math.nan
    iterations: int = 0
    successful_steps: int = 0
    unsuccessful_steps: int = 0
    invalid_steps: int = 0
    termination: str = "not_run"  # function_tolerance | gradient_tolerance | parameter_tolerance |
    # max_iterations | max_time | min_trust_region_radius | linear_solver_failure | no_parameters
    message: str = ""
    linear_solver: str = ""
    linear_iterations: int = 0  # CG iterations, all steps together
    # CG iterations executed: PCG runs in blocks between host reads, so a block may go on past
    # convergence (those iterations change nothing); the difference is the price of few reads
    linear_iterations_run: int = 0
    num_reduced_unknowns: int = 0
    setup_time_s: float = 0.0
    total_time_s: float = 0.0
    time_s: dict = field(default_factory=dict)  # seconds per phase
    trace: list = field(default_factory=list)  # IterationRecord per iteration (index 0: initial)

    @property
    def converged(self) -> bool:
        return self.termination in ("function_tolerance", "gradient_tolerance", "parameter_tolerance")

    def time_to_cost(self, target: float) -> float | None:
        """Seconds (from the start of solve, setup included) until the cost first reached target."""
        for rec in self.trace:
            if rec.cost <= target:
                return self.setup_time_s + rec.time_s
        return None

    def brief(self) -> str:
        return (
            f"cost {self.initial_cost:.6e} -> {self.final_cost:.6e}, {self.iterations} iterations "
            f"({self.successful_steps} successful), {self.termination}, {self.total_time_s:.3f} s, "
            f"linear solver {self.linear_solver}"
        )
