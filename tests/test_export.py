"""Exports: COLMAP round trips, PLY contents and colours, nerfstudio transforms.json read back,
undistorted PINHOLE datasets, refusals and the CLI's exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch

from torchsfm.cameras.models import project_cameras, unproject_cameras
from torchsfm.data.camera_models import model_id
from torchsfm.cli import main
from torchsfm.export import (
    ExportError,
    NerfstudioOptions,
    export_model,
    export_nerfstudio,
    export_ply,
    export_undistorted,
    sample_point_colors,
    transforms_json,
)
from torchsfm.export import nerfstudio as ns_module
from torchsfm.geometry import so3
from torchsfm.io.colmap_model import from_pycolmap, read_model, write_model

OPENCV = [180.0, 175.0, 101.0, 74.0, 0.12, -0.04, 0.002, -0.001]


def synthetic_pycolmap(model="OPENCV", params=OPENCV, rigs=2, frames=3, points=80, w=200, h=150, seed=0, track_length=-1):
    pycolmap.set_random_seed(seed)
    o = pycolmap.SyntheticDatasetOptions()
    o.num_rigs, o.num_cameras_per_rig, o.num_frames_per_rig, o.num_points3D = rigs, 1, frames, points
    o.camera_width, o.camera_height = w, h
    o.camera_model_id = getattr(pycolmap.CameraModelId, model)
    o.camera_params = list(params)
    o.num_points2D_without_point3D = 3
    o.track_length = track_length  # -1: every point seen by every image
    return pycolmap.synthesize_dataset(o)


def synthetic(**kw):
    return from_pycolmap(synthetic_pycolmap(**kw))


def read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """A minimal binary little-endian PLY reader: header lines and the vertex records."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    n = int(next(line for line in header if line.startswith("element vertex")).split()[-1])
    types = {"float": "<f4", "double": "<f8", "uchar": "u1"}
    fields = [(line.split()[2], types[line.split()[1]]) for line in header if line.startswith("property")]
    rec = np.frombuffer(data[end:], dtype=fields)
    assert rec.shape[0] == n
    return header, rec


def cam_from_world_np(rec) -> tuple[np.ndarray, np.ndarray]:
    return so3.quat_to_matrix(rec.images.quat).numpy(), rec.images.trans.numpy()


# ---------------------------------------------------------------------------------------------
# COLMAP


@pytest.mark.parametrize("fmt", ["colmap-bin", "colmap-txt"])
def test_colmap_export_round_trip(tmp_path, fmt):
    rec = synthetic()
    out = export_model(rec, fmt, tmp_path / "out")
    ext = fmt.split("-")[1]
    assert all((out / f"{n}.{ext}").is_file() for n in ("cameras", "images", "points3D"))
    back = read_model(out)
    assert back.images.name == rec.images.name
    tol = 0 if ext == "bin" else 1e-9
    for a, b in [(back.images.quat, rec.images.quat), (back.images.trans, rec.images.trans),
                 (back.cameras.params, rec.cameras.params), (back.points3D.xyz, rec.points3D.xyz),
                 (back.keypoints.xy, rec.keypoints.xy)]:
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert torch.equal(back.points3D.rgb, rec.points3D.rgb)
    assert torch.equal(back.tracks.image, rec.tracks.image) and torch.equal(back.tracks.keypoint, rec.tracks.keypoint)


def test_colmap_in_place_conversion_needs_overwrite(tmp_path):
    model = tmp_path / "sparse" / "0"
    write_model(synthetic(), model)
    rec = read_model(model)
    with pytest.raises(ExportError, match="--overwrite"):
        export_model(rec, "colmap-txt", model, model_path=model)
    export_model(rec, "colmap-txt", model, model_path=model, overwrite=True)
    assert (model / "images.txt").is_file() and not (model / "images.bin").exists()
    # A folder holding the model is never a valid output: it would be replaced as a whole.
    with pytest.raises(ExportError, match="contains the input"):
        export_model(rec, "colmap-bin", tmp_path / "sparse", model_path=model, overwrite=True)
    assert (model / "images.txt").is_file()


# ---------------------------------------------------------------------------------------------
# PLY


