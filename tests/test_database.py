"""COLMAP database read/write through pycolmap, with validation of what is loaded."""
from __future__ import annotations

import logging
import os

import numpy as np
import pycolmap
import pytest
import torch

from torchsfm.data.model import TWO_VIEW_CALIBRATED, TWO_VIEW_DEGENERATE, TWO_VIEW_UNDEFINED, Images, ViewGraph
from torchsfm.geometry import so3
from torchsfm.io.database import _invert_geometry, read_view_graph, write_database
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database


@pytest.fixture(scope="module")
def scene():
    return synthesize(SyntheticOptions(num_images=8, num_points=300, outlier_ratio=0.1, pixel_noise=0.3, seed=4))


def test_write_then_read_is_equal(tmp_path, scene, device):
    db = tmp_path / "db.db"
    write_synthetic_database(scene, db)
    cams, ims, kps, vg = read_view_graph(db, device=device)
    gt, ref = scene.gt, scene.view_graph
    assert vg.pairs.device.type == device.type
    cams, ims, kps, vg = cams.to("cpu"), ims.to("cpu"), kps.to("cpu"), vg.to("cpu")
    for name in ("camera_id", "model_id", "width", "height", "params", "has_prior_focal_length"):
        assert torch.equal(getattr(cams, name), getattr(gt.cameras, name)), name
    assert torch.equal(ims.image_id, gt.images.image_id) and ims.name == gt.images.name
    assert torch.equal(ims.camera, gt.images.camera) and not bool(ims.registered.any())
    assert torch.equal(kps.offsets, gt.keypoints.offsets)
    assert torch.equal(kps.xy, gt.keypoints.xy.float().double())  # COLMAP stores float32 keypoints
    for name in ("pairs", "config", "matches", "match_offsets", "F", "E", "H", "valid"):
        assert torch.equal(getattr(vg, name), getattr(ref, name)), name
    assert torch.allclose(so3.quat_to_matrix(vg.rel_quat), so3.quat_to_matrix(ref.rel_quat), atol=1e-15)
    assert torch.equal(vg.rel_trans, ref.rel_trans)


def test_raw_matches_table(tmp_path, scene):
    db = tmp_path / "db.db"
    write_synthetic_database(scene, db)
    *_, vg = read_view_graph(db, source="matches")
    assert torch.equal(vg.matches, scene.view_graph.matches) and torch.equal(vg.pairs, scene.view_graph.pairs)
    assert bool((vg.config == TWO_VIEW_UNDEFINED).all()) and float(vg.F.abs().max()) == 0
    with pytest.raises(ValueError, match="source"):
        read_view_graph(db, source="inliers")


def test_descriptors_and_overwrite(tmp_path, scene):
    db = tmp_path / "db.db"
    gt = scene.gt
    g = torch.Generator().manual_seed(0)
    desc = torch.randint(0, 256, (len(gt.keypoints), 128), dtype=torch.uint8, generator=g)
    write_database(db, gt.cameras, gt.images, gt.keypoints, scene.view_graph, descriptors=desc)
    with pycolmap.Database.open(str(db)) as d:
        iid = int(gt.images.image_id[2])
        a, b = gt.keypoints.offsets[2:4].tolist()
        assert np.array_equal(d.read_descriptors(iid).data, desc[a:b].numpy())
        assert d.num_rigs() == len(gt.cameras) and d.num_frames() == len(gt.images)
    with pytest.raises(FileExistsError):
        write_database(db, gt.cameras, gt.images, gt.keypoints, scene.view_graph)
    write_database(db, gt.cameras, gt.images, gt.keypoints, ViewGraph.empty(), overwrite=True)
    *_, vg = read_view_graph(db)
    assert len(vg) == 0 and vg.matches.shape == (0, 2)


