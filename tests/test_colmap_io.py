"""COLMAP model round trips through pycolmap, and crash-safe writes."""
from __future__ import annotations

import os

import numpy as np
import pycolmap
import pytest
import torch

from torchsfm.io import atomic
from torchsfm.io.colmap_model import from_pycolmap, read_model, to_pycolmap, write_model


def synthetic_model(num_rigs=2, frames=4, points=60, cams_per_rig=1, seed=0) -> pycolmap.Reconstruction:
    pycolmap.set_random_seed(seed)
    o = pycolmap.SyntheticDatasetOptions()
    o.num_rigs = num_rigs
    o.num_cameras_per_rig = cams_per_rig
    o.num_frames_per_rig = frames
    o.num_points3D = points
    o.num_points2D_without_point3D = 7  # keypoints without a 3D point must survive too
    o.camera_has_prior_focal_length = True
    return pycolmap.synthesize_dataset(o)


def assert_same_pycolmap(a, b, exact: bool = True, check_prior: bool = True) -> None:
    tol = 0 if exact else 1e-9
    assert sorted(a.cameras.keys()) == sorted(b.cameras.keys())
    for cid, ca in a.cameras.items():
        cb = b.cameras[cid]
        assert (ca.model, ca.width, ca.height) == (cb.model, cb.width, cb.height)
        assert not check_prior or ca.has_prior_focal_length == cb.has_prior_focal_length
        np.testing.assert_allclose(ca.params, cb.params, rtol=0, atol=tol)
    assert sorted(a.images.keys()) == sorted(b.images.keys())
    for iid, ia in a.images.items():
        ib = b.images[iid]
        assert (ia.name, ia.camera_id, ia.has_pose) == (ib.name, ib.camera_id, ib.has_pose)
        if ia.has_pose:
            np.testing.assert_allclose(ia.cam_from_world().params, ib.cam_from_world().params, rtol=0, atol=tol)
        pa = np.array([(*p.xy, p.point3D_id) for p in ia.points2D]).reshape(-1, 3)
        pb = np.array([(*p.xy, p.point3D_id) for p in ib.points2D]).reshape(-1, 3)
        np.testing.assert_allclose(pa, pb, rtol=0, atol=tol)
    assert sorted(a.points3D.keys()) == sorted(b.points3D.keys())
    for pid, pa in a.points3D.items():
        pb = b.points3D[pid]
        np.testing.assert_allclose(pa.xyz, pb.xyz, rtol=0, atol=tol)
        assert np.array_equal(pa.color, pb.color)
        assert abs(pa.error - pb.error) <= max(tol, 1e-12)
        ta = sorted((e.image_id, e.point2D_idx) for e in pa.track.elements)
        tb = sorted((e.image_id, e.point2D_idx) for e in pb.track.elements)
        assert ta == tb


def test_from_pycolmap_content():
    rec = synthetic_model()
    t = from_pycolmap(rec)
    assert t.summary()["images"] == rec.num_images() == 8
    assert len(t.points3D) == rec.num_points3D()
    # Quaternions are w-first, pycolmap's are xyzw.
    iid = int(t.images.image_id[3])
    q_xyzw = rec.images[iid].cam_from_world().rotation.quat
    assert torch.allclose(t.images.quat[3], torch.tensor(np.roll(q_xyzw, 1)), atol=0)
    # Rotation matrix of our quaternion equals pycolmap's.
    R = rec.images[iid].cam_from_world().rotation.matrix()
    assert torch.allclose(t.images.rotation[3], torch.tensor(R), atol=1e-12)
    # Every points2D (also those without a 3D point) is a keypoint; tracks sorted by point.
    assert int(t.keypoints.count()[3]) == rec.images[iid].num_points2D() > rec.images[iid].num_points3D
    assert torch.all(t.tracks.point[1:] >= t.tracks.point[:-1])
    # The observed keypoints reproject onto the points (the model is noiseless).
    obs = t.observation_xy().numpy()
    for k in range(0, len(t.tracks), 37):
        img = rec.images[int(t.images.image_id[t.tracks.image[k]])]
        xyz = t.points3D.xyz[t.tracks.point[k]].numpy()
        np.testing.assert_allclose(img.project_point(xyz), obs[k], atol=1e-6)


def test_in_memory_round_trip_with_unregistered_image():
    rec = synthetic_model()
    fid = sorted(rec.frames.keys())[2]
    rec.deregister_frame(fid)
    t = from_pycolmap(rec)
    assert int(t.images.registered.sum()) == rec.num_reg_images() == rec.num_images() - 1
    assert_same_pycolmap(rec, to_pycolmap(t))


