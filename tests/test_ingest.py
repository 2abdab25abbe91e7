"""Image ingest without feature extraction: scanning, skip reasons, normalisation, EXIF, cameras."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from torchsfm.frontend.ingest import (
    IngestError,
    group_cameras,
    natural_key,
    scan_images,
    to_uint8,
)
from torchsfm.frontend.options import ExtractOptions


def texture(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, arr=None, fmt=None, exif=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(texture() if arr is None else arr)
    extra = {"exif": exif} if exif is not None else {}
    im.save(path, format=fmt, **extra, **kw)
    return path


def exif(make=None, model=None, f35=None, fmm=None, xres=None, unit=None, pixel_x=None, orientation=None):
    ex = Image.Exif()
    if make:
        ex[0x010F] = make
    if model:
        ex[0x0110] = model
    if orientation is not None:
        ex[0x0112] = orientation
    ifd = ex.get_ifd(0x8769)
    for tag, v in ((0xA405, f35), (0x920A, fmm), (0xA20E, xres), (0xA210, unit), (0xA002, pixel_x)):
        if v is not None:
            ifd[tag] = v
    return ex


def test_scan_skips_bad_files_with_reasons(tmp_path):
    root = tmp_path / "imgs"
    save(root / "a.png")
    save(root / "B.JPG", fmt="JPEG")  # upper-case extension is accepted
    save(root / "sub" / "a.png", texture(seed=1))  # same basename in another folder: a different image
    (root / "notes.txt").write_text("hello")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "text.png").write_text("not an image")
    (root / "zero.png").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(texture(seed=2)).save(good, "JPEG")
    (root / "trunc.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "dup.png").write_bytes((root / "a.png").read_bytes())
    save(root / ".hidden" / "c.png", texture(seed=3))  # hidden folders are not entered

    res = scan_images(root, ExtractOptions())
    assert [r.name for r in res.images] == ["B.JPG", "a.png", "sub/a.png"]
    reasons = {s.name: s.reason for s in res.skipped}
    assert reasons == {
        ".DS_Store": "unsupported_extension",
        "notes.txt": "unsupported_extension",
        "text.png": "decode_error",
        "zero.png": "empty_file",
        "trunc.jpg": "decode_error",
        "dup.png": "duplicate",
    }
    dup = next(s for s in res.skipped if s.name == "dup.png")
    assert "a.png" in dup.detail
    assert res.num_files == 9


def test_scan_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        scan_images(tmp_path / "nope", ExtractOptions())


def test_unicode_and_nested_names_are_relative_posix(tmp_path):
    root = tmp_path / "imgs"
    save(root / "données" / "façade 1.png")
    save(root / "日本" / "写真.png", texture(seed=5))
    res = scan_images(root, ExtractOptions())
    assert sorted(r.name for r in res.images) == sorted(["données/façade 1.png", "日本/写真.png"])
    assert {r.folder for r in res.images} == {"données", "日本"}


def test_natural_order():
    names = ["f10.png", "f2.png", "f1.png", "a/f3.png"]
    assert sorted(names, key=natural_key) == ["a/f3.png", "f1.png", "f2.png", "f10.png"]


def test_normalisation_16bit_grey_rgba_palette_float():
    g8 = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    g16 = Image.fromarray(g8.astype(np.uint16) * 257)  # full 16-bit range: must scale, not clip
    assert g16.mode.startswith("I;16")
    np.testing.assert_array_equal(to_uint8(g16), g8)
    np.testing.assert_array_equal(to_uint8(Image.fromarray(g8)), g8)  # grey stays single-channel
    np.testing.assert_array_equal(to_uint8(Image.fromarray(g8.astype(np.int32) * 257, mode="I")), g8)
    rgb = texture(20, 30)
    rgba = Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)]))
    np.testing.assert_array_equal(to_uint8(rgba), rgb)  # alpha dropped, colours kept
    pal = Image.fromarray(rgb).quantize(16)
    np.testing.assert_array_equal(to_uint8(pal), np.asarray(pal.convert("RGB")))
    assert to_uint8(pal).shape == (20, 30, 3)
    f = Image.fromarray(g8.astype(np.float32) / 255.0, mode="F")
    assert np.abs(to_uint8(f).astype(int) - g8).max() <= 1
    la = Image.fromarray(np.dstack([g8, g8]), mode="LA")
    np.testing.assert_array_equal(to_uint8(la), g8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert to_uint8(cmyk).shape == (20, 30, 3)


def test_16bit_and_rgba_files_scan_as_usable(tmp_path):
    g8 = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(np.dstack([texture(20, 30), np.full((20, 30), 255, np.uint8)])).save(tmp_path / "rgba.png")
    res = scan_images(tmp_path, ExtractOptions())
    assert {r.name: r.mode for r in res.images} == {"g16.png": "I;16", "rgba.png": "RGBA"}


def test_exif_focal_priors(tmp_path):
    o = ExtractOptions()
    w, h = 64, 48
    save(tmp_path / "f35.jpg", fmt="JPEG", exif=exif("Canon", "X", f35=50))
    # 4 mm at 100 px/mm (1000 px/cm), file downsized 2x from a 128 px wide original -> 200 px
    save(tmp_path / "plane.jpg", fmt="JPEG", exif=exif("Canon", "X", fmm=4.0, xres=1000.0, unit=3, pixel_x=128))
    save(tmp_path / "zero.jpg", fmt="JPEG", exif=exif("DJI", "Y", fmm=0.0))
    save(tmp_path / "wide.jpg", fmt="JPEG", exif=exif(f35=1))  # ~173 deg field of view: absurd
    save(tmp_path / "tele.jpg", fmt="JPEG", exif=exif(f35=5000))  # ~0.5 deg: absurd
    save(tmp_path / "none.jpg", fmt="JPEG")
    recs = {r.name: r for r in scan_images(tmp_path, o).images}
    assert recs["f35.jpg"].focal_px == pytest.approx(50 * math.hypot(w, h) / math.hypot(36, 24))
    assert (recs["f35.jpg"].make, recs["f35.jpg"].model) == ("Canon", "X")
    assert recs["plane.jpg"].focal_px == pytest.approx(4.0 * 100.0 * 0.5)
    for n in ("zero.jpg", "wide.jpg", "tele.jpg"):
        assert recs[n].focal_px is None and recs[n].focal_note, n
    assert recs["none.jpg"].focal_px is None and recs["none.jpg"].focal_note == ""


def test_exif_orientation_recorded_invalid_kept(tmp_path):
    save(tmp_path / "rot.jpg", fmt="JPEG", exif=exif(orientation=6))
    save(tmp_path / "bad.jpg", fmt="JPEG", exif=exif(orientation=9))
    recs = {r.name: r for r in scan_images(tmp_path, ExtractOptions()).images}
    assert recs["rot.jpg"].orientation == 6
    assert recs["bad.jpg"].orientation == 9  # reported as invalid by extract(), geometry unaffected
    assert (recs["rot.jpg"].width, recs["rot.jpg"].height) == (64, 48)  # stored pixel grid


def _records(tmp_path, specs):
    for name, (w, h, ex) in specs.items():
        save(tmp_path / name, texture(h, w, seed=hash(name) % 1000), fmt="JPEG", exif=ex)
    return scan_images(tmp_path, ExtractOptions()).images


def test_camera_grouping_auto_per_folder_per_image_single(tmp_path):
    recs = _records(tmp_path, {
        "a/1.jpg": (64, 48, exif("Canon", "X", f35=50)),
        "a/2.jpg": (64, 48, exif("Canon", "X", f35=50)),
        "a/3.jpg": (48, 64, exif("Canon", "X", f35=50)),  # portrait: other size, never shared
        "b/4.jpg": (64, 48, exif("Nikon", "Z", f35=50)),  # other body
        "b/5.jpg": (64, 48, None),
        "b/6.jpg": (64, 48, None),
    })
    names = [r.name for r in recs]

    def groups(mode):
        gs = group_cameras(recs, ExtractOptions(camera_mode=mode))
        return sorted(sorted(names[i] for i in g.members) for g in gs), gs

    auto, gs = groups("auto")
    assert auto == [["a/1.jpg", "a/2.jpg"], ["a/3.jpg"], ["b/4.jpg"], ["b/5.jpg", "b/6.jpg"]]
    by_first = {names[g.members[0]]: g for g in gs}
    assert by_first["a/1.jpg"].has_prior_focal_length
    assert by_first["a/1.jpg"].focal == pytest.approx(50 * 80 / math.hypot(36, 24))
    assert not by_first["b/5.jpg"].has_prior_focal_length
    assert by_first["b/5.jpg"].focal == pytest.approx(1.2 * 64)
    assert len(groups("per_image")[0]) == 6
    with pytest.raises(IngestError, match="sizes") as e:
        group_cameras(recs, ExtractOptions(camera_mode="single"))
    assert "a/3.jpg" in str(e.value) and "48x64" in str(e.value)
    with pytest.raises(IngestError, match="folder 'a'"):
        group_cameras(recs, ExtractOptions(camera_mode="per-folder"))
    same = [r for r in recs if (r.width, r.height) == (64, 48)]
    gs = group_cameras(same, ExtractOptions(camera_mode="per_folder"))
    assert sorted(len(g.members) for g in gs) == [2, 3]
    gs = group_cameras(same, ExtractOptions(camera_mode="single"))
    assert len(gs) == 1 and gs[0].has_prior_focal_length  # median of the priors that exist


def test_options_validation():
    assert ExtractOptions(camera_mode="PER-FOLDER").camera_mode == "per_folder"
    assert ExtractOptions(camera_model="pinhole").camera_model == "PINHOLE"
    with pytest.raises(ValueError, match="camera mode"):
        ExtractOptions(camera_mode="weird")
    with pytest.raises(ValueError, match="camera model"):
        ExtractOptions(camera_model="FOV")
