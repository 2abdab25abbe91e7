"""benchmarks/fixed_intrinsics.py: its keypoint-precision measure on synthetic scenes with known noise,
and the database it maps (the ground truth's camera, trusted)."""
from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from torchsfm.io.colmap_model import write_model
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database

spec = importlib.util.spec_from_file_location("fixed_intrinsics", Path(__file__).parents[1] / "benchmarks" / "fixed_intrinsics.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _scene(tmp_path: Path, noise: float) -> tuple[Path, Path]:
    scene = synthesize(SyntheticOptions(num_images=6, num_points=200, camera_model="PINHOLE", pixel_noise=noise, seed=3))
    db, gt = tmp_path / "database.db", tmp_path / "gt"
    write_synthetic_database(scene, db)
    gt.mkdir()
    write_model(scene.gt, gt, format="txt")
    return db, gt


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_epipolar_distance_follows_the_keypoint_noise(tmp_path, noise):
    db, gt = _scene(tmp_path, noise)
    d = bench.epipolar_distances(db, gt)
    assert len(d) > 100
    if noise == 0:
        assert np.median(d) < 1e-3
    else:  # distance to a line of a point off by N(0, 1) per coordinate: median of |N(0, 1)| = 0.674, both ends
        assert 0.4 < np.median(d) < 1.0


def test_database_gets_the_true_camera_as_a_trusted_prior(tmp_path):
    db, gt = _scene(tmp_path, 0.0)
    with sqlite3.connect(db) as c:
        c.execute("UPDATE cameras SET params = ?, prior_focal_length = 0", (np.array([1.0, 2.0, 3.0, 4.0]).tobytes(),))
    out = tmp_path / "out"
    out.mkdir()
    fixed = bench.with_true_intrinsics(db, gt, out)
    cam = [ln.split() for ln in (gt / "cameras.txt").read_text().splitlines() if ln and ln[0] != "#"][0]
    with sqlite3.connect(fixed) as c:
        model, params, prior = c.execute("SELECT model, params, prior_focal_length FROM cameras").fetchone()
    assert model == 1 and prior == 1
    np.testing.assert_allclose(np.frombuffer(params, np.float64), [float(v) for v in cam[4:8]])
    with sqlite3.connect(db) as c:  # the input is left as it was
        assert c.execute("SELECT prior_focal_length FROM cameras").fetchone()[0] == 0
