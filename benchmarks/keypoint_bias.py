"""Frame bias of each learned detector, as torchsfm stores its keypoints: mirror each image left-right
and up-down and report (b_x, b_y) = half the mean of x + x' - W and y + y' - H over the keypoints
found in both (`torchsfm.frontend.learned.frame_bias`, a 2.5 px window). 0 is right. `--raw`
shows the networks' own numbers: ALIKED's (+0.43, -0.15) is removed by its extractor's
`frame_bias`; XFeat and DISK detect on the pixel grid, their mirrored keypoints differ by whole
pixels (-2 to +2), and the mean of that wide distribution moves with the window, so theirs
(XFeat x +0.33, DISK y -0.75 at 2.5 px) are reported, not corrected.

    python benchmarks/keypoint_bias.py [--features aliked,xfeat,disk] [--raw]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
IMAGES = ["templeRing/images/templeR0005.png", "templeRing/images/templeR0012.png", "templeRing/images/templeR0030.png",
          "templeRing/images/templeR0040.png", "dtu_scan24/images/000005.jpg", "dtu_scan24/images/000030.jpg",
          "kitchen/images/05.png"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", default="aliked,xfeat,disk")
    ap.add_argument("--raw", action="store_true", help="without torchsfm's ALIKED correction")
    a = ap.parse_args()
    from torchsfm.frontend.extractors import create_extractor
    from torchsfm.frontend.learned.frame_bias import frame_bias
    from torchsfm.frontend.options import ExtractOptions

    torch.set_num_threads(1)
    images = [(p, np.array(Image.open(DATA / p).convert("L"))) for p in IMAGES if (DATA / p).exists()]
    if not images:
        sys.exit(f"no image of {DATA}")
    for name in a.features.split(","):
        # full resolution: the bias is in network pixels
        ex = create_extractor(ExtractOptions(features=name, learned_max_image_size=4096), "cpu")
        if a.raw:
            ex.frame_bias = (0.0, 0.0)
        rows = []
        for path, img in images:
            b, n = frame_bias(lambda im: ex.extract(im)[0][:, :2].astype(np.float64), img)
            rows.append(b)
            print(f"{name:7s} {path:40s} b_x {b[0]:+.3f} ({n[0]} keypoints)  b_y {b[1]:+.3f} ({n[1]})", flush=True)
        m = np.nanmean(rows, 0)
        print(f"{name:7s} {'mean':40s} b_x {m[0]:+.3f}  b_y {m[1]:+.3f}", flush=True)


if __name__ == "__main__":
    main()
