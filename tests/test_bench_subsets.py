"""The robustness benchmark (bench/subsets.py, bench/robustness.py): seeded subsets, their
databases made as `extract` + `match` on the subset's photos, references restricted to them, and a
small subset run end to end by all three mappers."""
import json
import sqlite3

import numpy as np
import pytest

from conftest import shared_data
from torchsfm.bench.child import database_hash
from torchsfm.bench.harness import SUITES, BenchOptions, run_benchmark
from torchsfm.bench.inputs import prepare, resolve_spec
from torchsfm.bench.robustness import AUC_TOLERANCE, robustness_rows, robustness_table
from torchsfm.bench.subsets import copy_features, parse_subset, restrict_reference, subset_names
from torchsfm.bench.tables import to_markdown
from torchsfm.io.colmap_model import read_model, write_model
from torchsfm.synthetic import SyntheticOptions, synthesize

pytest.importorskip("pycolmap")


def test_subset_names_are_seeded_and_sized():
    names = [f"img{i:03d}.png" for i in range(47)]
    assert parse_subset("templeRing-sub3") == ("templeRing", 3, None)
    assert parse_subset("dtu_scan24-sub0-n8") == ("dtu_scan24", 0, 8)
    assert parse_subset("templeRing") is None
    draws = [subset_names("templeRing", names, k) for k in range(10)]
    assert draws[3] == subset_names("templeRing", list(reversed(names)), 3)  # listing order is irrelevant
    assert all(12 <= len(d) <= 20 and d == sorted(d) and len(set(d)) == len(d) for d in draws)
    assert len({tuple(d) for d in draws}) == 10 and len({len(d) for d in draws}) > 3
    assert subset_names("kitchen", names, 3) != draws[3]  # the parent's name is part of the seed
    assert len(subset_names("templeRing", names, 0, size=8)) == 8
    assert len(subset_names("kitchen", names[:25], 5)) <= 20
    with pytest.raises(ValueError):
        subset_names("x", names[:5], 0, size=8)


def test_reference_restricted_to_the_subset(tmp_path):
    s = synthesize(SyntheticOptions(num_images=6, num_points=300, seed=1))
    write_model(s.gt, tmp_path / "gt", format="txt")
    keep = [s.gt.images.name[i] for i in (1, 4)]
    restrict_reference(tmp_path / "gt", keep, tmp_path / "ref")
    ref = read_model(tmp_path / "ref")
    assert ref.images.name == keep and len(ref.points3D) == 0
    for k, i in enumerate((1, 4)):
        assert np.allclose(ref.images.quat[k].numpy(), s.gt.images.quat[i].numpy())
    with pytest.raises(ValueError):
        restrict_reference(tmp_path / "gt", ["absent.png"], tmp_path / "none")


def test_robustness_rows_and_targets():
    def run(method, reg, a1, a3):
        return {"method": method, "status": "ok", "model_stats": {"registered": reg},
                "accuracy": {"num_registered": reg, "auc@1": a1, "auc@3": a3}}

    ds = {"name": "x-sub0", "spec": {"kind": "subset", "subset": {"parent": {"name": "x"}}},
          "stats": {"images": 14, "reference": "ground truth"}, "groups": ["table"],
          "runs": [run("colmap", 12, 10.0, 40.0), run("glomap", 14, 20.0, 30.0), run("torchsfm", 14, 19.5, 42.0)]}
    bad = json.loads(json.dumps(ds))
    bad["name"], bad["runs"][2] = "x-sub1", run("torchsfm", 13, 50.0, 50.0)
    result = {"datasets": [ds, bad]}
    rows = robustness_rows(result)
    assert rows[0]["margin_auc@1"] == pytest.approx(-0.5) and rows[0]["margin_auc@3"] == pytest.approx(2.0)
    assert rows[0]["meets"] and not rows[1]["meets"] and rows[1]["margin_registered"] == -1
    assert -AUC_TOLERANCE < rows[0]["margin_auc@1"]
    table = robustness_table(result)
    assert "**x: worst**" in table and "1 of 2 met" in table and "**not met**" in table


