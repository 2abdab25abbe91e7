"""Front end: image folder -> COLMAP database.db with SIFT features and verified matches.

    from torchsfm.frontend import extract, match, ExtractOptions, MatchOptions
    extract("images/", "database.db", ExtractOptions(camera_mode="single"))
    match("database.db", MatchOptions(mode="sequential"))
"""
from __future__ import annotations

from .ingest import IngestError, SkippedFile
from . import learned  # noqa: F401 - registers the learned feature types (models load on use)
from .options import ExecutorOptions, ExtractOptions, MatchOptions
from .report import ExtractReport, MatchReport


def extract(image_dir, database, options: ExtractOptions | None = None) -> ExtractReport:
    from .features import extract as _extract

    return _extract(image_dir, database, options)


def match(database, options: MatchOptions | None = None) -> MatchReport:
    from .matching import match as _match

    return _match(database, options)


def load_view_graph(database):
    """(cameras, images, keypoints, view graph) of a COLMAP database (torchsfm.io.database)."""
    from .matching import load_view_graph as _load

    return _load(database)


__all__ = ["load_view_graph", "ExecutorOptions", "ExtractOptions", "ExtractReport", "IngestError", "MatchOptions", "MatchReport", "SkippedFile", "extract", "match"]
