"""The feature interface: what an extractor gives the front end, and the registry of extractors.

An extractor turns one 8-bit image ((H, W) grey or (H, W, 3) RGB, full resolution) into
- keypoints (N, 6) float32 in COLMAP's layout [x, y, a11, a12, a21, a22], full-resolution pixels,
  pixel centre at +0.5 (an extractor without shape gives the identity affine scaled by 1);
- descriptors (N, D) in its `FeatureType`'s dtype.
Its `FeatureType` tells the database and the matcher what the descriptors are: the COLMAP
`descriptors.type` id it is stored under, the dimension and dtype, and the L2 norm that the
matcher's distance threshold is relative to (COLMAP: 512 for SIFT's uint8 descriptors).

SIFT (pycolmap, COLMAP's own implementation, CPU or CUDA) is built in; learned extractors
register themselves with `register_extractor` from the optional `learned` extra.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .options import ExtractOptions


@dataclass(frozen=True)
class FeatureType:
    name: str  # the --features choice
    colmap_type: int  # descriptors.type in database.db (pycolmap.FeatureExtractorType; -1 undefined)
    descriptor_dim: int
    descriptor_dtype: str  # "uint8" or "float32"
    descriptor_norm: float  # L2 norm of a descriptor: the matcher's max_distance is relative to it


class Extractor(Protocol):
    feature_type: FeatureType

    def extract(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints (N, 6) float32, descriptors (N, D)) of one 8-bit image."""


SIFT = FeatureType("sift", colmap_type=0, descriptor_dim=128, descriptor_dtype="uint8", descriptor_norm=512.0)


class SiftExtractor:
    """COLMAP's SIFT through pycolmap (its CPU or CUDA implementation, as the installed wheel has)."""

    feature_type = SIFT

    def __init__(self, options: ExtractOptions, device: str = "cpu"):
        import pycolmap

        fo = pycolmap.FeatureExtractionOptions()
        fo.num_threads = 1
        fo.max_image_size = int(options.max_image_size)
        fo.sift.max_num_features = int(options.max_num_features)
        if options.sift:
            fo.sift.mergedict(dict(options.sift))
        self._extractor = pycolmap.FeatureExtractor.create(fo, getattr(pycolmap.Device, device))
        self.max_image_size = int(options.max_image_size)

    def extract(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Large images are downscaled first (as COLMAP does); keypoints are scaled back by the
        size ratio, which is exact in COLMAP's corner-origin pixel convention."""
        import pycolmap

        h, w = image.shape[:2]
        bitmap = pycolmap.Bitmap.from_array(np.ascontiguousarray(image))
        if not bitmap.is_grey:
            bitmap = bitmap.clone_as_grey()
        sx = sy = 1.0
        if max(w, h) > self.max_image_size:
            scale = self.max_image_size / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            bitmap.rescale(nw, nh)
            sx, sy = w / nw, h / nh
        keypoints, descriptors = self._extractor.extract(bitmap)
        k = pycolmap.keypoints_to_matrix(keypoints).astype(np.float64)  # x, y, scale, orientation
        c, s = k[:, 2] * np.cos(k[:, 3]), k[:, 2] * np.sin(k[:, 3])
        kp = np.stack([k[:, 0] * sx, k[:, 1] * sy, c * sx, -s * sx, s * sy, c * sy], axis=1).astype(np.float32)
        return kp, np.ascontiguousarray(descriptors.data, dtype=np.uint8)


_REGISTRY: dict[str, tuple[FeatureType, Callable[[ExtractOptions, str], Extractor]]] = {"sift": (SIFT, SiftExtractor)}


def register_extractor(feature_type: FeatureType, factory: Callable[[ExtractOptions, str], Extractor]) -> None:
    """Make `--features feature_type.name` available; `factory(options, device)` builds one."""
    _REGISTRY[feature_type.name] = (feature_type, factory)


def feature_types() -> dict[str, FeatureType]:
    return {k: v[0] for k, v in _REGISTRY.items()}


def feature_type_of_colmap_type(colmap_type: int) -> FeatureType | None:
    """The registered feature type stored under a COLMAP descriptors.type id (None if unknown)."""
    return next((ft for ft, _ in _REGISTRY.values() if ft.colmap_type == colmap_type), None)


def create_extractor(options: ExtractOptions, device: str = "cpu") -> Extractor:
    name = getattr(options, "features", "sift")
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature type {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][1](options, device)
