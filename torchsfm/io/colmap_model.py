"""COLMAP sparse models (cameras/images/points3D[/rigs/frames] .bin or .txt) <-> Reconstruction.

pycolmap parses all files and writes text models; binary models of a Reconstruction are written
by `colmap_binary` straight from the arrays (same bytes, without a pycolmap object per point).
Ids, names, every image's points2D (also those without a 3D point), tracks, colours and errors
are kept, so a model round-trips unchanged.

Rigs: COLMAP 4 stores poses on frames of rigs. We support trivial rigs only (one camera per
rig, one image per frame), which is what legacy models and single-camera captures give; a
model with a multi-sensor rig raises NotImplementedError naming it. Rig and frame ids that
differ from COLMAP's defaults (rig_id = camera_id, frame_id = image_id) are kept in
`meta["colmap_rig_ids"]` / `meta["colmap_frame_ids"]` ({camera_id: rig_id} / {image_id:
frame_id}), keyed by COLMAP id so that they survive filtering or reordering of rows.

Unregistered images: a pycolmap.Reconstruction holds them (from/to_pycolmap keep them), but
COLMAP 4's writers store registered frames only, so `write_model` cannot put them in the files;
it logs how many were left out.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pycolmap
import torch

from ..data.camera_models import model_info
from ..data.model import (
    MAX_CAMERA_PARAMS,
    Cameras,
    Images,
    Keypoints,
    Points3D,
    Reconstruction,
    Tracks,
    offsets_from_counts,
)
from .atomic import atomic_dir
from .colmap_binary import unit_quaternions, write_binary_model

logger = logging.getLogger(__name__)

MODEL_FILES = ("cameras", "images", "points3D")
RIG_FILES = ("rigs", "frames")


# ---------------------------------------------------------------------------------------------
# pycolmap -> torchsfm


def _check_trivial_rigs(rec: pycolmap.Reconstruction) -> None:
    for rig_id, rig in rec.rigs.items():
        n = rig.num_sensors()
        if n != 1 or rig.ref_sensor_id.type != pycolmap.SensorType.CAMERA:
            raise NotImplementedError(
                f"rig {rig_id} has {n} sensors ({rig.sensor_ids()}); torchsfm supports trivial rigs only "
                "(one camera per rig, sensor_from_rig = identity). Split the rig into single-camera rigs "
                "or use COLMAP/GLOMAP for multi-camera rigs."
            )
    for frame_id, frame in rec.frames.items():
        n = frame.num_data_ids()
        if n != 1:
            raise NotImplementedError(
                f"frame {frame_id} of rig {frame.rig_id} holds {n} images; torchsfm supports one image per "
                "frame (trivial rigs) only."
            )


def _quat_wxyz(rigid: pycolmap.Rigid3d) -> np.ndarray:
    return np.roll(np.asarray(rigid.rotation.quat, dtype=np.float64), 1)  # pycolmap is xyzw


def from_pycolmap(
    rec: pycolmap.Reconstruction, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> Reconstruction:
    """Convert a pycolmap.Reconstruction (rows sorted by COLMAP id)."""
    _check_trivial_rigs(rec)

    cam_ids = sorted(rec.cameras.keys())
    cam_row = {cid: r for r, cid in enumerate(cam_ids)}
    params = np.zeros((len(cam_ids), MAX_CAMERA_PARAMS))
    model_ids, widths, heights, priors = [], [], [], []
    rig_ids: dict[int, int] = {}
    for r, cid in enumerate(cam_ids):
        cam = rec.cameras[cid]
        info = model_info(int(cam.model.value))  # raises a clear error for unsupported models
        p = np.asarray(cam.params, dtype=np.float64)
        if p.size != info.num_params:
            raise ValueError(f"camera {cid} ({info.name}) has {p.size} parameters, expected {info.num_params}")
        params[r, : p.size] = p
        model_ids.append(info.model_id)
        widths.append(cam.width)
        heights.append(cam.height)
        priors.append(bool(cam.has_prior_focal_length))
    for rig_id, rig in rec.rigs.items():
        cid = rig.ref_sensor_id.id
        if cid != rig_id:
            rig_ids[cid] = rig_id

    img_ids = sorted(rec.images.keys())
    img_row = {iid: r for r, iid in enumerate(img_ids)}
    n_img = len(img_ids)
    quat = np.zeros((n_img, 4))
    quat[:, 0] = 1.0
    trans = np.zeros((n_img, 3))
    registered = np.zeros(n_img, dtype=bool)
    cam_of_img = np.zeros(n_img, dtype=np.int64)
    names, xy_list, counts = [], [], np.zeros(n_img, dtype=np.int64)
    frame_ids: dict[int, int] = {}
    for r, iid in enumerate(img_ids):
        im = rec.images[iid]
        if im.camera_id not in cam_row:
            raise ValueError(f"image {iid} ({im.name}) refers to camera {im.camera_id}, which the model lacks")
        cam_of_img[r] = cam_row[im.camera_id]
        names.append(im.name)
        if im.has_pose:
            pose = im.cam_from_world()
            quat[r] = _quat_wxyz(pose)
            trans[r] = np.asarray(pose.translation, dtype=np.float64)
            registered[r] = True
        pts = im.points2D
        counts[r] = len(pts)
        xy_list.append(np.array([p.xy for p in pts], dtype=np.float64).reshape(-1, 2))
        if im.has_frame_id() and im.frame_id != iid:
            frame_ids[iid] = int(im.frame_id)

    pt_ids = sorted(rec.points3D.keys())
    n_pts = len(pt_ids)
    xyz = np.zeros((n_pts, 3))
    rgb = np.zeros((n_pts, 3), dtype=np.uint8)
    err = np.zeros(n_pts)
    track_img, track_kp, track_len = [], [], np.zeros(n_pts, dtype=np.int64)
    for r, pid in enumerate(pt_ids):
        p = rec.points3D[pid]
        xyz[r] = p.xyz
        rgb[r] = p.color
        err[r] = p.error
        els = p.track.elements
        track_len[r] = len(els)
        track_img.extend(e.image_id for e in els)
        track_kp.extend(e.point2D_idx for e in els)

    # Map track image ids to rows, vectorised, and check the keypoint indices.
    ids_sorted = np.asarray(img_ids, dtype=np.int64)
    t_img_id = np.asarray(track_img, dtype=np.int64)
    t_img = np.searchsorted(ids_sorted, t_img_id)
    bad = t_img >= n_img
    bad[~bad] = ids_sorted[t_img[~bad]] != t_img_id[~bad]
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        point_row = int(np.searchsorted(np.cumsum(track_len), k, side="right"))
        raise ValueError(f"point3D {pt_ids[point_row]} is observed in image {t_img_id[k]}, which the model lacks")
    t_kp = np.asarray(track_kp, dtype=np.int64)
    if t_kp.size and (t_kp >= counts[t_img]).any():
        k = int(np.flatnonzero(t_kp >= counts[t_img])[0])
        point_row = int(np.searchsorted(np.cumsum(track_len), k, side="right"))
        raise ValueError(
            f"point3D {pt_ids[point_row]} observes point2D {t_kp[k]} of image {t_img_id[k]}, "
            f"which has only {counts[t_img[k]]} points2D"
        )

    f = dict(dtype=dtype, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    cameras = Cameras(
        camera_id=torch.tensor(cam_ids, **i64).reshape(-1),
        model_id=torch.tensor(model_ids, **i64).reshape(-1),
        width=torch.tensor(widths, **i64).reshape(-1),
        height=torch.tensor(heights, **i64).reshape(-1),
        params=torch.tensor(params, **f),
        has_prior_focal_length=torch.tensor(priors, dtype=torch.bool, device=device).reshape(-1),
    )
    images = Images(
        image_id=torch.tensor(img_ids, **i64).reshape(-1),
        name=names,
        camera=torch.from_numpy(cam_of_img).to(device),
        quat=torch.tensor(quat, **f),
        trans=torch.tensor(trans, **f),
        registered=torch.from_numpy(registered).to(device),
    )
    xy = np.concatenate(xy_list) if xy_list else np.zeros((0, 2))
    keypoints = Keypoints(xy=torch.tensor(xy, **f), offsets=offsets_from_counts(torch.from_numpy(counts)).to(device))
    points3D = Points3D(
        point3D_id=torch.tensor(pt_ids, **i64).reshape(-1),
        xyz=torch.tensor(xyz, **f),
        rgb=torch.from_numpy(rgb).to(device),
        error=torch.tensor(err, **f),
    )
    tracks = Tracks(
        point=torch.repeat_interleave(torch.arange(n_pts), torch.from_numpy(track_len)).to(device),
        image=torch.from_numpy(t_img.astype(np.int64)).to(device),
        keypoint=torch.from_numpy(t_kp).to(device),
    )
    meta = {}
    if rig_ids:
        meta["colmap_rig_ids"] = rig_ids
    if frame_ids:
        meta["colmap_frame_ids"] = frame_ids
    return Reconstruction(cameras, images, keypoints, points3D, tracks, meta=meta)


# ---------------------------------------------------------------------------------------------
# torchsfm -> pycolmap


def _np(t: torch.Tensor, dtype=None) -> np.ndarray:
    a = t.detach().cpu()
    if dtype is not None and a.is_floating_point():
        a = a.to(torch.float64)
    return a.numpy()


def to_pycolmap(rec: Reconstruction) -> pycolmap.Reconstruction:
    """Build a pycolmap.Reconstruction with one trivial rig per camera and one frame per image."""
    out = pycolmap.Reconstruction()
    cams, ims = rec.cameras, rec.images
    cam_ids = _np(cams.camera_id).tolist()
    rig_ids = rec.meta.get("colmap_rig_ids", {})
    frame_ids = rec.meta.get("colmap_frame_ids", {})
    params = _np(cams.params, float)
    for r, cid in enumerate(cam_ids):
        info = model_info(int(cams.model_id[r]))
        out.add_camera(
            pycolmap.Camera(
                camera_id=cid, model=info.name, width=int(cams.width[r]), height=int(cams.height[r]),
                params=params[r, : info.num_params].copy(), has_prior_focal_length=bool(cams.has_prior_focal_length[r]),
            )
        )
        rig = pycolmap.Rig(rig_id=int(rig_ids.get(cid, cid)))
        rig.add_ref_sensor(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cid))
        out.add_rig(rig)

    img_ids = _np(ims.image_id).tolist()
    cam_of_img = _np(ims.camera).tolist()
    quat = unit_quaternions(ims.quat)
    trans = _np(ims.trans, float)
    reg = _np(ims.registered).tolist()
    kp_xy = _np(rec.keypoints.xy, float)
    kp_off = _np(rec.keypoints.offsets).tolist()
    if len(kp_off) != len(img_ids) + 1:
        raise ValueError(f"keypoints have offsets for {len(kp_off) - 1} images, the model has {len(img_ids)}")
    for r, iid in enumerate(img_ids):
        cid = cam_ids[cam_of_img[r]]
        fid = int(frame_ids.get(iid, iid))
        frame = pycolmap.Frame(frame_id=fid, rig_id=int(rig_ids.get(cid, cid)))
        frame.add_data_id(pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cid), iid))
        if reg[r]:
            frame.rig_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(np.roll(quat[r], -1)), trans[r].copy())
        out.add_frame(frame)
        image = pycolmap.Image(
            name=ims.name[r], keypoints=kp_xy[kp_off[r] : kp_off[r + 1]].copy(), camera_id=cid, image_id=iid
        )
        image.frame_id = fid
        out.add_image(image)
        if reg[r]:
            out.register_frame(fid)

    # Tracks sorted by point (stable, so that each track keeps its element order).
    P = len(rec.points3D)
    order = torch.sort(rec.tracks.point, stable=True).indices
    t_point = rec.tracks.point[order]
    t_img_id = _np(ims.image_id[rec.tracks.image[order]]).tolist()
    t_kp = _np(rec.tracks.keypoint[order]).tolist()
    t_off = _np(offsets_from_counts(torch.bincount(t_point, minlength=P))).tolist()
    xyz = _np(rec.points3D.xyz, float)
    rgb = _np(rec.points3D.rgb).astype(np.uint8)
    err = _np(rec.points3D.error, float).tolist()
    pids = _np(rec.points3D.point3D_id).tolist()
    TE = pycolmap.TrackElement
    for r, pid in enumerate(pids):
        a, b = t_off[r], t_off[r + 1]
        track = pycolmap.Track([TE(t_img_id[k], t_kp[k]) for k in range(a, b)])
        point = pycolmap.Point3D(xyz=xyz[r].copy(), color=rgb[r].copy(), error=err[r], track=track)
        out.add_point3D_with_id(pid, point)
    return out


# ---------------------------------------------------------------------------------------------
# Files


def detect_format(path: str | os.PathLike) -> str:
    """'bin' or 'txt' for a model folder; a clear error when it holds neither."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"COLMAP model folder {p} does not exist")
    for fmt in ("bin", "txt"):
        if all((p / f"{name}.{fmt}").is_file() for name in MODEL_FILES):
            return fmt
    raise FileNotFoundError(
        f"{p} is not a COLMAP model: expected cameras, images and points3D as .bin or .txt files, found "
        f"{sorted(x.name for x in p.iterdir())}"
    )


