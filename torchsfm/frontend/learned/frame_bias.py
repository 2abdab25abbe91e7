"""How far a detector's keypoints sit from the image content, measured by mirroring the image.

A detector that is right to the pixel convention puts a keypoint of the mirrored image at the
mirror of the original's: x' = W - x (left-right), y' = H - y (up-down), in COLMAP's corner-origin
frame. A keypoint found at x + b (b fixed to the image frame, whatever the content) comes back at
W - x + b, so the mean of x + x' - W over keypoints found in both images is 2 b. Content-relative
offsets (a detector that fires beside an edge) mirror with the image and cancel. Pairs are
mutual nearest neighbours within `radius`: wide enough to hold the whole distribution of 2 b
(grid detectors such as XFeat and DISK differ by whole pixels, -2 to +2), as a narrower window
cuts off one side and underestimates b.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def mutual_neighbours(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of points a[i], b[j] (N, 2) that are each other's nearest, within `radius`."""
    d = torch.cdist(torch.from_numpy(a).double(), torch.from_numpy(b).double())
    if d.numel() == 0:
        return np.zeros(0, int), np.zeros(0, int)
    dj, j = d.min(1)
    i_back = d.argmin(0)
    ok = (dj < radius) & (i_back[j] == torch.arange(len(a)))
    return torch.nonzero(ok).squeeze(1).numpy(), j[ok].numpy()


def frame_bias(keypoints: Callable[[np.ndarray], np.ndarray], image: np.ndarray,
               radius: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """(b_x, b_y) in pixels, and the number of keypoints each is measured on, for `keypoints`
    (an image (H, W[, 3]) uint8 -> keypoint positions (N, 2) in COLMAP's convention)."""
    h, w = image.shape[:2]
    k = keypoints(image)
    bias, count = np.zeros(2), np.zeros(2, int)
    for axis, size in ((0, w), (1, h)):
        mirrored = np.ascontiguousarray(np.flip(image, 1 - axis))
        km = keypoints(mirrored)
        expect = k.copy()
        expect[:, axis] = size - k[:, axis]
        i, j = mutual_neighbours(expect, km, radius)
        count[axis] = len(i)
        bias[axis] = (km[j, axis] - expect[i, axis]).mean() / 2 if len(i) else np.nan
    return bias, count
