"""Observation caps of global positioning and the early bundle-adjustment rounds (mapper.problem_caps):
which tracks are solved on, and that capping them costs no accuracy once the final rounds use
every observation."""
from __future__ import annotations

import pytest
import torch

from torchsfm import metrics
from torchsfm.api import map_database
from torchsfm.mapper.pipeline import MapperOptions
from torchsfm.mapper.problem_caps import nominated_tracks
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database


def test_each_image_nominates_long_spread_tracks():
    # one 100x100 image, 2x2 grid; tracks 0-3 in the top-left cell (lengths 5, 4, 3, 2), track 4
    # (length 1) alone in the bottom-right cell
    track = torch.tensor([0, 1, 2, 3, 4])
    image = torch.zeros(5, dtype=torch.long)
    xy = torch.tensor([[10.0, 10], [20, 10], [10, 20], [20, 20], [90, 90]], dtype=torch.float64)
    size = torch.full((5, 2), 100.0, dtype=torch.float64)
    # lengths come from the observations: add views of tracks 0-3 in other images
    extra_t = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    extra_i = torch.tensor([1, 2, 3, 4, 1, 2, 3, 1, 2, 1])
    t = torch.cat([track, extra_t])
    i = torch.cat([image, extra_i])
    xy = torch.cat([xy, torch.full((10, 2), 50.0, dtype=torch.float64)])
    size = torch.cat([size, torch.full((10, 2), 100.0, dtype=torch.float64)])
    # image 0 with a cap of 2: the longest of the crowded cell, then the lone short track of
    # another cell (spread beats length); the other images nominate their longest
    keep_0 = nominated_tracks(t[:5], i[:5], xy[:5], size[:5], 5, 2, grid=2)
    assert keep_0.tolist() == [True, False, False, False, True]
    keep = nominated_tracks(t, i, xy, size, 5, 1, grid=2)
    assert keep.tolist() == [True, False, False, False, False]  # every image's one longest: track 0
    assert bool(nominated_tracks(t, i, xy, size, 5, 10, grid=2).all())  # a cap above the counts keeps all


@pytest.fixture(scope="module")
def scene_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("caps")
    scene = synthesize(SyntheticOptions(num_images=30, num_points=1500, layout="ring", pixel_noise=0.5,
                                        outlier_ratio=0.1, seed=6))
    db = root / "database.db"
    write_synthetic_database(scene, db)
    return root, db, scene.gt


def _map(root, db, name, gp_cap, ba_cap):
    opt = MapperOptions(device="cpu")
    opt.global_positioning.max_tracks_per_image = gp_cap
    opt.ba_max_tracks_per_image = ba_cap
    models, report = map_database(db, root / name, opt, resume=False)
    return models[0], {s.name: s.counts for s in report.stages}


def test_caps_keep_the_accuracy_of_the_uncapped_run(scene_db):
    root, db, gt = scene_db
    full, _ = _map(root, db, "full", None, None)
    capped, counts = _map(root, db, "capped", 40, 40)
    gp, ba1 = counts["global_positioning"], counts["bundle_adjustment_1"]
    # the caps shrink the problems (each image sees ~370 tracks, nominates 40)...
    assert gp["points_solved"] < 0.5 * gp["points"]
    assert ba1["observations_solved"] < 0.6 * gp["observations"]
    # ...and the final rounds use every observation: the same model, to the noise
    assert int(capped.images.registered.sum()) == int(full.images.registered.sum()) == 30
    assert abs(len(capped.tracks) - len(full.tracks)) < 0.01 * len(full.tracks)
    ev_c, ev_f = metrics.evaluate(capped, gt), metrics.evaluate(full, gt)
    assert ev_c["auc@1"] > ev_f["auc@1"] - 1.0 and ev_c["auc@3"] > ev_f["auc@3"] - 0.3
    assert ev_c["median_rotation_error_deg"] < 1.2 * ev_f["median_rotation_error_deg"] + 0.01
