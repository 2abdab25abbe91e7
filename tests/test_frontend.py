"""Front end on synthetic images: bad inputs, features, database layout, resume, pairs, matching, CLI."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image, ImageFilter

from torchsfm.frontend import ExtractOptions, IngestError, MatchOptions, extract, match
from torchsfm.frontend.colmap_db import DatabaseError, FrontendDatabase, pair_ids, pair_ids_to_images
from torchsfm.frontend.features import make_extractor
from torchsfm.frontend.ingest import load_uint8
from torchsfm.frontend.pairs import exhaustive_pairs, sequential_pairs, top_k_pairs
from torchsfm.frontend.retrieval import kmeans, vlad
from torchsfm.report import RunReport

FAST = dict(num_workers=1, progress=False)
TABLES = ["cameras", "images", "rigs", "rig_sensors", "frames", "frame_data", "keypoints", "descriptors",
          "matches", "two_view_geometries", "pose_priors", "sqlite_sequence"]


def blobs(h, w, seed=0, channels=3) -> np.ndarray:
    """Blurred noise: plenty of SIFT blobs, cheap to extract."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    return np.asarray(Image.fromarray(a.squeeze()).filter(ImageFilter.GaussianBlur(1.5)))


def dump(db) -> dict:
    with contextlib.closing(sqlite3.connect(str(db))) as c:
        return {t: sorted(c.execute(f"SELECT * FROM {t}").fetchall()) for t in TABLES}


def name_features(db) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = pycolmap.Database.open(str(db))
    try:
        return {im.name: (d.read_keypoints(im.image_id), d.read_descriptors(im.image_id).data) for im in d.read_all_images()}
    finally:
        d.close()


