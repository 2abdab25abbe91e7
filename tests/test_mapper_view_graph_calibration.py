import numpy as np
import poselib
import torch
from torch.func import jvp

from test_mapper_scene import make_scene, unposed
from torchsfm.mapper.view_graph_calibration import (
    CAM_DEGENERATE,
    CAM_FIXED_PRIOR,
    CAM_REFINED,
    ViewGraphCalibrationOptions,
    calibrate_view_graph,
    essential_residual,
    essential_residual_jvp,
)


def estimated_F(rec):
    """F of every pair by PoseLib's RANSAC on the (noisy) matches, as a front end would give."""
    vg, Fs = rec.view_graph, []
    for e in range(len(vg)):
        i, j = vg.pairs[e].tolist()
        m = vg.matches[vg.match_offsets[e]:vg.match_offsets[e + 1]]
        x1 = rec.keypoints.of_image(i)[m[:, 0]].numpy()
        x2 = rec.keypoints.of_image(j)[m[:, 1]].numpy()
        F, _ = poselib.estimate_fundamental(x1, x2, {"max_epipolar_error": 1.0, "seed": e}, {})
        Fs.append(torch.from_numpy(np.asarray(F)))
    return torch.stack(Fs)


def mapper_input(scene, scale=1.3, estimate=True):
    rec = unposed(scene.rec)
    if estimate:
        rec.view_graph.F = estimated_F(rec)
    rec.cameras.params[:, 0] *= scale  # SIMPLE_PINHOLE: f only
    rec.cameras.has_prior_focal_length[:] = False
    return rec


def test_residual_is_singular_value_gap_and_jacobian_is_exact():
    g = torch.Generator().manual_seed(0)
    U, _, Vh = torch.linalg.svd(torch.randn(20, 3, 3, generator=g, dtype=torch.float64))
    s = torch.rand(20, 2, generator=g, dtype=torch.float64) + 0.1
    S = torch.zeros(20, 3, 3, dtype=torch.float64)
    S[:, 0, 0], S[:, 1, 1] = s[:, 0], s[:, 1]
    E = U @ S @ Vh
    gap = (s[:, 0] ** 2 - s[:, 1] ** 2).abs() / (s ** 2).sum(-1)
    assert torch.allclose(essential_residual(E).norm(dim=-1), gap, atol=1e-12)
    D = torch.randn(20, 3, 3, generator=g, dtype=torch.float64)
    r, d = essential_residual_jvp(E, D)
    r_ref, d_ref = jvp(essential_residual, (E,), (D,))
    assert torch.allclose(r, r_ref, atol=1e-12) and torch.allclose(d, d_ref, atol=1e-10)


def test_recovers_perturbed_focals_on_ring(device, dtype):
    from conftest import tol

    # Cameras on a ring looking roughly (10 deg jitter) at the object, one camera each.
    sc = make_scene(num_images=12, num_points=400, layout="ring", look_jitter_deg=10, noise_px=0.5, seed=1)
    exact = mapper_input(sc, estimate=False)
    out, rep = calibrate_view_graph(exact.to(device, dtype))
    assert bool((rep.status == CAM_REFINED).all())
    assert torch.allclose(rep.focal_after.cpu().double(), sc.focal, rtol=tol(dtype, 1e-6, 1e-4))
    assert torch.allclose(rep.focal_before.cpu().double(), sc.focal * 1.3, rtol=tol(dtype, 1e-12, 1e-6))

    noisy = mapper_input(sc)
    out, rep = calibrate_view_graph(noisy.to(device, dtype))
    assert bool((rep.status == CAM_REFINED).all())
    rel = (out.cameras.params[:, 0].cpu().double() / sc.focal - 1).abs()
    assert float(rel.max()) < 0.015
    assert float(rep.focal_std.max()) < 0.05
    assert rep.num_pairs_dropped == 0
    assert bool(out.view_graph.valid.all())


def test_shared_camera_and_prior_focals_fixed():
    sc = make_scene(num_images=10, num_points=400, layout="ring", look_jitter_deg=10, noise_px=0.5, seed=2,
                    shared_camera=True)
    rec = mapper_input(sc)
    out, rep = calibrate_view_graph(rec)
    assert rep.status.tolist() == [CAM_REFINED]
    assert abs(float(out.cameras.params[0, 0]) / float(sc.focal[0]) - 1) < 0.01

    sc = make_scene(num_images=10, num_points=400, layout="ring", look_jitter_deg=10, noise_px=0.5, seed=3)
    rec = mapper_input(sc)
    prior = torch.arange(10) % 2 == 0
    rec.cameras.params[prior, 0] = sc.focal[prior]  # trusted priors are exact
    rec.cameras.has_prior_focal_length = prior
    out, rep = calibrate_view_graph(rec)
    assert torch.equal(out.cameras.params[prior, 0], sc.focal[prior])
    assert bool((rep.status[prior] == CAM_FIXED_PRIOR).all())
    assert bool((rep.status[~prior] == CAM_REFINED).all())
    assert float((out.cameras.params[~prior, 0] / sc.focal[~prior] - 1).abs().max()) < 0.015


def test_sphere_looking_at_centre_is_flagged_degenerate(device):
    # All optical axes meet at the centre: F does not determine the focal lengths.
    for estimate in (False, True):
        sc = make_scene(num_images=12, num_points=400, layout="sphere", look_jitter_deg=0, noise_px=0.5, seed=4)
        rec = mapper_input(sc, estimate=estimate)
        out, rep = calibrate_view_graph(rec.to(device))
        assert bool((rep.status == CAM_DEGENERATE).all()), rep.counts()
        assert bool(rep.degenerate.all())
        # The initial focal lengths are kept, not a degenerate estimate.
        assert torch.equal(out.cameras.params.cpu(), rec.cameras.params)
    # The same sphere with varied viewing directions is well posed again.
    sc = make_scene(num_images=12, num_points=400, layout="sphere", look_jitter_deg=10, noise_px=0.5, seed=4)
    out, rep = calibrate_view_graph(mapper_input(sc))
    assert not bool(rep.degenerate.any())
    assert float((out.cameras.params[:, 0] / sc.focal - 1).abs().max()) < 0.02


def test_inconsistent_pair_is_dropped():
    sc = make_scene(num_images=12, num_points=400, layout="ring", look_jitter_deg=10, noise_px=0.5, seed=5)
    rec = mapper_input(sc)
    g = torch.Generator().manual_seed(1)
    bad = torch.tensor([3, 17])
    U, S, Vh = torch.linalg.svd(torch.randn(2, 3, 3, generator=g, dtype=torch.float64))
    S[:, 2] = 0
    rec.view_graph.F[bad] = U @ torch.diag_embed(S) @ Vh  # rank 2 but no focal makes it essential
    out, rep = calibrate_view_graph(rec)
    assert not bool(out.view_graph.valid[bad].any())
    assert rep.num_pairs_dropped == 2
    assert float(rep.pair_error[bad].min()) > ViewGraphCalibrationOptions().max_pair_error
    assert float((out.cameras.params[:, 0] / sc.focal - 1).abs().max()) < 0.015
