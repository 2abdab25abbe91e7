"""COLMAP database.db <-> (Cameras, Images, Keypoints, ViewGraph), through pycolmap.Database
(the big keypoint and match tables are read from SQLite in chunks: `torchsfm.io.sqlite_tables`).

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
    INDEX_DTYPE,
    Keypoints,
    ViewGraph,
    offsets_from_counts,
)
from ..geometry import se3, so3
from .atomic import atomic_path
from .sqlite_tables import connect_readonly, read_geometry, read_keypoints, read_pair_table, stream_matches

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


def _read_cameras(con, device, dtype) -> Cameras:
    """The cameras table read with SQLite, read-only (pycolmap's Database.open writes to the file)."""
    cams = con.execute("SELECT camera_id, model, width, height, params, prior_focal_length FROM cameras "
                       "ORDER BY camera_id").fetchall()
    params = np.zeros((len(cams), MAX_CAMERA_PARAMS))
    model_ids = []
    for r, (cid, model, _, _, blob, _) in enumerate(cams):
        info = model_info(int(model))
        p = np.frombuffer(blob or b"", dtype=np.float64)
        if p.size != info.num_params:
            raise ValueError(f"cameras table: camera {cid} ({info.name}) has {p.size} params, "
                             f"expected {info.num_params}")
        params[r, : p.size] = p
        model_ids.append(info.model_id)
    i64 = dict(dtype=torch.int64, device=device)
    return Cameras(
        camera_id=torch.tensor([c[0] for c in cams], **i64).reshape(-1),
        model_id=torch.tensor(model_ids, **i64).reshape(-1),
        width=torch.tensor([c[2] for c in cams], **i64).reshape(-1),
        height=torch.tensor([c[3] for c in cams], **i64).reshape(-1),
        params=torch.tensor(params, dtype=dtype, device=device),
        has_prior_focal_length=torch.tensor([bool(c[5]) for c in cams], dtype=torch.bool, device=device).reshape(-1),
    )


def _read_images(con, cameras: Cameras, device, dtype) -> Images:
    ims = con.execute("SELECT image_id, name, camera_id FROM images ORDER BY image_id").fetchall()
    cam_row = {int(c): r for r, c in enumerate(cameras.camera_id.tolist())}
    rows = []
    for iid, name, cid in ims:
        if cid not in cam_row:
            raise ValueError(f"images table: image {iid} ({name}) names camera {cid}, "
                             "which the cameras table lacks")
        rows.append(cam_row[cid])
    n = len(ims)
    quat = torch.zeros(n, 4, dtype=dtype, device=device)
    quat[:, 0] = 1
    return Images(
        image_id=torch.tensor([im[0] for im in ims], dtype=torch.int64, device=device).reshape(-1),
        name=[im[1] for im in ims],
        camera=torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1),
        quat=quat,
        trans=torch.zeros(n, 3, dtype=dtype, device=device),
        registered=torch.zeros(n, dtype=torch.bool, device=device),
    )


