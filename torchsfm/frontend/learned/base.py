"""What the learned extractors share: batched inference on images of one size, resizing, and the
conversion of a model's keypoints to COLMAP's pixel convention.

The models put pixel centres at integer coordinates (the pixel at row 0, column 0 is at (0, 0));
COLMAP puts the corner there, so a centre is at +0.5. A keypoint k found on a copy resized from
(w, h) to (nw, nh) is therefore at (k - b + 0.5) * (w / nw, h / nh) in the full image: exact in
COLMAP's corner-origin convention, whatever the resize factor. b is the network's own frame bias
(`frame_bias`, 0 unless measured): a trained detector can put its keypoints a fraction of a pixel
off the image content in a direction fixed to the image frame, which training on image pairs of
one orientation cannot see; mirroring images measures it (`benchmarks/keypoint_bias.py`).
"""
from __future__ import annotations

import contextlib
import importlib
import io
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from ..extractors import FeatureType
from ..options import ExtractOptions
from .rotations import quarter_turns, turn_points

MODULES = {"xfeat": "xfeat", "aliked": "aliked", "disk": "disk"}


def build_extractor(name: str, options: ExtractOptions, device: str = "cpu") -> "LearnedExtractor":
    module = importlib.import_module(f".{MODULES[name]}", __package__)
    return module.Extractor(options, device)


class LearnedExtractor:
    """Subclasses set `feature_type`, `multiple` (image sides are rounded down to a multiple of it)
    and implement `_load()` (the network, on the CPU), `_detect(images)` ((B, 3, H, W) RGB in
    [0, 1] -> per image (keypoints (N, 2) in the model's integer-centre frame, descriptors (N, D),
    scores (N,))) and `_describe(images, keypoints)` (the unit descriptors (N, D) of given
    keypoints per image: for the turned copies of `learned_rotations`)."""

    feature_type: FeatureType
    multiple: int = 1
    frame_bias: tuple[float, float] = (0.0, 0.0)  # (x, y) in network pixels, removed from the keypoints
    default_threshold: float = 0.0  # the network's own detection threshold (learned_detection_threshold -1)
    batched = True  # the front end groups images by size and calls extract_batch

    def __init__(self, options: ExtractOptions, device: str = "cpu"):
        self.device = torch.device(device)
        self.max_image_size = int(options.learned_max_image_size)
        self.min_image_size = int(options.learned_min_image_size)
        self.max_keypoints = int(options.learned_max_keypoints)
        t = float(options.learned_detection_threshold)
        self.detection_threshold = self.default_threshold if t < 0 else t
        self.batch_size = max(1, int(options.learned_batch_size))
        self.turns = quarter_turns(int(options.learned_rotations))
        with contextlib.redirect_stdout(io.StringIO()):  # some wheels print while loading weights
            self.model = self._load().to(self.device).eval()

    def _load(self) -> torch.nn.Module:
        raise NotImplementedError

    def _detect(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _describe(self, images: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the network sees: longer side at most max_image_size and, when
        min_image_size is set, at least that; sides rounded down to `multiple` (at least one)."""
        s = min(1.0, self.max_image_size / max(width, height))
        if max(width, height) < self.min_image_size:
            s = self.min_image_size / max(width, height)
        m = self.multiple
        return max(m, int(round(width * s)) // m * m), max(m, int(round(height * s)) // m * m)

    def extract(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.extract_batch([image])[0]

    @torch.inference_mode()
    def extract_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keypoints (N, 6) float32 in COLMAP's layout, descriptors (N, D) float32, or (N, R, D)
        with the R > 1 turns of `learned_rotations`, upright first) per image; images of one size
        run as one batch (of at most `batch_size`)."""
        out: list = [None] * len(images)
        groups = defaultdict(list)
        for i, im in enumerate(images):
            groups[im.shape[:2]].append(i)
        for (h, w), idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s : s + self.batch_size]
                for i, res in zip(part, self._run([images[i] for i in part], w, h)):
                    out[i] = res
        return out

    def _run(self, images: list[np.ndarray], w: int, h: int) -> list[tuple[np.ndarray, np.ndarray]]:
        x = torch.stack([_to_rgb_tensor(im) for im in images]).to(self.device)
        x = x.float().div_(255.0)
        nw, nh = self.target_size(w, h)
        if (nw, nh) != (w, h):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nw < w)
        scale = torch.tensor([w / nw, h / nh], device=self.device, dtype=torch.float64)
        shift = 0.5 - torch.tensor(self.frame_bias, device=self.device, dtype=torch.float64)
        kps, descs = [], []
        for kp, desc, score in self._detect(x):
            order = torch.argsort(score, descending=True, stable=True)[: self.max_keypoints]
            kps.append(kp[order])
            descs.append([desc[order].float()])
        for k in self.turns[1:]:  # the same keypoints, described on the turned copy
            turned = [turn_points(kp.float(), k, nw - 1, nh - 1) for kp in kps]
            for d, t in zip(descs, self._describe(torch.rot90(x, k, dims=(-2, -1)), turned)):
                d.append(t.float())
        results = []
        for kp, d in zip(kps, descs):
            k6 = torch.zeros(len(kp), 6, dtype=torch.float64, device=self.device)
            k6[:, :2] = (kp.double() + shift) * scale
            k6[:, 2], k6[:, 5] = scale[0], scale[1]  # one model pixel, in image pixels
            de = d[0] if len(d) == 1 else torch.stack(d, 1)
            results.append((k6.float().cpu().numpy(), de.contiguous().cpu().numpy()))
        return results


def _to_rgb_tensor(image: np.ndarray) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an (H, W) grey or (H, W, 3) RGB 8-bit image."""
    t = torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable copy
    if t.ndim == 2:
        return t[None].expand(3, -1, -1)
    return t.permute(2, 0, 1)[:3]
