"""Fault cases 14 and 15 (docs/fault-cases.md): non-finite values and out-of-memory.

NaN/Inf is injected into the input (keypoints, F, relative poses, camera parameters) and into
stage outputs (monkeypatched stages); out-of-memory is injected into the solver's chunked Schur
kernel, which then fails whenever its per-chunk budget exceeds a cap (as a capped GPU would).
"""
import logging

import pytest
import torch

from torchsfm import metrics
from torchsfm.cli import main
from torchsfm.mapper import pipeline
from torchsfm.mapper.pipeline import MapperOptions, _check_finite, global_mapping
from torchsfm.runtime.memory import OutOfMemory, is_oom, run_with_memory_fallback
from torchsfm.solver import schur
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database


@pytest.fixture(scope="module")
def ring():
    return synthesize(SyntheticOptions(num_images=10, num_points=500, layout="ring", seed=11))


def rot_err(m, gt):
    ev = metrics.relative_pose_errors(m.images.rotation, m.images.trans, m.images.registered,
                                      gt.images.rotation, gt.images.trans)
    return ev.rotation


def all_finite(m) -> bool:
    reg = m.images.registered
    return all(bool(torch.isfinite(x).all()) for x in (m.images.quat[reg], m.images.trans[reg], m.points3D.xyz,
                                                         m.cameras.params))


def test_nan_keypoint_and_nan_geometry_in_the_input_are_quarantined(ring, device, caplog):
    rec = ring.mapper_input().to(device)
    vg = rec.view_graph
    a, b = int(vg.pairs[0, 0]), int(vg.matches[0, 0])  # a keypoint that is matched
    rec.keypoints.xy[rec.keypoints.offsets[a] + b] = float("nan")
    rec.keypoints.xy[rec.keypoints.offsets[5] + 3, 1] = float("inf")
    vg.F[4] = float("nan")
    vg.rel_trans[7, 0] = float("inf")
    n_matches = vg.matches.shape[0]
    with caplog.at_level(logging.WARNING):
        models, rep = global_mapping(rec, MapperOptions(device=str(device)))
    m = models[0].to("cpu")
    assert bool(m.images.registered.all()) and all_finite(m)
    assert not bool(m.view_graph.valid[4]) and not bool(m.view_graph.valid[7])
    check = next(s for s in rep.stages if s.name == "input_check")
    assert any("keypoint(s) are not finite" in w for w in check.warnings)
    assert any("2 image pair(s) have non-finite two-view geometry" in w for w in check.warnings)
    assert "not finite" in caplog.text
    assert float(rot_err(m, ring.gt).max()) < 0.01  # noiseless: as exact as without the faults
    assert ring.view_graph.matches.shape[0] == n_matches  # the scene itself was not touched


def test_nan_pose_from_a_stage_unregisters_that_image(ring, monkeypatch):
    real = pipeline.global_positioning

    def nan_gp(rec, opt):
        out, counts = real(rec, opt)
        out.images.trans[3] = float("nan")
        return out, counts

    monkeypatch.setattr(pipeline, "global_positioning", nan_gp)
    models, rep = global_mapping(ring.mapper_input(), MapperOptions())
    m = models[0]
    assert m.images.registered.tolist() == [i != 3 for i in range(10)]
    assert m.meta["image_reason"][3] == "non-finite pose after global positioning"
    assert all_finite(m) and not bool((m.tracks.image == 3).any())
    gp = next(s for s in rep.stages if s.name == "global_positioning")
    assert gp.warnings == ["global positioning produced non-finite poses for 1 image(s); they are unregistered"]
    err = rot_err(m, ring.gt)
    assert float(err[torch.isfinite(err)].max()) < 0.01


def test_nan_points_from_bundle_adjustment_are_dropped(ring, monkeypatch):
    real, calls = pipeline.bundle_adjust, []

    def nan_ba(rec, opt):
        out, summary = real(rec, opt)
        calls.append(len(out.points3D))
        if len(calls) == 1:
            out.points3D.xyz[:7] = float("nan")
        return out, summary

    monkeypatch.setattr(pipeline, "bundle_adjust", nan_ba)
    # one BA call per round (a capped round adds a points-only call for the other points)
    models, rep = global_mapping(ring.mapper_input(), MapperOptions(ba_max_tracks_per_image=None))
    m = models[0]
    assert all_finite(m) and bool(m.images.registered.all())
    ba1 = next(s for s in rep.stages if s.name == "bundle_adjustment_1")
    assert ba1.warnings == ["bundle adjustment produced 7 non-finite point(s); they are dropped"]
    assert calls[1] == calls[0] - 7  # the next round no longer sees them


