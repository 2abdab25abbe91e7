"""The data check of view-graph calibration: a focal the matches do not support is rejected."""
import torch

from torchsfm.mapper.calibration_check import CalibrationCheckOptions, check_calibration
from torchsfm.synthetic import SyntheticOptions, synthesize


def _scene():
    s = synthesize(SyntheticOptions(num_images=12, num_points=600, layout="ring", pixel_noise=0.5,
                                    camera_model="SIMPLE_PINHOLE", seed=7))
    return s.mapper_input(), float(s.gt.cameras.params[0, 0])


def _with_focal(rec, f):
    out = rec.clone()
    out.cameras.params[:, 0] = f
    return out


def test_wrong_calibration_is_rejected_and_right_one_kept():
    rec, f_true = _scene()
    wrong = _with_focal(rec, 0.3 * f_true)
    out, rep = check_calibration(rec, wrong)
    assert rep["checked"] and not rep["accepted"] and rep["inliers_after"] < rep["inliers_before"]
    assert out is rec
    # from a wrong start, a calibration that recovers the true focal is accepted
    start = _with_focal(rec, 0.6 * f_true)
    out, rep = check_calibration(start, rec)
    assert rep["accepted"] and rep["inliers_after"] >= rep["inliers_before"]
    assert float(out.cameras.params[0, 0]) == f_true


def test_small_changes_are_not_checked():
    rec, f_true = _scene()
    out, rep = check_calibration(rec, _with_focal(rec, 1.01 * f_true), CalibrationCheckOptions(min_focal_change=0.05))
    assert not rep["checked"] and rep["accepted"]
    assert torch.allclose(out.cameras.params[:, 0], torch.tensor(1.01 * f_true, dtype=torch.float64))


def test_check_does_not_depend_on_the_stored_two_view_poses():
    """The stored poses were estimated with the initial intrinsics; refining them would favour one
    focal, so the check runs RANSAC for both and ignores them (same counts with garbage poses)."""
    from torchsfm.geometry import so3

    rec, f_true = _scene()
    wrong = _with_focal(rec, 0.5 * f_true)
    _, ref = check_calibration(rec, wrong)
    g = torch.Generator().manual_seed(0)
    garbage_q = so3.matrix_to_quat(so3.random_rotation(len(rec.view_graph), generator=g))
    garbage = [r.clone() for r in (rec, wrong)]
    for r in garbage:
        r.view_graph.rel_quat = garbage_q.clone()
    _, rep = check_calibration(*garbage)
    assert (rep["inliers_before"], rep["inliers_after"]) == (ref["inliers_before"], ref["inliers_after"])
