"""Parity of the torch verification with pycolmap on real matches of ../shared/data."""
from __future__ import annotations

import shutil

import pytest
from conftest import shared_data

from torchsfm.frontend import ExtractOptions, extract
from torchsfm.frontend.verification import VerificationOptions, verify_all
from torchsfm.frontend.verification.parity import compare, flat_inputs, match_without_verification, pycolmap_verify

pytestmark = pytest.mark.data


def _raw_database(tmp_path, scene: str, count: int, step: int):
    src = sorted((shared_data(scene) / "images").iterdir())[::step][:count]
    img = tmp_path / "images"
    img.mkdir()
    for p in src:
        shutil.copy(p, img / p.name)
    db = tmp_path / "database.db"
    extract(img, db, ExtractOptions(camera_mode="single"))
    match_without_verification(db, num_threads=2)
    return db


def _parity(db, per_image: bool, device="cpu"):
    d = flat_inputs(db, per_image_cameras=per_image)
    opt = VerificationOptions(seed=1)
    ref_cfg, ref_inl, _, _ = pycolmap_verify(d["xy"], d["offsets"], d["pairs"], d["matches"], d["match_offsets"],
                                          d["cameras"], d["image_camera"], opt)
    g = verify_all(d["xy"], d["offsets"], d["pairs"], d["matches"], d["match_offsets"], d["cameras"],
                   d["image_camera"], opt, device=device)
    return compare(ref_cfg, ref_inl, g.config.cpu(), g.inliers.cpu(), d["match_offsets"]), g


def test_parity_with_pycolmap_templering_per_image_cameras(tmp_path, device):
    """COLMAP's F + H path (one camera per image): the same configuration and inliers."""
    db = _raw_database(tmp_path, "templeRing", 5, 2)
    cmp, g = _parity(db, per_image=True, device=device)
    assert cmp["pairs"] == 10
    assert cmp["agreement"] >= 0.9, cmp
    assert cmp["jaccard_median"] >= 0.95, cmp
    same = sum(v for k, v in cmp["confusion"].items() if k.split("->")[0] == k.split("->")[1])
    assert same >= 9, cmp["confusion"]
    assert bool(g.pose_valid[g.config == 3].all())


@pytest.mark.slow
@pytest.mark.parametrize("per_image", [True, False])
def test_parity_with_pycolmap_dtu(tmp_path, per_image):
    """A dozen DTU images (66 pairs). With one shared camera COLMAP takes its shared-focal path,
    which accepts fewer weak pairs than F + H (see verify.py): agreement is then lower."""
    db = _raw_database(tmp_path, "dtu_scan24", 12, 4)
    cmp, _ = _parity(db, per_image=per_image)
    assert cmp["pairs"] == 66
    assert cmp["agreement"] >= (0.95 if per_image else 0.9), cmp
    assert cmp["jaccard_median"] >= 0.95, cmp