def test_a_stage_breaking_most_images_is_an_error_naming_it(ring, monkeypatch):
    real = pipeline.rotation_averaging

    def broken(rec, opt):
        out, r = real(rec, opt)
        out.images.quat = torch.full_like(out.images.quat, float("nan"))
        return out, r

    monkeypatch.setattr(pipeline, "rotation_averaging", broken)
    with pytest.raises(RuntimeError, match="rotation averaging produced non-finite values for 10 of 10 images"):
        global_mapping(ring.mapper_input(), MapperOptions())


def test_check_finite_takes_out_images_of_a_broken_camera_without_touching_the_input():
    s = synthesize(SyntheticOptions(num_images=6, num_points=300, num_cameras=3, seed=1))
    rec = s.gt.clone()
    rec.cameras.params[1, 0] = float("inf")
    before = rec.images.registered.clone()
    out = _check_finite(rec, "test", max_fraction=0.5)
    assert out.images.registered.tolist() == [True, True, False, False, True, True]
    assert out.meta["image_reason"][2] == "non-finite camera parameters after test"
    assert torch.equal(rec.images.registered, before)  # copy-on-write
    with pytest.raises(RuntimeError, match="test produced non-finite values for 4 of 6 images"):
        rec.cameras.params[2, 0] = float("nan")
        _check_finite(rec, "test", max_fraction=0.5)


# -- out of memory --------------------------------------------------------------------------

def cap_solver_chunks(monkeypatch, cap_bytes: int | None, on=lambda t: True, log: list | None = None):
    """The solver's chunked Schur kernel fails like an allocator whenever a chunk may exceed
    `cap_bytes` (None: always) for tensors selected by `on`."""
    real = schur._gram_segments

    def capped(rows, segments, out, h, chunk_bytes, *a, **k):
        if on(rows) and (cap_bytes is None or chunk_bytes > cap_bytes):
            if log is not None:
                log.append(chunk_bytes)
            raise torch.OutOfMemoryError(f"simulated: tried to allocate a {chunk_bytes}-byte chunk")
        return real(rows, segments, out, h, chunk_bytes, *a, **k)

    monkeypatch.setattr(schur, "_gram_segments", capped)


def test_solver_out_of_memory_retries_with_smaller_chunks(ring, monkeypatch, caplog):
    s = synthesize(SyntheticOptions(num_images=8, num_points=400, pixel_noise=0.5, seed=12))
    ref, _ = global_mapping(s.mapper_input(), MapperOptions())
    failed: list = []
    cap_solver_chunks(monkeypatch, 1 << 20, log=failed)  # the CPU default is 4 MiB
    with caplog.at_level(logging.WARNING):
        models, rep = global_mapping(s.mapper_input(), MapperOptions())
    assert failed and all(c > 1 << 20 for c in failed)
    events = rep.summary["memory_fallbacks"]
    assert {e["stage"] for e in events} >= {"global_positioning", "bundle_adjustment_1"}
    assert all(e["attempt"].startswith("with solver chunks") for e in events if e["result"] == "ok")
    assert "out of memory" in caplog.text
    # chunking does not change the arithmetic's result beyond rounding
    m, r = models[0], ref[0]
    assert torch.allclose(m.images.quat, r.images.quat, atol=1e-7)
    assert len(m.points3D) == len(r.points3D)


def test_out_of_memory_everywhere_is_a_clear_error(tmp_path, monkeypatch, capsys):
    s = synthesize(SyntheticOptions(num_images=6, num_points=300, seed=13))
    cap_solver_chunks(monkeypatch, None)
    with pytest.raises(OutOfMemory, match=r"global_positioning ran out of memory even .*registered images"):
        global_mapping(s.mapper_input(), MapperOptions())
    db = tmp_path / "database.db"
    write_synthetic_database(s, db)
    assert main(["-q", "map", "--database", str(db), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "sparse").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_out_of_memory_falls_back_to_the_cpu(monkeypatch):
    s = synthesize(SyntheticOptions(num_images=8, num_points=400, pixel_noise=0.5, seed=12))
    ref, _ = global_mapping(s.mapper_input(), MapperOptions(device="cpu"))
    cap_solver_chunks(monkeypatch, None, on=lambda t: t.is_cuda)  # no solver fits on the GPU
    models, rep = global_mapping(s.mapper_input(), MapperOptions(device="cuda"))
    assert {e["attempt"] for e in rep.summary["memory_fallbacks"] if e["result"] == "ok"} == {"on the CPU"}
    m = models[0]
    assert m.images.quat.is_cuda  # moved back for the stages that fit
    assert bool(m.images.registered.all())
    assert torch.allclose(m.images.quat.cpu(), ref[0].images.quat, atol=1e-6)


def test_memory_fallback_passes_other_errors_through():
    s = synthesize(SyntheticOptions(num_images=4, num_points=100, seed=1))
    calls = []

    def boom(rec, opt):
        calls.append(1)
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        run_with_memory_fallback("x", boom, s.gt, MapperOptions())
    assert len(calls) == 1
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory")) and is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))

