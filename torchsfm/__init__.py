"""torchsfm: global structure-from-motion on PyTorch, batched on CPU and GPU."""
from __future__ import annotations

import logging
import os

# Huge pages for PyTorch's CPU tensors of 2 MB and more (PyTorch reads this once, at its first such
# allocation: so here, before any). glibc serves blocks above 32 MiB with fresh mmap()s, so every
# large temporary is faulted in 4 KB at a time: at corridor10000 (6.7M observations, 54 MB per
# column) a third of the mapping time was the kernel's. With 2 MB pages a 56 MB temporary costs 0.01
# s instead of 0.05 s. TORCHSFM_NO_MALLOC_TUNING=1 leaves it off (as `runtime.tune_cpu_allocator`).
if not os.environ.get("TORCHSFM_NO_MALLOC_TUNING"):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
