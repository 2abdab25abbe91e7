"""The rendered low-texture scene (`python -m torchsfm.synthetic.low_texture`): ground truth that
COLMAP reads, cameras looking at the object, and presets that differ in texture as documented."""
from __future__ import annotations

import numpy as np
import pycolmap
import torch
from PIL import Image

from torchsfm.synthetic.low_texture import PRESETS, LowTextureScene, main, render, ring_poses


def _grain(img: np.ndarray) -> float:
    """Mean absolute difference of neighbouring object pixels: the texture SIFT can see."""
    a = img.astype(np.float64)
    on = (a[:, 1:] > 8) & (a[:, :-1] > 8)
    return float(np.abs(np.diff(a, axis=1))[on].mean())


def test_scene_written_with_ground_truth(tmp_path):
    main([str(tmp_path / "s"), "--images", "3", "--preset", "medium"])
    rec = pycolmap.Reconstruction(str(tmp_path / "s" / "gt"))
    assert len(rec.images) == 3 and rec.cameras[1].model.name == "PINHOLE"
    for im in rec.images.values():
        assert Image.open(tmp_path / "s" / "images" / im.name).size == (640, 480)
        # every camera looks at the object at the origin: it projects to the image centre
        xy = rec.cameras[1].img_from_cam(im.cam_from_world() * np.zeros(3))
        np.testing.assert_allclose(xy, [320, 240], atol=1e-6)


def test_medium_preset_has_finer_stronger_texture():
    small = {"width": 160, "height": 120, "focal": 150.0}
    R, t = ring_poses(LowTextureScene(**small))
    faint, medium = (render(LowTextureScene(noise_dn=0.0, **small, **PRESETS[p]), R[0], t[0],
                            torch.Generator().manual_seed(0)) for p in ("faint", "medium"))
    assert (faint > 0).mean() > 0.1 and np.array_equal(faint > 0, medium > 0)  # same object, same silhouette
    assert _grain(medium) > 2 * _grain(faint)
