"""The synthetic scene generator: geometry, noise, outliers, seeds, layouts, and COLMAP interop."""
from __future__ import annotations

import math

import numpy as np
import pycolmap
import pytest
import torch

from torchsfm.cameras.projection import project_world
from torchsfm.data.model import TWO_VIEW_CALIBRATED, TWO_VIEW_UNCALIBRATED
from torchsfm.geometry import se3, so3
from torchsfm.io.colmap_model import from_pycolmap, to_pycolmap
from torchsfm.synthetic import LAYOUTS, SyntheticOptions, synthesize, write_synthetic_database


def reprojection(scene):
    gt = scene.gt
    tr = gt.tracks
    proj = project_world(gt.cameras, gt.images.camera[tr.image], gt.images.quat[tr.image], gt.images.trans[tr.image],
                         gt.points3D.xyz[tr.point])
    return proj, gt.observation_xy()


def point_of_keypoint(gt):
    """Point row of every flat keypoint (the generator gives each keypoint exactly one point)."""
    flat = gt.keypoints.flat_index(gt.tracks.image, gt.tracks.keypoint)
    out = torch.full((len(gt.keypoints),), -1, dtype=torch.long, device=gt.device)
    out[flat] = gt.tracks.point.long()
    return out


def match_points(scene):
    """Point rows observed by the two keypoints of every match (M, 2)."""
    gt, vg = scene.gt, scene.view_graph
    pk = point_of_keypoint(gt)
    pm = vg.pair_of_match()
    fi = gt.keypoints.flat_index(vg.pairs[pm, 0], vg.matches[:, 0])
    fj = gt.keypoints.flat_index(vg.pairs[pm, 1], vg.matches[:, 1])
    return torch.stack([pk[fi], pk[fj]], -1)


def test_noiseless_keypoints_are_exact_projections(device):
    scene = synthesize(SyntheticOptions(num_images=8, num_points=200, seed=3), device=device)
    proj, xy = reprojection(scene)
    assert bool(proj.valid.all())
    assert float((proj.uv - xy).abs().max()) < 1e-9
    assert float(scene.gt.points3D.error.abs().max()) < 1e-9
    # Independent check through pycolmap's own projection (COLMAP's camera model code).
    rec = to_pycolmap(scene.gt.to("cpu"))
    gt = scene.gt.to("cpu")
    for k in range(0, len(gt.tracks), 41):
        img = rec.images[int(gt.images.image_id[gt.tracks.image[k]])]
        uv = img.project_point(gt.points3D.xyz[gt.tracks.point[k]].numpy())
        np.testing.assert_allclose(uv, xy[k].cpu().numpy(), atol=1e-8)


def test_pixel_noise_has_the_requested_std():
    scene = synthesize(SyntheticOptions(num_images=12, num_points=600, pixel_noise=0.7, seed=1))
    proj, xy = reprojection(scene)
    res = (xy - proj.uv).flatten()
    assert res.numel() > 4000
    assert abs(float(res.mean())) < 0.05
    assert abs(float(res.std()) - 0.7) < 0.035  # ~4 standard errors of the estimate
    # The stored per-point error is the mean reprojection error of its track.
    err = torch.zeros(len(scene.gt.points3D), dtype=torch.float64).index_add_(
        0, scene.gt.tracks.point, (xy - proj.uv).norm(dim=-1))
    err /= scene.gt.tracks.lengths(len(scene.gt.points3D))
    assert torch.allclose(err, scene.gt.points3D.error)


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_outlier_ratio(ratio):
    scene = synthesize(SyntheticOptions(num_images=10, num_points=300, outlier_ratio=ratio, seed=2))
    vg = scene.view_graph
    mp = match_points(scene)
    same = mp[:, 0] == mp[:, 1]
    assert torch.equal(~same, scene.is_outlier)  # inliers join one point's observations, outliers do not
    per_pair_out = torch.bincount(vg.pair_of_match(), weights=scene.is_outlier.double(), minlength=len(vg))
    n = vg.num_matches().double()
    n_in = n - per_pair_out
    assert torch.equal(per_pair_out, torch.round(n_in * ratio / (1 - ratio)))
    assert abs(float(per_pair_out.sum() / n.sum()) - ratio) < 0.01
    # Inlier matches are exactly the co-observed points of the pair.
    pm = vg.pair_of_match()
    for e in range(0, len(vg), 7):
        i, j = vg.pairs[e].tolist()
        pts_i = set(scene.gt.tracks.point[scene.gt.tracks.image == i].tolist())
        pts_j = set(scene.gt.tracks.point[scene.gt.tracks.image == j].tolist())
        assert int(n_in[e]) == len(pts_i & pts_j)
        assert set(mp[(pm == e) & same, 0].tolist()) == pts_i & pts_j
    # No match is repeated.
    key = torch.cat([pm[:, None], vg.matches], 1)
    assert torch.unique(key, dim=0).shape[0] == key.shape[0]