@pytest.fixture
def messy(tmp_path):
    """The bad-input folder of issue 3."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    grey = blobs(72, 96, seed=1, channels=1)
    rgb = blobs(72, 96, seed=2)
    Image.fromarray(grey).save(root / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "grey16.png")
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((72, 96), 128, np.uint8)])).save(root / "sub" / "rgba.png")
    Image.fromarray(blobs(80, 64, seed=3)).save(root / "sub" / "portrait.png")  # another size
    Image.fromarray(blobs(72, 96, seed=4)).save(root / "sub" / "façade é.png")  # unicode + space
    (root / "sub" / "copy.png").write_bytes((root / "rgb.png").read_bytes())
    (root / "readme.txt").write_text("junk")
    (root / "Thumbs.db").write_bytes(os.urandom(64))
    (root / "fake.png").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(blobs(72, 96, seed=5)).save(buf, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:-len(buf.getvalue()) // 3])
    return root


def test_bad_inputs_are_skipped_and_reported(messy, tmp_path):
    db = tmp_path / "out" / "database.db"
    rep = extract(messy, db, ExtractOptions(**FAST))
    kept = {"grey8.png", "grey16.png", "rgb.png", "sub/rgba.png", "sub/portrait.png", "sub/façade é.png"}
    assert {s.name: s.reason for s in rep.skipped} == {
        "readme.txt": "unsupported_extension", "Thumbs.db": "unsupported_extension", "fake.png": "decode_error",
        "empty.png": "empty_file", "truncated.jpg": "decode_error", "sub/copy.png": "duplicate",
    }
    assert "rgb.png" in next(s.detail for s in rep.skipped if s.reason == "duplicate")
    assert rep.num_images == len(kept) and rep.num_extracted == len(kept) and rep.num_files == 12
    feats = name_features(db)
    assert set(feats) == kept
    assert all(len(k) > 20 and k.shape[1] == 6 and d.shape == (len(k), 128) for k, d in feats.values())
    # 16-bit and 8-bit copies of one picture normalise to the same pixels, hence the same features;
    # RGBA loses only its alpha.
    np.testing.assert_array_equal(feats["grey16.png"][0], feats["grey8.png"][0])
    np.testing.assert_array_equal(feats["grey16.png"][1], feats["grey8.png"][1])
    np.testing.assert_array_equal(feats["sub/rgba.png"][1], feats["rgb.png"][1])
    # auto camera mode without EXIF: one camera per size, default focal 1.2 * max(W, H), no prior
    d = pycolmap.Database.open(str(db))
    cams = {c.camera_id: c for c in d.read_all_cameras()}
    by_name = {im.name: cams[im.camera_id] for im in d.read_all_images()}
    frames = d.read_all_frames()
    d.close()
    assert len(cams) == 2 and by_name["sub/portrait.png"].width == 64
    assert len({by_name[n].camera_id for n in kept - {"sub/portrait.png"}}) == 1
    cam = by_name["rgb.png"]
    assert cam.model_name == "SIMPLE_RADIAL" and not cam.has_prior_focal_length
    np.testing.assert_allclose(cam.params, [1.2 * 96, 48, 36, 0])
    assert len(frames) == len(kept)  # COLMAP 4 layout: a frame per image, a rig per camera
    run = RunReport(command="extract")
    run.skip_files(rep.skipped)
    report_json = run.write_json(tmp_path / "r.json").read_text(encoding="utf-8")
    assert "truncated.jpg" in report_json and "decode_error" in report_json


def test_fewer_than_two_usable_images_is_an_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(blobs(40, 40)).save(tmp_path / "imgs" / "one.png")
    (tmp_path / "imgs" / "bad.png").write_text("x")
    with pytest.raises(IngestError, match="1 usable image.*need at least 2") as e:
        extract(tmp_path / "imgs", tmp_path / "db.db", ExtractOptions(**FAST))
    assert e.value.report.skipped[0].reason == "decode_error"
    assert not (tmp_path / "db.db").exists()


def test_single_camera_mode_with_mixed_sizes_names_the_files(messy, tmp_path):
    with pytest.raises(IngestError, match="portrait.png"):
        extract(messy, tmp_path / "db.db", ExtractOptions(camera_mode="single", **FAST))
    assert not (tmp_path / "db.db").exists()


def test_features_equal_pycolmap_extract_features(tmp_path):
    """Known answer: our decode + normalisation + pycolmap extractor gives COLMAP's own features,
    also when the image is downscaled for SIFT (positions scaled back to full resolution)."""
    (tmp_path / "img").mkdir()
    Image.fromarray(blobs(120, 160, seed=7)).save(tmp_path / "img" / "a.png")
    for size in (3200, 100):
        ours_k, ours_d = make_extractor(ExtractOptions(max_image_size=size)).extract(load_uint8(tmp_path / "img" / "a.png"))
        ref_db = tmp_path / f"ref{size}.db"
        pycolmap.extract_features(ref_db, tmp_path / "img", extraction_options=pycolmap.FeatureExtractionOptions(
            num_threads=1, max_image_size=size), device=pycolmap.Device.cpu)
        ref_k, ref_d = name_features(ref_db)["a.png"]
        np.testing.assert_array_equal(ours_d, ref_d)
        np.testing.assert_allclose(ours_k[:, :2], ref_k[:, :2], atol=1e-3)
        # affine shape: COLMAP scales its columns, we scale rows (x' = S x); equal when sx == sy
        np.testing.assert_allclose(ours_k[:, 2:], ref_k[:, 2:], rtol=0, atol=5e-3 * np.abs(ref_k[:, 2:]).max())
        if size == 100:
            assert ours_k[:, 0].max() > 100 and ours_k[:, 0].max() <= 160


def _clean_and_interrupted(messy, tmp_path, interrupt):
    clean = tmp_path / "clean.db"
    extract(messy, clean, ExtractOptions(**FAST))
    db = tmp_path / "resumed.db"
    interrupt(db)
    rep = extract(messy, db, ExtractOptions(**FAST))
    assert dump(db) == dump(clean)
    return rep


def test_resume_after_interrupt_equals_clean_run(messy, tmp_path, monkeypatch):
    """Ctrl-C between the keypoints and the descriptors of the third image: that image's
    transaction rolls back, the rerun finishes the job, the database equals a clean run's."""
    calls = {"n": 0}
    orig = FrontendDatabase.write_descriptors

    def flaky(self, image_id, descriptors, *rest):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        orig(self, image_id, descriptors, *rest)

    def interrupt(db):
        monkeypatch.setattr(FrontendDatabase, "write_descriptors", flaky)
        with pytest.raises(KeyboardInterrupt):
            extract(messy, db, ExtractOptions(**FAST))
        monkeypatch.setattr(FrontendDatabase, "write_descriptors", orig)
        with contextlib.closing(sqlite3.connect(str(db))) as c:
            assert c.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 6  # registered up front
            assert c.execute("SELECT COUNT(*) FROM keypoints").fetchone()[0] == 2  # no partial third
            assert c.execute("SELECT COUNT(*) FROM descriptors").fetchone()[0] == 2

    rep = _clean_and_interrupted(messy, tmp_path, interrupt)
    assert (rep.num_resumed, rep.num_extracted, rep.num_registered) == (2, 4, 0)


