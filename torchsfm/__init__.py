"""torchsfm: global structure-from-motion on PyTorch, batched on CPU and GPU."""
from __future__ import annotations

import logging

# Pillow before pycolmap: with pycolmap's bundled libraries loaded first, saving a PNG through
# Pillow was seen to abort the process ("free(): invalid pointer").
import PIL.Image  # noqa: F401

from ._version import __version__

logger = logging.getLogger("torchsfm")
logger.addHandler(logging.NullHandler())

from .data.model import (  # noqa: E402
    Cameras,
    Images,
    Keypoints,
    Points3D,
    Reconstruction,
    Tracks,
    ViewGraph,
)

__all__ = ["Cameras", "Images", "Keypoints", "Points3D", "Reconstruction", "Tracks", "ViewGraph", "__version__"]
