"""Shared checks for exports: refusals with a fix, safe output paths, image lookup and copying."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("colmap-bin", "colmap-txt", "ply", "nerfstudio", "undistorted")


class ExportError(ValueError):
    """The export cannot be written as asked; the message says why and what to do instead."""


def check_output(
    output: str | os.PathLike, overwrite: bool = False, protect: tuple = (), replaceable: tuple = ()
) -> Path:
    """Refuse outputs that would destroy inputs or earlier results.

    Folder exports replace their target as a whole (atomically), so the target must not be, or
    contain, any path in `protect` (the images, the model), nor contain a path in `replaceable`
    (paths it may replace, e.g. a model converted in place); an existing target is replaced
    only with `overwrite`.
    """
    out = Path(output).absolute()
    real = out.resolve()  # compare real paths: a symlinked input must not slip through
    for p, may_equal in [(p, False) for p in protect] + [(p, True) for p in replaceable]:
        if p is None:
            continue
        p = Path(p).resolve()
        if real in p.parents or (real == p and not may_equal):
            raise ExportError(
                f"output {out} {'is' if real == p else 'contains'} the input {p}; the export replaces its output "
                "as a whole, so choose a new path (e.g. a sibling of the model folder)"
            )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    return out


def image_paths(image_dir: str | os.PathLike, names: list[str]) -> list[Path]:
    """Paths of the model's images under `image_dir`; a clear error naming the missing ones."""
    root = Path(image_dir)
    if not root.is_dir():
        raise ExportError(f"image folder {root} does not exist")
    paths = [root / n for n in names]
    missing = [n for n, p in zip(names, paths) if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ExportError(
            f"{len(missing)} of {len(names)} images of the model are missing under {root}: {shown}. "
            "Pass the folder the model's image names are relative to (the one given to the mapper)."
        )
    return paths


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when source and target share a filesystem (no extra space), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
