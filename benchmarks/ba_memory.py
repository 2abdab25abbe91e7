"""Peak memory of the steps of one bundle adjustment (problem set-up, linearisation, Schur
structure, one LM step) on a COLMAP model, each in its own peak-memory window.

    python benchmarks/ba_memory.py out/bench/corridor1000/runs/torchsfm/sparse/0 --linear-solver sparse
    python benchmarks/ba_memory.py MODEL --obs-chunk 100000000   # linearisation in one pass (no chunks)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from torchsfm.ba.bundle_adjustment import BundleAdjustmentOptions, ReprojectionProblem  # noqa: E402
from torchsfm.io.colmap_model import read_model  # noqa: E402
from torchsfm.runtime import configure_threads, peak_memory, tune_cpu_allocator  # noqa: E402
from torchsfm.solver import lm  # noqa: E402
from torchsfm.solver.structure import SchurStructure  # noqa: E402


def window(name: str, fn):
    w = peak_memory.begin()
    out = fn()
    p = peak_memory.end(w)
    print(f"| {name} | {p['peak_rss_mb']:.0f} | {p['rss_mb']:.0f} |", flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--linear-solver", default="sparse", help="dense | sparse | pcg_explicit | pcg")
    ap.add_argument("--obs-chunk", type=int, help="observations per evaluation chunk (default: from chunk_bytes)")
    a = ap.parse_args()
    configure_threads(1)
    tune_cpu_allocator()  # as solve() does: the heap behaves as in a real run
    rec = read_model(a.model)
    o = BundleAdjustmentOptions()
    o.solver.linear_solver = a.linear_solver
    print(f"{len(rec.tracks)} observations, {len(rec.points3D)} points; RSS at start {peak_memory.rss_mb():.0f} MB")
    print("| step | peak RSS (MB) | RSS after (MB) |\n|---|---|---|")
    prob = window("problem set-up", lambda: ReprojectionProblem(rec, o))
    if a.obs_chunk:
        prob.obs_chunk = a.obs_chunk
    lin = window("linearisation", prob.linearize)
    del lin
    opt = lm._defaults(o.solver, torch.device("cpu"))
    st = window("Schur structure", lambda: SchurStructure(
        prob.cam_index, prob.point_index, prob.num_cams, prob.num_points, prob.cam_dim, 3, prob.cam_param_map,
        explicit=a.linear_solver != "pcg", segment_length=opt.segment_length, device=torch.device("cpu")))
    cost, system = window("linearise + robustify (solver)", lambda: lm._linearize(prob, st, opt, a.linear_solver))
    window("one LM step", lambda: system.step(1e4))
