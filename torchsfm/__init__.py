"""torchsfm: global structure-from-motion on PyTorch, batched on CPU and GPU."""
from __future__ import annotations

import logging

# Pillow before pycolmap: with pycolmap's bundled libraries loaded first, saving a PNG through
# Pillow was seen to abort the process ("free(): invalid pointer").
import PIL.Image  # noqa: F401

from ._version import __version__

logger = logging.getLogger("torchsfm")
logger.addHandler(logging.NullHandler())

_MODEL_NAMES = ("Cameras", "Images", "Keypoints", "Points3D", "Reconstruction", "Tracks", "ViewGraph")


def __getattr__(name: str):
    """The data model on first use: `import torchsfm` stays light (no torch), so the front end's
    extraction worker processes start in a fraction of a second."""
    if name in _MODEL_NAMES:
        from .data import model

        return getattr(model, name)
    raise AttributeError(f"module 'torchsfm' has no attribute {name!r}")


__all__ = [*_MODEL_NAMES, "__version__"]
