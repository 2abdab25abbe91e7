"""Self-contained HTML viewer for sparse models (`torchsfm view`)."""
from .html import ViewerOptions, build_scene, default_output, find_models, render_html, write_viewer

__all__ = ["ViewerOptions", "build_scene", "default_output", "find_models", "render_html", "write_viewer"]
