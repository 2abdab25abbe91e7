"""Fault cases 17 and 18 (docs/fault-cases.md): interruption, resume and determinism.

A run is interrupted (KeyboardInterrupt from a monkeypatched stage, SIGTERM / SIGKILL to a real
`torchsfm map` process) and rerun: nothing half-written may appear, and the rerun must resume
from the last completed stage and give exactly the model of an uninterrupted run.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from torchsfm import api
from torchsfm.api import map_database
from torchsfm.cli import main
from torchsfm.io.colmap_model import read_model
from torchsfm.mapper import pipeline
from torchsfm.mapper.checkpoint import CheckpointStore
from torchsfm.mapper.pipeline import MapperOptions
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scene_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    s = synthesize(SyntheticOptions(num_images=8, num_points=400, layout="ring", pixel_noise=0.3, seed=6))
    db = root / "database.db"
    write_synthetic_database(s, db)
    ref, _ = map_database(db, root / "reference", MapperOptions(seed=3), resume=False)
    return db, ref[0], root / "reference"


def same_model(a, b) -> bool:
    return (torch.equal(a.images.quat, b.images.quat) and torch.equal(a.images.trans, b.images.trans)
            and torch.equal(a.points3D.xyz, b.points3D.xyz) and torch.equal(a.cameras.params, b.cameras.params)
            and torch.equal(a.tracks.image, b.tracks.image))


def checkpoint_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / ".checkpoints").rglob("*.pt"))


def stage_of(checkpoint) -> str:
    """The stage a checkpoint file (NNNN-phase-stage.pt) was written after."""
    return str(getattr(checkpoint, "name", checkpoint)).split("-", 2)[2][: -len(".pt")]


def interrupt_second_ba(monkeypatch, db, out: Path) -> None:
    """Map with a Ctrl-C at the second bundle-adjustment call, then undo the patch."""
    real = interrupt_at(monkeypatch, "bundle_adjust", 2)
    with pytest.raises(KeyboardInterrupt):
        map_database(db, out, MapperOptions(seed=3))
    monkeypatch.setattr(pipeline, "bundle_adjust", real)


def interrupt_at(monkeypatch, target: str, call: int):
    """Raise KeyboardInterrupt at the `call`-th call of pipeline.<target>."""
    real, n = getattr(pipeline, target), [0]

    def flaky(*a, **k):
        n[0] += 1
        if n[0] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipeline, target, flaky)
    return real


@pytest.mark.parametrize("target,call,expect_resume", [
    ("calibrate_view_graph", 1, None),  # before any checkpoint: starts over
    ("estimate_relative_poses", 1, "view_graph_calibration"),
    ("global_positioning", 1, "rotation_averaging"),
    ("bundle_adjust", 2, "latest"),  # a later BA round (unchanged rounds are skipped, so: whichever)
])
def test_interrupted_map_resumes_to_the_same_model(scene_db, tmp_path, monkeypatch, target, call, expect_resume):
    db, ref, _ = scene_db
    out = tmp_path / "out"
    real = interrupt_at(monkeypatch, target, call)
    with pytest.raises(KeyboardInterrupt):
        map_database(db, out, MapperOptions(seed=3))
    assert not (out / "sparse").exists() and not (out / "report.json").exists()  # nothing half-written
    assert bool(checkpoint_files(out)) == (expect_resume is not None)
    if expect_resume == "latest":
        expect_resume = stage_of(checkpoint_files(out)[-1])
    monkeypatch.setattr(pipeline, target, real)
    models, rep = map_database(db, out, MapperOptions(seed=3))
    assert same_model(models[0], ref)
    resumed = [s.counts["from_checkpoint"] for s in rep.stages if s.name == "resume"]
    assert resumed == ([expect_resume] if expect_resume else [])
    names = [s.name for s in rep.stages]
    assert names.count("rotation_averaging") == 1 and names.count("final_bundle_adjustment_1") == 1
    assert not (out / ".checkpoints").exists()  # removed after a successful write
    assert same_model(read_model(out / "sparse" / "0"), read_model(scene_db[2] / "sparse" / "0"))


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(scene_db, tmp_path, monkeypatch, caplog):
    db, ref, _ = scene_db
    out = tmp_path / "out"
    interrupt_second_ba(monkeypatch, db, out)
    files = sorted((out / ".checkpoints").rglob("*.pt"))
    assert len(files) >= 2
    files[-1].write_bytes(files[-1].read_bytes()[:100])  # e.g. a disk that lied about fsync
    models, rep = map_database(db, out, MapperOptions(seed=3))
    assert same_model(models[0], ref)
    assert [s.counts["from_checkpoint"] for s in rep.stages if s.name == "resume"] == [stage_of(files[-2])]
    assert "ignoring unreadable checkpoint" in caplog.text


def test_other_options_do_not_reuse_checkpoints(scene_db, tmp_path, monkeypatch):
    db, _, _ = scene_db
    out = tmp_path / "out"
    interrupt_second_ba(monkeypatch, db, out)
    stale = {p.name for p in (out / ".checkpoints").iterdir()}
    models, rep = map_database(db, out, MapperOptions(seed=4), keep_checkpoints=True)
    assert not any(s.name == "resume" for s in rep.stages)
    fresh, _ = map_database(db, tmp_path / "fresh", MapperOptions(seed=4), resume=False)
    assert same_model(models[0], fresh[0])
    kept = {p.name for p in (out / ".checkpoints").iterdir()}
    assert kept and not (kept & stale)  # the stale key's folder is gone
    store = CheckpointStore.for_output(out, kept.pop())
    assert store.latest().name == "finish"


def test_interrupted_write_keeps_the_previous_model(scene_db, tmp_path, monkeypatch):
    db, _, _ = scene_db
    out = tmp_path / "out"
    map_database(db, out, MapperOptions(seed=3))
    before = {p.name: p.read_bytes() for p in (out / "sparse" / "0").iterdir()}
    report_before = (out / "report.json").read_text()
    real = api.write_model

    def flaky(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # after the model files, before the folder is renamed into place

    monkeypatch.setattr(api, "write_model", flaky)
    with pytest.raises(KeyboardInterrupt):
        map_database(db, out, MapperOptions(seed=5))
    assert {p.name: p.read_bytes() for p in (out / "sparse" / "0").iterdir()} == before
    assert (out / "report.json").read_text() == report_before
    assert not [p for p in out.iterdir() if p.name.startswith(".sparse")]  # no temporaries left


CHILD = textwrap.dedent("""
    import pathlib, sys, time
    from torchsfm.cli import main
    from torchsfm.mapper import pipeline
    real, n = pipeline.bundle_adjust, [0]
    def slow(*a, **k):
        n[0] += 1
        if n[0] == 2:  # mid-run: BA round 2 has started
            pathlib.Path(sys.argv[1]).touch()
            time.sleep(120)
        return real(*a, **k)
    pipeline.bundle_adjust = slow
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)])
def test_killed_process_leaves_no_model_and_rerun_resumes(scene_db, tmp_path, sig, code):
    db, ref, _ = scene_db
    out, flag = tmp_path / "out", tmp_path / "started"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = ["map", "--database", str(db), "--output", str(out), "--seed", "3", "--device", "cpu"]
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(flag), *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the child never reached bundle adjustment"
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err
    if sig == signal.SIGTERM:
        assert "terminated (SIGTERM)" in err and "rerun the same command to resume" in err
    assert not (out / "sparse").exists()
    latest = sorted(checkpoint_files(out))[-1]  # written before the second BA call
    assert "bundle_adjustment" in latest or "retriangulation" in latest
    models, rep = map_database(db, out, MapperOptions(seed=3, device="cpu"))
    assert same_model(models[0], ref)
    assert [s.counts["from_checkpoint"] for s in rep.stages if s.name == "resume"] == [stage_of(latest)]


