import pytest
import torch

from torchsfm.data.model import offsets_from_counts
from torchsfm.geometry import so3
from torchsfm.mapper.graph import REASON_COMPONENT, REASON_RELPOSE
from torchsfm.mapper.relative_pose import (
    PAIR_FEW_INLIERS,
    PAIR_LOW_RATIO,
    PAIR_OK,
    PAIR_TOO_FEW_MATCHES,
    RelativePoseOptions,
    estimate_relative_poses,
)
from torchsfm.synthetic import SyntheticOptions, synthesize

OPTS = RelativePoseOptions(num_threads=2, progress=False)
MIN_INLIERS = OPTS.min_num_inliers


def gt_relative(sc):
    vg = sc.view_graph
    return so3.quat_to_matrix(vg.rel_quat), torch.nn.functional.normalize(vg.rel_trans, dim=-1)


def errors(out, R_gt, t_gt):
    vg = out.view_graph
    R = so3.quat_to_matrix(vg.rel_quat.cpu())
    rot = torch.rad2deg(so3.log(R @ R_gt.transpose(-1, -2)).norm(dim=-1))
    cos = (vg.rel_trans.cpu() * t_gt).sum(-1).clamp(-1, 1)
    return rot, torch.rad2deg(torch.arccos(cos))


def wipe_geometry(rec):
    vg = rec.view_graph
    vg.rel_quat = torch.tensor([[1.0, 0, 0, 0]], dtype=vg.rel_quat.dtype).repeat(len(vg), 1)
    vg.rel_trans = torch.zeros_like(vg.rel_trans)
    return rec


def test_noiseless_pairs_recover_ground_truth(device):
    # SIMPLE_RADIAL with distortion: keypoints must be undistorted before the essential matrix.
    sc = synthesize(SyntheticOptions(num_images=10, num_points=500, layout="random", seed=0))
    rec = wipe_geometry(sc.mapper_input())
    out, rep = estimate_relative_poses(rec.to(device), OPTS)
    R_gt, t_gt = gt_relative(sc)
    status = rep.status
    counts = sc.view_graph.num_matches()
    assert torch.equal(status == PAIR_TOO_FEW_MATCHES, counts < MIN_INLIERS)
    ok = status == PAIR_OK
    assert int(ok.sum()) >= 0.8 * len(status)
    rot, tra = errors(out, R_gt, t_gt)
    assert float(rot[ok].max()) < 0.01
    assert float(tra[ok].max()) < 0.01
    assert torch.equal(out.view_graph.valid.cpu(), ok)
    # All matches were inliers, so the kept pairs keep all of them.
    assert torch.equal(out.view_graph.num_matches().cpu()[ok], counts[ok])


def test_outliers_are_removed_and_poses_stay_accurate():
    # Exact inliers, 30% wrong matches. (With pixel noise, these synthetic pairs, whose object
    # fills ~20 deg of the view, are ~1 deg off even when refined from the true pose.)
    sc = synthesize(SyntheticOptions(num_images=12, num_points=800, layout="ring", seed=1, outlier_ratio=0.3))
    rec = wipe_geometry(sc.mapper_input())
    out, rep = estimate_relative_poses(rec, OPTS)
    ok = rep.status == PAIR_OK
    assert int(ok.sum()) >= 30
    rot, tra = errors(out, *gt_relative(sc))
    assert float(rot[ok].median()) < 0.01
    assert float(tra[ok].median()) < 0.01
    assert float(rot[ok].max()) < 1.0  # a few wrong matches inside the 1 px band may remain
    # Inlier matches: true matches mostly kept, wrong ones mostly gone.
    vg_in, vg_out = sc.view_graph, out.view_graph
    pm_in = vg_in.pair_of_match()
    kept_pairs = torch.nonzero(ok, as_tuple=True)[0]
    key = lambda p, m: (p * 100000 + m[:, 0]) * 100000 + m[:, 1]  # noqa: E731
    in_keys = key(pm_in, vg_in.matches)
    out_keys = key(vg_out.pair_of_match(), vg_out.matches)
    on_kept = torch.isin(pm_in, kept_pairs)
    kept = torch.isin(in_keys, out_keys)
    true_on_kept = on_kept & ~sc.is_outlier
    assert float(kept[true_on_kept].float().mean()) > 0.9
    assert float(kept[on_kept & sc.is_outlier].float().mean()) < 0.1


