import math

import numpy as np
import pytest
import torch

from torchsfm.data.model import MAX_CAMERA_PARAMS, Cameras, Images, Keypoints, Points3D, Reconstruction, Tracks
from torchsfm.geometry import so3
from torchsfm.metrics import (
    Sim3,
    absolute_pose_errors,
    align_to_gt,
    evaluate,
    pair_indices,
    pose_auc,
    recall_at,
    relative_pose_errors,
    reprojection_errors,
    umeyama_sim3,
)

F64 = torch.float64


def look_at_poses(n, gen, radius=5.0):
    """cam_from_world poses of cameras on a noisy ring looking at the origin (z forward)."""
    ang = torch.linspace(0, 2 * math.pi, n + 1, dtype=F64)[:n]
    c = torch.stack([radius * ang.cos(), radius * ang.sin(), 0.5 * torch.randn(n, generator=gen, dtype=F64)], -1)
    z = -c / c.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(z, torch.tensor([0.0, 0.0, 1.0], dtype=F64).expand_as(z), dim=-1)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x, dim=-1)
    R = torch.stack([x, y, z], -2)  # rows: camera axes in world
    t = -(R @ c[..., None])[..., 0]
    return R, t


def random_sim3(gen):
    R = so3.random_rotation(1, gen)[0]
    return Sim3(torch.tensor(2.7, dtype=F64), R, torch.randn(3, generator=gen, dtype=F64) * 3)


def centers(R, t):
    return -(R.transpose(-1, -2) @ t[..., None])[..., 0]


def test_identical_poses_give_zero_errors_and_full_auc(device):
    gen = torch.Generator().manual_seed(0)
    R, t = look_at_poses(7, gen)
    R, t = R.to(device), t.to(device)
    reg = torch.ones(7, dtype=torch.bool, device=device)
    err = relative_pose_errors(R, t, reg, R, t)
    assert err.rotation.shape == (21,) and err.rotation.device.type == device.type
    assert err.max().abs().max() < 1e-9
    auc = pose_auc(err)
    assert auc.device.type == device.type
    assert torch.allclose(auc, torch.full((4,), 100.0, dtype=F64, device=device), atol=1e-9)
    assert torch.equal(pair_indices(4), torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]))


@pytest.mark.parametrize("both", [False, True])
def test_rotation_perturbation_of_one_camera_gives_expected_pair_errors(device, both):
    gen = torch.Generator().manual_seed(1)
    n, k, theta = 5, 2, math.radians(2.0)
    R, t = look_at_poses(n, gen)
    c = centers(R, t)
    axis = torch.tensor([1.0, 2.0, -0.5], dtype=F64)
    axis = axis / axis.norm()
    Rd = so3.exp(theta * axis)
    # Rotate camera k about its own centre: the centre stays, only its orientation changes.
    R_est, t_est = R.clone(), t.clone()
    R_est[k] = Rd @ R[k]
    t_est[k] = -(R_est[k] @ c[k])
    reg = torch.ones(n, dtype=torch.bool)
    err = relative_pose_errors(R_est.to(device), t_est.to(device), reg.to(device), R.to(device), t.to(device),
                               both_directions=both)

    def rotated_direction_angle(v):
        # Angle between v and Rd v: cos = cos(theta) + (1 - cos(theta)) (axis . v_hat)^2.
        a = float(axis @ (v / v.norm()))
        return math.degrees(math.acos(math.cos(theta) + (1 - math.cos(theta)) * a * a))

    pairs = pair_indices(n).tolist()
    exp_rot, exp_trans, exp_rev = [], [], []
    for i, j in pairs:
        exp_rot.append(2.0 if k in (i, j) else 0.0)
        # cam_j_from_cam_i translation R_j (c_i - c_j) changes only when j is the rotated camera.
        exp_trans.append(rotated_direction_angle(R[j] @ (c[i] - c[j])) if j == k else 0.0)
        exp_rev.append(rotated_direction_angle(R[i] @ (c[j] - c[i])) if i == k else 0.0)
    if both:
        exp_rot, exp_trans = exp_rot + exp_rot, exp_trans + exp_rev
    assert any(0.1 < e < 1.99 for e in exp_trans)  # the test exercises a non-trivial angle
    assert torch.allclose(err.rotation.cpu(), torch.tensor(exp_rot, dtype=F64), atol=1e-9)
    assert torch.allclose(err.translation.cpu(), torch.tensor(exp_trans, dtype=F64), atol=1e-7)