def test_cli_map_twice_with_one_seed_gives_identical_files(scene_db, tmp_path):
    """Case 17: same seed, same device -> byte-identical model files; the seed is in the report."""
    db, _, _ = scene_db
    for name in ("a", "b"):
        assert main(["-q", "map", "--database", str(db), "--output", str(tmp_path / name), "--seed", "7",
                     "--device", "cpu"]) == 0
    files = sorted(p.name for p in (tmp_path / "a" / "sparse" / "0").iterdir())
    assert files and all((tmp_path / "a" / "sparse" / "0" / f).read_bytes()
                         == (tmp_path / "b" / "sparse" / "0" / f).read_bytes() for f in files)
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["seed"] == 7 and rep["config"]["seed"] == 7 and rep["device"] == "cpu"


@pytest.mark.data
def test_torchsfm_run_twice_gives_identical_models(tmp_path):
    """Cases 17, 18, 21 end to end on real photos (6 templeRing views) in a folder whose path has
    spaces and non-ASCII characters: the rerun resumes the front end from the database, maps
    again, and writes byte-identical models."""
    import shutil

    from conftest import shared_data

    src = sorted((shared_data("templeRing") / "images").glob("*.png"))[:6]
    imgs, out = tmp_path / "photos é" / "tempel ring", tmp_path / "out put ü"
    imgs.mkdir(parents=True)
    for p in src:
        shutil.copy(p, imgs / p.name)

    def run() -> dict:
        assert main(["-q", "run", str(imgs), str(out), "--seed", "2", "--device", "cpu"]) == 0
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "sparse").rglob("*")) if p.is_file()}

    first = run()
    second = run()
    assert first and first == second
    rep = json.loads((out / "report.json").read_text())
    assert rep["seed"] == 2
    extract = rep["stages"][0]
    assert extract["name"] == "extract" and (extract["counts"]["num_extracted"], extract["counts"]["num_resumed"]) == (0, 6)
    assert "0 extracted, 6 already done" in rep["summary"]["extract"]
