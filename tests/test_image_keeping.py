"""Images kept that the data can hold (mapper/image_keeping.py): far cameras re-positioned from
their own observations, weak images completed from their matches, and every image that is still
dropped reported with its reason and counts."""
import pytest
import torch

from torchsfm import metrics
from torchsfm.data.model import Tracks
from torchsfm.mapper.image_keeping import (
    ImageKeepingOptions,
    complete_weak_images,
    keep_far_cameras,
    resect_translations,
)
from torchsfm.segments import first_per_key, segment_median
from torchsfm.mapper.pipeline import REASON_FEW_OBSERVATIONS, MapperOptions, global_mapping
from torchsfm.mapper.triangulation import reprojection_errors
from torchsfm.mapper.degeneracy import outlier_cameras
from torchsfm.synthetic import SyntheticOptions, synthesize


def _thrown_far(rec, i: int, factor: float = 100.0):
    """The model with camera i moved far outside the ring along its offset from the centroid."""
    out = rec.clone()
    c = out.images.centers
    c[i] = c[i] + factor * (c[i] - c.mean(0))
    out.images.trans = -(out.images.rotation @ c[..., None])[..., 0]
    return out


def test_segment_median():
    v = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 4.0])
    g = torch.tensor([0, 0, 0, 2, 2, 2])
    assert segment_median(v, g, 4).tolist() == [3.0, float("inf"), 4.0, float("inf")]
    assert first_per_key(torch.tensor([2, 1, 2, 1]), torch.tensor([0.5, 0.3, 0.1, 0.3])).tolist() == [
        False, True, True, False]


def test_resection_recovers_a_translation_from_the_points():
    s = synthesize(SyntheticOptions(num_images=10, num_points=600, pixel_noise=0.3, seed=2))
    rec = _thrown_far(s.gt, 4)
    t, ok = resect_translations(rec, torch.tensor([4, 7]))
    assert ok.tolist() == [True, True]
    scale = float(s.gt.images.centers.norm(dim=1).mean())
    assert float((t - s.gt.images.trans[[4, 7]]).norm(dim=1).max()) < 1e-2 * scale


def test_a_far_camera_that_its_observations_place_is_kept():
    s = synthesize(SyntheticOptions(num_images=10, num_points=600, pixel_noise=0.3, seed=2))
    rec = _thrown_far(s.gt, 4)
    far = outlier_cameras(rec)
    assert far.tolist() == [i == 4 for i in range(10)]
    out, bad, counts = keep_far_cameras(rec, far, ImageKeepingOptions())
    assert not bool(bad.any()) and counts["kept_after_resection"] == 1
    assert torch.allclose(out.images.centers[4], s.gt.images.centers[4], atol=0.05)
    assert torch.equal(out.images.trans[:4], rec.images.trans[:4])  # the others untouched


def test_a_far_camera_that_no_position_explains_is_still_dropped():
    s = synthesize(SyntheticOptions(num_images=10, num_points=600, pixel_noise=0.3, seed=2))
    rec = _thrown_far(s.gt, 4)
    kp = rec.keypoints
    a, b = int(kp.offsets[4]), int(kp.offsets[5])
    g = torch.Generator().manual_seed(0)
    kp.xy[a:b] = torch.rand(b - a, 2, generator=g, dtype=kp.xy.dtype) * torch.tensor([640.0, 480.0], dtype=kp.xy.dtype)
    out, bad, counts = keep_far_cameras(rec, outlier_cameras(rec), ImageKeepingOptions())
    assert bad.tolist() == [i == 4 for i in range(10)] and counts["kept_after_resection"] == 0
    assert counts["resection_error_px"]["image00004.png"] > counts["resection_error_limit_px"]