def test_resume_after_hard_kill_equals_clean_run(messy, tmp_path):
    """SIGKILL in the middle of an open transaction (a power cut, the OOM killer)."""
    script = textwrap.dedent("""
        import os, signal, sys
        from torchsfm.frontend import colmap_db, extract, ExtractOptions
        orig, n = colmap_db.FrontendDatabase.write_descriptors, [0]
        def killer(self, image_id, d, *rest):
            n[0] += 1
            if n[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            orig(self, image_id, d, *rest)
        colmap_db.FrontendDatabase.write_descriptors = killer
        extract(sys.argv[1], sys.argv[2], ExtractOptions(num_workers=1, progress=False))
    """)

    def interrupt(db):
        p = subprocess.run([sys.executable, "-c", script, str(messy), str(db)], capture_output=True, timeout=120)
        assert p.returncode == -9, p.stderr.decode()[-2000:]

    rep = _clean_and_interrupted(messy, tmp_path, interrupt)
    assert (rep.num_resumed, rep.num_extracted) == (3, 3)


def test_rerun_adds_only_new_images_to_existing_cameras(messy, tmp_path):
    db = tmp_path / "db.db"
    extract(messy, db, ExtractOptions(**FAST))
    again = extract(messy, db, ExtractOptions(**FAST))
    assert (again.num_extracted, again.num_resumed, again.num_registered) == (0, 6, 0)
    Image.fromarray(blobs(72, 96, seed=9)).save(messy / "new.png")
    before = dump(db)
    rep = extract(messy, db, ExtractOptions(**FAST))
    assert (rep.num_extracted, rep.num_registered, rep.num_cameras) == (1, 1, 2)
    after = dump(db)
    assert after["cameras"] == before["cameras"]  # joined the existing 96x72 camera
    new = [r for r in after["images"] if r[1] == "new.png"]
    assert new and new[0][2] == next(r[2] for r in after["images"] if r[1] == "rgb.png")


def test_corrupt_database_is_a_clear_error(messy, tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    with pytest.raises(DatabaseError, match="bad.db"):
        extract(messy, bad, ExtractOptions(**FAST))


def test_pair_ids_match_colmap():
    a, b = np.array([1, 7, 3]), np.array([2, 5, 3000])
    ids = pair_ids(a, b)
    assert ids.tolist() == [pycolmap.image_pair_to_pair_id(int(x), int(y)) for x, y in zip(a, b)]
    i, j = pair_ids_to_images(ids)
    assert i.tolist() == [1, 5, 3] and j.tolist() == [2, 7, 3000]


def test_pair_generators():
    assert exhaustive_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    seq = sequential_pairs(6, overlap=2, quadratic_overlap=False)
    assert seq.tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3], [2, 4], [3, 4], [3, 5], [4, 5]]
    # quadratic overlap 3: offsets {1, 2, 3} U {1, 2, 4}
    q = sequential_pairs(10, overlap=3, quadratic_overlap=True)
    assert set(map(tuple, q.tolist())) == {(i, i + o) for i in range(10) for o in (1, 2, 3, 4) if i + o < 10}
    ring = sequential_pairs(6, overlap=2, quadratic_overlap=False, loop_closure=True)
    assert {(0, 4), (0, 5), (1, 5)} <= set(map(tuple, ring.tolist())) and len(ring) == 12


