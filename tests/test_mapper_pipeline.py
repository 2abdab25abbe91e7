"""End-to-end known-answer tests of the global mapper on synthetic scenes."""
import pytest
import torch

from torchsfm import metrics
from torchsfm.api import map_database
from torchsfm.io.colmap_model import read_model
from torchsfm.mapper.pipeline import MapperOptions, global_mapping
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database


def _max_rot_err(model, gt):
    ev = metrics.relative_pose_errors(model.images.rotation, model.images.trans, model.images.registered,
                                      gt.images.rotation, gt.images.trans)
    return float(ev.rotation.max())


def test_noiseless_scene_is_exact(device):
    s = synthesize(SyntheticOptions(num_images=15, num_points=600, layout="ring", seed=2))
    models, rep = global_mapping(s.mapper_input(), MapperOptions(device=str(device)))
    assert len(models) == 1
    m = models[0].to("cpu")
    assert bool(m.images.registered.all())
    assert _max_rot_err(m, s.gt) < 0.01


def test_noisy_scene_with_outlier_matches(device):
    s = synthesize(SyntheticOptions(num_images=20, num_points=1000, layout="ring", pixel_noise=0.5,
                                    outlier_ratio=0.2, seed=4))
    models, _ = global_mapping(s.mapper_input(), MapperOptions(device=str(device)))
    m = models[0].to("cpu")
    assert int(m.images.registered.sum()) == 20
    ev = metrics.relative_pose_errors(m.images.rotation, m.images.trans, m.images.registered,
                                      s.gt.images.rotation, s.gt.images.trans)
    assert float(ev.rotation.median()) < 0.1
    assert float(m.points3D.error.mean()) < 1.0


def test_disconnected_graph_gives_two_models_largest_first():
    a = synthesize(SyntheticOptions(num_images=10, num_points=500, layout="ring", seed=5))
    rec = a.mapper_input()
    vg = rec.view_graph
    # cut every pair between images {0..5} and {6..9}: two components of 6 and 4 images
    side = torch.arange(len(rec.images)) < 6
    vg.valid = vg.valid & (side[vg.pairs[:, 0]] == side[vg.pairs[:, 1]])
    models, rep = global_mapping(rec, MapperOptions())
    assert [int(m.images.registered.sum()) for m in models] == [6, 4]
    assert bool(models[0].images.registered[:6].all()) and bool(models[1].images.registered[6:].all())
    assert rep.summary["models"] == 2
    for m in models:  # within each model (pairs with an unregistered image are failures: skip them)
        ev = metrics.relative_pose_errors(m.images.rotation, m.images.trans, m.images.registered,
                                          a.gt.images.rotation, a.gt.images.trans)
        finite = torch.isfinite(ev.rotation)
        assert int(finite.sum()) == (6 * 5 // 2 if m is models[0] else 4 * 3 // 2)
        assert float(ev.rotation[finite].max()) < 0.01


def test_same_seed_same_result_and_map_database_writes_loadable_models(tmp_path):
    s = synthesize(SyntheticOptions(num_images=8, num_points=400, layout="ring", pixel_noise=0.3, seed=6))
    db = tmp_path / "database.db"
    write_synthetic_database(s, db)
    m1, _ = map_database(db, tmp_path / "a", MapperOptions(seed=3))
    m2, _ = map_database(db, tmp_path / "b", MapperOptions(seed=3))
    assert torch.equal(m1[0].images.quat, m2[0].images.quat) and torch.equal(m1[0].points3D.xyz, m2[0].points3D.xyz)
    pycolmap = pytest.importorskip("pycolmap")
    r = pycolmap.Reconstruction(str(tmp_path / "a" / "sparse" / "0"))
    assert r.num_reg_images() == 8 and r.num_points3D() == len(m1[0].points3D)
    back = read_model(tmp_path / "a" / "sparse" / "0")
    assert torch.allclose(back.points3D.xyz, m1[0].points3D.xyz.cpu())
    assert (tmp_path / "a" / "report.json").is_file() and (tmp_path / "a" / "config.json").is_file()


def test_ba_rounds_skipped_only_when_the_filters_removed_little():
    # noisy ring with wrong matches: the filters remove a few observations after each round
    s = synthesize(SyntheticOptions(num_images=12, num_points=500, layout="ring", pixel_noise=0.5,
                                    outlier_ratio=0.2, seed=4))

    def ba_stages(skip):
        _, rep = global_mapping(s.mapper_input(), MapperOptions(ba_round_skip_max_removed=skip))
        return {st.name: st.counts for st in rep.stages if "bundle_adjustment_" in st.name}

    never = ba_stages(-1.0)  # any removal (even none) is more than -100%: every round runs
    assert not any("skipped" in c for c in never.values())
    always = ba_stages(1.0)  # every round after a converged BA is skipped
    ran = [n for n, c in always.items() if "skipped" not in c]
    assert "bundle_adjustment_1" in ran and "final_bundle_adjustment_1" in ran
    assert "bundle_adjustment_2" not in ran and "final_bundle_adjustment_3" not in ran
    default = ba_stages(MapperOptions().ba_round_skip_max_removed)
    skipped = [c["skipped"] for c in default.values() if "skipped" in c]
    ran = [n for n, c in default.items() if "skipped" not in c]
    # the default skips some rounds here, not all: both cases happen
    assert skipped and "bundle_adjustment_1" in ran
    for text in skipped:  # a skipped round names the share of observations filtered since
        assert "% of its observations were filtered since" in text


@pytest.mark.parametrize("offset", [(0.0, 0.0), (20.0, -12.0)], ids=["centred", "offset"])
def test_principal_point_is_freed_only_when_the_data_move_it(offset):
    # the mapper starts from the image centre; a true offset of 20 / -12 px must pass the nested
    # test (converged fixed model against the freed one), a centred principal point must not
    s = synthesize(SyntheticOptions(num_images=20, num_points=800, layout="sphere", pixel_noise=0.5,
                                    outlier_ratio=0.1, seed=3, principal_point_offset=offset))
    models, rep = global_mapping(s.mapper_input(), MapperOptions())
    m = models[0]
    test = next(st for st in rep.stages if st.name == "principal_point_bundle_adjustment")
    moved = offset != (0.0, 0.0)
    assert test.counts["accepted"] == moved == rep.summary["principal_point_refined"]
    pp, true_pp = m.cameras.params[0, 1:3], s.gt.cameras.params[0, 1:3]
    if moved:
        assert test.counts["relative_gain"] > 0.01
        assert float((pp - true_pp).abs().max()) < 4.0  # from 20 px off to a few px
    else:
        assert test.counts["relative_gain"] < 0.003
        assert torch.equal(pp, true_pp)
    ev = metrics.relative_pose_errors(m.images.rotation, m.images.trans, m.images.registered,
                                      s.gt.images.rotation, s.gt.images.trans)
    assert float(ev.rotation.median()) < 0.3
