"""Bundle adjustment on the data model: cost parity with pycolmap/Ceres, Jacobians, convergence to
ground truth for every camera model, robust losses, constant parameters, the CLI."""
from __future__ import annotations

import pycolmap
import pytest
import torch

from torchsfm.ba import BundleAdjustmentOptions, ReprojectionProblem, bundle_adjust
from torchsfm.data.camera_models import MODELS
from torchsfm.geometry import so3
from torchsfm.io.colmap_model import to_pycolmap
from torchsfm.solver import SolverOptions, check_jacobians, losses
from torchsfm.synthetic import SyntheticOptions, synthesize

MODEL_NAMES = list(MODELS)


def scene(model="SIMPLE_RADIAL", num_images=10, num_points=200, noise=0.5, seed=1, num_cameras=1, device="cpu"):
    return synthesize(SyntheticOptions(num_images=num_images, num_points=num_points, camera_model=model,
                                       pixel_noise=noise, seed=seed, num_cameras=num_cameras, min_pair_matches=8),
                      device=device).gt


def perturbed(gt, seed=0, pose=0.01, point=0.01, focal=1.01, keep_first_two=True):
    rec = gt.clone()
    g = torch.Generator().manual_seed(seed)
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(gt.device, gt.dtype)  # noqa: E731
    I = len(rec.images)
    dq = so3.axis_angle_to_quat(pose * n(I, 3))
    rec.images.quat = so3.quat_multiply(dq, rec.images.quat)
    rec.images.trans = rec.images.trans + pose * n(I, 3)
    if keep_first_two:  # the gauge "two_cams" then coincides with the ground truth frame
        rec.images.quat[:2], rec.images.trans[:2] = gt.images.quat[:2], gt.images.trans[:2]
    rec.points3D.xyz = rec.points3D.xyz + point * n(len(rec.points3D), 3)
    rec.cameras.params[:, 0] *= focal
    return rec


def ceres_initial_cost(rec, loss="trivial", scale=1.0) -> float:
    prec = to_pycolmap(rec)
    opts = pycolmap.BundleAdjustmentOptions()
    opts.print_summary = False
    opts.ceres.loss_function_type = getattr(pycolmap.LossFunctionType, loss.upper())
    opts.ceres.loss_function_scale = scale
    opts.ceres.solver_options.max_num_iterations = 0
    cfg = pycolmap.BundleAdjustmentConfig()
    for i in prec.reg_image_ids():
        cfg.add_image(i)
    return pycolmap.create_default_ceres_bundle_adjuster(opts, cfg, prec).solve().ceres_summary.initial_cost


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_cost_equals_pycolmap_ceres_cost(model):
    rec = perturbed(scene(model, num_images=8, num_points=120))
    # a few points pushed behind a camera: COLMAP zeroes those residuals, so must we
    rec.points3D.xyz[:3] = -3.0 * rec.points3D.xyz[:3] + torch.tensor([0.0, 0.0, -20.0], dtype=rec.dtype)
    ours = ReprojectionProblem(rec).cost()
    assert abs(ours - ceres_initial_cost(rec)) <= 1e-9 * ours


@pytest.mark.parametrize("loss", ["huber", "cauchy", "soft_l1"])
def test_robust_cost_equals_pycolmap_ceres_cost(loss):
    rec = perturbed(scene("RADIAL", num_images=8, num_points=120))
    ours = losses.cost(ReprojectionProblem(rec).residuals(), loss, 2.0)
    assert abs(ours - ceres_initial_cost(rec, loss, 2.0)) <= 1e-9 * ours


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_jacobians_match_finite_differences(model, device):
    rec = perturbed(scene(model, num_images=4, num_points=50, num_cameras=2, device=device))
    o = BundleAdjustmentOptions(refine_principal_point=True)
    chk = check_jacobians(ReprojectionProblem(rec, o), eps=1e-6)
    assert chk.max_rel_error_cam < 1e-5 and chk.max_rel_error_point < 1e-6, chk