def test_gauge_change_leaves_relative_errors_at_zero(device):
    gen = torch.Generator().manual_seed(2)
    R, t = look_at_poses(9, gen)
    sim = random_sim3(gen)
    R2, t2 = sim.transform_poses(R, t)
    assert (R2 - R).abs().max() > 0.1  # the gauge really changed
    assert torch.allclose(centers(R2, t2), sim.apply(centers(R, t)), atol=1e-12)
    reg = torch.ones(9, dtype=torch.bool, device=device)
    err = relative_pose_errors(R2.to(device), t2.to(device), reg, R.to(device), t.to(device), both_directions=True)
    assert err.max().max() < 1e-8
    # Camera 0 left in the old gauge: exactly its 8 pairs get large errors (the check can fail).
    R3, t3 = R2.clone(), t2.clone()
    R3[0], t3[0] = R[0], t[0]
    bad = relative_pose_errors(R3.to(device), t3.to(device), reg, R.to(device), t.to(device)).max().cpu()
    involves = (pair_indices(9) == 0).any(-1)
    assert bad[involves].min() > 1.0 and bad[~involves].max() < 1e-8


def test_unregistered_image_makes_its_pairs_failures(device):
    gen = torch.Generator().manual_seed(3)
    n = 5
    R, t = look_at_poses(n, gen)
    R_est, t_est = R.clone(), t.clone()
    R_est[3] = float("nan")  # garbage in an unregistered row must not leak into other pairs
    t_est[3] = float("nan")
    reg = torch.tensor([True, True, True, False, True])
    err = relative_pose_errors(R_est.to(device), t_est.to(device), reg.to(device), R.to(device), t.to(device))
    pairs = pair_indices(n)
    involves = ((pairs == 3).any(-1)).to(device)
    assert int(involves.sum()) == 4
    assert torch.isinf(err.rotation[involves]).all() and torch.isinf(err.translation[involves]).all()
    assert err.max()[~involves].max() < 1e-9
    # 6 of 10 pairs are perfect, 4 fail: the AUC is 60% at every threshold.
    assert torch.allclose(pose_auc(err).cpu(), torch.full((4,), 60.0, dtype=F64), atol=1e-9)
    assert torch.allclose(recall_at(err, (1.0,)).cpu(), torch.tensor([60.0], dtype=F64))


def test_zero_baselines():
    gen = torch.Generator().manual_seed(4)
    R, t = look_at_poses(3, gen)
    c = centers(R, t)
    # GT cameras 0 and 1 share a centre: only rotation is scored for that pair (error 0).
    c_gt = c.clone()
    c_gt[1] = c_gt[0]
    t_gt = -(R @ c_gt[..., None])[..., 0]
    reg = torch.ones(3, dtype=torch.bool)
    err = relative_pose_errors(R, t, reg, R, t_gt)
    assert err.translation[0] == 0 and err.translation[1:].max() > 1.0
    # The estimate collapses cameras 0 and 1 while the GT does not: a failure for that pair.
    err = relative_pose_errors(R, t_gt, reg, R, t)
    assert torch.isinf(err.translation[0]) and err.rotation[0] < 1e-9
    # COLMAP's min_proj_center_dist: a short GT baseline is not scored for direction.
    assert relative_pose_errors(R, t_gt, reg, R, t, min_gt_baseline=100.0).translation.max() == 0


def test_auc_of_hand_computed_errors(device):
    # Sorted errors 0.5, 2, 4, inf with recalls 1/4..1 from (0, 0):
    # t=1: 0.5*(0+.25)/2 + (1-.5)*.25 = 0.1875                       -> 18.75 %
    # t=2: 0.0625 + 1.5*(.25+.5)/2 = 0.625, over 2                    -> 31.25 %
    # t=3: 0.625 + (3-2)*.5 = 1.125, over 3                           -> 37.5 %
    # t=5: 0.625 + 2*(.5+.75)/2 + (5-4)*.75 = 2.625, over 5           -> 52.5 %
    e = torch.tensor([4.0, 0.5, float("inf"), 2.0], dtype=F64, device=device)
    auc = pose_auc(e, (1, 2, 3, 5))
    assert torch.allclose(auc.cpu(), torch.tensor([18.75, 31.25, 37.5, 52.5], dtype=F64), atol=1e-12)
    # COLMAP's min_error=1: the curve is (0,.25), (1,.25), (2,.5), ...: t=1 -> 25 %, t=3 -> 37.5 %.
    assert torch.allclose(pose_auc(e, (1, 3), min_error=1.0).cpu(), torch.tensor([25.0, 37.5], dtype=F64), atol=1e-12)
    # NaN counts as a failure.
    e_nan = torch.tensor([4.0, 0.5, float("nan"), 2.0], dtype=F64, device=device)
    assert torch.allclose(pose_auc(e_nan, (1, 2, 3, 5)), auc)
    # No 1.1 rescaling: a single perfect pair is exactly 100 %.
    assert float(pose_auc(torch.zeros(1, device=device), (5,))) == 100.0