def test_a_weak_image_gets_back_what_its_matches_support():
    s = synthesize(SyntheticOptions(num_images=8, num_points=400, pixel_noise=0.3, seed=4))
    rec = s.gt.clone()
    rec.view_graph = s.view_graph.clone()
    tr = rec.tracks
    obs0 = torch.nonzero(tr.image == 0)[:, 0]
    keep = torch.ones(len(tr), dtype=torch.bool)
    keep[obs0[5:]] = False  # image 0 keeps 5 of its observations
    rec.tracks = Tracks(tr.point[keep], tr.image[keep], tr.keypoint[keep])
    weak = torch.zeros(8, dtype=torch.bool)
    weak[0] = True
    out, counts = complete_weak_images(rec, weak, ImageKeepingOptions())
    c = counts["image00000.png"]
    assert c["observations_before"] == 5 and c["joined_existing_points"] > 50
    t = out.tracks
    assert int((t.image == 0).sum()) == 5 + c["joined_existing_points"] + c["new_two_view_points"]
    assert bool((t.point[1:] >= t.point[:-1]).all())  # still sorted by point
    key = t.point * 8 + t.image
    assert torch.unique(key).numel() == key.numel()  # a point is seen once per image
    flat = out.keypoints.flat_index(t.image, t.keypoint)
    assert torch.unique(flat).numel() == flat.numel()  # a keypoint observes one point
    err, front = reprojection_errors(out, out.points3D.xyz, t)
    assert bool(front.all()) and float(err[t.image == 0].max()) <= ImageKeepingOptions().max_reprojection_error
    # the GT points the completion found are the right ones: each added keypoint saw that point
    added = (t.image == 0) & ~torch.isin(flat, rec.keypoints.flat_index(rec.tracks.image, rec.tracks.keypoint))
    assert float(err[added].max()) < 2.0


def test_two_weak_images_matched_to_each_other_share_no_keypoint():
    """Images 0 and 1, both weak, matched to each other: their matches are looked at in both
    orientations, yet each keypoint ends in one point (a keypoint in two points is a model that
    COLMAP refuses to read: "point2D.point3D_id == point3D_id")."""
    s = synthesize(SyntheticOptions(num_images=8, num_points=400, pixel_noise=0.3, seed=4))
    rec = s.gt.clone()
    rec.view_graph = s.view_graph.clone()
    tr = rec.tracks
    keep = torch.ones(len(tr), dtype=torch.bool)
    for i in (0, 1):
        keep[torch.nonzero(tr.image == i)[:, 0][5:]] = False
    keep &= ~torch.isin(tr.point, tr.point[tr.image >= 2].unique()[::2])  # free keypoints elsewhere too
    rec.tracks = Tracks(tr.point[keep], tr.image[keep], tr.keypoint[keep])
    weak = torch.zeros(8, dtype=torch.bool)
    weak[:2] = True
    out, counts = complete_weak_images(rec, weak, ImageKeepingOptions())
    assert counts["image00000.png"]["new_two_view_points"] > 20
    t = out.tracks
    flat = out.keypoints.flat_index(t.image, t.keypoint)
    assert torch.unique(flat).numel() == flat.numel()


def _weaken(s, image: int, keep_pairs: int, keep_matches: int, noise: float = 0.0):
    """Mapper input where `image` keeps `keep_matches` matches to its first `keep_pairs` partners,
    its keypoints with `noise` px more noise (a blurred photo)."""
    rec = s.mapper_input()
    kp = rec.keypoints
    a, b = int(kp.offsets[image]), int(kp.offsets[image + 1])
    g = torch.Generator().manual_seed(1)
    kp.xy[a:b] += noise * torch.randn(b - a, 2, generator=g, dtype=kp.xy.dtype)
    vg = rec.view_graph
    pm = vg.pair_of_match()
    touches = (vg.pairs[:, 0] == image) | (vg.pairs[:, 1] == image)
    rank = torch.cumsum(touches.long(), 0) - 1
    keep_pair = ~touches | (rank < keep_pairs)
    first = vg.match_offsets[:-1][pm]
    keep = keep_pair[pm] & (~touches[pm] | (torch.arange(pm.numel()) - first < keep_matches))
    counts = torch.bincount(pm[keep], minlength=len(vg))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    rec.view_graph = type(vg)(vg.pairs, vg.config, vg.F, vg.E, vg.H, vg.rel_quat, vg.rel_trans, vg.matches[keep],
                              offsets, vg.valid & keep_pair & (counts > 0))
    return rec