def test_interrupted_write_keeps_the_old_database(tmp_path, scene, monkeypatch):
    db = tmp_path / "db.db"
    write_synthetic_database(scene, db)
    before = db.read_bytes()
    gt = scene.gt
    real = pycolmap.Database.write_two_view_geometry
    calls = {"n": 0}

    def fail_later(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(self, *args)

    monkeypatch.setattr(pycolmap.Database, "write_two_view_geometry", fail_later)
    with pytest.raises(RuntimeError, match="killed"):
        write_database(db, gt.cameras, gt.images, gt.keypoints, scene.view_graph, overwrite=True)
    assert db.read_bytes() == before and os.listdir(tmp_path) == ["db.db"]


def test_write_refuses_inconsistent_input(tmp_path, scene):
    gt = scene.gt
    vg = scene.view_graph.clone()
    vg.matches[5, 1] = int(gt.keypoints.count()[vg.pairs[0, 1]]) + 3
    with pytest.raises(ValueError, match="out of range"):
        write_database(tmp_path / "x.db", gt.cameras, gt.images, gt.keypoints, vg)
    assert not (tmp_path / "x.db").exists()


def test_unsorted_image_ids_are_stored_in_colmap_order(tmp_path, scene):
    """A pair whose first image has the larger id is inverted by pycolmap on write; reading it
    back (rows sorted by id) gives the same relation seen from the other side."""
    gt = scene.gt
    ids = gt.images.image_id.flip(0).clone()  # row 0 now has the largest id
    images = Images(ids, list(gt.images.name), gt.images.camera, gt.images.quat, gt.images.trans, gt.images.registered)
    db = tmp_path / "db.db"
    write_database(db, gt.cameras, images, gt.keypoints, scene.view_graph)
    _, ims, kps, vg = read_view_graph(db)
    N = len(ids)
    # Old row r is new row N-1-r, so old pair (i, j) with i < j is new pair (N-1-j, N-1-i).
    ref = scene.view_graph
    old = {(N - 1 - j, N - 1 - i): e for e, (i, j) in enumerate(ref.pairs.tolist())}
    assert set(map(tuple, vg.pairs.tolist())) == set(old)
    for e, (i, j) in enumerate(vg.pairs.tolist()):
        r = old[(i, j)]
        m_new = vg.matches[vg.match_offsets[e] : vg.match_offsets[e + 1]]
        m_old = ref.matches[ref.match_offsets[r] : ref.match_offsets[r + 1]]
        assert set(map(tuple, m_new.tolist())) == set(map(tuple, m_old.flip(1).tolist()))
        assert torch.allclose(vg.F[e], ref.F[r].T, atol=1e-15)
        R_old = so3.quat_to_matrix(ref.rel_quat[r])
        assert torch.allclose(so3.quat_to_matrix(vg.rel_quat[e]), R_old.T, atol=1e-12)
        assert torch.allclose(vg.rel_trans[e], -(R_old.T @ ref.rel_trans[r]), atol=1e-12)
    assert torch.equal(kps.xy[kps.offsets[0] : kps.offsets[1]], gt.keypoints.of_image(N - 1).float().double())


def test_invert_geometry_matches_pycolmap():
    g = torch.Generator().manual_seed(0)
    F, E, H = (torch.randn(3, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    q = so3.quat_normalize(torch.randn(3, 4, generator=g, dtype=torch.float64))
    t = torch.randn(3, 3, generator=g, dtype=torch.float64)
    Fi, Ei, Hi, qi, ti = _invert_geometry(F, E, H, q, t)
    for k in range(3):
        tvg = pycolmap.TwoViewGeometry()
        tvg.F, tvg.E, tvg.H = F[k].numpy(), E[k].numpy(), H[k].numpy()
        tvg.cam2_from_cam1 = pycolmap.Rigid3d(pycolmap.Rotation3d(np.roll(q[k].numpy(), -1)), t[k].numpy())
        tvg.invert()
        np.testing.assert_allclose(Fi[k].numpy(), tvg.F, atol=1e-12)
        np.testing.assert_allclose(Ei[k].numpy(), tvg.E, atol=1e-12)
        np.testing.assert_allclose(Hi[k].numpy(), tvg.H, atol=1e-12)
        np.testing.assert_allclose(so3.quat_to_matrix(qi[k]).numpy(), tvg.cam2_from_cam1.rotation.matrix(), atol=1e-12)
        np.testing.assert_allclose(ti[k].numpy(), tvg.cam2_from_cam1.translation, atol=1e-12)


def test_reads_a_pycolmap_synthetic_database(tmp_path):
    pycolmap.set_random_seed(1)
    o = pycolmap.SyntheticDatasetOptions()
    o.num_rigs, o.num_cameras_per_rig, o.num_frames_per_rig, o.num_points3D = 2, 1, 4, 80
    o.inlier_match_ratio = 0.7
    o.two_view_geometry_has_relative_pose = True
    path = tmp_path / "colmap.db"
    with pycolmap.Database.open(str(path)) as d:
        rec = pycolmap.synthesize_dataset(o, d)
    cams, ims, kps, vg = read_view_graph(path)
    assert len(cams) == rec.num_cameras() and len(ims) == rec.num_images() == 8
    with pycolmap.Database.open(str(path)) as d:
        assert len(vg) == d.num_verified_image_pairs()
        assert int(kps.count().sum()) == d.num_keypoints()
        for e in range(0, len(vg), 5):
            i, j = vg.pairs[e].tolist()
            id1, id2 = int(ims.image_id[i]), int(ims.image_id[j])
            tvg = d.read_two_view_geometry(id1, id2)
            assert np.array_equal(vg.matches[vg.match_offsets[e] : vg.match_offsets[e + 1]].numpy(), tvg.inlier_matches)
            np.testing.assert_array_equal(vg.F[e].numpy(), tvg.F)
            np.testing.assert_allclose(vg.rel_trans[e].numpy(), tvg.cam2_from_cam1.translation)
            assert int(vg.config[e]) == int(getattr(tvg.config, "value", tvg.config))
            np.testing.assert_array_equal(kps.of_image(i).numpy(), d.read_keypoints(id1)[:, :2].astype(np.float64))
    # The relative poses are those of the model.
    e = 0
    i, j = vg.pairs[e].tolist()
    Pi = rec.images[int(ims.image_id[i])].cam_from_world()
    Pj = rec.images[int(ims.image_id[j])].cam_from_world()
    rel = Pj * Pi.inverse()
    np.testing.assert_allclose(so3.quat_to_matrix(vg.rel_quat[e]).numpy(), rel.rotation.matrix(), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Fault injection: databases written with pycolmap directly, bypassing our writer's checks.


def _small_db(path, pairs):
    """Two cameras-worth of images (ids 1..3) with 10 keypoints each, and the given geometries:
    pairs = [(id1, id2, matches array, config)]."""
    with pycolmap.Database.open(str(path)) as d:
        cam = pycolmap.Camera(camera_id=1, model="SIMPLE_PINHOLE", width=100, height=80,
                              params=np.array([90.0, 50, 40]))
        d.write_camera(cam, use_camera_id=True)
        for iid in (1, 2, 3):
            d.write_image(pycolmap.Image(name=f"{iid}.jpg", camera_id=1, image_id=iid), use_image_id=True)
            d.write_keypoints(iid, np.arange(20, dtype=np.float32).reshape(10, 2) + iid)
        for id1, id2, m, cfg in pairs:
            tvg = pycolmap.TwoViewGeometry()
            tvg.config = cfg
            tvg.inlier_matches = np.asarray(m, dtype=np.uint32).reshape(-1, 2)
            d.write_two_view_geometry(id1, id2, tvg)
            d.write_matches(id1, id2, np.asarray(m, dtype=np.uint32).reshape(-1, 2))


CAL = pycolmap.TwoViewGeometryConfiguration.CALIBRATED


def test_duplicate_matches_are_removed_and_counted(tmp_path, caplog):
    path = tmp_path / "dup.db"
    _small_db(path, [(1, 2, [[0, 1], [2, 3], [0, 1], [4, 5], [2, 3], [0, 1]], CAL), (2, 3, [[1, 1], [2, 2]], CAL)])
    with caplog.at_level(logging.WARNING, logger="torchsfm.io.database"):
        _, _, _, vg = read_view_graph(path)
    assert "removed 3 duplicate match(es) in 1 pair(s)" in caplog.text
    assert vg.matches.tolist() == [[0, 1], [2, 3], [4, 5], [1, 1], [2, 2]]  # first occurrences, order kept
    assert vg.match_offsets.tolist() == [0, 3, 5] and vg.pairs.tolist() == [[0, 1], [1, 2]]


def test_unverified_and_empty_pairs_are_skipped(tmp_path):
    path = tmp_path / "cfg.db"
    deg = pycolmap.TwoViewGeometryConfiguration.DEGENERATE
    _small_db(path, [(1, 2, [[0, 1]], deg), (1, 3, [], CAL), (2, 3, [[3, 4]], CAL)])
    _, _, _, vg = read_view_graph(path)
    assert vg.pairs.tolist() == [[1, 2]] and vg.config.tolist() == [TWO_VIEW_CALIBRATED]
    _, _, _, raw = read_view_graph(path, source="matches")  # raw matches keep the degenerate pair
    assert raw.pairs.tolist() == [[0, 1], [1, 2]]
    assert TWO_VIEW_DEGENERATE not in raw.config.tolist()


@pytest.mark.parametrize("source", ["two_view_geometries", "matches"])
def test_out_of_range_keypoint_is_a_clear_error(tmp_path, source):
    path = tmp_path / "oor.db"
    _small_db(path, [(1, 2, [[0, 1]], CAL), (2, 3, [[1, 1], [2, 10]], CAL)])
    pid = pycolmap.image_pair_to_pair_id(2, 3)
    with pytest.raises(ValueError, match=rf"{source} table: row pair_id={pid} \(image ids \[2, 3\]\).*"
                                         r"keypoint index 10 but image 3 has 10 keypoints"):
        read_view_graph(path, source=source)


@pytest.mark.parametrize("source", ["two_view_geometries", "matches"])
def test_unknown_image_is_a_clear_error(tmp_path, source):
    path = tmp_path / "unk.db"
    _small_db(path, [(1, 2, [[0, 1]], CAL), (2, 99, [[1, 1]], CAL)])
    pid = pycolmap.image_pair_to_pair_id(2, 99)
    with pytest.raises(ValueError, match=rf"{source} table: row pair_id={pid} \(image ids \[2, 99\]\) names "
                                         r"image id\(s\) \[99\]"):
        read_view_graph(path, source=source)


def test_missing_database_is_not_created(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_view_graph(tmp_path / "none.db")
    assert not (tmp_path / "none.db").exists()


def test_pair_stored_in_reverse_order_is_swapped(tmp_path):
    """Hand-made databases may encode a pair with the larger image id first; the matches then
    refer to (larger id, smaller id) and are swapped, with the geometry inverted."""
    import sqlite3

    path = tmp_path / "rev.db"
    _small_db(path, [(2, 3, [[1, 7], [4, 2]], CAL)])
    with pycolmap.Database.open(str(path)) as d:
        tvg = d.read_two_view_geometry(2, 3)
        tvg.F = np.arange(9.0).reshape(3, 3)
        rot = pycolmap.Rotation3d(np.array([0.0, 0.6, 0.0, 0.8]))
        tvg.cam2_from_cam1 = pycolmap.Rigid3d(rot, np.array([1.0, 2, 3]))
        d.update_two_view_geometry(2, 3, tvg)
    k = 2147483647  # COLMAP's pair id: k * id1 + id2
    with sqlite3.connect(path) as con:
        con.execute("UPDATE two_view_geometries SET pair_id = ? WHERE pair_id = ?", (k * 3 + 2, k * 2 + 3))
    assert pycolmap.pair_id_to_image_pair(k * 3 + 2) == (3, 2)
    _, _, _, vg = read_view_graph(path)
    assert vg.pairs.tolist() == [[1, 2]]
    assert vg.matches.tolist() == [[7, 1], [2, 4]]
    assert torch.equal(vg.F[0], torch.arange(9.0, dtype=torch.float64).reshape(3, 3).T)
    R = so3.quat_to_matrix(torch.tensor([0.8, 0.0, 0.6, 0.0], dtype=torch.float64))
    assert torch.allclose(so3.quat_to_matrix(vg.rel_quat[0]), R.T, atol=1e-12)
    assert torch.allclose(vg.rel_trans[0], -(R.T @ torch.tensor([1.0, 2, 3], dtype=torch.float64)), atol=1e-12)


def test_reads_a_colmap3_style_database(tmp_path):
    """A database in the COLMAP 3.x schema (as hloc writes it: no rigs/frames tables, pose-prior
    columns on images, qvec/tvec blobs on two_view_geometries) loads too."""
    import sqlite3

    path = tmp_path / "hloc.db"
    k = 2147483647
    with sqlite3.connect(path) as con:
        con.executescript("""
            CREATE TABLE cameras (camera_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, model INTEGER NOT NULL,
                width INTEGER NOT NULL, height INTEGER NOT NULL, params BLOB, prior_focal_length INTEGER NOT NULL);
            CREATE TABLE images (image_id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, name TEXT NOT NULL UNIQUE,
                camera_id INTEGER NOT NULL, prior_qw REAL, prior_qx REAL, prior_qy REAL, prior_qz REAL,
                prior_tx REAL, prior_ty REAL, prior_tz REAL);
            CREATE TABLE keypoints (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL,
                cols INTEGER NOT NULL, data BLOB);
            CREATE TABLE descriptors (image_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL,
                cols INTEGER NOT NULL, data BLOB);
            CREATE TABLE matches (pair_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL,
                cols INTEGER NOT NULL, data BLOB);
            CREATE TABLE two_view_geometries (pair_id INTEGER PRIMARY KEY NOT NULL, rows INTEGER NOT NULL,
                cols INTEGER NOT NULL, data BLOB, config INTEGER NOT NULL, F BLOB, E BLOB, H BLOB,
                qvec BLOB, tvec BLOB);
        """)
        con.execute("INSERT INTO cameras VALUES (1, 2, 640, 480, ?, 1)",
                    (np.array([500.0, 320, 240, 0.01]).tobytes(),))
        for iid in (1, 2):
            con.execute("INSERT INTO images VALUES (?, ?, 1, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
                        (iid, f"img{iid}.jpg"))
            kp = (np.arange(12, dtype=np.float32).reshape(6, 2) + 10 * iid)
            con.execute("INSERT INTO keypoints VALUES (?, 6, 2, ?)", (iid, kp.tobytes()))
        m = np.array([[0, 1], [2, 3], [5, 5]], dtype=np.uint32)
        F = np.arange(9, dtype=np.float64).reshape(3, 3)
        con.execute("INSERT INTO matches VALUES (?, 3, 2, ?)", (k + 2, m.tobytes()))
        con.execute("INSERT INTO two_view_geometries VALUES (?, 3, 2, ?, 3, ?, ?, ?, ?, ?)",
                    (k + 2, m.tobytes(), F.tobytes(), np.zeros(9).tobytes(), np.eye(3).tobytes(),
                     np.array([1.0, 0, 0, 0]).tobytes(), np.zeros(3).tobytes()))
    cams, ims, kps, vg = read_view_graph(path)
    assert cams.camera_id.tolist() == [1] and cams.model_names == ["SIMPLE_RADIAL"]
    assert bool(cams.has_prior_focal_length[0]) and cams.params[0, :4].tolist() == [500.0, 320, 240, 0.01]
    assert ims.name == ["img1.jpg", "img2.jpg"] and kps.count().tolist() == [6, 6]
    assert kps.of_image(1)[0].tolist() == [20.0, 21.0]
    assert vg.pairs.tolist() == [[0, 1]] and vg.matches.tolist() == [[0, 1], [2, 3], [5, 5]]
    assert vg.config.tolist() == [3] and torch.equal(vg.F[0], torch.from_numpy(F))
