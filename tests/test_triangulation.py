import math
import pytest
import torch

from torchsfm.data.model import Tracks
from torchsfm.mapper.triangulation import (
    FilterOptions,
    TriangulationOptions,
    filter_reconstruction,
    max_triangulation_angle,
    track_observation_pairs,
    triangulate_tracks,
)
from torchsfm.synthetic import SyntheticOptions, synthesize


def _scene(noise=0.0, device="cpu"):
    s = synthesize(SyntheticOptions(num_images=10, num_points=300, layout="ring", pixel_noise=noise, seed=3))
    return s.gt.to(device)


def test_pairs_enumerate_every_unordered_pair():
    obs_track = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    a, b = track_observation_pairs(obs_track, 3)
    got = sorted(zip(a.tolist(), b.tolist()))
    want = [(0, 1), (0, 2), (1, 2)] + [(i, j) for i in range(4, 8) for j in range(i + 1, 8)]
    assert got == sorted(want)


def test_noiseless_triangulation_recovers_points(device):
    gt = _scene(device=device)
    rec, counts = triangulate_tracks(gt, gt.tracks, TriangulationOptions(min_triangulation_angle=0.0))
    assert counts["observations_rejected"] == 0
    # points are renumbered densely in track order; all tracks survive here
    assert len(rec.points3D) == len(gt.points3D)
    assert torch.allclose(rec.points3D.xyz, gt.points3D.xyz, atol=1e-7)


def test_outlier_observation_is_rejected_and_point_kept(device):
    gt = _scene(noise=0.5, device=device)
    kp = gt.keypoints.clone()
    # corrupt one observation of a long track by 50 px
    lengths = gt.tracks.lengths(len(gt.points3D))
    p = int(torch.argmax(lengths))
    o = int(torch.nonzero(gt.tracks.point == p)[0])
    flat = gt.keypoints.flat_index(gt.tracks.image[o : o + 1], gt.tracks.keypoint[o : o + 1])
    kp.xy[flat] += 50.0
    bad = gt.clone()
    bad.keypoints = kp
    rec, counts = triangulate_tracks(bad, bad.tracks, TriangulationOptions(max_reprojection_error=4.0))
    assert counts["observations_rejected"] >= 1
    # the corrupted point (new point ids are track id + 1) is still recovered close to the truth
    row = int(torch.nonzero(rec.points3D.point3D_id == p + 1)[0])
    assert torch.linalg.norm(rec.points3D.xyz[row] - gt.points3D.xyz[p]) < 0.01


def test_triangulation_angle_known_answer():
    centers = torch.tensor([[-1.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]], dtype=torch.float64)
    xyz = torch.tensor([[0.0, 0, 1.0]], dtype=torch.float64)
    ang = max_triangulation_angle(centers, xyz, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]), 1)
    assert ang.item() == pytest.approx(90.0, abs=1e-9)


@pytest.mark.parametrize("thr", [0.5, 1.5, 5.0])
def test_has_triangulation_angle_matches_all_pairs(thr):
    # tracks of 1-40 rays whose angles straddle the threshold: the [m, 2m] bound plus the exact
    # pass on the undecided tracks must give exactly the all-pairs answer
    from torchsfm.mapper.triangulation import has_triangulation_angle

    g = torch.Generator().manual_seed(3)
    T = 400
    lengths = torch.randint(0, 41, (T,), generator=g)
    track = torch.repeat_interleave(torch.arange(T), lengths)
    centers = torch.randn(int(lengths.sum()), 3, generator=g, dtype=torch.float64)
    spread = torch.rand(T, generator=g, dtype=torch.float64) * math.radians(thr)  # max angles ~0-4x thr
    centers *= spread[track, None]
    xyz = torch.zeros(T, 3, dtype=torch.float64)
    xyz[:, 2] = 1.0
    image = torch.arange(track.numel())
    exact = max_triangulation_angle(centers, xyz, image, track, T) >= thr
    fast = has_triangulation_angle(centers, xyz, image, track, T, thr)
    assert torch.equal(fast, exact)
    assert 40 < int(exact.sum()) < T - 40  # both answers occur


def test_filter_drops_bad_observations_and_low_angle_points(device):
    gt = _scene(device=device)
    rec = gt.clone()
    rec.points3D.xyz[0] += 10.0  # reprojects far off in every image
    out, counts = filter_reconstruction(rec, FilterOptions(max_reprojection_error=2.0, min_triangulation_angle=0.5))
    assert counts["points_removed"] >= 1
    assert len(out.points3D) == len(gt.points3D) - counts["points_removed"]
    assert float(out.points3D.error.max()) < 1e-6
    assert not torch.any(out.points3D.point3D_id == gt.points3D.point3D_id[0])


def test_nan_ray_flags_only_its_track():
    from torchsfm.mapper.triangulation import triangulate

    R = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone()
    t = torch.tensor([[0.0, 0, 0], [-1.0, 0, 0]], dtype=torch.float64)
    X = torch.tensor([[0.2, 0.1, 4.0], [-0.3, 0.2, 5.0]], dtype=torch.float64)
    img = torch.tensor([0, 1, 0, 1])
    trk = torch.tensor([0, 0, 1, 1])
    pc = X[trk] + t[img]
    rays = pc / pc.norm(dim=1, keepdim=True)
    rays[2] = float("nan")
    out, ok = triangulate(R, t, rays, img, trk, 2)
    assert ok.tolist() == [True, False]
    assert torch.allclose(out[0], X[0], atol=1e-10)