def test_vlad_retrieval_finds_images_of_the_same_scene(device):
    """Known answer: images drawn from two descriptor distributions retrieve their own kind."""
    g = torch.Generator().manual_seed(0)
    modes = torch.rand(2, 24, 128, generator=g) ** 4  # two scenes, 24 "structures" each
    descs, img = [], []
    for i in range(10):
        scene = i % 2
        pick = torch.randint(0, 24, (200,), generator=g)
        d = modes[scene, pick] + 0.05 * torch.rand(200, 128, generator=g)
        descs.append(d)
        img.append(torch.full((200,), i))
    x = torch.nn.functional.normalize(torch.cat(descs), dim=1).to(device)
    img = torch.cat(img).to(device)
    # fewer words than structures (as with real images): residuals carry the scene's signature
    centres = kmeans(x, 4, 10, torch.Generator().manual_seed(1))
    v = vlad(x, img, 10, centres)
    assert v.device.type == device.type
    torch.testing.assert_close(v.norm(dim=1), torch.ones(10, device=device))
    pairs = top_k_pairs(v, k=3)
    assert len(pairs) > 0 and bool(((pairs[:, 0] - pairs[:, 1]) % 2 == 0).all())  # same scene only
    loops = top_k_pairs(v, k=1, exclude_within=2, queries=torch.tensor([0]))
    assert loops.tolist() and all(abs(a - b) > 2 for a, b in loops.tolist())


@pytest.fixture
def shifted(tmp_path):
    """Two overlapping crops of one textured scene (known shift) and one unrelated image."""
    big = blobs(150, 200, seed=11)
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(big[0:120, 0:160]).save(root / "a.png")
    Image.fromarray(big[12:132, 25:185]).save(root / "b b.png")  # white space: one-by-one path
    Image.fromarray(big[5:125, 30:190]).save(root / "c.png")
    Image.fromarray(blobs(120, 160, seed=12)).save(root / "other.png")
    return root


def _verified_shift(db, n1, n2):
    d = pycolmap.Database.open(str(db))
    try:
        i1, i2 = d.read_image_with_name(n1).image_id, d.read_image_with_name(n2).image_id
        tvg = d.read_two_view_geometry(i1, i2)
        k1, k2 = d.read_keypoints(i1)[:, :2], d.read_keypoints(i2)[:, :2]
        m = tvg.inlier_matches
        if i1 > i2:
            m = m[:, ::-1]
        return tvg, (np.median(k2[m[:, 1]] - k1[m[:, 0]], axis=0) if len(m) else None)
    finally:
        d.close()


@pytest.mark.parametrize("verifier", ["torch", "colmap"])
def test_match_verifies_known_shift_and_resumes(shifted, tmp_path, verifier):
    """Both verifiers write what pycolmap reads back: the inliers give the known shift."""
    db = tmp_path / "db.db"
    extract(shifted, db, ExtractOptions(camera_mode="single", **FAST))
    rep = match(db, MatchOptions(mode="exhaustive", num_threads=1, progress=False, verifier=verifier))
    assert (rep.num_candidate_pairs, rep.num_matched, rep.num_resumed) == (6, 6, 0)
    tvg, shift = _verified_shift(db, "a.png", "c.png")
    assert len(tvg.inlier_matches) >= 30 and tvg.config >= 2
    np.testing.assert_allclose(shift, [-30, -5], atol=0.5)
    tvg, shift = _verified_shift(db, "a.png", "b b.png")  # through the per-pair path
    assert len(tvg.inlier_matches) >= 30
    np.testing.assert_allclose(shift, [-25, -12], atol=0.5)
    tvg, _ = _verified_shift(db, "a.png", "other.png")
    assert len(tvg.inlier_matches) < 15
    assert rep.num_verified == 3
    again = match(db, MatchOptions(mode="exhaustive", num_threads=1, progress=False, verifier=verifier))
    assert (again.num_matched, again.num_resumed, again.num_verified) == (0, 6, 3)


