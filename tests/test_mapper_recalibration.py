"""Recalibration: the mapper runs again from the focal lengths bundle adjustment found when they
differ from those its global stages used (torchsfm.mapper.recalibration)."""
import copy

import pytest
import torch

from torchsfm import metrics
from torchsfm.api import map_database
from torchsfm.cameras.models import focal_length, focal_mask, scaled_focal_params
from torchsfm.mapper import pipeline
from torchsfm.mapper.pipeline import MapperOptions, global_mapping
from torchsfm.mapper.recalibration import RecalibrationOptions, recalibrated_input
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database


def scaled_focal(rec, factor: float):
    """`rec` with every focal length times `factor` (a wrong prior, as without EXIF)."""
    out = copy.copy(rec)
    out.cameras = copy.copy(rec.cameras)
    out.cameras.params = scaled_focal_params(rec.cameras, factor)
    return out


@pytest.fixture(scope="module")
def ring():
    """A 12-image ring fixating its object, keypoint noise 0.5 px, mapped from half the true focal
    length with view-graph calibration off (on a fixating ring it cannot find the focal length)."""
    s = synthesize(SyntheticOptions(num_images=12, num_points=600, layout="ring", pixel_noise=0.5, seed=0))
    return s, scaled_focal(s.mapper_input(), 0.5)


def options(passes: int, **kw) -> MapperOptions:
    return MapperOptions(skip_view_graph_calibration=True, recalibration=RecalibrationOptions(max_passes=passes), **kw)


def test_halved_focal_is_mapped_again_from_the_adjusted_one(ring):
    s, inp = ring
    true_f = float(focal_length(s.gt.cameras)[0])
    once, _ = global_mapping(inp, options(0))
    twice, rep = global_mapping(inp, options(1))
    f1, f2 = float(focal_length(once[0].cameras)[0]), float(focal_length(twice[0].cameras)[0])
    auc1, auc2 = metrics.evaluate(once[0], s.gt)["auc@3"], metrics.evaluate(twice[0], s.gt)["auc@3"]
    # the first pass ends 4% short of the true focal length, the second within 1%, and the poses follow
    assert abs(f1 / true_f - 1) > 0.02 and abs(f2 / true_f - 1) < 0.01, (f1, f2, true_f)
    assert auc2 > auc1 + 5 and auc2 > 90, (auc1, auc2)
    (st,) = [st for st in rep.stages if "recalibration" in st.name]
    assert st.name == "recalibration" and st.counts["mapped_again"] and st.counts["max_focal_change"] > 0.8
    assert st.details["changed"] == {"1": [pytest.approx(true_f / 2, abs=0.1), pytest.approx(f1, abs=0.1)]}
    assert rep.summary["recalibration"].startswith("mapped 2 times, from bundle adjustment's focal lengths (camera 1: 384 ->")
    names = [st.name for st in rep.stages]
    assert "pass2/relative_poses" in names and "pass2/final_bundle_adjustment_1" in names
    assert "pass2/view_graph_calibration" not in names and "pass2/input_check" not in names
    assert names.count("relative_poses") == 1


def test_right_focal_is_mapped_once(ring):
    s, _ = ring
    _, rep = global_mapping(s.mapper_input(), MapperOptions())
    (st,) = [st for st in rep.stages if "recalibration" in st.name]
    assert st.counts["max_focal_change"] < 0.05 and not st.counts["mapped_again"] and "changed" not in st.details
    assert "recalibration" not in rep.summary
    assert not any(st.name.startswith("pass2/") for st in rep.stages)


def test_recalibrated_input_replaces_focal_lengths_only():
    s = synthesize(SyntheticOptions(num_images=9, num_points=200, num_cameras=3, camera_model="OPENCV",
                                    principal_point_offset=(5.0, -3.0), seed=2))
    inp = s.mapper_input()
    used = focal_length(inp.cameras)
    model = copy.copy(s.gt)
    model.cameras = copy.copy(s.gt.cameras)
    params = s.gt.cameras.params.clone()
    fm = focal_mask(s.gt.cameras)
    params[0] = torch.where(fm[0], params[0] * 1.5, params[0] + 7)  # camera 0: focal x1.5, the rest moved too
    params[1] = torch.where(fm[1], params[1] * 100, params[1])  # camera 1: diverged
    params[2] = torch.where(fm[2], params[2] * 3, params[2])  # camera 2: in no model
    model.cameras.params = params
    model.images = copy.copy(s.gt.images)
    model.images.registered = model.images.camera != 2
    out, rep = recalibrated_input(inp, used, [model], RecalibrationOptions())
    assert out is not None and rep["max_focal_change"] == pytest.approx(0.5) and rep["implausible"] == 1
    assert torch.equal(out.cameras.params[0], torch.where(fm[0], inp.cameras.params[0] * 1.5, inp.cameras.params[0]))
    assert torch.equal(out.cameras.params[1:], inp.cameras.params[1:])
    assert torch.equal(inp.cameras.params, s.mapper_input().cameras.params)  # the input is not edited
    assert list(rep["changed"]) == [int(inp.cameras.camera_id[0])]
    again, rep = recalibrated_input(inp, used, [model], RecalibrationOptions(min_focal_change=0.6))
    assert again is None and rep["max_focal_change"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [{"max_passes": -1}, {"min_focal_change": 0.0}, {"max_focal_ratio": 1.01}])
def test_bad_options_are_refused(ring, bad):
    with pytest.raises(ValueError, match="recalibration"):
        global_mapping(ring[1], MapperOptions(recalibration=RecalibrationOptions(**bad)))


def test_interrupted_second_pass_resumes_to_the_same_model(ring, tmp_path, monkeypatch):
    s, inp = ring
    scene = copy.copy(s)
    scene.gt = copy.copy(s.gt)
    scene.gt.cameras = inp.cameras
    db = tmp_path / "database.db"
    write_synthetic_database(scene, db)
    ref, _ = map_database(db, tmp_path / "ref", options(1), resume=False)
    real, n = pipeline.estimate_relative_poses, [0]

    def flaky(*a, **k):  # the second pass's relative poses
        n[0] += 1
        if n[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "estimate_relative_poses", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        map_database(db, out, options(1))
    assert not (out / "sparse").exists()
    monkeypatch.setattr(pipeline, "estimate_relative_poses", real)
    models, rep = map_database(db, out, options(1))
    a, b = models[0], ref[0]
    assert torch.equal(a.images.quat, b.images.quat) and torch.equal(a.points3D.xyz, b.points3D.xyz)
    assert torch.equal(a.cameras.params, b.cameras.params)
    assert [st.counts["from_checkpoint"] for st in rep.stages if st.name == "resume"] == [
        "finish", "pass2/view_graph_calibration"]  # the first pass is done; the second had got past its first step
    assert not (out / ".checkpoints").exists()