def test_copied_features_are_the_parents(tmp_path):
    """copy_features writes cameras, images in name order with ids 1..n, and the parent's
    keypoints and descriptors of those images, byte for byte."""
    from torchsfm.frontend.colmap_db import FrontendDatabase

    parent = tmp_path / "parent.db"
    rng = np.random.default_rng(0)
    with FrontendDatabase(parent) as db, db.transaction():
        cam = db.add_camera(2, 640, 480, np.array([768.0, 320.0, 240.0, 0.0]), False)
        for name in ("c.png", "a.png", "b.png", "d.png"):
            iid = db.add_image(name, cam)
            db.write_keypoints(iid, rng.random((5 + iid, 6), dtype=np.float32))
            db.write_descriptors(iid, rng.integers(0, 255, (5 + iid, 128), dtype=np.uint8))
    out = tmp_path / "sub.db"
    copy_features(parent, out, ["d.png", "b.png"])
    con, src = sqlite3.connect(out), sqlite3.connect(parent)
    assert con.execute("SELECT image_id, name FROM images ORDER BY image_id").fetchall() == [(1, "b.png"), (2, "d.png")]
    for new_id, name in ((1, "b.png"), (2, "d.png")):
        old_id = src.execute("SELECT image_id FROM images WHERE name = ?", (name,)).fetchone()[0]
        for table in ("keypoints", "descriptors"):
            a = con.execute(f"SELECT rows, cols, data FROM {table} WHERE image_id = ?", (new_id,)).fetchone()
            b = src.execute(f"SELECT rows, cols, data FROM {table} WHERE image_id = ?", (old_id,)).fetchone()
            assert a == b
    assert con.execute("SELECT count(*) FROM frames").fetchone()[0] == 2


@pytest.mark.slow
def test_a_subset_from_the_parents_features_equals_a_fresh_extraction(tmp_path):
    """The same database, content hash included, whether the subset's features are copied from
    the cached parent database or extracted from its photos."""
    shared_data("templeRing")
    spec = resolve_spec("templeRing-sub0-n6")
    prepare(resolve_spec("templeRing"), tmp_path / "with_parent", 2)
    a = prepare(spec, tmp_path / "with_parent", 2)
    b = prepare(spec, tmp_path / "fresh", 2)
    assert a.input_hash == b.input_hash == database_hash(b.database)
    assert a.stats == b.stats


@pytest.fixture(scope="module")
def small_subset(tmp_path_factory):
    shared_data("dtu_scan24")
    work = tmp_path_factory.mktemp("robustness")
    name = next(n for n in SUITES["smoke"][0] if parse_subset(n))
    opt = BenchOptions(datasets=[name], work_dir=str(work), time_cap=240, prepare_threads=1)
    return run_benchmark(opt, work / "bench.json"), name


def test_the_robustness_benchmark_runs_on_a_small_subset(small_subset):
    """The smoke suite's subset: 8 seeded images of DTU scan 24, front end on those photos only,
    COLMAP, GLOMAP and torchsfm on the same database, measured against the GT of those images."""
    result, name = small_subset
    ds = result["datasets"][0]
    assert ds["name"] == name and ds["spec"]["kind"] == "subset" and ds["stats"]["images"] == 8
    assert ds["stats"]["reference"] == "ground truth"
    assert read_model(ds["gt"]).images.name == ds["spec"]["subset"]["images"]
    assert [r["method"] for r in ds["runs"]] == ["colmap", "glomap", "torchsfm"]
    for r in ds["runs"]:
        assert r["status"] == "ok" and r["input_hash"] == ds["input_hash"]
        assert r["accuracy"]["num_images"] == 8 and r["accuracy"]["reference"] == "ground truth"
    (row,) = robustness_rows(result)
    assert row["methods"]["torchsfm"]["registered"] >= 3 and row["intrinsics"]
    md = to_markdown(result)
    assert "### Robustness: seeded subsets of real scenes" in md and f"| {name} | 8 |" in md
    assert "| dtu_scan24 | 8 |" not in md  # subsets are not repeated in the accuracy table
