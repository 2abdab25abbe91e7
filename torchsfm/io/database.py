"""COLMAP database.db <-> (Cameras, Images, Keypoints, ViewGraph), through pycolmap.Database.

`read_view_graph` loads any COLMAP database (COLMAP's own, hloc's, ours): cameras, images,
keypoints and the verified pairs of the `two_view_geometries` table with their inlier matches,
F/E/H and relative pose. What it loads is validated: duplicate matches are dropped (and
counted in the log); keypoint indices out of range or pairs naming unknown images raise a
ValueError that names the table and the row.

`write_database` writes a complete new database (one writer, one transaction) into a
temporary file that atomically replaces the target on success, with trivial rigs and frames
(one per camera / image) as COLMAP 4's feature extractor writes them, so that COLMAP's and
GLOMAP's mappers run on it unchanged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pycolmap
import torch
from torch import Tensor

from ..data.camera_models import model_info
from ..data.model import (
    MAX_CAMERA_PARAMS,
    TWO_VIEW_DEGENERATE,
    TWO_VIEW_MULTIPLE,
    TWO_VIEW_UNDEFINED,
    TWO_VIEW_WATERMARK,
    Cameras,
    Images,
    Keypoints,
    ViewGraph,
    offsets_from_counts,
    rows_of,
)
from ..geometry import se3, so3
from .atomic import atomic_path

logger = logging.getLogger(__name__)

# Two-view configurations that do not describe a usable geometric relation.
UNVERIFIED_CONFIGS = (TWO_VIEW_UNDEFINED, TWO_VIEW_DEGENERATE, TWO_VIEW_WATERMARK, TWO_VIEW_MULTIPLE)

_CAMERA = pycolmap.SensorType.CAMERA


# ---------------------------------------------------------------------------------------------
# Writing


def _np(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.to(torch.float64) if t.is_floating_point() else t).numpy()


def _check_view_graph(images: Images, keypoints: Keypoints, vg: ViewGraph) -> None:
    n_img = len(images)
    if len(keypoints.offsets) != n_img + 1:
        raise ValueError(f"keypoints have offsets for {len(keypoints.offsets) - 1} images, there are {n_img} images")
    if len(vg) == 0:
        return
    pairs = vg.pairs
    if int(pairs.min()) < 0 or int(pairs.max()) >= n_img or bool((pairs[:, 0] == pairs[:, 1]).any()):
        raise ValueError(f"view graph pairs must name two different image rows in [0, {n_img})")
    if len(vg.match_offsets) != len(vg) + 1 or int(vg.match_offsets[-1]) != vg.matches.shape[0]:
        raise ValueError("view graph match_offsets do not match its pairs and matches")
    pm = vg.pair_of_match()
    counts = keypoints.count()
    lim = torch.stack([counts[pairs[pm, 0]], counts[pairs[pm, 1]]], -1)
    bad = (vg.matches < 0) | (vg.matches >= lim)
    if bool(bad.any()):
        k = int(torch.nonzero(bad.any(-1))[0, 0])
        e = int(pm[k])
        raise ValueError(
            f"view graph pair {e} (image rows {pairs[e].tolist()}): match {vg.matches[k].tolist()} "
            f"is out of range of the images' keypoint counts {lim[k].tolist()}"
        )
    if torch.unique(images.image_id).numel() != n_img:
        raise ValueError("image ids are not unique")


def _descriptor_blob(desc: np.ndarray, type_name: str) -> pycolmap.FeatureDescriptors:
    ftype = getattr(pycolmap.FeatureExtractorType, type_name)
    if desc.dtype == np.uint8:
        return pycolmap.FeatureDescriptors(ftype, np.ascontiguousarray(desc))
    return pycolmap.FeatureDescriptors.from_float(
        pycolmap.FeatureDescriptorsFloat(ftype, np.ascontiguousarray(desc, dtype=np.float32))
    )


def write_database(
    path: str | os.PathLike,
    cameras: Cameras,
    images: Images,
    keypoints: Keypoints,
    view_graph: ViewGraph,
    descriptors: Tensor | None = None,
    descriptor_type: str = "SIFT",
    overwrite: bool = False,
) -> None:
    """Write a new COLMAP database.

    Both the `matches` (raw) and the `two_view_geometries` (verified) tables get the view
    graph's matches; the latter also its config, F, E, H and cam2_from_cam1 (omitted when the
    matrix is all zeros / the pose is the identity with zero translation). `descriptors`:
    (K, D) rows aligned with `keypoints.xy`, uint8 (SIFT-like) or float (stored as float32
    bytes, pycolmap's convention). Pairs with rows i > j are written as given; pycolmap stores
    them in its canonical image-id order, inverting the geometry.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    _check_view_graph(images, keypoints, view_graph)
    if descriptors is not None and descriptors.shape[0] != len(keypoints):
        raise ValueError(f"descriptors have {descriptors.shape[0]} rows for {len(keypoints)} keypoints")

    cam_ids = _np(cameras.camera_id).tolist()
    params = _np(cameras.params)
    img_ids = _np(images.image_id).tolist()
    img_cam = _np(images.camera).tolist()
    kp_xy = _np(keypoints.xy).astype(np.float32)
    kp_off = _np(keypoints.offsets).tolist()
    desc = None if descriptors is None else descriptors.detach().cpu().numpy()

    vg = view_graph
    E = len(vg)
    pairs = _np(vg.pairs).tolist()
    cfg = _np(vg.config).tolist()
    m_off = _np(vg.match_offsets).tolist()
    matches = _np(vg.matches).astype(np.uint32)
    F, Emat, H = _np(vg.F), _np(vg.E), _np(vg.H)
    has_F, has_E, has_H = (np.abs(x).reshape(E, 9).max(1, initial=0) > 0 for x in (F, Emat, H))
    rq = _np(vg.rel_quat)
    rt = _np(vg.rel_trans)
    has_pose = (np.abs(rt).max(1, initial=0) > 0) | (np.abs(rq[:, 1:]).max(1, initial=0) > 0)

    with atomic_path(path) as tmp:
        db = pycolmap.Database.open(str(tmp))
        try:
            with pycolmap.DatabaseTransaction(db):
                for r, cid in enumerate(cam_ids):
                    info = model_info(int(cameras.model_id[r]))
                    cam = pycolmap.Camera(
                        camera_id=cid, model=info.name, width=int(cameras.width[r]), height=int(cameras.height[r]),
                        params=params[r, : info.num_params].copy(),
                        has_prior_focal_length=bool(cameras.has_prior_focal_length[r]),
                    )
                    db.write_camera(cam, use_camera_id=True)
                    rig = pycolmap.Rig(rig_id=cid)
                    rig.add_ref_sensor(pycolmap.sensor_t(_CAMERA, cid))
                    db.write_rig(rig, use_rig_id=True)
                for r, iid in enumerate(img_ids):
                    cid = cam_ids[img_cam[r]]
                    db.write_image(pycolmap.Image(name=images.name[r], camera_id=cid, image_id=iid), use_image_id=True)
                    frame = pycolmap.Frame(frame_id=iid, rig_id=cid)
                    frame.add_data_id(pycolmap.data_t(pycolmap.sensor_t(_CAMERA, cid), iid))
                    db.write_frame(frame, use_frame_id=True)
                    a, b = kp_off[r], kp_off[r + 1]
                    db.write_keypoints(iid, kp_xy[a:b])
                    if desc is not None:
                        db.write_descriptors(iid, _descriptor_blob(desc[a:b], descriptor_type))
                for e in range(E):
                    id1, id2 = img_ids[pairs[e][0]], img_ids[pairs[e][1]]
                    m = matches[m_off[e] : m_off[e + 1]]
                    db.write_matches(id1, id2, m)
                    tvg = pycolmap.TwoViewGeometry()
                    tvg.config = pycolmap.TwoViewGeometryConfiguration(cfg[e])
                    tvg.inlier_matches = m
                    if has_F[e]:
                        tvg.F = F[e]
                    if has_E[e]:
                        tvg.E = Emat[e]
                    if has_H[e]:
                        tvg.H = H[e]
                    if has_pose[e]:
                        tvg.cam2_from_cam1 = pycolmap.Rigid3d(pycolmap.Rotation3d(np.roll(rq[e], -1)), rt[e].copy())
                    db.write_two_view_geometry(id1, id2, tvg)
        finally:
            db.close()
    logger.info("wrote %s: %d cameras, %d images, %d keypoints, %d pairs, %d matches",
                path, len(cam_ids), len(img_ids), len(kp_xy), E, len(matches))


# ---------------------------------------------------------------------------------------------
# Reading


def _read_cameras(db, device, dtype) -> Cameras:
    cams = sorted(db.read_all_cameras(), key=lambda c: c.camera_id)
    params = np.zeros((len(cams), MAX_CAMERA_PARAMS))
    model_ids = []
    for r, c in enumerate(cams):
        info = model_info(int(c.model.value))
        p = np.asarray(c.params, dtype=np.float64)
        if p.size != info.num_params:
            raise ValueError(f"cameras table: camera {c.camera_id} ({info.name}) has {p.size} params, "
                             f"expected {info.num_params}")
        params[r, : p.size] = p
        model_ids.append(info.model_id)
    i64 = dict(dtype=torch.int64, device=device)
    return Cameras(
        camera_id=torch.tensor([c.camera_id for c in cams], **i64).reshape(-1),
        model_id=torch.tensor(model_ids, **i64).reshape(-1),
        width=torch.tensor([c.width for c in cams], **i64).reshape(-1),
        height=torch.tensor([c.height for c in cams], **i64).reshape(-1),
        params=torch.tensor(params, dtype=dtype, device=device),
        has_prior_focal_length=torch.tensor([bool(c.has_prior_focal_length) for c in cams], dtype=torch.bool,
                                            device=device).reshape(-1),
    )


def _read_images(db, cameras: Cameras, device, dtype) -> Images:
    ims = sorted(db.read_all_images(), key=lambda im: im.image_id)
    cam_row = {int(c): r for r, c in enumerate(cameras.camera_id.tolist())}
    rows = []
    for im in ims:
        if im.camera_id not in cam_row:
            raise ValueError(f"images table: image {im.image_id} ({im.name}) names camera {im.camera_id}, "
                             "which the cameras table lacks")
        rows.append(cam_row[im.camera_id])
    n = len(ims)
    quat = torch.zeros(n, 4, dtype=dtype, device=device)
    quat[:, 0] = 1
    return Images(
        image_id=torch.tensor([im.image_id for im in ims], dtype=torch.int64, device=device).reshape(-1),
        name=[im.name for im in ims],
        camera=torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1),
        quat=quat,
        trans=torch.zeros(n, 3, dtype=dtype, device=device),
        registered=torch.zeros(n, dtype=torch.bool, device=device),
    )