def test_torch_matcher_caps_raw_matches_per_pair(shifted, tmp_path):
    """max_num_matches keeps each pair's best raw matches (COLMAP's cap); the geometry stays."""
    db = tmp_path / "db.db"
    extract(shifted, db, ExtractOptions(camera_mode="single", **FAST))
    d = tmp_path / "capped.db"
    d.write_bytes(db.read_bytes())
    full = match(db, MatchOptions(mode="exhaustive", num_threads=1, progress=False))
    capped = match(d, MatchOptions(mode="exhaustive", num_threads=1, progress=False, max_num_matches=40))
    with contextlib.closing(sqlite3.connect(str(db))) as c1, contextlib.closing(sqlite3.connect(str(d))) as c2:
        rows1 = dict(c1.execute("SELECT pair_id, rows FROM matches").fetchall())
        rows2 = dict(c2.execute("SELECT pair_id, rows FROM matches").fetchall())
    assert max(rows1.values()) > 40 and max(rows2.values()) == 40
    assert all(rows2[k] == min(v, 40) for k, v in rows1.items() if v >= 15)
    assert capped.num_verified == full.num_verified == 3
    tvg, shift = _verified_shift(d, "a.png", "c.png")
    assert len(tvg.inlier_matches) >= 30
    np.testing.assert_allclose(shift, [-30, -5], atol=0.5)


def test_guided_matching_is_colmap_only():
    with pytest.raises(ValueError, match="--verifier colmap"):
        MatchOptions(guided_matching=True)
    assert MatchOptions(guided_matching=True, verifier="colmap").guided_matching


def test_cli_ivf_options_reach_the_matcher(shifted, monkeypatch, tmp_path, capsys):
    from torchsfm.cli import main
    from torchsfm.frontend import torch_matcher

    seen = {}
    real = torch_matcher.descriptor_match_options

    def spy(options, norm=512.0):
        seen["dm"] = real(options, norm)
        return seen["dm"]

    monkeypatch.setattr(torch_matcher, "descriptor_match_options", spy)
    db = tmp_path / "db.db"
    extract(shifted, db, ExtractOptions(camera_mode="single", **FAST))
    assert main(["-q", "match", "--database", str(db), "--ivf-probes", "3", "--ivf-exact-check",
                 "--num-threads", "1"]) == 0
    assert seen["dm"].ivf_probes == 3 and seen["dm"].ivf_exact_check is True
    assert main(["-q", "match", "--database", str(db), "--SiftMatching.guided_matching", "1"]) == 2
    assert "--verifier colmap" in capsys.readouterr().err


