"""Outputs people read: report.json, config.json, torchsfm.log and the terminal summary."""
from __future__ import annotations

import json
import logging

import pytest

from torchsfm.api import map_database
from torchsfm.ba.bundle_adjustment import BundleAdjustmentOptions
from torchsfm.config import load
from torchsfm.mapper.pipeline import MapperOptions
from torchsfm.report import (RunReport, StageReport, format_summary, hints, log_to_file, progress_enabled,
                             registered_fraction, solver_progress, stage_counts)
from torchsfm.solver.options import IterationRecord
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    scene = synthesize(SyntheticOptions(num_images=6, num_points=200, seed=1))
    db = root / "database.db"
    write_synthetic_database(scene, db)
    opt = MapperOptions(device="cpu", seed=3)
    opt.bundle_adjustment.solver.max_iterations = 17  # a non-default nested value to find again
    models, report = map_database(db, root / "out", opt)
    return root / "out", opt, models, report


def test_report_json_schema_and_contents(mapped):
    out, opt, models, _ = mapped
    rep = json.loads((out / "report.json").read_text())
    assert {"command", "seed", "device", "config", "stages", "skipped", "summary", "versions"} <= set(rep)
    assert rep["command"] == "map" and rep["seed"] == 3 and rep["device"] == "cpu"
    cfg = rep["config"]
    assert cfg["device"] == "cpu" and cfg["seed"] == 3
    assert cfg["bundle_adjustment"]["solver"]["max_iterations"] == 17
    assert cfg["global_positioning"]["solver"]["max_iterations"] == opt.global_positioning.solver.max_iterations
    assert cfg["ba_round_max_reprojection"] == list(opt.ba_round_max_reprojection)
    names = [s["name"] for s in rep["stages"]]
    # report.json is written inside the "write" stage, so that stage is the last one it can list
    # the last: the check that found no focal length to map again from (recalibration)
    assert names[0] == "load_database" and names[-2:] == ["normalize", "recalibration"]
    assert "global_positioning" in names and "bundle_adjustment_1" in names
    assert all(isinstance(s["seconds"], float) and s["seconds"] >= 0 for s in rep["stages"])
    assert rep["stages"][0]["counts"]["images"] == 6
    v = rep["versions"]
    assert v["torch"] and v["pycolmap"] not in ("", "absent", "?")
    n_reg = int(models[0].images.registered.sum())
    assert rep["summary"]["registered_images"] == f"{n_reg} / 6"
    assert registered_fraction(rep["summary"]) == (n_reg, 6)
    assert len(rep["skipped"]) == 6 - n_reg
    assert all({"image", "reason"} <= set(s) for s in rep["skipped"])


def test_config_json_loads_back_equal(mapped):
    out, opt, _, _ = mapped
    back = load(MapperOptions, out / "config.json")
    assert back == opt
    assert back.bundle_adjustment.solver.max_iterations == 17


def test_log_file_has_stage_lines(mapped):
    out, _, _, report = mapped
    text = (out / "torchsfm.log").read_text()
    assert report.stages[-1].name == "write"
    for s in ("load_database", "global_positioning", "bundle_adjustment_1", "write"):
        assert f" {s} " in text or f" {s}\n" in text, s
    assert " DEBUG " in text  # solver iterations and other debug records go to the file
    assert "torchsfm map: done in" in text  # the summary
    # the handler is gone after the command
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("torchsfm").handlers)


def test_log_to_file_keeps_console_level_and_restores(tmp_path, caplog):
    pkg = logging.getLogger("torchsfm")
    before = (pkg.level, pkg.propagate, list(pkg.handlers))
    lg = logging.getLogger("torchsfm.test_report")
    path = tmp_path / "sub" / "torchsfm.log"
    with caplog.at_level(logging.INFO):
        with log_to_file(path):
            with log_to_file(path):  # nested for the same file: one handler, each line once
                lg.debug("debug-only-in-file")
                lg.info("info-everywhere")
        lg.info("after-the-block")
    text = path.read_text()
    assert text.count("debug-only-in-file") == 1 and text.count("info-everywhere") == 1
    assert "after-the-block" not in text
    console = [r.getMessage() for r in caplog.records]
    assert "info-everywhere" in console and "after-the-block" in console
    assert "debug-only-in-file" not in console
    assert (pkg.level, pkg.propagate, list(pkg.handlers)) == before


def _report(summary: dict, match_mode: str | None = None, skipped: bool = False) -> RunReport:
    r = RunReport(command="map", device="cpu", summary=summary)
    if match_mode is not None:
        r.stages.append(StageReport("match", 1.0, {"mode": match_mode}))
    r.stages.append(StageReport("global_positioning", 1.5))
    if skipped:
        r.skipped.append({"image": "a.png", "reason": "no verified image pair"})
    return r