def test_noise_capped_threshold_estimates_sigma_from_fitted_tracks():
    # residuals of points fitted to tracks of L views: Gaussian of sigma 0.3 px, shrunk by the
    # 3 of 2L coordinates the point absorbs; the threshold is 4 sigma, floored and capped
    from torchsfm.mapper.triangulation import reprojection_threshold

    g = torch.Generator().manual_seed(0)
    L = torch.tensor([2] * 3000 + [3] * 2000 + [10] * 500)  # mostly short tracks, as on real images
    point = torch.repeat_interleave(torch.arange(L.numel()), L)
    shrink = ((2 * L[point] - 3) / (2 * L[point])).sqrt().to(torch.float64)
    err = (torch.randn(point.numel(), 2, generator=g, dtype=torch.float64) * 0.3).norm(dim=1) * shrink
    err[::97] = float("inf")  # behind the camera: ignored
    opt = FilterOptions(max_reprojection_error=2.0, noise_sigmas=4.0, min_reprojection_error=0.5)
    assert reprojection_threshold(err, point, L.numel(), opt) == pytest.approx(1.2, rel=0.04)
    assert reprojection_threshold(err * 3, point, L.numel(), opt) == 2.0  # capped at the fixed threshold
    assert reprojection_threshold(err * 1e-6, point, L.numel(), opt) == 0.5  # noiseless: the floor
    fixed = FilterOptions(max_reprojection_error=2.0)  # noise_sigmas 0: the fixed threshold
    assert reprojection_threshold(err, point, L.numel(), fixed) == 2.0


@pytest.mark.parametrize("split_rounds", [0, 2])
def test_track_joining_two_points_is_split(device, split_rounds):
    # a wrong match joins the tracks of two points seen by disjoint images (no image holds two of
    # its keypoints, so building tracks cannot see it): split, both points come back; without
    # the split the whole merged track is lost
    gt = _scene(noise=0.3, device=device)
    P = len(gt.points3D)
    imgs = [set(gt.tracks.image[gt.tracks.point == p].tolist()) for p in range(P)]
    pa, pb = next((a, b) for a in range(P) for b in range(a + 1, P)
                  if len(imgs[a]) >= 4 and len(imgs[b]) >= 4 and not imgs[a] & imgs[b])
    point = gt.tracks.point.clone()
    point[point == pb] = pa  # one track id for both
    merged = Tracks(point, gt.tracks.image, gt.tracks.keypoint)
    rec, counts = triangulate_tracks(gt, merged, TriangulationOptions(split_rounds=split_rounds))  # 2: default
    # new point ids are track id + 1; a split-off track gets a new id beyond the input's
    dist = torch.cdist(gt.points3D.xyz[[pa, pb]], rec.points3D.xyz).min(1).values
    if split_rounds:
        assert counts["tracks_split"] == 1
        assert float(dist.max()) < 0.01  # both points, each from its own observations
        assert len(rec.points3D) == P - 1 + 1
    else:
        assert float(dist.min()) > 0.01  # the merged track fits neither point: lost


def test_chunked_triangulation_and_errors_equal_whole(monkeypatch):
    """Bearings, triangulation and reprojection errors run in row chunks on the CPU: the same
    model as in one piece."""
    import torchsfm.runtime.chunks as chunks
    from torchsfm.mapper.triangulation import bearings, reprojection_errors

    gt = _scene(noise=0.5)
    opt = TriangulationOptions()
    rec, counts = triangulate_tracks(gt, gt.tracks, opt)
    err, front = reprojection_errors(gt, gt.points3D.xyz, gt.tracks)
    rays = bearings(gt, gt.tracks.image, gt.tracks.keypoint)
    monkeypatch.setattr(chunks, "CPU_CHUNK_ROWS", 13)
    rec2, counts2 = triangulate_tracks(gt, gt.tracks, opt)
    assert counts2 == counts
    torch.testing.assert_close(rec2.points3D.xyz, rec.points3D.xyz, rtol=0, atol=1e-10)
    err2, front2 = reprojection_errors(gt, gt.points3D.xyz, gt.tracks)
    torch.testing.assert_close(err2, err, rtol=0, atol=1e-10)
    assert torch.equal(front2, front)
    torch.testing.assert_close(bearings(gt, gt.tracks.image, gt.tracks.keypoint), rays, rtol=0, atol=1e-14)


def test_unprojected_keypoints_cover_the_matched_keypoints_only(monkeypatch):
    """The keypoint table a chunked stage builds once (reading the matches in ranges of pairs):
    keypoints matched in the chosen pairs unprojected, the rest NaN; matches gathered from it
    equal those computed on their own."""
    import torchsfm.runtime.chunks as chunks
    from torchsfm.mapper.triangulation import normalized_matches, unprojected_keypoints

    rec = synthesize(SyntheticOptions(num_images=8, num_points=200, layout="ring", seed=5)).mapper_input()
    vg = rec.view_graph
    pairs = torch.arange(len(vg)) < len(vg) // 2
    monkeypatch.setattr(chunks, "CPU_CHUNK_ROWS", 50)  # many ranges of pairs
    assert len(vg.chunks(50)) > 5
    table = unprojected_keypoints(rec, pairs)
    kp = rec.keypoints
    select = pairs[vg.pair_of_match()]
    m, pm = vg.matches[select], vg.pair_of_match()[select]
    used = torch.zeros(len(kp), dtype=torch.bool)
    for side in (0, 1):
        used[kp.offsets[vg.pairs[pm, side]] + m[:, side]] = True
    assert torch.isfinite(table[used]).all() and torch.isnan(table[~used]).all()
    assert (~used).any()
    for a, b in zip(normalized_matches(rec, select, table), normalized_matches(rec, select)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