@pytest.mark.parametrize("fmt", ["bin", "txt"])
@pytest.mark.parametrize("legacy", [False, True], ids=["rigs", "legacy"])
def test_file_round_trip(tmp_path, fmt, legacy):
    rec = synthetic_model()
    src = tmp_path / "src"
    src.mkdir()
    (rec.write_binary if fmt == "bin" else rec.write_text)(str(src))
    if legacy:  # a COLMAP 3.x model has no rigs/frames files
        for name in ("rigs", "frames"):
            (src / f"{name}.{fmt}").unlink()
    t = read_model(src)
    assert t.meta["colmap_format"] == fmt
    out = tmp_path / "out"
    write_model(t, out, format=fmt)
    assert sorted(os.listdir(out)) == sorted(f"{n}.{fmt}" for n in ("cameras", "images", "points3D", "rigs", "frames"))
    back = pycolmap.Reconstruction(str(out))
    # Model files do not store has_prior_focal_length (the database does): compare with what
    # pycolmap itself reads from the source folder. Text goes through decimal printing.
    assert_same_pycolmap(pycolmap.Reconstruction(str(src)), back, exact=fmt == "bin")
    assert_same_pycolmap(rec, back, exact=False, check_prior=False)
    t2 = read_model(out)
    for name in ("image_id", "quat", "trans", "camera", "registered"):
        assert torch.equal(getattr(t.images, name), getattr(t2.images, name)), name
    assert t.images.name == t2.images.name
    assert torch.equal(t.keypoints.xy, t2.keypoints.xy) and torch.equal(t.tracks.keypoint, t2.tracks.keypoint)


def test_rig_and_frame_ids_survive(tmp_path):
    # A trivial rig whose id differs from its camera's, and frames whose ids differ from the images'.
    r = pycolmap.Reconstruction()
    r.add_camera(pycolmap.Camera(camera_id=3, model="PINHOLE", width=64, height=48,
                                 params=np.array([50.0, 51, 32, 24])))
    rig = pycolmap.Rig(rig_id=10)
    rig.add_ref_sensor(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, 3))
    r.add_rig(rig)
    for iid in (7, 9):
        fr = pycolmap.Frame(frame_id=iid + 100, rig_id=10)
        fr.add_data_id(pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, 3), iid))
        rot = pycolmap.Rotation3d(np.array([0.0, 0.6, 0.0, -0.8]))  # xyzw, w < 0 on purpose
        fr.rig_from_world = pycolmap.Rigid3d(rot, np.array([0.0, 1, iid]))
        r.add_frame(fr)
        kp = np.array([[1.5, 2.5], [3.0, 4.0]])
        im = pycolmap.Image(name=f"a/{iid}.jpg", keypoints=kp, camera_id=3, image_id=iid)
        im.frame_id = iid + 100
        r.add_image(im)
        r.register_frame(iid + 100)
    t = from_pycolmap(r)
    assert t.meta["colmap_rig_ids"] == {3: 10} and t.meta["colmap_frame_ids"] == {7: 107, 9: 109}
    assert float(t.images.quat[0, 0]) == -0.8  # the sign of w is kept as stored
    back = to_pycolmap(t)
    assert sorted(back.frames.keys()) == [107, 109] and list(back.rigs.keys()) == [10]
    assert_same_pycolmap(r, back)


def _rig_frame_model() -> pycolmap.Reconstruction:
    """Two cameras on rigs whose ids differ from theirs, frames whose ids differ from the images'."""
    r = pycolmap.Reconstruction()
    for cid, rid in ((3, 10), (5, 2)):
        r.add_camera(pycolmap.Camera(camera_id=cid, model="SIMPLE_RADIAL" if cid == 3 else "OPENCV", width=64,
                                     height=48, params=np.arange(4 if cid == 3 else 8) + 20.0))
        rig = pycolmap.Rig(rig_id=rid)
        rig.add_ref_sensor(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cid))
        r.add_rig(rig)
    for k, iid in enumerate((9, 7, 4)):
        cid, rid = ((3, 10), (5, 2))[k % 2]
        fr = pycolmap.Frame(frame_id=iid + 100, rig_id=rid)
        fr.add_data_id(pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cid), iid))
        fr.rig_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(np.array([0.0, 0.6, 0.0, -0.8])), np.array([0.0, 1, iid]))
        r.add_frame(fr)
        im = pycolmap.Image(name=f"a/{iid}.jpg", keypoints=np.arange(2 * (k + 3), dtype=float).reshape(-1, 2),
                            camera_id=cid, image_id=iid)
        im.frame_id = iid + 100
        r.add_image(im)
        r.register_frame(iid + 100)
    for pid, track in ((50, [(9, 0), (7, 1), (4, 3)]), (8, [(4, 0), (9, 2)])):
        t = pycolmap.Track([pycolmap.TrackElement(i, j) for i, j in track])
        r.add_point3D_with_id(pid, pycolmap.Point3D(xyz=np.array([0.5, pid, 2.0]), color=np.array([1, 2, pid], np.uint8),
                                                    error=0.25, track=t))
    return r