def read_cameras_images(path: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float64) -> tuple[Cameras, Images]:
    """Cameras and images (sorted by image_id) of a COLMAP database, validated as in
    `read_view_graph`, without keypoints or pairs."""
    with pycolmap.Database.open(str(path)) as db:
        cameras = _read_cameras(db, device, dtype)
        return cameras, _read_images(db, cameras, device, dtype)


def _read_keypoints(db, images: Images, device, dtype) -> Keypoints:
    xy = []
    for iid in images.image_id.tolist():
        k = np.asarray(db.read_keypoints(iid) if db.exists_keypoints(iid) else (), dtype=np.float64)
        # an image without features (SIFT found none) has an empty keypoint blob: no rows, any width
        xy.append(k.reshape(len(k), -1)[:, :2] if k.size else np.zeros((0, 2)))
    counts = torch.tensor([len(k) for k in xy], dtype=torch.int64)
    flat = np.concatenate(xy) if xy else np.zeros((0, 2))
    return Keypoints(xy=torch.tensor(flat, dtype=dtype, device=device).reshape(-1, 2),
                     offsets=offsets_from_counts(counts).to(device))


def _raw_pairs(db, source: str):
    """Per pair: (image id 1, image id 2, pair id, config, matches, F, E, H, quat wxyz, trans) from
    pycolmap, in its canonical order (id1 < id2). The loop only gathers pycolmap's objects."""
    out = dict(id1=[], id2=[], pair_id=[], config=[], matches=[], F=[], E=[], H=[], quat=[], trans=[])
    z33 = np.zeros((3, 3))
    if source == "two_view_geometries":
        pair_ids, tvgs = db.read_two_view_geometries()
    elif source == "matches":
        pair_ids, raw = db.read_all_matches()
        tvgs = [None] * len(pair_ids)
    else:
        raise ValueError(f"source must be 'two_view_geometries' or 'matches', not {source!r}")
    for k, (pid, tvg) in enumerate(zip(pair_ids, tvgs)):
        i1, i2 = pycolmap.pair_id_to_image_pair(pid)
        out["id1"].append(i1)
        out["id2"].append(i2)
        out["pair_id"].append(pid)
        if tvg is None:
            out["config"].append(TWO_VIEW_UNDEFINED)
            out["matches"].append(np.asarray(raw[k], dtype=np.int64).reshape(-1, 2))
            for key in ("F", "E", "H"):
                out[key].append(z33)
            out["quat"].append(np.array([1.0, 0, 0, 0]))
            out["trans"].append(np.zeros(3))
            continue
        out["config"].append(int(getattr(tvg.config, "value", tvg.config)))
        out["matches"].append(np.asarray(tvg.inlier_matches, dtype=np.int64).reshape(-1, 2))
        for key in ("F", "E", "H"):
            v = getattr(tvg, key)
            out[key].append(z33 if v is None else np.asarray(v, dtype=np.float64))
        pose = tvg.cam2_from_cam1
        out["quat"].append(np.array([1.0, 0, 0, 0]) if pose is None else np.roll(np.asarray(pose.rotation.quat), 1))
        out["trans"].append(np.zeros(3) if pose is None else np.asarray(pose.translation, dtype=np.float64))
    return out