def test_auc_matches_trapezoid_reference():
    gen = torch.Generator().manual_seed(5)
    e = torch.rand(200, generator=gen, dtype=F64) * 12
    e[::17] = float("inf")
    thresholds = (0.5, 1, 3, 5, 10)
    # Independent reference: integrate the recall curve sampled densely as a step/linear mix is
    # hard to do exactly, so build the curve explicitly and use numpy's trapezoid.
    es = np.sort(e.numpy())
    rec = np.arange(1, len(es) + 1) / len(es)
    ref = []
    for t in thresholds:
        keep = es <= t
        x = np.concatenate([[0.0], es[keep], [t]])
        last = rec[keep][-1] if keep.any() else 0.0
        y = np.concatenate([[0.0], rec[keep], [last]])
        ref.append(100 * np.trapezoid(y, x) / t)
    assert np.allclose(pose_auc(e, thresholds).numpy(), ref, atol=1e-10)


def test_umeyama_recovers_known_sim3_and_robust_handles_outliers(device):
    gen = torch.Generator().manual_seed(6)
    src = torch.randn(20, 3, generator=gen, dtype=F64).to(device)
    sim = random_sim3(gen)
    s0, R0, t0 = sim.scale.to(device), sim.R.to(device), sim.t.to(device)
    dst = s0 * src @ R0.T + t0
    s, R, t = umeyama_sim3(src, dst)
    assert abs(float(s - s0)) < 1e-10 and (R - R0).abs().max() < 1e-10 and (t - t0).abs().max() < 1e-10
    assert s.device.type == device.type
    # Four gross outliers: least squares is pulled off, LMedS + refit is exact again.
    dst_bad = dst.clone()
    dst_bad[[1, 5, 9, 13]] += torch.tensor([4.0, -6.0, 3.0], dtype=F64, device=device)
    s1, R1, t1 = umeyama_sim3(src, dst_bad)
    assert (R1 - R0).abs().max() > 1e-3 or abs(float(s1 - s0)) > 1e-3
    s2, R2, t2 = umeyama_sim3(src, dst_bad, robust=True)
    assert abs(float(s2 - s0)) < 1e-9 and (R2 - R0).abs().max() < 1e-9 and (t2 - t0).abs().max() < 1e-9
    assert torch.linalg.det(R2) > 0
    with pytest.raises(ValueError):
        umeyama_sim3(src[:2], dst[:2])


def test_align_and_absolute_errors(device):
    gen = torch.Generator().manual_seed(7)
    n = 12
    R, t = look_at_poses(n, gen)
    c_gt = centers(R, t)
    # The estimate is the GT in another gauge, with camera 4 misplaced by 0.3 GT units and
    # camera 8 not registered.
    c_moved = c_gt.clone()
    c_moved[4] += torch.tensor([0.0, 0.3, 0.0], dtype=F64)
    t_moved = -(R @ c_moved[..., None])[..., 0]
    gauge = random_sim3(gen)
    R_est, t_est = gauge.transform_poses(R, t_moved)
    reg = torch.ones(n, dtype=torch.bool)
    reg[8] = False
    R_est, t_est, reg_d = R_est.to(device), t_est.to(device), reg.to(device)
    sim = align_to_gt(centers(R_est, t_est), c_gt.to(device), reg_d)
    assert sim.inliers.tolist() == [i not in (4, 8) for i in range(n)]
    assert abs(float(sim.scale) * 2.7 - 1) < 1e-9
    ab = absolute_pose_errors(R_est, t_est, reg_d, R.to(device), t.to(device), sim)
    expect_pos = torch.zeros(n, dtype=F64)
    expect_pos[4] = 0.3
    ok = reg.clone()
    assert torch.allclose(ab.position.cpu()[ok], expect_pos[ok], atol=1e-9)
    assert ab.rotation.cpu()[ok].max() < 1e-7
    assert torch.isinf(ab.position[8]) and torch.isinf(ab.rotation[8])


