"""Problem-agnostic sparse Levenberg-Marquardt with Schur elimination (knows nothing of cameras).

    from torchsfm.solver import SolverOptions, solve
    summary = solve(problem, SolverOptions(loss="huber", loss_scale=1.0))

`problem` implements `SparseProblem` (problem.py): residual blocks that each touch one camera-side
block and one eliminated (point) block. See lm.py (trust region), schur.py (normal equations and
the reduced system), structure.py (sparsity), pcg.py, losses.py.
"""
from .checks import check_jacobians
from .lm import choose_linear_solver, reduced_information, solve
from .options import IterationRecord, SolverOptions, SolverSummary
from .problem import Linearization, SparseProblem, Step, compact_param_map, identity_param_map

__all__ = [
    "IterationRecord", "Linearization", "SolverOptions", "SolverSummary", "SparseProblem", "Step",
    "check_jacobians", "choose_linear_solver", "compact_param_map", "identity_param_map", "reduced_information",
    "solve",
]