def _pose_errors(a, b):
    rot = so3.angle_between(a.images.rotation, b.images.rotation).max()
    ctr = (a.images.centers - b.images.centers).norm(dim=-1).max()
    return float(rot), float(ctr)


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_synthetic_ba_with_outliers_converges_to_ground_truth(model, device):
    gt = scene(model, num_points=600, noise=0.3, device=device)
    rec = perturbed(gt)
    # plant outliers: 3% of the keypoints moved by 20-40 px
    g = torch.Generator().manual_seed(7)
    K = len(rec.keypoints)
    bad = torch.randperm(K, generator=g)[: K * 3 // 100].to(device)
    shift = (20 + 20 * torch.rand(bad.numel(), 2, generator=g, dtype=torch.float64)).to(device, gt.dtype)
    rec.keypoints.xy[bad] += shift * torch.sign(torch.randn(bad.numel(), 2, generator=g, dtype=torch.float64)).to(device, gt.dtype)
    # Cauchy: Huber (and soft-L1) converge only linearly here, as Ceres does on the same data (its
    # IRLS model overestimates the curvature of outliers in the linear zone, rho ~ 2 per step).
    o = BundleAdjustmentOptions(gauge="two_cams", solver=SolverOptions(
        loss="cauchy", loss_scale=1.0, function_tolerance=1e-12, parameter_tolerance=1e-12))
    out, s = bundle_adjust(rec, o)
    assert s.converged, s.termination
    # the optimum of this data: the same adjustment started from the ground truth
    start = gt.clone()
    start.keypoints.xy = rec.keypoints.xy
    best, _ = bundle_adjust(start, o)
    rot, ctr = _pose_errors(out, best)
    assert rot < 1e-5 and ctr < 1e-4, (rot, ctr)  # the same minimum (a flat valley: focal vs depth)
    # and that optimum is the ground truth up to the noise (0.3 px; cameras 4.5 units from the centre)
    rot, ctr = _pose_errors(out, gt)
    assert rot < 1e-2 and ctr < 5e-2, (rot, ctr)
    f_err = float(((out.cameras.params[:, 0] - gt.cameras.params[:, 0]) / gt.cameras.params[:, 0]).abs().max())
    assert f_err < 3e-3
    pt_err = float((out.points3D.xyz - gt.points3D.xyz).norm(dim=-1).median())
    assert pt_err < 1e-2
    # without the robust loss the outliers pull the solution away
    plain, _ = bundle_adjust(rec, BundleAdjustmentOptions(gauge="two_cams"))
    assert _pose_errors(plain, gt)[1] > 2 * ctr, (_pose_errors(plain, gt), ctr)
    # the first image is the gauge: untouched
    assert torch.equal(out.images.quat[0], rec.images.quat[0]) and torch.equal(out.images.trans[0], rec.images.trans[0])
    # the planted outliers end up with small IRLS weights, also under Huber
    huber, _ = bundle_adjust(rec, BundleAdjustmentOptions(gauge="two_cams", solver=SolverOptions(
        loss="huber", loss_scale=1.0, max_iterations=20)))
    prob = ReprojectionProblem(huber)
    w = losses.weights(prob.residuals(), "huber", 1.0)
    flat = out.keypoints.flat_index(out.tracks.image, out.tracks.keypoint)
    is_bad = torch.isin(flat[prob.obs], bad)
    assert float(w[is_bad].median()) < 0.1 and float(w[~is_bad].median()) == 1.0
    assert _pose_errors(huber, gt)[1] < 5e-2


@pytest.mark.parametrize("method", ["dense", "pcg"])
def test_ba_device_dtype_matrix(device, dtype, method):
    """Known answer on every device and in both precisions: from a perturbed start, BA reaches
    the ground truth up to the noise, and float32 the float64 minimum to 1e-4 of the cost."""
    from conftest import tol

    gt = scene("SIMPLE_RADIAL", num_images=10, num_points=300, noise=0.3, device=device)
    rec = perturbed(gt)
    o = BundleAdjustmentOptions(gauge="two_cams", solver=SolverOptions(linear_solver=method, loss="huber"))
    out, s = bundle_adjust(rec.to(device, dtype), o)
    assert s.converged, s.termination
    assert out.dtype == dtype and out.device.type == device.type
    rot, ctr = _pose_errors(out.to(device, torch.float64), gt)
    assert rot < 1e-2 and ctr < 5e-2, (rot, ctr)
    ref = bundle_adjust(rec, o)[1].final_cost
    assert abs(s.final_cost - ref) <= tol(dtype, 1e-9, 1e-4) * ref, (s.final_cost, ref)


def test_shared_and_per_image_intrinsics_reach_the_same_answer_as_ceres():
    for num_cameras in (1, 3, 10):
        rec = perturbed(scene("RADIAL", num_cameras=num_cameras, seed=2))
        out, s = bundle_adjust(rec)
        prec = to_pycolmap(rec)
        opts = pycolmap.BundleAdjustmentOptions()
        opts.print_summary = False
        cfg = pycolmap.BundleAdjustmentConfig()
        for i in prec.reg_image_ids():
            cfg.add_image(i)
        ceres = pycolmap.create_default_ceres_bundle_adjuster(opts, cfg, prec).solve().ceres_summary
        assert s.final_cost <= ceres.final_cost * (1 + 1e-6), (num_cameras, s.final_cost, ceres.final_cost)
        # one focal length per camera, not per image
        assert s.num_reduced_unknowns == 6 * len(rec.images) + 3 * num_cameras


@pytest.mark.parametrize("loss", ["trivial", "huber"])
def test_points_alone_reach_ceres_cost_each_with_its_own_trust_region(loss):
    """Cameras held: the problem separates into points, which the solver refines each with its own
    radius and convergence test. The result must be the optimum Ceres finds, and a point far off
    must still be brought back."""
    gt = scene("SIMPLE_RADIAL", num_images=8, num_points=150, seed=4)
    rec = perturbed(gt, pose=0.0, point=0.05)
    rec.points3D.xyz[7] += torch.tensor([0.3, -0.2, 0.4], dtype=rec.dtype)
    o = BundleAdjustmentOptions(refine_poses=False, refine_focal_length=False, refine_extra_params=False,
                                solver=SolverOptions(loss=loss, loss_scale=2.0))
    out, s = bundle_adjust(rec, o)
    assert s.linear_solver == "separable" and s.converged, s.brief()
    assert torch.equal(out.images.trans, rec.images.trans) and torch.equal(out.cameras.params, rec.cameras.params)
    prec = to_pycolmap(rec)
    opts = pycolmap.BundleAdjustmentOptions()
    opts.print_summary = False
    opts.refine_focal_length = opts.refine_extra_params = False
    opts.refine_rig_from_world = opts.refine_sensor_from_rig = False
    opts.ceres.loss_function_type = getattr(pycolmap.LossFunctionType, loss.upper())
    opts.ceres.loss_function_scale = 2.0
    cfg = pycolmap.BundleAdjustmentConfig()
    for i in prec.reg_image_ids():
        cfg.add_image(i)
        cfg.set_constant_rig_from_world_pose(i)
    ceres = pycolmap.create_default_ceres_bundle_adjuster(opts, cfg, prec).solve().ceres_summary
    assert abs(ceres.initial_cost - s.initial_cost) <= 1e-9 * s.initial_cost
    assert s.final_cost <= ceres.final_cost * (1 + 1e-6), (s.final_cost, ceres.final_cost)
    assert (out.points3D.xyz[7] - gt.points3D.xyz[7]).norm() < 0.05


def test_refine_switches_and_constant_parameters():
    gt = scene("OPENCV", num_cameras=2)
    rec = perturbed(gt)
    o = BundleAdjustmentOptions(refine_focal_length=False, refine_extra_params=False, constant_images=[3],
                                constant_points=[0, 5])
    out, s = bundle_adjust(rec, o)
    assert s.final_cost < 0.2 * s.initial_cost
    assert torch.equal(out.cameras.params, rec.cameras.params)
    assert torch.equal(out.images.quat[3], rec.images.quat[3]) and torch.equal(out.images.trans[3], rec.images.trans[3])
    assert torch.equal(out.points3D.xyz[[0, 5]], rec.points3D.xyz[[0, 5]])
    assert not torch.equal(out.points3D.xyz[1], rec.points3D.xyz[1])
    # principal point on, focal off: only cx, cy move
    o = BundleAdjustmentOptions(refine_focal_length=False, refine_principal_point=True, refine_extra_params=False)
    out, _ = bundle_adjust(rec, o)
    moved = (out.cameras.params != rec.cameras.params).any(0)
    assert moved[2] and moved[3] and not moved[0] and not moved[1] and not moved[4:].any()
    # nothing camera-side left (points only) and no points (cameras only)
    for method in ("dense", "pcg"):
        out, s = bundle_adjust(rec, BundleAdjustmentOptions(
            refine_poses=False, refine_focal_length=False, refine_extra_params=False,
            solver=SolverOptions(linear_solver=method)))
        assert s.num_reduced_unknowns == 0 and s.final_cost < 0.5 * s.initial_cost
        assert torch.equal(out.images.trans, rec.images.trans)
        out, s = bundle_adjust(rec, BundleAdjustmentOptions(refine_points=False, solver=SolverOptions(linear_solver=method)))
        assert s.final_cost < 0.5 * s.initial_cost and torch.equal(out.points3D.xyz, rec.points3D.xyz)


def test_min_track_length_leaves_short_tracks_out():
    rec = perturbed(scene("PINHOLE"))
    lengths = rec.tracks.lengths(len(rec.points3D))
    o = BundleAdjustmentOptions(min_track_length=4)
    prob = ReprojectionProblem(rec, o)
    assert int(prob.points.numel()) == int((lengths >= 4).sum())
    out, _ = bundle_adjust(rec, o)
    short = lengths < 4
    assert short.any() and torch.equal(out.points3D.xyz[short], rec.points3D.xyz[short])


def test_dense_and_pcg_reduced_solvers_agree():
    rec = perturbed(scene("SIMPLE_RADIAL", num_images=12, num_cameras=12))
    finals = []
    for method in ("dense", "pcg", "sparse"):
        out, s = bundle_adjust(rec, BundleAdjustmentOptions(solver=SolverOptions(linear_solver=method)))
        assert s.linear_solver == method and s.converged
        finals.append(s.final_cost)
    assert max(finals) - min(finals) <= 1e-6 * min(finals), finals


def test_cli_bundle_adjusts_a_colmap_model(tmp_path, capsys):
    from torchsfm.cli import main
    from torchsfm.io.colmap_model import write_model

    gt = scene("SIMPLE_RADIAL", num_images=8, num_points=150)
    rec = perturbed(gt)
    write_model(rec, tmp_path / "in")
    code = main(["ba", str(tmp_path / "in"), str(tmp_path / "out"), "--loss", "huber", "--loss-scale", "1",
                 "--max-iterations", "50", "--device", "cpu"])
    assert code == 0
    text = capsys.readouterr().out
    assert "initial cost" in text and "final cost" in text and "iterations" in text
    loaded = pycolmap.Reconstruction(str(tmp_path / "out"))
    assert loaded.num_reg_images() == len(rec.images) and loaded.num_points3D() == len(rec.points3D)
    assert loaded.compute_mean_reprojection_error() < 1.0  # noise is 0.5 px
    assert main(["ba", str(tmp_path / "in"), str(tmp_path / "out2"), "--loss", "nonsense"]) == 2
    assert "invalid choice 'nonsense'" in capsys.readouterr().err
    assert main(["ba", str(tmp_path / "missing"), str(tmp_path / "out3")]) == 2


def test_bal_mirror_mapping_onto_colmap_radial():
    """A BAL camera is a COLMAP RADIAL camera in the z-mirrored world: same cost through our camera
    models (data model), through Ceres (pycolmap), and back."""
    from torchsfm.ba import bal

    d = bal.synthetic_bal(6, 150, 4.0, seed=2)
    ref = bal.cost_np(d)
    assert abs(ReprojectionProblem(bal.to_reconstruction(d)).cost() - ref) <= 1e-9 * ref
    prec = bal.to_pycolmap(d)
    opts = pycolmap.BundleAdjustmentOptions()
    opts.print_summary = False
    opts.refine_principal_point = False
    cfg = pycolmap.BundleAdjustmentConfig()
    for i in prec.reg_image_ids():
        cfg.add_image(i)
    summary = pycolmap.create_default_ceres_bundle_adjuster(opts, cfg, prec).solve().ceres_summary
    assert abs(summary.initial_cost - ref) <= 1e-9 * ref
    back = bal.from_pycolmap(prec, d)
    assert abs(bal.cost_np(back) - summary.final_cost) <= 1e-9 * summary.final_cost