def test_ply_stored_colours(tmp_path):
    rec = synthetic()
    g = torch.Generator().manual_seed(1)
    rec.points3D.rgb = torch.randint(0, 256, (len(rec.points3D), 3), generator=g).to(torch.uint8)
    path = export_ply(rec, tmp_path / "points.ply")
    header, v = read_ply(path)
    assert "property uchar red" in header and "property float x" in header
    assert v.shape[0] == len(rec.points3D)
    xyz = np.stack([v["x"], v["y"], v["z"]], 1)
    np.testing.assert_allclose(xyz, rec.points3D.xyz.numpy(), rtol=1e-6, atol=1e-6)
    assert np.array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), rec.points3D.rgb.numpy())


def write_gradient_images(rec, folder: Path) -> None:
    """Image k: red = column, green = row, blue = 7 (k + 1); BMP so that values are exact."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rec.images.name = [Path(n).with_suffix(".bmp").as_posix() for n in rec.images.name]
    for k, name in enumerate(rec.images.name):
        c = int(rec.images.camera[k])
        w, h = int(rec.cameras.width[c]), int(rec.cameras.height[c])
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = np.arange(w)[None, :]
        img[..., 1] = np.arange(h)[:, None]
        img[..., 2] = 7 * (k + 1)
        Image.fromarray(img).save(folder / name)


def test_ply_colours_sampled_from_images(tmp_path):
    rec = synthetic(points=60, track_length=3)
    write_gradient_images(rec, tmp_path / "images")
    path = export_ply(rec, tmp_path / "points.ply", image_dir=tmp_path / "images")
    _, v = read_ply(path)
    got = np.stack([v["red"], v["green"], v["blue"]], 1).astype(np.float64)
    # Known answer: bilinear sampling of the ramps at (x - 0.5, y - 0.5) gives x - 0.5 and y - 0.5.
    xy = rec.observation_xy().numpy()
    expect_obs = np.stack([xy[:, 0] - 0.5, xy[:, 1] - 0.5, 7.0 * (rec.tracks.image.numpy() + 1)], 1)
    P = len(rec.points3D)
    n = np.bincount(rec.tracks.point.numpy(), minlength=P)
    expect = np.stack([np.bincount(rec.tracks.point.numpy(), expect_obs[:, j], minlength=P) for j in range(3)], 1)
    expect = np.round(expect / n[:, None])
    assert (n > 0).all()
    assert np.abs(got - expect).max() <= 1  # rounding of values within float noise of .5
    assert (got == expect).mean() > 0.98
    assert len(np.unique(got[:, 2])) > 3  # averages over different images, not one image's colour


def test_ply_colours_match_colmap(tmp_path):
    """Parity with COLMAP's own colour extraction (Reconstruction.extract_colors_for_all_images)."""
    prec = synthetic_pycolmap(rigs=2, frames=3, points=120, track_length=3)
    (tmp_path / "images").mkdir()
    pycolmap.synthesize_images(pycolmap.SyntheticImageOptions(), prec, str(tmp_path / "images"))
    rec = from_pycolmap(prec)
    prec.extract_colors_for_all_images(str(tmp_path / "images"))
    colmap_rgb = from_pycolmap(prec).points3D.rgb.numpy().astype(int)
    rgb, colored = sample_point_colors(rec, tmp_path / "images")
    assert colored.all()
    assert colmap_rgb.std() > 10  # the synthetic images are not flat
    d = np.abs(rgb.numpy().astype(int) - colmap_rgb)
    assert d.max() <= 1 and (d == 0).all(1).mean() > 0.98


def test_ply_refusals(tmp_path):
    rec = synthetic()
    rec.images.name[0] = "missing.png"
    (tmp_path / "images").mkdir()
    with pytest.raises(ExportError, match="missing"):
        export_ply(rec, tmp_path / "p.ply", image_dir=tmp_path / "images")
    assert not (tmp_path / "p.ply").exists()


# ---------------------------------------------------------------------------------------------
# nerfstudio


