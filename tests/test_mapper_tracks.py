import pytest
import torch

from torchsfm.mapper.tracks import TrackOptions, establish_tracks, select_tracks
from torchsfm.synthetic import SyntheticOptions, synthesize


def complete_scene(seed=0, **kw):
    """Every co-visible pair is in the view graph (min_pair_matches=1), so each true track is
    a clique of matches and must come back exactly."""
    o = dict(num_images=10, num_points=400, layout="ring", seed=seed, min_pair_matches=1)
    o.update(kw)
    return synthesize(SyntheticOptions(**o))


def gt_point_of_observation(sc, image, keypoint):
    gt = sc.gt
    flat_gt = gt.keypoints.flat_index(gt.tracks.image, gt.tracks.keypoint)
    lut = torch.full((len(gt.keypoints),), -1, dtype=torch.long, device=flat_gt.device)
    lut[flat_gt] = gt.tracks.point.long()
    return lut[gt.keypoints.flat_index(image, keypoint)]


def canonical(point, image, keypoint):
    """Tracks as a sorted list of sorted (image, keypoint) tuples: comparable across numberings."""
    key = image * 100000 + keypoint
    groups = {}
    for p, k in zip(point.tolist(), key.tolist()):
        groups.setdefault(p, []).append(k)
    return sorted(tuple(sorted(v)) for v in groups.values())


def test_noiseless_matches_reproduce_ground_truth_tracks(device):
    sc = complete_scene()
    rec = sc.mapper_input().to(device)
    out, rep = establish_tracks(rec, TrackOptions(min_track_length=2))
    gt = sc.gt.tracks
    assert rep.num_inconsistent == 0 and rep.num_duplicates_removed == 0
    assert rep.num_tracks == len(sc.gt.points3D)
    t = out.tracks
    assert canonical(t.point.cpu(), t.image.cpu(), t.keypoint.cpu()) == canonical(gt.point, gt.image, gt.keypoint)
    # Sorted by track, then image; points3D has one placeholder row per track.
    key = t.point * 10 + t.image
    assert bool((key[1:] > key[:-1]).all())
    assert len(out.points3D) == rep.num_tracks
    assert bool((out.points3D.error == -1).all())


@pytest.mark.parametrize("split_rounds", [2, 0])
def test_outlier_match_merging_two_tracks_is_cut_or_rejected(split_rounds):
    """The wrong match closes no triangle: it is cut and both tracks survive whole; with
    split_rounds=0 (GLOMAP) the merged component is dropped, losing both tracks."""
    sc = complete_scene(seed=1)
    rec = sc.mapper_input()
    vg, gt = rec.view_graph, sc.gt
    # Pick two true tracks A, B both seen in images i and j; add the wrong match A@i <-> B@j.
    e = 0
    i, j = vg.pairs[e].tolist()
    obs_i = gt.tracks.point[gt.tracks.image == i]
    obs_j = gt.tracks.point[gt.tracks.image == j]
    both = obs_i[torch.isin(obs_i, obs_j)]
    A, B = int(both[0]), int(both[1])
    kp = lambda p, im: int(gt.tracks.keypoint[(gt.tracks.point == p) & (gt.tracks.image == im)])  # noqa: E731
    assert float((gt.keypoints.of_image(j)[kp(A, j)] - gt.keypoints.of_image(j)[kp(B, j)]).norm()) > 10
    wrong = torch.tensor([[kp(A, i), kp(B, j)]])
    o0, o1 = int(vg.match_offsets[e]), int(vg.match_offsets[e + 1])
    vg.matches = torch.cat([vg.matches[:o1], wrong, vg.matches[o1:]])
    vg.match_offsets[e + 1:] += 1

    out, rep = establish_tracks(rec, TrackOptions(min_track_length=2, split_rounds=split_rounds))
    found = torch.unique(gt_point_of_observation(sc, out.tracks.image, out.tracks.keypoint))
    if split_rounds:
        assert rep.num_matches_cut == 1 and rep.num_inconsistent == 0
        assert rep.num_tracks == len(gt.points3D)
        assert found.numel() == len(gt.points3D)
        assert len(out.tracks) == len(gt.tracks)  # every observation kept
    else:
        assert rep.num_matches_cut == 0 and rep.num_inconsistent == 1
        assert rep.num_tracks == len(gt.points3D) - 2
        assert not bool(torch.isin(torch.tensor([A, B]), found).any())
        assert found.numel() == len(gt.points3D) - 2  # every other track intact and pure
    pure = gt_point_of_observation(sc, out.tracks.image, out.tracks.keypoint)
    per_track = torch.unique(torch.stack([out.tracks.point, pure], 1), dim=0)
    assert per_track.shape[0] == rep.num_tracks

    # With a permissive distance the merged track is kept, one observation per image.
    out2, rep2 = establish_tracks(rec, TrackOptions(min_track_length=2, max_keypoint_distance_px=1e9))
    assert rep2.num_inconsistent == 0 and rep2.num_duplicates_removed > 0
    assert rep2.num_tracks == len(gt.points3D) - 1
    k = out2.tracks.point * 10 + out2.tracks.image
    assert torch.unique(k).numel() == k.numel()


def test_length_limits():
    sc = complete_scene(seed=2)
    rec = sc.mapper_input()
    gt_len = torch.bincount(sc.gt.tracks.point)
    out, rep = establish_tracks(rec, TrackOptions(min_track_length=3, max_track_length=5))
    assert rep.num_too_short == int((gt_len < 3).sum())
    assert rep.num_too_long == int((gt_len > 5).sum())
    lengths = out.tracks.lengths(rep.num_tracks)
    assert int(lengths.min()) >= 3 and int(lengths.max()) <= 5
    assert rep.num_tracks == int(((gt_len >= 3) & (gt_len <= 5)).sum())


def test_cap_keeps_coverage_then_longest():
    sc = complete_scene(seed=3, num_images=12, num_points=600)
    rec = sc.mapper_input()
    full, _ = establish_tracks(rec, TrackOptions(min_track_length=2))
    out, rep = establish_tracks(rec, TrackOptions(min_track_length=2, max_num_tracks=40, min_tracks_per_image=3))
    assert rep.num_tracks == 40 and rep.num_capped == full.points3D.point3D_id.numel() - 40
    per_image = torch.bincount(out.tracks.image, minlength=12)
    assert int(per_image.min()) >= 3
    # The kept tracks are among the longest: none is shorter than the per-image minimum forces.
    L = out.tracks.lengths(40).float()
    assert float(L.mean()) > float(full.tracks.lengths(len(full.points3D)).float().mean())


def test_select_tracks_unit():
    # 4 tracks; image 1 only sees the short track 3, so coverage must keep it.
    track = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    image = torch.tensor([0, 2, 3, 0, 2, 0, 3, 1, 2])
    keep = select_tracks(track, image, 4, 4, max_num_tracks=2, min_tracks_per_image=1)
    assert keep.tolist() == [True, False, False, True]
