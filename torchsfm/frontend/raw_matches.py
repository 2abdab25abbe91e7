"""Verify raw matches that are already in a database (a synthetic scene's, another tool's), as
`match --verifier colmap` verifies the ones it makes: the two-view geometries are replaced by
pycolmap's estimation (F/E/H with RANSAC) on the stored matches, with the MatchOptions'
verification settings."""
from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

from .options import MatchOptions


def verify_raw_matches(database: str | os.PathLike, pairs: list[tuple[str, str]],
                       options: MatchOptions | None = None) -> None:
    """Replace DATABASE's two_view_geometries by the verification of its raw matches of `pairs`
    (image names). Pairs not listed get no geometry."""
    import pycolmap

    from .colmap_matcher import _pycolmap_options

    _, vo = _pycolmap_options(options or MatchOptions(progress=False))
    database = Path(database)
    con = sqlite3.connect(str(database))
    try:
        con.execute("DELETE FROM two_view_geometries")
        con.commit()
    finally:
        con.close()
    fd, lst = tempfile.mkstemp(prefix=".pairs-", suffix=".txt", dir=database.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{a} {b}\n" for a, b in pairs))
    level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = max(level, 1)
    try:
        pycolmap.verify_matches(str(database), lst, vo)
    finally:
        pycolmap.logging.minloglevel = level
        os.unlink(lst)