def cam_from_world_from_transforms(meta: dict, frame: dict) -> tuple[np.ndarray, np.ndarray]:
    """Undo nerfstudio's conventions independently of the exporter."""
    T = np.asarray(frame["transform_matrix"], dtype=np.float64)
    if "applied_transform" in meta:
        A = np.vstack([np.asarray(meta["applied_transform"]), [0, 0, 0, 1]])
        T = np.linalg.inv(A) @ T
    c2w = T.copy()
    c2w[:3, 1:3] *= -1  # OpenGL -> OpenCV camera axes
    R = c2w[:3, :3].T
    return R, -R @ c2w[:3, 3]


@pytest.mark.parametrize("rigs", [1, 2])
def test_nerfstudio_round_trip(tmp_path, rigs):
    rec = synthetic(rigs=rigs)
    rec.images.registered[1] = False  # unregistered images are not frames
    out = export_nerfstudio(rec, tmp_path / "ns")
    meta = json.loads((out / "transforms.json").read_text())
    reg = rec.images.registered.numpy()
    assert [f["colmap_im_id"] for f in meta["frames"]] == rec.images.image_id.numpy()[reg].tolist()
    assert meta["camera_model"] == "OPENCV"
    single = rigs == 1
    assert ("fl_x" in meta) == single  # one camera: intrinsics at the top level, else per frame
    R_all, t_all = cam_from_world_np(rec)
    params = rec.cameras.params.numpy()
    for frame, i in zip(meta["frames"], np.flatnonzero(reg)):
        assert frame["file_path"] == f"images/{rec.images.name[i]}"
        R, t = cam_from_world_from_transforms(meta, frame)
        np.testing.assert_allclose(R, R_all[i], rtol=0, atol=1e-9)
        np.testing.assert_allclose(t, t_all[i], rtol=0, atol=1e-9)
        intr = meta if single else frame
        p = params[int(rec.images.camera[i])]
        got = [intr[k] for k in ("fl_x", "fl_y", "cx", "cy", "k1", "k2", "p1", "p2")]
        assert got == p[:8].tolist()
        assert (intr["w"], intr["h"]) == (200, 150)
    # The point cloud is in the same (re-axed) world as the poses.
    assert meta["ply_file_path"] == "sparse_pc.ply"
    _, v = read_ply(out / "sparse_pc.ply")
    A = np.asarray(meta["applied_transform"])
    xyz = rec.points3D.xyz.numpy() @ A[:, :3].T + A[:, 3]
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), xyz, rtol=1e-6, atol=1e-6)
    assert not (out / "images").exists()  # no image folder given


def test_nerfstudio_matches_nerfstudio_conventions(tmp_path):
    """transform_matrix follows colmap_to_json's recipe: inv(w2c), flip y/z columns, rows
    (x, z, -y); applied_transform is that row map; keep_world drops it."""
    rec = synthetic(rigs=1)
    meta = transforms_json(rec)
    R, t = cam_from_world_np(rec)
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R[0], t[0]
    c2w = np.linalg.inv(w2c)
    c2w[0:3, 1:3] *= -1
    kept = c2w.copy()
    c2w = c2w[[0, 2, 1, 3], :]
    c2w[2, :] *= -1
    np.testing.assert_allclose(meta["frames"][0]["transform_matrix"], c2w, rtol=0, atol=1e-12)
    assert meta["applied_transform"] == [[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0]]
    kw = transforms_json(rec, NerfstudioOptions(keep_world=True))
    assert "applied_transform" not in kw
    np.testing.assert_allclose(kw["frames"][0]["transform_matrix"], kept, rtol=0, atol=1e-12)


def test_nerfstudio_fisheye_and_simple_models():
    fish = synthetic(model="OPENCV_FISHEYE", params=[150, 151, 100, 75, 0.05, -0.01, 0.002, 0.001], rigs=1)
    meta = transforms_json(fish)
    assert meta["camera_model"] == "OPENCV_FISHEYE"
    assert [meta[k] for k in ("k1", "k2", "k3", "k4")] == [0.05, -0.01, 0.002, 0.001]
    assert "p1" not in meta
    sr = synthetic(model="SIMPLE_RADIAL", params=[160, 100, 75, 0.03], rigs=1)
    meta = transforms_json(sr)
    assert (meta["camera_model"], meta["fl_x"], meta["fl_y"], meta["k1"], meta["k2"], meta["p1"]) == (
        "OPENCV", 160.0, 160.0, 0.03, 0.0, 0.0)