def test_seeds_are_stable():
    o = SyntheticOptions(num_images=6, num_points=150, pixel_noise=0.5, outlier_ratio=0.2, seed=7)
    a, b = synthesize(o), synthesize(SyntheticOptions(**vars(o)))
    for name in ("quat", "trans"):
        assert torch.equal(getattr(a.gt.images, name), getattr(b.gt.images, name))
    assert torch.equal(a.gt.points3D.xyz, b.gt.points3D.xyz)
    assert torch.equal(a.gt.keypoints.xy, b.gt.keypoints.xy)
    assert torch.equal(a.view_graph.matches, b.view_graph.matches)
    assert torch.equal(a.view_graph.pairs, b.view_graph.pairs)
    c = synthesize(SyntheticOptions(**{**vars(o), "seed": 8}))
    assert not torch.equal(a.gt.points3D.xyz, c.gt.points3D.xyz)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_geometry_is_valid(layout):
    # a loop needs enough images to close (0.6 units per image); the others are small on purpose
    n, p = (150, 3000) if layout == "loop" else (12, 300)
    o = SyntheticOptions(num_images=n, num_points=p, layout=layout, seed=5, loop_laps=2)
    scene = synthesize(o)
    gt, vg = scene.gt, scene.view_graph
    proj, xy = reprojection(scene)
    # In front of and inside every image that observes it.
    assert float(proj.p_cam[:, 2].min()) > 0
    W = gt.cameras.width[gt.images.camera[gt.tracks.image]]
    H = gt.cameras.height[gt.images.camera[gt.tracks.image]]
    assert bool(((proj.uv >= 0) & (proj.uv <= torch.stack([W, H], -1))).all())
    # Enough points per image, at least two views per point, ids and counts consistent.
    assert int(gt.keypoints.count().min()) >= o.min_pair_matches
    assert int(gt.tracks.lengths(len(gt.points3D)).min()) >= 2
    assert len(gt.points3D) == o.num_points and bool(gt.images.registered.all())
    assert torch.equal(gt.keypoints.count(), torch.bincount(gt.tracks.image, minlength=o.num_images))
    # Tracks sorted by point; each image observes a point once.
    assert bool((gt.tracks.point[1:] >= gt.tracks.point[:-1]).all())
    key = gt.tracks.point * o.num_images + gt.tracks.image
    assert torch.unique(key).numel() == key.numel()
    # View graph: i < j, connected (every image in a pair), configs and GT relative poses.
    assert bool((vg.pairs[:, 0] < vg.pairs[:, 1]).all())
    assert torch.unique(vg.pairs).numel() == o.num_images
    assert int(vg.num_matches().min()) >= o.min_pair_matches
    assert bool((vg.config == TWO_VIEW_CALIBRATED).all())
    Ri, Rj = gt.images.rotation[vg.pairs[:, 0]], gt.images.rotation[vg.pairs[:, 1]]
    R_rel, t_rel = se3.relative(Ri, gt.images.trans[vg.pairs[:, 0]], Rj, gt.images.trans[vg.pairs[:, 1]])
    assert torch.allclose(so3.quat_to_matrix(vg.rel_quat), R_rel, atol=1e-12)
    assert torch.allclose(vg.rel_trans, t_rel, atol=1e-12)


def test_layout_shapes():
    ring = synthesize(SyntheticOptions(num_images=12, num_points=300, layout="ring")).gt.images.centers
    r = ring[:, [0, 2]].norm(dim=-1)
    assert float(ring[:, 1].abs().max()) < 0.35 and float((r - 4.5).abs().max()) < 0.25  # a horizontal circle
    fwd = synthesize(SyntheticOptions(num_images=12, num_points=200, layout="forward"))
    c = fwd.gt.images.centers
    assert bool((c[1:, 2] > c[:-1, 2]).all())  # moving along +z
    axis = fwd.gt.images.rotation[:, 2]  # optical axes in world coordinates
    assert float(axis[:, 2].min()) > math.cos(math.radians(10))
    sph = synthesize(SyntheticOptions(num_images=12, num_points=300, layout="sphere")).gt.images
    view_dir = sph.rotation[:, 2]
    to_centre = torch.nn.functional.normalize(-sph.centers, dim=-1)
    assert float((view_dir * to_centre).sum(-1).min()) > math.cos(math.radians(5))


