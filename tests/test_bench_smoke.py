"""Smoke run of the benchmark harness (torchsfm/bench) on a tiny synthetic scene, and its
refusal to compare runs on different inputs. The benchmarks themselves are not tests."""
import copy
import json
import shutil
import sqlite3

import pytest
from PIL import Image

from torchsfm.bench.child import database_hash
from torchsfm.bench.harness import (
    BenchOptions,
    InputMismatch,
    check_comparable,
    merge_results,
    run_benchmark,
    run_method,
    stage_groups,
    stages_from_log,
)
from torchsfm.bench.inputs import prepare, synthetic_spec
from torchsfm.bench.plot import plot_scaling
from torchsfm.bench.tables import to_markdown

pytest.importorskip("pycolmap")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    opt = BenchOptions(datasets=["ring12"], scaling=["ring12=torchsfm"], work_dir=str(work), time_cap=240,
                       prepare_threads=1)
    out = work / "bench.json"
    return run_benchmark(opt, out), out, opt


def test_every_method_runs_on_the_same_input_and_is_measured(smoke):
    result, out, _ = smoke
    assert json.loads(out.read_text())["datasets"][0]["input_hash"] == result["datasets"][0]["input_hash"]
    ds = result["datasets"][0]
    assert ds["groups"] == ["table", "scaling"]
    assert ds["stats"]["images"] == 12 and ds["stats"]["observations"] > 0
    assert [r["method"] for r in ds["runs"]] == ["colmap", "glomap", "torchsfm"]
    for r in ds["runs"]:
        assert r["status"] == "ok", r.get("error")
        assert r["input_hash"] == ds["input_hash"] == database_hash(ds["database"])
        assert r["seed"] == 0 and r["threads"] == 1 and r["options"]
        assert r["versions"]["python"]
        assert r["seconds"] > 0 and r["peak_rss_mb"] >= r["rss_start_mb"] > 0
        st = r["model_stats"]
        assert st["registered"] == 12 and st["points"] > 100 and 2 <= st["mean_track_length"] <= 12
        assert st["mean_reprojection_error_px"] < 2.0  # 0.5 px keypoint noise
        acc = r["accuracy"]
        assert acc["reference"] == "ground truth" and acc["num_registered"] == 12
        assert acc["auc@10"] > 90 and acc["median_rotation_error_deg"] < 0.5
        assert sum(r["stage_groups"].values()) == pytest.approx(r["seconds"], rel=1e-6)
    by = {r["method"]: r for r in ds["runs"]}
    assert "pycolmap" in by["glomap"]["versions"] and "torch" in by["torchsfm"]["versions"]
    assert by["glomap"]["stage_groups"]["global_positioning"] > 0  # parsed from GLOMAP's log
    assert by["torchsfm"]["stage_groups"]["relative_poses"] > 0
    md = to_markdown(result)
    for label in ("COLMAP incremental", "GLOMAP (COLMAP global)", "torchsfm (cpu)", "### Scaling"):
        assert label in md


def test_comparisons_of_different_inputs_are_refused(smoke):
    result, _, _ = smoke
    check_comparable(result)
    bad = copy.deepcopy(result)
    bad["datasets"][0]["runs"][1]["input_hash"] = "0" * 64
    with pytest.raises(InputMismatch):
        check_comparable(bad)
    with pytest.raises(InputMismatch):
        to_markdown(bad)
    other = copy.deepcopy(result)
    other["datasets"][0]["input_hash"] = "1" * 64
    for r in other["datasets"][0]["runs"]:
        r["input_hash"] = r["expected_hash"] = "1" * 64
    with pytest.raises(InputMismatch):
        merge_results([result, other])
    merged = merge_results([result, copy.deepcopy(result)])  # same input twice: pooled
    assert len(merged["datasets"][0]["runs"]) == 6


def test_a_changed_database_is_refused_by_the_run(smoke, tmp_path):
    _, _, opt = smoke
    prep = prepare(synthetic_spec("ring12"), opt.work_dir)  # the cached input, hash rechecked
    changed = copy.copy(prep)
    changed.database = tmp_path / "database.db"
    shutil.copyfile(prep.database, changed.database)
    assert database_hash(changed.database) == prep.input_hash  # a byte copy is the same input
    con = sqlite3.connect(changed.database)
    con.execute("UPDATE cameras SET params = ? WHERE camera_id = 1", (b"\0" * 32,))
    con.commit()
    con.close()
    assert database_hash(changed.database) != prep.input_hash
    res = run_method("glomap", changed, tmp_path / "run", opt, seed=0)
    assert res["status"] == "refused" and res["exit_code"] == 3
    assert res["input_hash"] != res["expected_hash"] == prep.input_hash


def test_stage_parsing_and_grouping():
    log = ("I20261129 23:23:12.217750 1 global_mapper.cc:559] Rotation averaging done in 0.5 seconds\n"
           "I20261129 23:23:12.663477 1 global_mapper.cc:584] Global positioning done in 2.25 seconds\n"
           "I20261129 23:23:12.891824 1 global_mapper.cc:608] Iterative bundle adjustment done in 1 seconds\n"
           "I20261129 23:23:13.891824 1 global_mapper.cc:584] Global positioning done in 0.75 seconds\n"
           "I20261129 23:23:16.987213 1 global_pipeline.cc:183] Reconstruction done in 9 seconds\n")
    st = stages_from_log(log)
    assert st == {"Rotation averaging": 0.5, "Global positioning": 3.0, "Iterative bundle adjustment": 1.0}
    g = stage_groups("glomap", st, 10.0)
    assert g["global_positioning"] == 3.0 and g["relative_poses"] == 0.0 and g["other"] == pytest.approx(5.5)
    ours = {"load_database": 0.5, "relative_poses": 1.0, "model0/bundle_adjustment_1": 2.0, "model0/filter_1": 0.5,
            "model0/retriangulation": 1.0, "model0/final_bundle_adjustment_1": 2.0, "write": 0.25,
            "model0/intrinsics_selection": 0.5, "model0/noise_filter": 0.25}
    g = stage_groups("torchsfm", ours, 9.0)
    assert g["bundle_adjustment"] == 2.5 and g["retriangulation"] == 3.75 and g["other"] == pytest.approx(1.75)
    assert stage_groups("colmap", {}, 4.0) == {"other": 4.0}


def test_scaling_plot_is_written(smoke, tmp_path):
    result, _, _ = smoke
    path = plot_scaling([result], tmp_path / "scaling.png")
    assert path is not None and Image.open(path).size == (1400, 660)
    no_scaling = copy.deepcopy(result)
    no_scaling["datasets"][0]["groups"] = ["table"]
    assert plot_scaling([no_scaling], tmp_path / "none.png") is None