def test_nerfstudio_copies_images(tmp_path):
    rec = synthetic(rigs=1)
    write_gradient_images(rec, tmp_path / "images")
    out = export_nerfstudio(rec, tmp_path / "ns", image_dir=tmp_path / "images")
    meta = json.loads((out / "transforms.json").read_text())
    assert len(meta["frames"]) == int(rec.images.registered.sum()) > 0
    for f in meta["frames"]:
        assert (out / f["file_path"]).read_bytes() == (tmp_path / "images" / f["file_path"][7:]).read_bytes()


def test_nerfstudio_refuses_mixed_camera_types(tmp_path):
    rec = synthetic(rigs=2)
    rec.cameras.model_id[1] = model_id("OPENCV_FISHEYE")
    with pytest.raises(ExportError, match="--format undistorted") as e:
        export_nerfstudio(rec, tmp_path / "ns")
    assert "OPENCV_FISHEYE" in str(e.value) and "one camera_model per dataset" in str(e.value)
    assert not (tmp_path / "ns").exists()


def test_nerfstudio_refuses_inexpressible_models(tmp_path, monkeypatch):
    # Every model torchsfm supports today maps to nerfstudio; a model that does not (as
    # FULL_OPENCV or FOV in COLMAP) must be refused, not written wrong.
    rec = synthetic(model="RADIAL", params=[160, 100, 75, 0.01, 0.001], rigs=1)
    monkeypatch.delitem(ns_module.NERFSTUDIO_MODELS, "RADIAL")
    with pytest.raises(ExportError, match="cannot express.*--format undistorted"):
        export_nerfstudio(rec, tmp_path / "ns")