def test_coverage_hint_names_only_options_not_used():
    # a database matched elsewhere (map): exhaustive matching is suggested conditionally
    low = format_summary(_report({"models": 1, "registered_images": "6 / 10"}, skipped=True))
    assert "hint: only 60% of images registered (6 / 10)" in low
    assert "if the database was not matched exhaustively: `torchsfm match --mode exhaustive`" in low
    assert "report.json" in low
    # run with sequential matching: exhaustive is suggested; run with exhaustive matching: it is not
    seq = hints(_report({"registered_images": "6 / 10"}, match_mode="sequential"))
    assert len(seq) == 1 and "--match-mode exhaustive (this run matched sequential)" in seq[0]
    exh = hints(_report({"registered_images": "6 / 10"}, match_mode="exhaustive"))
    assert len(exh) == 1 and "exhaustive" not in exh[0] and "more overlap" in exh[0]
    # numbers instead of the "N / M" string
    assert "only 50%" in format_summary(_report({"registered_images": 5, "num_images": 10}))
    # good coverage (8 / 10 is the threshold), missing or unreadable values: no hint
    for summary in ({"registered_images": "8 / 10"}, {"registered_images": "10 / 10"}, {},
                    {"registered_images": "n/a"}, {"registered_images": "0 / 0"}):
        assert hints(_report(summary)) == [], summary
        assert "hint:" not in format_summary(_report(summary))


def test_summary_lists_every_model_and_the_images_in_none():
    """Several models: the summary counts the images of all of them (8 + 6 + 4 of 20 is 90%: no
    hint), names each model's size, and the images in no model."""
    summary = {"models": 3, "registered_images": "8 / 20", "images_in_no_model": 2,
               "model_sizes": [{"registered_images": 8, "points3D": 500}, {"registered_images": 6, "points3D": 300},
                               {"registered_images": 4, "points3D": 90}]}
    text = format_summary(_report(summary))
    assert "3 (sparse/0: 8 images, 500 points; sparse/1: 6 images, 300 points; sparse/2: 4 images, 90 points)" in text
    assert "18 of 20; 2 in no model (reasons in report.json)" in text
    assert "8 / 20" not in text and "hint:" not in text
    assert registered_fraction(summary) == (18, 20)
    # fewer in any model: one hint, which says the models share no pair
    summary.update(images_in_no_model=10)
    (h,) = hints(_report(summary))
    assert "only 64% of images registered (18 / 28), in 3 models that share no verified image pair" in h


def test_stage_counts_is_the_one_serialisation_of_stage_results():
    """Scalars are counts, JSON lists and dicts are details, tensors and private fields stay out."""
    import dataclasses

    import torch

    @dataclasses.dataclass
    class Result:
        num_pairs: int = 3
        ratio: float = 0.5
        mode: str = "exhaustive"
        rounds: list = dataclasses.field(default_factory=lambda: [{"dropped": 1}])
        per_pair: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(3))
        mixed: list = dataclasses.field(default_factory=lambda: [torch.zeros(1)])
        _private: int = 1

    counts, details = stage_counts(Result())
    assert counts == {"num_pairs": 3, "ratio": 0.5, "mode": "exhaustive"}
    assert details == {"rounds": [{"dropped": 1}]}
    st = StageReport("x")
    st.record(Result(), exclude=("mode",))
    assert "mode" not in st.counts and st.details == {"rounds": [{"dropped": 1}]}
    assert stage_counts({"a": 1, "b": [1, 2]}) == ({"a": 1}, {"b": [1, 2]})


def test_solver_progress_chains_callback_and_leaves_options():
    seen = []
    opt = BundleAdjustmentOptions()
    opt.solver.callback = seen.append
    with solver_progress(opt, "bundle_adjustment_1") as o:
        assert o is not opt and o.solver is not opt.solver
        for it in range(3):
            o.solver.callback(IterationRecord(it, 1.0 / (it + 1), 1.0, True, 0.5, 1e4, 0.1, 1e-3, 0, 0.0))
    assert [r.iteration for r in seen] == [0, 1, 2]
    assert opt.solver.callback == seen.append  # the caller's options are untouched


@pytest.mark.parametrize("level,shown", [(logging.INFO, True), (logging.WARNING, False)])
def test_progress_follows_console_level_inside_log_file(tmp_path, monkeypatch, level, shown):
    """--quiet (WARNING) hides the bars even while the log file lowers "torchsfm" to DEBUG."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    pkg = logging.getLogger("torchsfm")
    old = pkg.level
    pkg.setLevel(level)
    try:
        assert progress_enabled() is shown
        with log_to_file(tmp_path / "torchsfm.log"):
            assert pkg.isEnabledFor(logging.DEBUG)
            assert progress_enabled() is shown
    finally:
        pkg.setLevel(old)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress_enabled() is False


def test_stage_times_stay_in_one_column_for_long_stage_names():
    """A second mapping pass names its stages pass2/...: their times line up with the others'."""
    report = _report({})
    report.stages = [StageReport("load_database", 0.04, memory={"peak_rss_mb": 423.0}),
                     StageReport("pass2/final_bundle_adjustment_1", 0.84, memory={"peak_rss_mb": 512.0})]
    lines = [ln for ln in format_summary(report).splitlines() if ln.endswith(" MB")]
    assert len(lines) == 2 and len({ln.index(" s  peak") for ln in lines}) == 1
