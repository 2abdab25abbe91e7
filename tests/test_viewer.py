"""The HTML viewer: self-contained page, scene data equal to the model, components, escaping,
CLI; and, when Chromium is installed, a headless render that must show the scene."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import torch

from torchsfm.cli import main
from torchsfm.io.colmap_model import from_pycolmap, write_model
from torchsfm.viewer import ViewerOptions, build_scene, default_output, find_models, render_html, write_viewer
from torchsfm.viewer.html import PALETTE


def synthetic(rigs=2, frames=4, points=150, seed=0):
    pycolmap.set_random_seed(seed)
    o = pycolmap.SyntheticDatasetOptions()
    o.num_rigs, o.num_cameras_per_rig, o.num_frames_per_rig, o.num_points3D = rigs, 1, frames, points
    o.camera_width, o.camera_height = 200, 150
    o.camera_params = [180.0, 100.0, 75.0, 0.02]
    return from_pycolmap(pycolmap.synthesize_dataset(o))


def scene_of(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="scene">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def decode(s: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype)


def test_page_is_self_contained_and_holds_the_scene(tmp_path):
    rec = synthetic()
    rec.images.registered[2] = False
    out = write_viewer([rec], tmp_path / "v.html", names=["sparse/0"])
    page = out.read_text()
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert not re.search(r"<script[^>]+src=", page) and "<link" not in page and "@import" not in page
    s = scene_of(page)
    reg = rec.images.registered.numpy()
    assert s["cameras"]["names"] == [n for n, r in zip(rec.images.name, reg) if r]
    assert s["cameras"]["image_ids"] == rec.images.image_id.numpy()[reg].tolist()
    origin = np.asarray(s["origin"])
    centers = decode(s["cameras"]["center"], "<f4").reshape(-1, 3) + origin
    np.testing.assert_allclose(centers, rec.images.centers.numpy()[reg], rtol=0, atol=1e-5)
    xyz = decode(s["points"]["xyz"], "<f4").reshape(-1, 3) + origin
    np.testing.assert_allclose(xyz, rec.points3D.xyz.numpy(), rtol=0, atol=1e-5)
    assert s["points"]["total"] == len(rec.points3D)
    obs = np.bincount(rec.tracks.image.numpy(), minlength=len(rec.images))[reg]
    assert s["cameras"]["observations"] == obs.tolist()
    # Frustum corners: image corner rays, rotated to the world, all at the same depth along the optical axis.
    corners = decode(s["cameras"]["corners"], "<f4").reshape(-1, 4, 3)
    axis = rec.images.rotation.numpy()[reg][:, 2, :]  # camera z in world coordinates
    depth = np.einsum("nkc,nc->nk", corners, axis)
    np.testing.assert_allclose(depth, s["view"]["frustum_scale"], rtol=1e-5)


def test_subsampling_caps_points(tmp_path):
    rec = synthetic(points=300)
    s = build_scene([rec], options=ViewerOptions(max_points=50))
    xyz = decode(s["points"]["xyz"], "<f4").reshape(-1, 3) + np.asarray(s["origin"])
    assert xyz.shape == (50, 3) and s["points"]["total"] == 300
    d = np.linalg.norm(xyz[:, None] - rec.points3D.xyz.numpy()[None], axis=-1).min(1)
    assert d.max() < 1e-5  # a subset of the model's points, not new ones
    assert len(np.unique(xyz, axis=0)) == 50


def test_components_and_default_paths(tmp_path):
    sparse = tmp_path / "scene" / "sparse"
    for k, seed in [(0, 0), (1, 1), (10, 2)]:
        write_model(synthetic(rigs=1, seed=seed), sparse / str(k))
    (sparse / "notes").mkdir()
    models = find_models([sparse])
    assert [m.name for m in models] == ["0", "1", "10"]
    # next to the model, never inside it: MODEL.html, or viewer.html in the common folder of several
    assert default_output(models) == sparse.absolute() / "viewer.html"
    assert default_output(models[:1]) == sparse.absolute() / "0.html"
    assert default_output([sparse]) == sparse.absolute().parent / "sparse.html"
    out = write_viewer([sparse])
    s = scene_of(out.read_text())
    assert out == sparse.absolute().parent / "sparse.html"
    assert [c["name"] for c in s["components"]] == ["sparse/0", "sparse/1", "sparse/10"]
    assert [c["color"] for c in s["components"]] == PALETTE[:3]
    comp = decode(s["cameras"]["component"], "<u2")
    assert comp.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    pcomp = decode(s["points"]["component"], "<u2")
    assert np.bincount(pcomp).tolist() == [c["points"] for c in s["components"]]
    with pytest.raises(FileNotFoundError, match="neither a COLMAP model"):
        find_models([sparse / "notes"])


def test_names_cannot_break_out_of_the_page(tmp_path):
    rec = synthetic(rigs=1)
    evil = "</script><script>alert(1)</script>.png"
    rec.images.name[0] = evil
    page = render_html(build_scene([rec], names=["<b>x</b> __SCENE_JSON__"]))
    assert page.count("</script>") == 2  # the JSON block and the renderer, nothing injected
    assert scene_of(page)["cameras"]["names"][0] == evil
    assert "<title>torchsfm viewer: &lt;b&gt;x&lt;/b&gt; __SCENE_JSON__</title>" in page


def test_uncoloured_points_get_the_component_colour():
    rec = synthetic(rigs=1)
    rec.points3D.rgb.zero_()
    s = build_scene([rec])
    rgb = decode(s["points"]["rgb"], "u1").reshape(-1, 3)
    assert (rgb == rgb[0]).all() and rgb[0].min() > 100  # visible on the dark background


def test_thumbnails_from_images(tmp_path):
    from PIL import Image

    rec = synthetic(rigs=1)
    for name in rec.images.name[:-1]:  # the last image is missing: no thumbnail, no failure
        Image.fromarray(np.full((150, 200, 3), 90, np.uint8)).save(tmp_path / Path(name).with_suffix(".jpg").name)
    rec.images.name = [Path(n).with_suffix(".jpg").name for n in rec.images.name]
    s = build_scene([rec], image_dir=tmp_path, options=ViewerOptions(thumbnail_size=40))
    th = s["cameras"]["thumbnails"]
    assert all(t.startswith("data:image/jpeg;base64,") for t in th[:-1]) and th[-1] is None
    import io

    with Image.open(io.BytesIO(base64.b64decode(th[0].split(",", 1)[1]))) as im:
        assert max(im.size) == 40


def test_cli_view(tmp_path, capsys):
    model = tmp_path / "sparse" / "0"
    write_model(synthetic(rigs=1), model)
    assert main(["-q", "view", str(model)]) == 0
    page = tmp_path / "sparse" / "0.html"
    assert page.is_file() and "0.html" in capsys.readouterr().out and not (model / "viewer.html").exists()
    assert main(["-q", "view", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["-q", "view", str(model), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Headless browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found (install it with `apt-get install -y chromium`): headless viewer render not checked")


def run_chromium(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=800,600", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_headless_render_shows_the_scene(tmp_path):
    exe = chromium()
    a, b = synthetic(rigs=1, seed=0), synthetic(rigs=1, seed=5)
    a.points3D.rgb[:] = torch.tensor([0, 255, 0], dtype=torch.uint8)  # pure green points
    b.points3D.rgb[:] = torch.tensor([0, 0, 255], dtype=torch.uint8)
    page = tmp_path / "v.html"
    write_viewer([a, b], page, names=["a", "b"])
    # Hover over the first camera: the tooltip must name its image.
    probe = ("<script>window.addEventListener('load', () => { const v = window.torchsfmViewer;"
             " const p = v.cameraScreen(0); document.getElementById('view').dispatchEvent(new MouseEvent("
             "'mousemove', {clientX: p[0], clientY: p[1], bubbles: true})); });</script>")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page.read_text().replace("</body>", probe + "</body>"))

    shot = tmp_path / "shot.png"
    r = run_chromium(exe, tmp_path, f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    dom = run_chromium(exe, tmp_path, "--dump-dom", page.as_uri()).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-ready="1"' in body and "data-error" not in body, body
    assert f'data-drawn-points="{len(a.points3D) + len(b.points3D)}"' in body  # the initial view frames all points
    assert f'data-drawn-cameras="{len(a.images) + len(b.images)}"' in body
    dom = run_chromium(exe, tmp_path, "--dump-dom", probe_page.as_uri()).stdout
    tip = re.search(r'<div id="tip"[^>]*>(.*?)</div></div>', dom, re.S)
    assert tip and a.images.name[0] in tip.group(1) and "display: block" in dom

    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (600, 800)
    assert img.std() > 5  # not blank
    img[:200, :380] = img[-1, -1]  # leave out the legend panel (its colour swatches)

    def count(rgb, tol=40):
        return int((np.abs(img - np.asarray(rgb)).sum(-1) < tol).sum())

    assert count((0, 255, 0)) > 100 and count((0, 0, 255)) > 100  # both point clouds
    frust_a = tuple(int(PALETTE[0][i : i + 2], 16) for i in (1, 3, 5))
    frust_b = tuple(int(PALETTE[1][i : i + 2], 16) for i in (1, 3, 5))
    assert count(frust_a, 60) > 50 and count(frust_b, 60) > 50  # frusta in both component colours
