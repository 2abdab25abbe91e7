"""Fault cases 1-10, 19, 21, 24 at the command line (docs/fault-cases.md).

The front end's handling of bad files is tested in tests/test_ingest.py and tests/test_frontend.py,
the database validation in tests/test_database.py; here: the CLI turns every such problem into
a skip with a reason or a one-line error with exit code 2, never a traceback, and never
modifies or half-writes anything.
"""
import io
import json
import os
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from test_database import CAL, _small_db
from torchsfm import runtime
from torchsfm.cli import main
from torchsfm.synthetic import SyntheticOptions, synthesize, write_synthetic_database


def blobs(h, w, seed):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.5))


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["-q", *map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


@pytest.fixture
def junk_folder(tmp_path):
    """Unrelated random images (no scene) among junk, corrupt and odd files, in a folder whose
    name has spaces and non-ASCII characters."""
    root = tmp_path / "photos é ü"
    (root / "sub dir").mkdir(parents=True)
    for k in range(3):
        blobs(64, 80, k).save(root / f"img {k}.png")
    blobs(80, 64, 9).save(root / "sub dir" / "portrait ñ.png")
    (root / "sub dir" / "copy.png").write_bytes((root / "img 0.png").read_bytes())
    (root / "notes.txt").write_text("junk")
    (root / ".DS_Store").write_bytes(os.urandom(32))
    (root / "fake.jpg").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    blobs(64, 80, 5).save(buf, "JPEG")
    (root / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


def test_run_on_a_folder_without_a_scene_is_a_clear_error_with_a_report(junk_folder, tmp_path, capsys):
    """Cases 1, 2, 7, 10, 21: bad files are skipped with reasons, and 'nothing to reconstruct'
    is an error (exit 2) whose report.json still lists what was skipped and why."""
    out = tmp_path / "out put"
    code, err = run_cli(capsys, "run", junk_folder, out, "--device", "cpu")
    assert code == 2 and "torchsfm run: error:" in err
    assert not (out / "sparse").exists()
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    reasons = {s["file"]: s["reason"] for s in rep["skipped"] if "file" in s}
    assert reasons == {"notes.txt": "unsupported_extension", ".DS_Store": "unsupported_extension",
                       "fake.jpg": "decode_error", "empty.png": "empty_file", "cut.jpg": "decode_error",
                       "sub dir/copy.png": "duplicate"}
    assert rep["summary"]["error"]


def _damage_table(db, table: str) -> None:
    """Overwrite the first page of `table`'s b-tree with junk (SQLite: "database disk image is malformed")."""
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA journal_mode=DELETE")  # everything in the file itself: no log left to replay
        root = c.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        page = c.execute("PRAGMA page_size").fetchone()[0]
    c.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\xff" * 64)


@pytest.mark.parametrize("kind", ["missing", "zero_bytes", "text", "garbage_sqlite", "other_sqlite"])
def test_map_refuses_unusable_databases_without_touching_them(tmp_path, capsys, kind):
    """Case 19: a clear error naming the file (exit 2); the file is left exactly as it was
    (pycolmap would otherwise add an empty COLMAP schema to any SQLite file it opens)."""
    db = tmp_path / f"{kind}.db"
    if kind == "zero_bytes":
        db.write_bytes(b"")
    elif kind == "text":
        db.write_text("hello")
    elif kind == "garbage_sqlite":
        db.write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    elif kind == "other_sqlite":
        with sqlite3.connect(db) as c:
            c.execute("CREATE TABLE photos (name TEXT)")
    before = db.read_bytes() if db.exists() else None
    code, err = run_cli(capsys, "map", "--database", db, "--output", tmp_path / "out")
    assert code == 2 and f"{kind}.db" in err
    assert (db.read_bytes() if db.exists() else None) == before
    assert not (tmp_path / "out" / "sparse").exists()


def test_map_reports_a_damaged_table_where_it_reads_it(tmp_path, capsys):
    """The mapper does not read the whole file for SQLite's quick_check first (7 s on a 300 MB
    database): damage is reported, as clearly, when the table is read."""
    db = tmp_path / "damaged.db"
    write_synthetic_database(synthesize(SyntheticOptions(num_images=6, num_points=300, seed=2)), db)
    _damage_table(db, "two_view_geometries")
    before = db.read_bytes()
    code, err = run_cli(capsys, "map", "--database", db, "--output", tmp_path / "out")
    assert code == 2 and "damaged.db is corrupt" in err and "malformed" in err
    assert not (tmp_path / "out" / "sparse").exists() and db.read_bytes() == before


def test_map_reads_the_database_without_writing_to_it(tmp_path, capsys):
    """The mapper reads with read-only SQLite connections: a database it maps is the same file,
    byte for byte, afterwards (pycolmap's Database.open bumped SQLite's change counter)."""
    db = tmp_path / "database.db"
    write_synthetic_database(synthesize(SyntheticOptions(num_images=6, num_points=300, seed=2)), db)
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA journal_mode=DELETE")  # no log beside it: the file is the whole database
    c.close()
    before = db.read_bytes()
    code, _ = run_cli(capsys, "map", "--database", db, "--output", tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "sparse" / "0").is_dir()
    assert db.read_bytes() == before


def test_map_reports_inconsistent_database_rows(tmp_path, capsys):
    """Case 8: an out-of-range keypoint index in a hand-made database -> the table and row."""
    db = tmp_path / "bad rows.db"
    _small_db(db, [(1, 2, [[0, 1]], CAL), (2, 3, [[1, 1], [2, 10]], CAL)])
    code, err = run_cli(capsys, "map", "--database", db, "--output", tmp_path / "out")
    assert code == 2 and "two_view_geometries table: row pair_id=" in err and "keypoint index 10" in err


def test_unexpected_errors_are_one_line_unless_verbose(tmp_path, capsys, monkeypatch):
    """Anything unforeseen (here a full disk while writing the model) is one line and exit 1;
    -v adds the traceback for a bug report."""
    s = synthesize(SyntheticOptions(num_images=6, num_points=300, seed=2))
    db = tmp_path / "database.db"
    write_synthetic_database(s, db)
    import torchsfm.api as api

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "write_model", full)
    code, err = run_cli(capsys, "map", "--database", db, "--output", tmp_path / "out", "--device", "cpu")
    assert code == 1 and "OSError: [Errno 28] No space left on device (run with -v for the traceback)" in err
    assert not (tmp_path / "out" / "sparse").exists()
    assert main(["-v", "map", "--database", str(db), "--output", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("verb", ["map", "run"])
def test_device_cuda_without_a_gpu_is_an_error_before_any_work(tmp_path, capsys, verb):
    """Case 24: an explicit --device cuda never falls back silently; it fails before the front
    end or the database are touched."""
    (tmp_path / "imgs").mkdir()
    blobs(64, 80, 0).save(tmp_path / "imgs" / "a.png")
    db = tmp_path / "database.db"
    write_synthetic_database(synthesize(SyntheticOptions(num_images=4, num_points=200, seed=1)), db)
    args = (["map", "--database", db, "--output", tmp_path / "out"] if verb == "map"
            else ["run", tmp_path / "imgs", tmp_path / "out"])
    code, err = run_cli(capsys, *args, "--device", "cuda")
    assert code == 2 and "--device cuda was requested but no CUDA GPU is available" in err
    assert not (tmp_path / "out").exists()


def test_device_auto_picks_the_gpu_when_present(monkeypatch):
    """Case 24: 'auto' is CUDA when CUDA is available, else the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto") == torch.device("cuda")
    assert runtime.resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        runtime.resolve_device("cuda")


def test_cli_map_records_the_resolved_device(tmp_path, capsys):
    s = synthesize(SyntheticOptions(num_images=6, num_points=300, seed=3))
    db = tmp_path / "database.db"
    write_synthetic_database(s, db)
    code, _ = run_cli(capsys, "map", "--database", db, "--output", tmp_path / "out", "--device", "auto")
    assert code == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