# --------------------------------------------------------------------------------------------
# Reconstructions for reprojection and end-to-end evaluation


def pinhole_reconstruction(gen, n_images=5, n_points=30, names=None):
    R, t = look_at_poses(n_images, gen)
    f, cx, cy = 500.0, 320.0, 240.0
    params = torch.zeros(1, MAX_CAMERA_PARAMS, dtype=F64)
    params[0, :4] = torch.tensor([f, f, cx, cy], dtype=F64)
    cameras = Cameras(torch.tensor([1]), torch.tensor([1]), torch.tensor([640]), torch.tensor([480]), params,
                      torch.tensor([True]))
    X = torch.randn(n_points, 3, generator=gen, dtype=F64)
    # Every image sees every point (all within ~1.7 units of the origin, cameras 5 away).
    img = torch.arange(n_images).repeat_interleave(n_points)
    pt = torch.arange(n_points).repeat(n_images)
    p = (R[img] @ X[pt][..., None])[..., 0] + t[img]
    xy = torch.stack([f * p[:, 0] / p[:, 2] + cx, f * p[:, 1] / p[:, 2] + cy], -1)
    images = Images(torch.arange(1, n_images + 1), names or [f"im{i}.jpg" for i in range(n_images)],
                    torch.zeros(n_images, dtype=torch.long), so3.matrix_to_quat(R), t,
                    torch.ones(n_images, dtype=torch.bool))
    keypoints = Keypoints(xy, torch.arange(n_images + 1) * n_points)
    points = Points3D(torch.arange(1, n_points + 1), X, torch.zeros(n_points, 3, dtype=torch.uint8),
                      -torch.ones(n_points, dtype=F64))
    order = torch.argsort(pt, stable=True)
    tracks = Tracks(pt[order], img[order], (torch.arange(len(img)) % n_points)[order])
    return Reconstruction(cameras, images, keypoints, points, tracks)


def test_reprojection_errors(device):
    pytest.importorskip("torchsfm.cameras.projection", reason="camera projection module not available")
    gen = torch.Generator().manual_seed(8)
    rec = pinhole_reconstruction(gen, 3, 4)
    # Shift one observation by (3, 4) px: its error is exactly 5 px, every other one is 0.
    flat = int(rec.keypoints.flat_index(torch.tensor(1), torch.tensor(2)))
    rec.keypoints.xy[flat] += torch.tensor([3.0, 4.0], dtype=F64)
    rec = rec.to(device)
    err = reprojection_errors(rec)
    assert err.shape == (12,) and err.device.type == device.type
    obs = (rec.tracks.image == 1) & (rec.tracks.keypoint == 2)
    assert torch.allclose(err[obs].cpu(), torch.tensor([5.0], dtype=F64), atol=1e-9)
    assert err[~obs].abs().max() < 1e-9
    # Unregistered images contribute NaN, not a number.
    rec.images.registered[0] = False
    err = reprojection_errors(rec)
    assert torch.isnan(err[rec.tracks.image == 0]).all() and not torch.isnan(err[rec.tracks.image != 0]).any()