@pytest.mark.parametrize("case", ["synthetic", "rigs_and_frames"])
def test_native_binary_writer_gives_pycolmaps_bytes(tmp_path, case):
    rec = synthetic_model(num_rigs=3, frames=3) if case == "synthetic" else _rig_frame_model()
    t = from_pycolmap(rec)
    write_model(t, tmp_path / "ours")
    to_pycolmap(t).write_binary(str(tmp_path))
    for name in ("cameras", "images", "points3D", "rigs", "frames"):
        assert (tmp_path / "ours" / f"{name}.bin").read_bytes() == (tmp_path / f"{name}.bin").read_bytes(), name
    assert_same_pycolmap(rec, pycolmap.Reconstruction(str(tmp_path / "ours")), check_prior=False)  # not in files


def test_native_binary_writer_with_an_unregistered_image(tmp_path):
    # COLMAP writes registered frames only; their points keep their other observations
    rec = synthetic_model()
    rec.deregister_frame(sorted(rec.frames.keys())[1])
    t = from_pycolmap(rec)
    write_model(t, tmp_path / "ours")
    back = pycolmap.Reconstruction(str(tmp_path / "ours"))
    assert back.num_reg_images() == rec.num_reg_images() and back.num_images() == rec.num_images() - 1
    reg = {i for i, im in rec.images.items() if im.has_pose}
    assert rec.num_points3D() > 0  # the loop below compares something
    for pid, p in rec.points3D.items():
        kept = sorted((e.image_id, e.point2D_idx) for e in p.track.elements if e.image_id in reg)
        got = sorted((e.image_id, e.point2D_idx) for e in back.points3D[pid].track.elements) if pid in back.points3D else []
        assert got == kept


def test_non_trivial_rig_is_refused():
    rec = synthetic_model(num_rigs=1, cams_per_rig=2)
    with pytest.raises(NotImplementedError, match=r"rig 1 has 2 sensors"):
        from_pycolmap(rec)


def test_write_model_refuses_bad_format(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_model(from_pycolmap(synthetic_model()), tmp_path / "m", format="ply")
    with pytest.raises(FileNotFoundError, match="not a COLMAP model"):
        read_model(tmp_path)


def test_unregistered_images_are_left_out_of_files_with_a_warning(tmp_path, caplog):
    rec = synthetic_model()
    rec.deregister_frame(sorted(rec.frames.keys())[0])
    t = from_pycolmap(rec)
    write_model(t, tmp_path / "m")
    assert "1 unregistered image(s) are not written" in caplog.text
    t2 = read_model(tmp_path / "m")
    assert len(t2.images) == len(t.images) - 1 and bool(t2.images.registered.all())
    # The observations of the left-out image are gone from the tracks, the others are kept.
    assert len(t2.tracks) == len(t.tracks) - int((~t.images.registered[t.tracks.image]).sum())


def test_interrupted_write_leaves_previous_model(tmp_path, monkeypatch):
    rec = synthetic_model()
    t = from_pycolmap(rec)
    target = tmp_path / "model"
    write_model(t, target)
    before = {n: (target / n).read_bytes() for n in os.listdir(target)}

    # Fail after the writer wrote some files into the temporary folder.
    from torchsfm.io import colmap_model

    real = colmap_model.write_binary_model

    def write_then_fail(rec, path):
        real(rec, path)
        (tmp_path / "seen").write_text(str(sorted(os.listdir(path))))
        raise OSError("disk full")

    monkeypatch.setattr(colmap_model, "write_binary_model", write_then_fail)
    t.points3D.xyz += 1.0
    with pytest.raises(OSError, match="disk full"):
        write_model(t, target)
    assert "points3D.bin" in (tmp_path / "seen").read_text()  # the failure really was mid-write
    assert {n: (target / n).read_bytes() for n in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["model", "seen"]  # no temporary left behind

    # A fresh target that fails is not created at all.
    with pytest.raises(OSError):
        write_model(t, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_atomic_dir_replaces_and_rolls_back(tmp_path):
    target = tmp_path / "out"
    with atomic.atomic_dir(target) as d:
        (d / "a.txt").write_text("one")
        assert not target.exists()  # nothing visible until the block succeeds
    assert (target / "a.txt").read_text() == "one"
    with atomic.atomic_dir(target) as d:
        (d / "b.txt").write_text("two")
    assert os.listdir(target) == ["b.txt"]  # replaced as a whole
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(target) as d:
            (d / "c.txt").write_text("partial")
            raise RuntimeError("crash")
    assert os.listdir(target) == ["b.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_write_text_and_bytes(tmp_path, monkeypatch):
    p = tmp_path / "sub" / "x.json"
    atomic.atomic_write_text(p, "first")
    atomic.atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0600

    def boom(*a, **k):
        raise OSError("fsync failed")

    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(OSError, match="fsync failed"):
        atomic.atomic_write_text(p, "third")
    monkeypatch.undo()
    assert p.read_text() == "second"
    assert os.listdir(p.parent) == ["x.json"]


def test_atomic_path_for_path_writers(tmp_path):
    target = tmp_path / "db.sqlite"
    with atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"abc")
    assert target.read_bytes() == b"abc"
    with pytest.raises(ValueError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("stop")
    assert target.read_bytes() == b"abc" and os.listdir(tmp_path) == ["db.sqlite"]