def read_model(
    path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> Reconstruction:
    """Read a COLMAP model folder (.bin or .txt, with or without rigs/frames files)."""
    fmt = detect_format(path)
    rec = pycolmap.Reconstruction()
    (rec.read_binary if fmt == "bin" else rec.read_text)(str(path))
    out = from_pycolmap(rec, device=device, dtype=dtype)
    out.meta["colmap_format"] = fmt
    logger.info("read %s model %s: %s", fmt, path, out.summary())
    return out


def write_model(rec: Reconstruction | pycolmap.Reconstruction, path: str | os.PathLike, format: str = "bin") -> None:
    """Write a COLMAP model folder atomically (the folder is replaced as a whole).

    COLMAP 4 writes rigs/frames files next to cameras/images/points3D; older COLMAP and most
    third-party readers ignore them.
    """
    if format not in ("bin", "txt"):
        raise ValueError(f"format must be 'bin' or 'txt', not {format!r}")
    native = isinstance(rec, Reconstruction) and format == "bin"
    prec = None if native else (rec if isinstance(rec, pycolmap.Reconstruction) else to_pycolmap(rec))
    dropped = int((~rec.images.registered).sum()) if native else prec.num_images() - prec.num_reg_images()
    if dropped:
        logger.warning(
            "%d unregistered image(s) are not written to %s: COLMAP model files hold registered images only",
            dropped, path,
        )
    with atomic_dir(path) as tmp:
        if native:  # numpy writer: no pycolmap object per point (colmap_binary.py)
            write_binary_model(rec, tmp)
        else:
            (prec.write_binary if format == "bin" else prec.write_text)(str(tmp))
        missing = [n for n in MODEL_FILES if not (tmp / f"{n}.{format}").is_file()]
        if missing:
            raise RuntimeError(f"the model writer did not write {missing} for {path}")