def test_evaluate_end_to_end(device):
    pytest.importorskip("torchsfm.cameras.projection", reason="camera projection module not available")
    gen = torch.Generator().manual_seed(9)
    gt = pinhole_reconstruction(gen, 5, 20)
    # The estimate: the GT in another gauge, images in another order, image im3 absent and an
    # extra image that the GT does not know (ignored).
    sim = random_sim3(gen)
    R, t = sim.transform_poses(gt.images.rotation, gt.images.trans)
    keep = [4, 0, 2, 1]
    est = gt.clone()
    est.images = Images(torch.tensor([10, 11, 12, 13, 14]), [gt.images.name[k] for k in keep] + ["extra.jpg"],
                        torch.zeros(5, dtype=torch.long), so3.matrix_to_quat(torch.cat([R[keep], R[:1]])),
                        torch.cat([t[keep], t[:1]]), torch.ones(5, dtype=torch.bool))
    # Keypoints/tracks rows follow the new image order; points follow the gauge.
    n_pts = 20
    kp = gt.keypoints.xy.view(5, n_pts, 2)
    est.keypoints = Keypoints(torch.cat([kp[keep].reshape(-1, 2), kp[0]]), torch.arange(6) * n_pts)
    est.points3D.xyz = sim.apply(gt.points3D.xyz)
    pt = torch.arange(n_pts).repeat(5)
    img = torch.arange(5).repeat_interleave(n_pts)
    order = torch.argsort(pt, stable=True)
    est.tracks = Tracks(pt[order], img[order], (torch.arange(5 * n_pts) % n_pts)[order])

    out = evaluate(est.to(device), gt.to(device))
    assert out["num_images"] == 5 and out["num_registered"] == 4 and out["num_pairs"] == 10
    for k in ("auc@1", "auc@3", "auc@5", "auc@10"):
        assert abs(out[k] - 60.0) < 1e-7  # 4 of 10 pairs involve the missing image
    assert out["median_rotation_error_deg"] < 1e-7
    assert out["abs_median_position_error"] < 1e-9 and out["abs_median_rotation_error_deg"] < 1e-7
    assert out["abs_alignment_inliers"] == 4
    assert abs(out["abs_alignment_scale"] * 2.7 - 1) < 1e-9
    assert out["mean_reprojection_error"] < 1e-9  # the extra image observes the moved points exactly


def test_relative_errors_match_pycolmap_formula():
    """Per-pair errors equal COLMAP's benchmark formula evaluated with pycolmap's Rigid3d:
    dR = angle(est^-1 * gt), dt = angle between the tgt_from_src translations."""
    pycolmap = pytest.importorskip("pycolmap")
    gen = torch.Generator().manual_seed(10)
    n = 6
    R, t = look_at_poses(n, gen)
    R_est = so3.exp(0.05 * torch.randn(n, 3, generator=gen, dtype=F64)) @ R
    t_est = t + 0.2 * torch.randn(n, 3, generator=gen, dtype=F64)
    err = relative_pose_errors(R_est, t_est, torch.ones(n, dtype=torch.bool), R, t, both_directions=True)

    def rigid(Rm, tv):
        return pycolmap.Rigid3d(pycolmap.Rotation3d(Rm.numpy()), tv.numpy())

    pairs = pair_indices(n).tolist()
    ordered = [(i, j) for i, j in pairs] + [(j, i) for i, j in pairs]  # (src, tgt)
    exp_rot, exp_trans = [], []
    for src, tgt in ordered:
        est = rigid(R_est[tgt], t_est[tgt]) * rigid(R_est[src], t_est[src]).inverse()
        gt = rigid(R[tgt], t[tgt]) * rigid(R[src], t[src]).inverse()
        exp_rot.append(math.degrees((est.inverse() * gt).rotation.angle()))
        a, b = est.translation, gt.translation
        cos = np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)
        exp_trans.append(math.degrees(math.acos(cos)))
    assert min(exp_trans) > 0.1 and min(exp_rot) > 0.1
    assert np.allclose(err.rotation.numpy(), exp_rot, atol=1e-6)
    assert np.allclose(err.translation.numpy(), exp_trans, atol=1e-6)


def test_chunking_does_not_change_results(device):
    gen = torch.Generator().manual_seed(11)
    n = 23
    R, t = look_at_poses(n, gen)
    R_est = (so3.exp(0.02 * torch.randn(n, 3, generator=gen, dtype=F64)) @ R).to(device)
    t_est = (t + 0.1 * torch.randn(n, 3, generator=gen, dtype=F64)).to(device)
    reg = (torch.rand(n, generator=gen) > 0.2).to(device)
    full = relative_pose_errors(R_est, t_est, reg, R.to(device), t.to(device), both_directions=True)
    for chunk in (1, 7, 40):
        part = relative_pose_errors(R_est, t_est, reg, R.to(device), t.to(device), both_directions=True,
                                    chunk_pairs=chunk)
        # Same pairs in the same order; values equal up to round-off of differently sized kernels.
        assert torch.allclose(part.rotation, full.rotation, atol=1e-12)
        assert torch.allclose(part.translation, full.translation, atol=1e-12)
        assert torch.equal(torch.isinf(part.rotation), torch.isinf(full.rotation))
    assert full.rotation.numel() == n * (n - 1)
    single = relative_pose_errors(R_est[:1], t_est[:1], reg[:1], R[:1].to(device), t[:1].to(device))
    assert single.rotation.numel() == 0