def test_match_graphs():
    base = dict(num_images=14, num_points=300, layout="forward", seed=4)
    ex = synthesize(SyntheticOptions(**base, match_graph="exhaustive")).view_graph
    seq = synthesize(SyntheticOptions(**base, match_graph="sequential", sequential_overlap=3)).view_graph
    sp = synthesize(SyntheticOptions(**base, match_graph="sparse", sparse_ratio=0.3)).view_graph
    assert int((seq.pairs[:, 1] - seq.pairs[:, 0]).max()) <= 3
    ex_keys = set(map(tuple, ex.pairs.tolist()))
    assert set(map(tuple, seq.pairs.tolist())) <= ex_keys
    assert set(map(tuple, sp.pairs.tolist())) < ex_keys and len(sp) < 0.7 * len(ex)
    assert torch.unique(sp.pairs).numel() == 14
    # retrieval: every image keeps the 3 pairs sharing the most matches (its own top 3)
    rt = synthesize(SyntheticOptions(**base, match_graph="retrieval", retrieval_neighbors=3)).view_graph
    rt_keys = set(map(tuple, rt.pairs.tolist()))
    assert rt_keys <= ex_keys and len(rt) < len(ex)
    n_ex = dict(zip(map(tuple, ex.pairs.tolist()), ex.num_matches().tolist()))
    for i in range(14):
        mine = {k: n for k, n in n_ex.items() if i in k}
        third = sorted(mine.values(), reverse=True)[:3][-1]
        assert all(k in rt_keys for k, n in mine.items() if n > third)  # ties at the third may go either way
        assert sum(k in rt_keys for k, n in mine.items() if n >= third) >= min(3, len(mine))


def test_loop_layout_is_unordered_and_closes_loops():
    o = SyntheticOptions(num_images=300, num_points=4000, layout="loop", loop_laps=3, match_graph="retrieval",
                         retrieval_neighbors=10, seed=2)
    scene = synthesize(o)
    c, vg = scene.gt.images.centers, scene.view_graph
    # the images are in random order: successive ids are far apart, not one 0.6 step
    assert float((c[1:] - c[:-1]).norm(dim=1).median()) > 5
    # each lap drives its own lane (radial offsets 0.4 apart): pairs across lanes are loop closures
    lane = torch.round((c[:, [0, 2]].norm(dim=1) - c[:, [0, 2]].norm(dim=1).mean()) / 0.4)
    lane = lane.clamp(-1, 1)  # lane noise (0.1) sometimes crosses the half spacing
    across = lane[vg.pairs[:, 0]] != lane[vg.pairs[:, 1]]
    assert float(across.double().mean()) > 0.3
    assert float((c[vg.pairs[:, 0]] - c[vg.pairs[:, 1]]).norm(dim=1).max()) < 20  # only near images match
    deg = torch.bincount(vg.pairs.reshape(-1), minlength=300)
    assert int(deg.min()) >= 10 and len(vg) <= 300 * 10


def test_epipolar_geometry_of_pinhole_scene():
    scene = synthesize(SyntheticOptions(num_images=6, num_points=200, camera_model="PINHOLE", seed=9))
    vg, kp = scene.view_graph, scene.gt.keypoints
    pm = vg.pair_of_match()
    h = lambda x: torch.cat([x, torch.ones_like(x[:, :1])], -1)  # noqa: E731
    xi = h(kp.xy[kp.flat_index(vg.pairs[pm, 0], vg.matches[:, 0])])
    xj = h(kp.xy[kp.flat_index(vg.pairs[pm, 1], vg.matches[:, 1])])
    line = (vg.F[pm] @ xi[..., None])[..., 0]
    dist = (xj * line).sum(-1).abs() / line[:, :2].norm(dim=-1)  # pixel distance to the epipolar line
    assert float(dist.max()) < 1e-6
    assert torch.allclose(vg.F.flatten(1).norm(dim=-1), torch.ones(len(vg), dtype=torch.float64))


