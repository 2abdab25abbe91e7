"""COLMAP sparse model exports (.bin or .txt), through torchsfm.io.colmap_model."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..data.model import Reconstruction
from ..io.colmap_model import write_model
from .common import check_output

logger = logging.getLogger(__name__)


def export_colmap(
    rec: Reconstruction,
    output: str | os.PathLike,
    format: str = "bin",
    overwrite: bool = False,
    protect: tuple = (),
    replaceable: tuple = (),
) -> Path:
    """Write `rec` as a COLMAP model folder (cameras, images, points3D, rigs, frames) atomically.
    With `overwrite`, the folder `rec` was read from may be the output (in-place conversion)."""
    out = check_output(output, overwrite, protect=protect, replaceable=replaceable)
    write_model(rec, out, format=format)
    logger.info("wrote COLMAP %s model %s", format, out)
    return out