def test_bad_pairs_are_filtered_and_reasons_recorded():
    sc = synthesize(SyntheticOptions(num_images=12, num_points=800, layout="ring", seed=2))
    rec = sc.mapper_input()
    vg = rec.view_graph
    g = torch.Generator().manual_seed(0)
    # Image 11: every match of its pairs is random -> no geometry -> the image drops out.
    counts = rec.keypoints.count()
    pm = vg.pair_of_match()
    touches = (vg.pairs[pm] == 11).any(1)
    side = (vg.pairs[pm, 1] == 11).long()  # which column indexes image 11
    rnd = (torch.rand(int(touches.sum()), generator=g) * counts[11]).long()
    vg.matches[touches, side[touches]] = rnd.to(vg.matches.dtype)
    # Split the remaining images into 0..3 and 4..10 with no valid pair across: 4..10 is larger.
    group_a = torch.arange(12) < 4
    cross = (group_a[vg.pairs[:, 0]] != group_a[vg.pairs[:, 1]]) & ~(vg.pairs == 11).any(1)
    vg.valid = vg.valid & ~cross
    out, rep = estimate_relative_poses(rec, OPTS)
    bad = (vg.pairs == 11).any(1) & ~cross
    assert bool(torch.isin(rep.status[bad & (vg.num_matches() >= MIN_INLIERS)],
                           torch.tensor([PAIR_FEW_INLIERS, PAIR_LOW_RATIO])).all())
    reasons = out.meta["image_reason"]
    assert reasons[11] in (REASON_RELPOSE, REASON_COMPONENT)
    assert reasons[:4] == [REASON_COMPONENT] * 4
    assert all(r == "" for r in reasons[4:11])
    valid = out.view_graph.valid
    assert bool(valid.any())
    assert not bool((out.view_graph.pairs[valid] < 4).any())
    assert not bool((out.view_graph.pairs[valid] == 11).any())
    # CSR stays consistent after keeping only inliers.
    assert int(out.view_graph.match_offsets[-1]) == out.view_graph.matches.shape[0]
    assert torch.equal(out.view_graph.match_offsets, offsets_from_counts(out.view_graph.num_matches()))


@pytest.mark.parametrize("ratio, expect", [(0.99, PAIR_LOW_RATIO), (0.0, PAIR_OK)])
def test_inlier_ratio_threshold(ratio, expect):
    sc = synthesize(SyntheticOptions(num_images=5, num_points=600, layout="random", seed=3, outlier_ratio=0.2))
    rec = sc.mapper_input()
    opts = RelativePoseOptions(num_threads=1, progress=False, min_inlier_ratio=ratio, min_num_inliers=5)
    _, rep = estimate_relative_poses(rec, opts)
    attempted = rep.status != PAIR_TOO_FEW_MATCHES
    assert int(attempted.sum()) >= 5
    assert bool((rep.status[attempted] == expect).all())


def test_stored_poses_are_kept_refined_or_replaced_by_ransac():
    """init="database": exact stored poses are kept as they are, wrong ones (3 deg) are refined in
    the batch, and a pose that explains nothing (60 deg) goes to RANSAC; all end at the truth."""
    sc = synthesize(SyntheticOptions(num_images=10, num_points=600, layout="ring", seed=5))
    rec = sc.mapper_input()
    vg = rec.view_graph
    R_gt, t_gt = gt_relative(sc)
    E = len(vg)
    g = torch.Generator().manual_seed(0)
    axis = torch.nn.functional.normalize(torch.randn(E, 3, generator=g, dtype=torch.float64), dim=1)
    angle = torch.zeros(E, dtype=torch.float64)
    angle[E // 3: 2 * E // 3] = torch.deg2rad(torch.tensor(3.0))  # refined
    angle[2 * E // 3:] = torch.deg2rad(torch.tensor(60.0))  # hopeless: RANSAC
    vg.rel_quat = so3.matrix_to_quat(so3.exp(angle[:, None] * axis) @ so3.quat_to_matrix(vg.rel_quat))
    out, rep = estimate_relative_poses(rec, OPTS)
    ok = rep.status == PAIR_OK
    assert torch.equal(ok, vg.num_matches() >= MIN_INLIERS)  # every pair with enough matches
    rot, tra = errors(out, R_gt, t_gt)
    assert float(rot[ok].max()) < 0.05 and float(tra[ok].max()) < 0.05
    assert float(rot[ok & (angle > 0) & (angle < 1)].max()) < 1e-3  # refined to the truth
    assert rep.num_refined >= E // 3  # at least the exact ones skip RANSAC
    _, rep_r = estimate_relative_poses(rec, RelativePoseOptions(num_threads=2, progress=False, init="ransac"))
    assert rep_r.num_refined == 0 and torch.equal(rep_r.status == PAIR_OK, ok)