def _row_of_ids(image_ids: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of `ids` in the sorted `image_ids`, and whether each id exists."""
    if image_ids.numel() == 0:
        return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    pos = torch.searchsorted(image_ids, ids).clamp_max(image_ids.numel() - 1)
    return pos, image_ids[pos] == ids


def first_occurrence(key: Tensor) -> Tensor:
    """Mask (N,) keeping the first occurrence of every value (row, for 2-D keys) of `key`, order
    preserved."""
    n = key.shape[0]
    if n == 0:
        return torch.ones(0, dtype=torch.bool, device=key.device)
    _, inv = torch.unique(key, return_inverse=True, dim=0 if key.dim() > 1 else None)
    idx = torch.arange(n, device=key.device)
    first = torch.full((int(inv.max()) + 1,), n, dtype=torch.int64, device=key.device)
    first.scatter_reduce_(0, inv, idx, reduce="amin")
    return first[inv] == idx


def _dedupe(pair_of_match: Tensor, matches: Tensor, num_kp: int) -> Tensor:
    """Mask keeping the first occurrence of every (pair, i, j) match, order preserved."""
    if matches.shape[0] == 0:
        return torch.ones(0, dtype=torch.bool, device=matches.device)
    base = max(num_kp, 1)
    if (int(pair_of_match.max()) + 1) * base * base < 2**62:
        return first_occurrence((pair_of_match * base + matches[:, 0]) * base + matches[:, 1])
    return first_occurrence(torch.cat([pair_of_match[:, None], matches], 1))  # a combined key would overflow


def _invert_geometry(F: Tensor, E: Tensor, H: Tensor, quat: Tensor, trans: Tensor):
    """The same relation seen from the other image: transpose F, E, invert H and the pose."""
    Hnz = H.abs().flatten(1).amax(1) > 0
    Hinv = H.clone()
    if bool(Hnz.any()):
        Hinv[Hnz] = torch.linalg.inv(H[Hnz])
    R = so3.quat_to_matrix(quat)
    _, ti = se3.inverse(R, trans)
    return F.transpose(-1, -2), E.transpose(-1, -2), Hinv, so3.quat_conjugate(quat), ti


def read_view_graph(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    source: str = "two_view_geometries",
) -> tuple[Cameras, Images, Keypoints, ViewGraph]:
    """Load cameras, images (unposed, sorted by image_id), keypoints and verified pairs.

    source="two_view_geometries" (default) keeps pairs whose config is not UNDEFINED,
    DEGENERATE, WATERMARK or MULTIPLE and that have inlier matches; source="matches" reads the
    raw `matches` table instead (config UNDEFINED, no geometry), for callers that verify
    themselves. Pairs are ordered (i, j) with row i < row j.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COLMAP database {path} does not exist")
    with pycolmap.Database.open(str(path)) as db:
        cameras = _read_cameras(db, device, dtype)
        images = _read_images(db, cameras, device, dtype)
        keypoints = _read_keypoints(db, images, device, dtype)
        raw = _raw_pairs(db, source)

    table = source
    n_all = len(raw["pair_id"])
    cfg = torch.tensor(raw["config"], dtype=torch.int64).reshape(-1)
    n_m = torch.tensor([len(m) for m in raw["matches"]], dtype=torch.int64).reshape(-1)
    keep = n_m > 0
    if source == "two_view_geometries":
        keep &= ~torch.isin(cfg, torch.tensor(UNVERIFIED_CONFIGS))
    sel = torch.nonzero(keep)[:, 0]
    if n_all - len(sel):
        logger.info("%s: skipped %d of %d pairs (unverified configuration or no matches)",
                    table, n_all - len(sel), n_all)

    ids = torch.tensor([raw["id1"], raw["id2"]], dtype=torch.int64).reshape(2, -1).T[sel]
    pair_id = [raw["pair_id"][k] for k in sel.tolist()]
    image_ids = images.image_id.cpu()
    rows, exists = _row_of_ids(image_ids, ids)
    if not bool(exists.all()):
        k = int(torch.nonzero(~exists.all(1))[0, 0])
        missing = [int(x) for x, ok in zip(ids[k].tolist(), exists[k].tolist()) if not ok]
        raise ValueError(
            f"{table} table: row pair_id={pair_id[k]} (image ids {ids[k].tolist()}) names image id(s) {missing} "
            "that the images table lacks"
        )
    if bool((rows[:, 0] == rows[:, 1]).any()):
        k = int(torch.nonzero(rows[:, 0] == rows[:, 1])[0, 0])
        raise ValueError(f"{table} table: row pair_id={pair_id[k]} pairs image {ids[k, 0].item()} with itself")

    mats = [raw["matches"][k] for k in sel.tolist()]
    counts = n_m[sel]
    matches = torch.from_numpy(np.concatenate(mats)) if mats else torch.zeros(0, 2, dtype=torch.int64)
    offsets = offsets_from_counts(counts)
    pm = rows_of(offsets)

    # Keypoint indices within range of their images.
    kp_count = keypoints.count().cpu()
    lim = torch.stack([kp_count[rows[pm, 0]], kp_count[rows[pm, 1]]], -1)
    bad = (matches < 0) | (matches >= lim)
    if bool(bad.any()):
        k = int(torch.nonzero(bad.any(1))[0, 0])
        e = int(pm[k])
        side = 0 if bool(bad[k, 0]) else 1
        raise ValueError(
            f"{table} table: row pair_id={pair_id[e]} (image ids {ids[e].tolist()}): match {matches[k].tolist()} "
            f"has keypoint index {int(matches[k, side])} but image {int(ids[e, side])} has "
            f"{int(lim[k, side])} keypoints"
        )

    def stack(key, shape):
        vals = [raw[key][k] for k in sel.tolist()]
        return torch.tensor(np.stack(vals) if vals else np.zeros((0, *shape)), dtype=torch.float64)

    F, Emat, H = stack("F", (3, 3)), stack("E", (3, 3)), stack("H", (3, 3))
    quat, trans = stack("quat", (4,)), stack("trans", (3,))
    pair_cfg = cfg[sel]

    # Our pairs are (row i, row j) with i < j; pycolmap's are ordered by image id. Rows are sorted
    # by id, so a swap is needed only for hand-made databases, but it is cheap to do right.
    swap = rows[:, 0] > rows[:, 1]
    if bool(swap.any()):
        rows[swap] = rows[swap].flip(1)
        sm = swap[pm]
        matches[sm] = matches[sm].flip(1)
        F[swap], Emat[swap], H[swap], quat[swap], trans[swap] = _invert_geometry(
            F[swap], Emat[swap], H[swap], quat[swap], trans[swap])

    dup_keep = _dedupe(pm, matches, int(kp_count.max()) if kp_count.numel() else 0)
    n_dup = int((~dup_keep).sum())
    if n_dup:
        logger.warning("%s: removed %d duplicate match(es) in %d pair(s)", table, n_dup,
                       int(torch.unique(pm[~dup_keep]).numel()))
        matches, pm = matches[dup_keep], pm[dup_keep]
        counts = torch.bincount(pm, minlength=len(sel))
        offsets = offsets_from_counts(counts)

    vg = ViewGraph(
        pairs=rows, config=pair_cfg, F=F, E=Emat, H=H, rel_quat=quat, rel_trans=trans,
        matches=matches, match_offsets=offsets, valid=torch.ones(len(sel), dtype=torch.bool),
    ).to(device=device, dtype=dtype)
    logger.info("read %s: %d cameras, %d images, %d keypoints, %d pairs, %d matches", path, len(cameras),
                len(images), len(keypoints), len(vg), vg.matches.shape[0])
    return cameras, images, keypoints, vg
