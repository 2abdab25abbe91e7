"""The first mapper stages chained as the global mapper runs them, on a synthetic scene."""
import torch

from test_mapper_scene import rotation_error_deg
from torchsfm.mapper.relative_pose import RelativePoseOptions, estimate_relative_poses
from torchsfm.mapper.rotation_averaging import rotation_averaging
from torchsfm.mapper.tracks import establish_tracks
from torchsfm.mapper.view_graph_calibration import CAM_FIXED_PRIOR, calibrate_view_graph
from torchsfm.synthetic import SyntheticOptions, synthesize


def snapshot(rec):
    vg = rec.view_graph
    return [t.clone() for t in (rec.cameras.params, rec.images.quat, rec.images.registered, vg.valid, vg.matches,
                                vg.match_offsets, vg.rel_quat, rec.tracks.point)] + [dict(rec.meta)]


def same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_calibration_relpose_rotations_tracks_chain():
    sc = synthesize(SyntheticOptions(num_images=15, num_points=1500, layout="ring", seed=7, outlier_ratio=0.2))
    rec = sc.mapper_input()
    before = snapshot(rec)

    rec1, rep1 = calibrate_view_graph(rec)
    assert bool((rep1.status == CAM_FIXED_PRIOR).all())  # synthetic cameras carry exact priors
    rec2, rep2 = estimate_relative_poses(rec1, RelativePoseOptions(num_threads=2, progress=False))
    rec3, rep3 = rotation_averaging(rec2)
    rec4, rep4 = establish_tracks(rec3)

    assert same(snapshot(rec), before), "a stage modified its input"
    assert bool(rec3.images.registered.all())
    # Exact inliers; the few wrong matches that fall inside the 1 px band bias some pairs slightly.
    assert float(rotation_error_deg(sc.gt.images.rotation, rec3.images.rotation).max()) < 0.25
    # Tracks come from relative-pose inliers only, so nearly all are pure; a wrong match that
    # happens to lie within 1 px of its epipolar line cannot be caught by two-view geometry.
    gt = sc.gt
    lut = torch.full((len(gt.keypoints),), -1, dtype=torch.long)
    lut[gt.keypoints.flat_index(gt.tracks.image, gt.tracks.keypoint)] = gt.tracks.point.long()
    true_point = lut[rec4.keypoints.flat_index(rec4.tracks.image, rec4.tracks.keypoint)]
    pure = torch.unique(torch.stack([rec4.tracks.point, true_point], 1), dim=0)
    assert pure.shape[0] - rep4.num_tracks < 0.02 * rep4.num_tracks
    assert rep4.num_tracks > 0.8 * int((torch.bincount(gt.tracks.point) >= 3).sum())
    assert bool(rec4.images.registered[rec4.tracks.image].all())
