"""The import-linter contracts of pyproject.toml: layers only point down, no cycles between siblings.

The contracts are checked on the package as it is, and on a copy with one upward import and one
cycle added, which they must catch (a contract that cannot fail would check nothing).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def _lint(root: Path) -> subprocess.CompletedProcess:
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return subprocess.run([lint_imports, "--no-cache", str(root / "pyproject.toml")], cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)


def test_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 2 kept, 0 broken." in r.stdout


def test_contracts_catch_an_upward_import_and_a_cycle(tmp_path):
    shutil.copytree(ROOT / "torchsfm", tmp_path / "torchsfm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    # the data model importing the mapper: an arrow up
    with open(tmp_path / "torchsfm" / "data" / "model.py", "a") as f:
        f.write("\n\ndef _up():\n    from ..mapper import pipeline  # noqa: F401\n")
    # two mapper modules importing each other: a cycle inside one layer
    with open(tmp_path / "torchsfm" / "mapper" / "graph.py", "a") as f:
        f.write("\n\ndef _cycle():\n    from . import pipeline  # noqa: F401\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "Contracts: 0 kept, 2 broken." in r.stdout, r.stdout
    assert "torchsfm.data is not allowed to import torchsfm.mapper" in r.stdout