def test_cameras_per_image_and_uncalibrated():
    o = SyntheticOptions(num_images=6, num_points=150, num_cameras=6, focal_jitter=0.1, has_prior_focal_length=False,
                         camera_model="OPENCV")
    scene = synthesize(o)
    cams = scene.gt.cameras
    assert len(cams) == 6 and torch.equal(scene.gt.images.camera, torch.arange(6))
    assert torch.unique(cams.params[:, 0]).numel() == 6
    assert torch.allclose(cams.params[:, 4:8], torch.tensor([-0.02, 0.005, 0.0005, -0.0005], dtype=torch.float64))
    assert bool((scene.view_graph.config == TWO_VIEW_UNCALIBRATED).all())
    proj, xy = reprojection(scene)
    assert float((proj.uv - xy).abs().max()) < 1e-9
    shared = synthesize(SyntheticOptions(num_images=6, num_points=150, num_cameras=2))
    assert shared.gt.images.camera.tolist() == [0, 0, 0, 1, 1, 1]


def test_device_and_dtype_follow_the_request(device):
    cpu = synthesize(SyntheticOptions(num_images=5, num_points=100, seed=11))
    dev = synthesize(SyntheticOptions(num_images=5, num_points=100, seed=11), device=device, dtype=torch.float32)
    assert dev.gt.device.type == device.type and dev.gt.dtype == torch.float32
    assert dev.view_graph.F.dtype == torch.float32 and dev.view_graph.matches.dtype == torch.int32
    assert torch.equal(dev.view_graph.matches.cpu(), cpu.view_graph.matches)
    assert torch.allclose(dev.gt.keypoints.xy.cpu().double(), cpu.gt.keypoints.xy, atol=1e-3)


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="layout"):
        synthesize(SyntheticOptions(layout="spiral"))
    with pytest.raises(ValueError, match="num_cameras"):
        synthesize(SyntheticOptions(num_images=3, num_cameras=4))
    with pytest.raises(ValueError, match="distortion"):
        synthesize(SyntheticOptions(camera_model="PINHOLE", distortion=(0.1,)))
    with pytest.raises(ValueError, match="sees only"):
        synthesize(SyntheticOptions(num_images=20, num_points=20))


def test_mapper_input_has_no_answers():
    scene = synthesize(SyntheticOptions(num_images=5, num_points=100))
    inp = scene.mapper_input()
    assert not bool(inp.images.registered.any()) and len(inp.points3D) == 0 and len(inp.tracks) == 0
    assert torch.equal(inp.keypoints.xy, scene.gt.keypoints.xy) and inp.view_graph is not scene.view_graph
    assert torch.equal(inp.view_graph.matches, scene.view_graph.matches)


def _relative_rotation_errors_deg(gt, rec) -> torch.Tensor:
    """Gauge-free comparison: angles between true and estimated relative rotations of all pairs."""
    est = from_pycolmap(rec)
    assert torch.equal(est.images.image_id, gt.images.image_id)
    Rg, Re = gt.images.rotation, est.images.rotation
    i, j = torch.triu_indices(len(gt.images), len(gt.images), 1)
    Rg_rel = Rg[j] @ Rg[i].transpose(-1, -2)
    Re_rel = Re[j] @ Re[i].transpose(-1, -2)
    return torch.rad2deg(so3.angle_between(Rg_rel, Re_rel))


@pytest.mark.parametrize("mapper", ["incremental", "global"])
def test_pycolmap_mappers_reconstruct_the_written_database(tmp_path, mapper):
    scene = synthesize(SyntheticOptions(num_images=10, num_points=400, seed=0))
    db = tmp_path / "database.db"
    write_synthetic_database(scene, db)
    with pycolmap.Database.open(str(db)) as d:
        assert d.num_images() == 10 and d.num_verified_image_pairs() == len(scene.view_graph)
    (tmp_path / "images").mkdir()
    if mapper == "incremental":
        opts = pycolmap.IncrementalPipelineOptions()
        fn = pycolmap.incremental_mapping
    else:
        opts = pycolmap.GlobalPipelineOptions()
        fn = pycolmap.global_mapping
    opts.num_threads = 1
    opts.random_seed = 0
    recs = fn(str(db), str(tmp_path / "images"), str(tmp_path / "out"), opts)
    assert len(recs) == 1
    rec = recs[0]
    assert rec.num_reg_images() == 10
    assert float(_relative_rotation_errors_deg(scene.gt, rec).max()) < 0.05
    assert rec.compute_mean_reprojection_error() < 0.01
