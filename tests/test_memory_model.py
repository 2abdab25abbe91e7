"""Compact storage of the data model (int32 indices, float32 keypoints from a database), kept
through every mapper stage, and the chunked database reader: a memory regression of the data
model (int64 indices coming back, keypoints upcast, matches loaded whole) fails here."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import torchsfm.io.database as database
import torchsfm.mapper.pipeline as pipeline
from torchsfm.runtime import peak_memory
from torchsfm.api import load_mapper_input, map_database
from torchsfm.data.model import INDEX_DTYPE, Tracks, storage_bytes, wide_indices
from torchsfm.mapper.pipeline import MapperOptions
from torchsfm.report import RunReport
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "database.db"
    scene = synthesize(SyntheticOptions(num_images=30, num_points=600, layout="forward", match_graph="sequential",
                                        sequential_overlap=6, pixel_noise=0.5, outlier_ratio=0.1, seed=3))
    write_synthetic_database(scene, path)
    return path


def test_loaded_input_is_compact(db):
    rec = load_mapper_input(db)
    vg, kp = rec.view_graph, rec.keypoints
    assert INDEX_DTYPE == torch.int32
    assert vg.matches.dtype == torch.int32 and kp.xy.dtype == torch.float32  # the database's own precision
    assert wide_indices(rec) == []
    # the budget: 8 bytes per match, 8 per keypoint, ~0.3 kB per pair (F, E, H, pose), little per image
    budget = 8 * vg.matches.shape[0] + 8 * len(kp) + 400 * len(vg) + 200 * len(rec.images) + 4096
    assert storage_bytes(rec.view_graph) + storage_bytes(kp) <= budget
    # .to(dtype) moves the model, not the measurements: keypoints keep float32
    assert rec.to("cpu", torch.float64).keypoints.xy.dtype == torch.float32


def test_every_stage_keeps_compact_indices(db, tmp_path, monkeypatch):
    """The finite-value check runs after every stage: record what each stage hands on."""
    seen = {}
    real = pipeline.check_finite

    def spy(rec, stage, max_fraction):
        seen[stage] = (wide_indices(rec), rec.keypoints.xy.dtype, storage_bytes(rec.tracks), len(rec.tracks))
        return real(rec, stage, max_fraction)

    monkeypatch.setattr(pipeline, "check_finite", spy)
    models, report = map_database(db, tmp_path / "out", MapperOptions(device="cpu"))
    assert {"tracks", "global positioning", "bundle adjustment", "retriangulation"} <= set(seen)
    for stage, (wide, kp_dtype, nbytes, n_obs) in seen.items():
        assert wide == [], stage
        assert kp_dtype == torch.float32, stage
        assert nbytes == 12 * n_obs, stage  # three int32 per observation
    assert models[0].tracks.point.dtype == torch.int32
    # every stage reports its peak memory, and the run its largest
    assert all(s.memory.get("peak_rss_mb", 0) > 0 for s in report.stages)
    assert report.summary["peak_rss_mb"] == max(s.memory["peak_rss_mb"] for s in report.stages[:-1])


def test_wide_indices_are_reported():
    t = Tracks(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]))
    assert t.point.dtype == torch.int32  # made compact on construction
    scene = synthesize(SyntheticOptions(num_images=6, num_points=300, seed=1))
    rec = scene.mapper_input()
    assert wide_indices(rec) == []
    rec.tracks = t
    object.__setattr__(rec.tracks, "image", rec.tracks.image.long())  # as a stage assigning int64 would
    rec.view_graph = dataclasses.replace(rec.view_graph)
    rec.view_graph.matches = rec.view_graph.matches.long()
    assert wide_indices(rec) == [f"tracks.image is torch.int64 (3 values fit in {INDEX_DTYPE})",
                                 f"view_graph.matches is torch.int64 ({rec.view_graph.matches.numel()} values fit in "
                                 f"{INDEX_DTYPE})"]


def test_reader_streams_matches_in_chunks(db, monkeypatch):
    """The same view graph for any chunk size, and no chunk larger than asked (plus one pair)."""
    whole = database.read_view_graph(db, chunk_matches=1 << 30)[3]
    sizes = []
    real = database.stream_matches

    def spy(*args, **kw):
        for e0, e1, chunk in real(*args, **kw):
            sizes.append((chunk.shape[0], int(whole.num_matches()[e1 - 1])))
            yield e0, e1, chunk

    monkeypatch.setattr(database, "stream_matches", spy)
    small = database.read_view_graph(db, chunk_matches=500)[3]
    assert len(sizes) > 10 and all(n < 500 + last for n, last in sizes)
    for f in dataclasses.fields(whole):
        assert torch.equal(getattr(whole, f.name), getattr(small, f.name)), f.name


def test_peak_memory_windows_nest():
    rep = RunReport()
    outer = peak_memory.begin()
    with rep.stage("big"):
        x = torch.ones(40_000_000, dtype=torch.float64)  # 305 MB
        x += 1
        del x
    with rep.stage("small"):
        y = torch.ones(1_000_000)
        y += 1
        del y
    total = peak_memory.end(outer)
    if total["peak_rss_mb"] is None:
        pytest.skip("the kernel refuses to reset the peak RSS (/proc/self/clear_refs)")
    big, small = (s.memory["peak_rss_mb"] for s in rep.stages)
    assert big - small > 250  # the second stage's window does not see the first's peak
    assert total["peak_rss_mb"] >= big - 0.1  # but the enclosing window does (stages round to 0.1 MB)


def test_bundle_adjustment_evaluates_in_chunks_exactly():
    """The reprojection problem's evaluation in observation chunks (bounded projection
    temporaries) gives the same residuals and Jacobians as one pass."""
    from torchsfm.ba.bundle_adjustment import BundleAdjustmentOptions, ReprojectionProblem

    gt = synthesize(SyntheticOptions(num_images=8, num_points=300, pixel_noise=0.5, seed=2)).gt
    whole = ReprojectionProblem(gt, BundleAdjustmentOptions())
    chunked = ReprojectionProblem(gt, BundleAdjustmentOptions())
    chunked.obs_chunk = 37  # not a divisor of the observation count
    a, b = whole.linearize(), chunked.linearize()
    for x, y in ((a.residuals, b.residuals), (a.jac_cam, b.jac_cam), (a.jac_point, b.jac_point)):
        assert torch.equal(x, y)
    assert torch.equal(whole.residuals(), chunked.residuals())

