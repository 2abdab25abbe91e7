"""The host-sync counts that tests/test_sync_budget.py asserts on, measured in a process of their
own: the counter patches methods of torch.Tensor, and CPython cannot fully undo that for special
methods (a patched `__getitem__` leaves 0-d tensors looking like sequences), so no test process
may be left patched.

    python tests/sync_cases.py DEVICE [DEVICE ...]   # prints {"case|device|dtype": [per iteration, reads, shapes]}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_ba import perturbed, scene  # noqa: E402
from torchsfm.ba import BundleAdjustmentOptions, bal, bundle_adjust  # noqa: E402
from torchsfm.bench.syncs import SyncCounter, per_iteration  # noqa: E402
from torchsfm.solver import SolverOptions, solve  # noqa: E402

ZERO_TOL = dict(function_tolerance=0.0, gradient_tolerance=0.0, parameter_tolerance=0.0)
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def ba_case(method: str, loss: str, device, dtype):
    rec = perturbed(scene("SIMPLE_RADIAL", num_images=10, num_points=300, device=device), pose=0.02).to(device, dtype)

    def run(n: int) -> int:
        o = BundleAdjustmentOptions(gauge="two_cams", solver=SolverOptions(
            linear_solver=method, loss=loss, max_iterations=n, **ZERO_TOL))
        return bundle_adjust(rec, o)[1].iterations

    return run


def points_case(loss: str, device, dtype):
    """Points against fixed cameras: the separable solver (a trust region per point)."""
    rec = perturbed(scene("SIMPLE_RADIAL", num_images=10, num_points=300, device=device), pose=0.0,
                    point=0.05).to(device, dtype)

    def run(n: int) -> int:
        o = BundleAdjustmentOptions(refine_poses=False, refine_focal_length=False, refine_extra_params=False,
                                    solver=SolverOptions(loss=loss, max_iterations=n, **ZERO_TOL))
        return bundle_adjust(rec, o)[1].iterations

    return run


def bal_case(method: str, device, dtype):
    d = bal.synthetic_bal(12, 400, 4.0, seed=3, perturb=2e-2)

    def run(n: int) -> int:
        p = bal.BALProblem(d, device=device, dtype=dtype)
        return solve(p, SolverOptions(linear_solver=method, loss="huber", max_iterations=n, **ZERO_TOL)).iterations

    return run


def gp_case(device, dtype):
    from torchsfm.mapper.global_positioning import GlobalPositioningOptions, global_positioning
    from torchsfm.mapper.tracks import establish_tracks
    from torchsfm.synthetic import SyntheticOptions, synthesize

    sc = synthesize(SyntheticOptions(num_images=10, num_points=400, layout="ring", seed=7, pixel_noise=0.5))
    rec = sc.mapper_input()
    rec.images.quat = sc.gt.images.quat.clone()
    rec.images.registered[:] = True
    rec, _ = establish_tracks(rec)
    rec = rec.to(device, dtype)

    def run(n: int) -> int:
        o = GlobalPositioningOptions(init_max_iterations=3, solver=SolverOptions(
            loss="huber", loss_scale=0.1, max_iterations=n, **ZERO_TOL))
        return global_positioning(rec, o)[1]["iterations"]

    return run


def vgc_case(device, dtype):
    from torchsfm.mapper.view_graph_calibration import ViewGraphCalibrationOptions, calibrate_view_graph
    from torchsfm.synthetic import SyntheticOptions, synthesize

    rec = synthesize(SyntheticOptions(num_images=10, num_points=400, layout="ring", seed=7, pixel_noise=0.5)).mapper_input()
    rec.cameras.params[:, 0] *= 1.3
    rec.cameras.has_prior_focal_length[:] = False
    rec = rec.to(device, dtype)

    def run(n: int) -> int:
        o = ViewGraphCalibrationOptions(max_iterations=n, step_tolerance=0.0, function_tolerance=0.0)
        return calibrate_view_graph(rec, o)[1].iterations

    return run


def focal_scan_case(device, dtype):
    """The focal scan: per scale, pose refinement on all pairs and the triangles' closure, no read."""
    from torchsfm.cameras.models import scaled_focal_params
    from torchsfm.mapper.focal_scan import FocalScanOptions, scan_focal_length
    from torchsfm.synthetic import SyntheticOptions, synthesize

    rec = synthesize(SyntheticOptions(num_images=10, num_points=400, layout="ring", seed=7, pixel_noise=0.5,
                                      has_prior_focal_length=False)).mapper_input()
    rec.cameras.params = scaled_focal_params(rec.cameras, 1.3)
    rec = rec.to(device, dtype)

    def run(n: int) -> int:  # odd counts of scales hold 1 itself: n + 3 scales in all
        # min_improvement 0: every run applies its minimum, so both take the same path after the scan
        scan_focal_length(rec, FocalScanOptions(num_scales=2 * (n // 2) + 3, min_improvement=0.0))
        return 2 * (n // 2) + 3

    return run


def ra_case(solver: str, device, dtype):
    from torchsfm.bench.syncs import rotation_averaging_syncs

    return lambda: rotation_averaging_syncs(str(device), str(dtype)[6:], solver, num_images=30, n1=2, n2=8)


def patch_alignment_case(device, dtype):
    """Gauss-Newton steps of patch alignment (keypoint refinement) on 2,000 matches of two random
    images; the dtype is the sampled images' (the steps run in float64)."""
    from torchsfm.frontend.patch_alignment import ImageBank, align_patches

    g = torch.Generator().manual_seed(0)
    bank = ImageBank.build([torch.rand(80 * 60, 3, generator=g).to(device, dtype) for _ in range(2)], [(80, 60)] * 2)
    x1 = (torch.rand(2000, 2, generator=g, dtype=torch.float64) * torch.tensor([60.0, 40.0]) + 10).to(device)
    x2 = x1 + 0.3
    image = torch.zeros(2000, dtype=torch.long, device=device)
    warp = torch.eye(2, dtype=torch.float64, device=device).expand(2000, 2, 2)

    def run(n: int) -> int:
        align_patches(bank, image, x1, bank, image + 1, x2, warp, 5, n)
        return n

    return run


def cases(device: torch.device):
    for method in ("dense", "pcg", "pcg_explicit"):
        for loss in ("trivial", "huber", "cauchy"):
            yield f"ba-{method}-{loss}", lambda dt, m=method, lo=loss: ba_case(m, lo, device, dt)
    for loss in ("trivial", "huber"):
        yield f"ba-points-{loss}", lambda dt, lo=loss: points_case(lo, device, dt)
    for method in ("dense", "pcg"):
        yield f"bal-{method}", lambda dt, m=method: bal_case(m, device, dt)
    yield "global_positioning", lambda dt: gp_case(device, dt)
    yield "view_graph_calibration", lambda dt: vgc_case(device, dt)
    yield "patch_alignment", lambda dt: patch_alignment_case(device, dt)
    yield "focal_scan", lambda dt: focal_scan_case(device, dt)


def self_check() -> dict:
    """The counter is not blind: one read and two data-dependent shapes inside the block."""
    x = torch.arange(10.0)
    with SyncCounter() as c:
        float(x.sum())
        _ = x[x > 3]
        _ = torch.nonzero(x)
        _ = x.sum() * 2  # no sync
    return dict(c.counts)


def main(devices: list[str]) -> dict:
    out = {"self_check": self_check()}
    for dev in map(torch.device, devices):
        for dname, dt in DTYPES.items():
            for name, make in cases(dev):
                per, kinds = per_iteration(make(dt), 2, 8)
                out[f"{name}|{dev.type}|{dname}"] = [per, kinds["reads"], kinds["shapes"]]
            solvers = ("dense", "cg") + (("cholesky",) if dev.type == "cpu" else ())
            for solver in solvers:
                per, kinds = ra_case(solver, dev, dt)()
                out[f"rotation_averaging-{solver}|{dev.type}|{dname}"] = [per, kinds["reads"], kinds["shapes"]]
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1:])))