def read_cameras_images(path: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float64) -> tuple[Cameras, Images]:
    """Cameras and images (sorted by image_id) of a COLMAP database, validated as in
    `read_view_graph`, without keypoints or pairs."""
    con = connect_readonly(path)
    try:
        cameras = _read_cameras(con, device, dtype)
        return cameras, _read_images(con, cameras, device, dtype)
    finally:
        con.close()


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
    chunk_matches: int = 1 << 20,
) -> tuple[Cameras, Images, Keypoints, ViewGraph]:
    """Load cameras, images (unposed, sorted by image_id), keypoints and verified pairs.

    source="two_view_geometries" (default) keeps pairs whose config is not UNDEFINED,
    DEGENERATE, WATERMARK or MULTIPLE and that have inlier matches; source="matches" reads the
    raw `matches` table instead (config UNDEFINED, no geometry), for callers that verify
    themselves. Pairs are ordered (i, j) with row i < row j. Keypoints keep the database's
    float32 and matches are int32 (see `torchsfm.data.model`); both big tables are read from
    SQLite in chunks of about `chunk_matches` rows straight into their arrays
    (`torchsfm.io.sqlite_tables`), so the peak stays near the size of the result.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COLMAP database {path} does not exist")
    if source not in ("two_view_geometries", "matches"):
        raise ValueError(f"source must be 'two_view_geometries' or 'matches', not {source!r}")
    con = connect_readonly(path)  # read-only: the file is left as it was, byte for byte
    try:
        cameras = _read_cameras(con, device, dtype)
        images = _read_images(con, cameras, device, dtype)
        xy, kp_counts = read_keypoints(con, images.image_id.cpu().numpy())
        keypoints = Keypoints(xy=torch.from_numpy(xy).to(device), offsets=offsets_from_counts(
            torch.from_numpy(kp_counts)).to(device))
        vg = _read_pairs(con, source, images, torch.from_numpy(kp_counts), chunk_matches).to(device=device, dtype=dtype)
    finally:
        con.close()
    logger.info("read %s: %d cameras, %d images, %d keypoints, %d pairs, %d matches", path, len(cameras),
                len(images), len(keypoints), len(vg), vg.matches.shape[0])
    return cameras, images, keypoints, vg


def _read_pairs(con, table: str, images: Images, kp_count: Tensor, chunk_matches: int) -> ViewGraph:
    """The view graph of `table`, validated (see `read_view_graph`); matches streamed in chunks."""
    pt = read_pair_table(con, table, UNVERIFIED_CONFIGS)
    if pt.num_all - len(pt.pair_id):
        logger.info("%s: skipped %d of %d pairs (unverified configuration or no matches)",
                    table, pt.num_all - len(pt.pair_id), pt.num_all)
    ids = torch.from_numpy(np.stack([pt.id1, pt.id2], 1))
    rows, exists = _row_of_ids(images.image_id.cpu(), ids)
    if not bool(exists.all()):
        k = int(torch.nonzero(~exists.all(1))[0, 0])
        missing = [int(x) for x, ok in zip(ids[k].tolist(), exists[k].tolist()) if not ok]
        raise ValueError(
            f"{table} table: row pair_id={int(pt.pair_id[k])} (image ids {ids[k].tolist()}) names image id(s) "
            f"{missing} that the images table lacks")
    if bool((rows[:, 0] == rows[:, 1]).any()):
        k = int(torch.nonzero(rows[:, 0] == rows[:, 1])[0, 0])
        raise ValueError(f"{table} table: row pair_id={int(pt.pair_id[k])} pairs image {ids[k, 0].item()} with itself")
    # Our pairs are (row i, row j) with i < j; pycolmap's are ordered by image id. Rows are sorted
    # by id, so a swap is needed only for hand-made databases, but it is cheap to do right.
    swap = rows[:, 0] > rows[:, 1]
    counts = torch.from_numpy(pt.count)
    starts = offsets_from_counts(counts)
    matches = torch.empty(int(starts[-1]), 2, dtype=INDEX_DTYPE)
    kept = torch.zeros_like(counts)  # matches per pair after removing duplicates
    lim_img = kp_count[rows]  # (E, 2) keypoints of both images
    pos, n_dup, dup_pairs = 0, 0, 0
    for e0, e1, chunk in stream_matches(con, table, UNVERIFIED_CONFIGS, chunk_matches):
        m = torch.from_numpy(chunk.astype(np.int64))
        pm = torch.repeat_interleave(torch.arange(e0, e1), counts[e0:e1])
        lim = lim_img[pm]
        bad = m >= lim
        if bool(bad.any()):
            k = int(torch.nonzero(bad.any(1))[0, 0])
            e, side = int(pm[k]), 0 if bool(bad[k, 0]) else 1
            raise ValueError(
                f"{table} table: row pair_id={int(pt.pair_id[e])} (image ids {ids[e].tolist()}): match "
                f"{m[k].tolist()} has keypoint index {int(m[k, side])} but image {int(ids[e, side])} has "
                f"{int(lim[k, side])} keypoints")
        sm = swap[pm]
        if bool(sm.any()):
            m[sm] = m[sm].flip(1)
        keep = _dedupe(pm - e0, m, int(lim_img.max()))
        if not bool(keep.all()):
            n_dup += int((~keep).sum())
            dup_pairs += int(torch.unique(pm[~keep]).numel())
            m, pm = m[keep], pm[keep]
        matches[pos:pos + m.shape[0]] = m.to(INDEX_DTYPE)
        pos += m.shape[0]
        kept[e0:e1] = torch.bincount(pm - e0, minlength=e1 - e0)
    if n_dup:
        logger.warning("%s: removed %d duplicate match(es) in %d pair(s)", table, n_dup, dup_pairs)
        matches = matches[:pos].clone()
    geo = torch.from_numpy(read_geometry(con, table, UNVERIFIED_CONFIGS))
    F, Emat, H = (geo[:, 9 * k:9 * k + 9].reshape(-1, 3, 3).clone() for k in range(3))
    quat, trans = geo[:, 27:31].clone(), geo[:, 31:34].clone()
    if bool(swap.any()):
        rows[swap] = rows[swap].flip(1)
        F[swap], Emat[swap], H[swap], quat[swap], trans[swap] = _invert_geometry(
            F[swap], Emat[swap], H[swap], quat[swap], trans[swap])
    return ViewGraph(pairs=rows, config=torch.from_numpy(pt.config), F=F, E=Emat, H=H, rel_quat=quat, rel_trans=trans,
                     matches=matches, match_offsets=offsets_from_counts(kept),
                     valid=torch.ones(len(pt.pair_id), dtype=torch.bool))