def test_a_weak_image_is_kept_or_dropped_with_its_counts():
    """A blurred photo (2.5-4 px keypoint noise) matched to few neighbours: the last filtering
    leaves it a few observations. Matched with 30 keypoints to two neighbours, completing its
    tracks from its matches keeps it (its pose is as good as such keypoints allow: a few degrees);
    with 40 noisier matches to one neighbour it stays short and is dropped with its counts. Every
    unregistered image has a reason."""
    s = synthesize(SyntheticOptions(num_images=12, num_points=600, pixel_noise=0.3, seed=5))
    need = MapperOptions().degeneracy.min_camera_observations
    for pairs, keep_matches, noise, kept in ((2, 30, 2.5, True), (1, 40, 4.0, False)):
        models, rep = global_mapping(_weaken(s, 5, pairs, keep_matches, noise), MapperOptions())
        m = models[0]
        assert all(d["reason"] for d in rep.skipped)
        stage = next(st for st in rep.stages if st.name == "image_keeping")
        c = stage.counts["images"]["image00005.png"]
        assert c["observations_before"] < need and c["matches_to_registered"] > 10
        assert bool(m.images.registered[5]) == kept
        if kept:
            assert c["joined_existing_points"] + c["new_two_view_points"] > 0 and c["observations_after"] >= need
            assert int((m.tracks.image == 5).sum()) >= need
            ev = metrics.relative_pose_errors(m.images.rotation, m.images.trans, m.images.registered,
                                              s.gt.images.rotation, s.gt.images.trans)
            i, j = metrics.pair_indices(12).unbind(-1)
            with5 = (i == 5) | (j == 5)
            assert float(ev.rotation[with5].max()) < 5.0 and float(ev.rotation[~with5].max()) < 0.5
        else:
            d = next(d for d in rep.skipped if d["image"] == "image00005.png")
            assert d["reason"] == REASON_FEW_OBSERVATIONS
            assert d["detail"]["observations"] == c["observations_after"] < need
            assert d["detail"]["matches_to_registered"] == c["matches_to_registered"]


def test_split_tracks_that_one_point_explains_are_merged():
    """A track cut in two (as an eager cut of a weak match leaves it) is merged back; points
    joined only by wrong matches (20 % of the matches) are not."""
    from torchsfm.mapper.track_merging import _candidates, merge_tracks

    s = synthesize(SyntheticOptions(num_images=8, num_points=300, pixel_noise=0.3, outlier_ratio=0.2, seed=6))
    rec = s.gt.clone()
    rec.view_graph = s.view_graph.clone()
    t = rec.tracks
    length = torch.bincount(t.point)
    p = int(torch.argmax(length))  # the longest track: its first two observations become a new point
    obs = torch.nonzero(t.point == p)[:, 0]
    point = t.point.clone()
    point[obs[:2]] = len(rec.points3D)
    order = torch.argsort(point, stable=True)
    rec.tracks = Tracks(point[order], t.image[order], t.keypoint[order])
    pts = rec.points3D
    rec.points3D = type(pts)(torch.cat([pts.point3D_id, pts.point3D_id[-1:] + 1]), torch.cat([pts.xyz, pts.xyz[p:p + 1]]),
                             torch.cat([pts.rgb, pts.rgb[p:p + 1]]), torch.cat([pts.error, pts.error[p:p + 1]]))
    cand = _candidates(rec)
    assert cand.shape[0] > 10  # the split pair and pairs joined by wrong matches
    import torchsfm.runtime.chunks as chunks

    with pytest.MonkeyPatch.context() as mp:  # read in many ranges of pairs: the same candidates
        mp.setattr(chunks, "CPU_CHUNK_ROWS", 40)
        assert len(rec.view_graph.chunks(40)) > 5
        assert torch.equal(_candidates(rec), cand)
    out, counts = merge_tracks(rec)
    assert counts["points_merged"] == 1 and len(out.points3D) == len(s.gt.points3D)
    assert torch.equal(torch.sort(torch.bincount(out.tracks.point)).values, torch.sort(length).values)
    err, _ = reprojection_errors(out, out.points3D.xyz, out.tracks)
    assert float(err.max()) < 4.0
    again, c2 = merge_tracks(out)
    assert c2["points_merged"] == 0 and len(again.points3D) == len(out.points3D)