def test_cli_extract_and_match(shifted, tmp_path, capsys):
    from torchsfm.cli import main

    db = tmp_path / "w" / "database.db"
    assert main(["-q", "extract", str(shifted), "--database", str(db), "--threads", "1", "--camera-mode", "single"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("torchsfm extract: done in") and "extract: 4 images in 1 camera(s)" in out
    rep = json.loads((tmp_path / "w" / "database.extract.json").read_text())
    assert [s["name"] for s in rep["stages"]] == ["extract"] and rep["stages"][0]["counts"]["num_images"] == 4
    assert main(["-q", "match", "--database", str(db), "--mode", "sequential", "--overlap", "1",
                 "--no-quadratic-overlap", "--num-threads", "1"]) == 0
    assert "match (sequential): 3 candidate pairs over 4 images" in capsys.readouterr().out
    rep = json.loads((tmp_path / "w" / "database.match.json").read_text())
    assert rep["stages"][0]["counts"]["mode"] == "sequential" and rep["stages"][0]["counts"]["num_verified"] >= 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["-q", "extract", str(empty), "--database", str(tmp_path / "x.db")]) == 2
    assert "need at least 2" in capsys.readouterr().err
    assert main(["-q", "match", "--database", str(tmp_path / "missing.db")]) == 2


@pytest.mark.parametrize("verifier", ["torch", "colmap"])
def test_match_resume_after_interrupt_equals_clean_run(shifted, tmp_path, monkeypatch, verifier):
    import torchsfm.frontend.colmap_matcher as colmap_matcher
    import torchsfm.frontend.torch_matcher as torch_matcher

    features = tmp_path / "features.db"
    extract(shifted, features, ExtractOptions(camera_mode="single", **FAST))
    opts = MatchOptions(mode="exhaustive", num_threads=1, progress=False, chunk_size=1, verifier=verifier)
    clean, resumed = tmp_path / "clean.db", tmp_path / "resumed.db"
    for p in (clean, resumed):
        p.write_bytes(features.read_bytes())
    match(clean, opts)
    calls = {"n": 0}
    module, name = (colmap_matcher, "_match_listed") if verifier == "colmap" else (torch_matcher, "write_pair_results")
    orig = getattr(module, name)

    def flaky(*args, **kwargs):  # the second committed chunk is interrupted
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        orig(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    with pytest.raises(KeyboardInterrupt):
        match(resumed, opts)
    monkeypatch.setattr(module, name, orig)
    done = len(dump(resumed)["two_view_geometries"])
    assert 1 <= done < 6  # the first chunk is committed, the interrupted one is not
    rep = match(resumed, opts)
    assert (rep.num_resumed, rep.num_matched) == (done, 6 - done)
    a, b = dump(clean), dump(resumed)
    assert a["matches"] == b["matches"]
    assert a["two_view_geometries"] == b["two_view_geometries"]  # seeded RANSAC: identical geometry


def test_exif_priors_reach_the_database(tmp_path, caplog):
    from test_ingest import exif

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(2):
        Image.fromarray(blobs(48, 64, seed=20 + i)).save(root / f"ok{i}.jpg", exif=exif("Canon", "X", f35=50))
        Image.fromarray(blobs(48, 64, seed=30 + i)).save(root / f"bad{i}.jpg", exif=exif("DJI", "Y", f35=1))
    db = tmp_path / "db.db"
    with caplog.at_level("WARNING"):
        rep = extract(root, db, ExtractOptions(**FAST))
    assert sorted(e["name"] for e in rep.exif_focal_ignored) == ["bad0.jpg", "bad1.jpg"]
    assert sum("absurd EXIF focal" in r.getMessage() for r in caplog.records) == 1  # one aggregated warning
    d = pycolmap.Database.open(str(db))
    cams = {c.camera_id: c for c in d.read_all_cameras()}
    by_name = {im.name: cams[im.camera_id] for im in d.read_all_images()}
    d.close()
    assert len(cams) == 2
    assert by_name["ok0.jpg"].has_prior_focal_length
    assert by_name["ok0.jpg"].focal_length == pytest.approx(50 * 80 / np.hypot(36, 24))
    assert not by_name["bad0.jpg"].has_prior_focal_length
    assert by_name["bad0.jpg"].focal_length == pytest.approx(1.2 * 64)


def test_worker_processes_give_the_same_database(shifted, tmp_path):
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    extract(shifted, one, ExtractOptions(num_workers=1, progress=False))
    extract(shifted, two, ExtractOptions(num_workers=2, progress=False))
    assert dump(one) == dump(two)


def test_extraction_workers_do_not_import_torch():
    """A spawned extraction worker imports only the extraction path: no torch (seconds per worker)."""
    code = "import sys, torchsfm.frontend.features; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
