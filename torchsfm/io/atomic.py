"""Crash-safe output: a reader sees the old result or the complete new one, never a partial one.

Everything is written into a temporary sibling (same folder, hence the same filesystem, so the
final rename is atomic), flushed to disk with fsync, and only then renamed over the target.
On an exception the temporary is removed and an existing target is left untouched.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _temp_sibling(path: Path, tag: str) -> Path:
    # Hidden, unique per process and call, so that concurrent writers never share a temporary.
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a folder's entries (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the data files are synced anyway
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(dirpath)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final_path` as a whole.

    An existing target (file or folder) is moved aside, the new folder renamed into place and
    the old one deleted; if the second rename fails the old one is restored. A reader may see
    the target missing for the instant between the two renames, never half-written.
    """
    final = Path(final_path).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            old = _temp_sibling(final, "old")
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
            fsync_dir(final.parent)
            _remove(old)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path (not created) for a writer that needs a path, e.g. SQLite;
    on success the file is fsynced and atomically replaces `final_path`."""
    final = Path(final_path).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer produced no file at {tmp}")
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        # The writer may have left sidecars (SQLite's -journal/-wal/-shm); the name is unique.
        for p in tmp.parent.glob(glob.escape(tmp.name) + "*"):
            _remove(p)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` atomically (temporary file + fsync + os.replace).

    durable=False skips the fsyncs: still atomic for readers and across a killed process, but an
    OS crash may leave an empty or stale file; for files whose readers check them (checkpoints)."""
    final = Path(path).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    # O_EXCL: never follow or clobber something already at the temporary name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if durable:
            fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))