def test_nerfstudio_failure_leaves_existing_output(tmp_path, monkeypatch):
    out = tmp_path / "ns"
    export_nerfstudio(synthetic(rigs=1), out)
    before = (out / "transforms.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ns_module, "write_ply", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_nerfstudio(synthetic(rigs=2, seed=3), out, overwrite=True)
    assert (out / "transforms.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ns"]  # no temporaries left


# ---------------------------------------------------------------------------------------------
# Undistorted PINHOLE dataset


def test_undistorted_is_pinhole_and_consistent(tmp_path):
    prec = synthetic_pycolmap(model="OPENCV", params=[180, 175, 101, 74, 0.15, -0.05, 0.003, -0.002], rigs=2)
    (tmp_path / "images").mkdir()
    pycolmap.synthesize_images(pycolmap.SyntheticImageOptions(), prec, str(tmp_path / "images"))
    rec = from_pycolmap(prec)
    out = export_undistorted(rec, tmp_path / "images", tmp_path / "und")
    assert sorted(p.name for p in out.iterdir()) == ["images", "sparse"]
    und = read_model(out / "sparse" / "0")
    assert set(und.cameras.model_names) == {"PINHOLE"}
    assert und.images.name == rec.images.name
    torch.testing.assert_close(und.images.quat, rec.images.quat, rtol=0, atol=1e-12)
    torch.testing.assert_close(und.images.trans, rec.images.trans, rtol=0, atol=1e-12)
    torch.testing.assert_close(und.points3D.xyz, rec.points3D.xyz, rtol=0, atol=1e-12)
    from PIL import Image

    for k, name in enumerate(und.images.name):
        c = int(und.images.camera[k])
        with Image.open(out / "images" / name) as im:
            assert im.size == (int(und.cameras.width[c]), int(und.cameras.height[c]))

    # 1) 3D points project, through the PINHOLE cameras, onto the undistorted observations.
    tr = und.tracks
    R = so3.quat_to_matrix(und.images.quat)[tr.image]
    p_cam = (R @ und.points3D.xyz[tr.point][..., None])[..., 0] + und.images.trans[tr.image]
    uv = project_cameras(und.cameras, und.images.camera[tr.image], p_cam)
    obs_und = und.observation_xy_of(tr)
    assert (uv - obs_und).abs().max() < 1e-6
    # 2) Each undistorted observation is the distorted one taken through the original camera's
    #    undistortion (torchsfm's own camera code) and the new PINHOLE intrinsics.
    assert torch.equal(tr.image, rec.tracks.image) and torch.equal(tr.keypoint, rec.tracks.keypoint)
    ray = unproject_cameras(rec.cameras, rec.images.camera[tr.image], rec.observation_xy_of(rec.tracks))
    K = und.cameras.params[und.images.camera[tr.image]]
    expect = torch.stack([K[:, 0] * ray[:, 0] + K[:, 2], K[:, 1] * ray[:, 1] + K[:, 3]], -1)
    assert (expect - obs_und).abs().max() < 1e-6
    # The distortion was real: the observations moved.
    assert (obs_und - rec.observation_xy_of(rec.tracks)).norm(dim=-1).max() > 2


def test_undistorted_needs_images(tmp_path):
    rec = synthetic(rigs=1)
    with pytest.raises(ExportError, match="--images"):
        export_undistorted(rec, None, tmp_path / "und")
    (tmp_path / "images").mkdir()
    with pytest.raises(ExportError, match="missing"):
        export_undistorted(rec, tmp_path / "images", tmp_path / "und")
    assert not (tmp_path / "und").exists()


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def model_dir(tmp_path) -> Path:
    path = tmp_path / "scene" / "sparse" / "0"
    write_model(synthetic(rigs=1), path)
    return path


def test_cli_export_success(tmp_path, model_dir, capsys):
    assert main(["-q", "export", str(model_dir), "--format", "ply", "--output", str(tmp_path / "p.ply")]) == 0
    assert "wrote ply export" in capsys.readouterr().out
    _, v = read_ply(tmp_path / "p.ply")
    assert v.shape[0] == 80
    assert main(["-q", "export", str(model_dir), "-f", "nerfstudio", "-o", str(tmp_path / "ns")]) == 0
    assert (tmp_path / "ns" / "transforms.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "{missing}", "--format", "ply", "--output", "{tmp}/p.ply"], "does not exist"),
        (["export", "{model}", "--format", "undistorted", "--output", "{tmp}/u"], "--images"),
        (["export", "{model}", "--format", "ply", "--output", "{tmp}"], "is a folder"),
        (["export", "{model}", "--format", "ply", "--output", "{tmp}/p.ply", "--images", "{tmp}/nope"], "not a folder"),
        (["export", "{model}", "--format", "nerfstudio", "--output", "{scene}"], "contains the input"),
        (["export", "{model}", "--format", "colmap-bin", "--output", "{model}"], "--overwrite"),
    ],
)
def test_cli_export_bad_input_exits_2(tmp_path, model_dir, capsys, args, message):
    subs = {"missing": str(tmp_path / "nope" / "0"), "tmp": str(tmp_path), "model": str(model_dir),
            "scene": str(model_dir.parent.parent)}
    argv = [a.format(**subs) for a in args]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchsfm export: error:") and message in err
    assert (model_dir / "images.bin").is_file()  # inputs untouched


def test_cli_export_unknown_format_exits_2(tmp_path, model_dir, capsys):
    assert main(["export", str(model_dir), "--format", "obj", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'obj'" in err and len(err.strip().splitlines()) == 1  # one line, no usage dump


def test_cli_export_refusal_exits_2(tmp_path, capsys):
    rec = synthetic(rigs=2)
    rec.cameras.model_id[1] = model_id("OPENCV_FISHEYE")
    write_model(rec, tmp_path / "m")
    assert main(["-q", "export", str(tmp_path / "m"), "-f", "nerfstudio", "-o", str(tmp_path / "ns")]) == 2
    assert not (tmp_path / "ns").exists()  # nothing written
    assert "--format undistorted" in capsys.readouterr().err


def test_exports_follow_the_model_device(tmp_path, device):
    rec = synthetic(rigs=2, track_length=3)
    write_gradient_images(rec, tmp_path / "images")
    on_dev = rec.to(device)
    assert transforms_json(on_dev) == transforms_json(rec)
    a = export_ply(rec, tmp_path / "a.ply", image_dir=tmp_path / "images").read_bytes()
    b = export_ply(on_dev, tmp_path / "b.ply", image_dir=tmp_path / "images").read_bytes()
    assert a == b
