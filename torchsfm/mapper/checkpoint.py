"""Per-stage checkpoints of the global mapper, so that an interrupted run resumes where it stopped.

After each major stage the mapper state (the working Reconstruction, the models finished so far,
the report so far and the RNG states) is written with `torch.save`, atomically (temporary file,
fsync, rename), to `OUTPUT/.checkpoints/<key>/NNN-<stage>.pt`. The key is a hash of the mapper's
input (as read from the database), the resolved mapper options, the device and the torchsfm version, so a
checkpoint is only ever reused for the very same computation; folders of other keys are stale
and are removed when a run starts. Files hold plain tensors, lists and dicts (no pickled
classes), loaded with `weights_only=True`; a file that does not load is skipped (the previous
one is used instead).

Resuming gives the same model as an uninterrupted run: every stage after the checkpoint runs on
bit-identical inputs, and the stages use explicit seeds (RNG states are restored as well).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.model import Cameras, Images, Keypoints, Points3D, Reconstruction, Tracks, ViewGraph
from ..io.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_PARTS = {"cameras": Cameras, "images": Images, "keypoints": Keypoints, "points3D": Points3D, "tracks": Tracks,
          "view_graph": ViewGraph}


SHARED = "@base"  # a field stored once in the base (common-phase) checkpoint


def reconstruction_state(rec: Reconstruction, base: Reconstruction | None = None) -> dict:
    """A Reconstruction as nested dicts of CPU tensors, lists and plain values. Fields equal to
    those of `base` (keypoints, matches, ... which the component stages never change) are stored
    as a marker and taken from the base on loading."""
    out: dict = {"meta": _plain(rec.meta)}
    for name in _PARTS:
        part = getattr(rec, name)
        bpart = getattr(base, name) if base is not None else None
        if part is None:
            out[name] = None
            continue
        d = {}
        for f in dataclasses.fields(part):
            v = getattr(part, f.name)
            if bpart is not None and _same(getattr(bpart, f.name), v):
                d[f.name] = SHARED
            else:
                d[f.name] = v.detach().cpu() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v
        out[name] = d
    return out


def _same(a, b) -> bool:
    """The same data (bit for bit): the object itself, or a copy made by a stage's clone()."""
    if a is b:
        return isinstance(a, (torch.Tensor, list))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    return isinstance(a, list) and isinstance(b, list) and a == b


def reconstruction_from_state(state: dict, device=None, base: Reconstruction | None = None) -> Reconstruction:
    parts = {}
    for name, cls in _PARTS.items():
        d = state[name]
        if d is None:
            parts[name] = None
            continue
        kw = {}
        for k, v in d.items():
            if isinstance(v, str) and v == SHARED:
                if base is None or getattr(base, name) is None:
                    raise ValueError(f"checkpoint field {name}.{k} refers to a base checkpoint that is missing")
                kw[k] = getattr(getattr(base, name), k)
            else:
                kw[k] = v.to(device) if isinstance(v, torch.Tensor) and device is not None else v
        parts[name] = cls(**kw)
    return Reconstruction(meta=dict(state["meta"]), **parts)


def _plain(obj):
    """meta values as JSON-like data (tuples kept); anything exotic becomes its repr."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _hash_tensors(obj, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            _hash_tensors(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _hash_tensors(v, h)
    else:
        h.update(repr(obj).encode())


def checkpoint_key(rec: Reconstruction, options: dict, device: str, extra: str = "") -> str:
    """Hash (hex, 24 characters) of the mapper's input content (cameras, images, keypoints, view
    graph; not the database file, whose bytes change whenever SQLite opens it for writing), the
    options, the device and the torchsfm version."""
    from .._version import __version__

    h = hashlib.sha256()
    state = reconstruction_state(rec)
    _hash_tensors({k: state[k] for k in ("cameras", "images", "keypoints", "view_graph")}, h)
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    h.update(f"|{device}|{__version__}|{FORMAT_VERSION}|{extra}".encode())
    return h.hexdigest()[:24]


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": _plain(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class Checkpoint:
    seq: int
    name: str  # the stage just completed, e.g. "relative_poses", "model0/global_positioning"
    phase: str  # "common" (before the component split) or "component"
    component: int  # rank of the component (phase "component"), else -1
    step: int  # index of the completed step within its phase
    rec: Reconstruction
    models: list[Reconstruction] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    rng: dict | None = None
    path: Path | None = None
    base: Reconstruction | None = None  # the common-phase result component states share fields with
    base_seq: int = -1


class CheckpointStore:
    """Checkpoints of one computation (one key) under `root/<key>/`; keeps the last common-phase
    checkpoint (the base every component starts from) and the `keep` newest others."""

    def __init__(self, root: str | os.PathLike, key: str, keep: int = 2):
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key
        self.keep = max(1, keep)

    @classmethod
    def for_output(cls, output: str | os.PathLike, key: str, keep: int = 2) -> "CheckpointStore":
        return cls(Path(output) / ".checkpoints", key, keep)

    def child(self, name: str) -> "CheckpointStore":
        """The store of a later pass of the same computation, inside this one's folder (cleared
        with it, and not stale to it)."""
        return CheckpointStore(self.dir, f"{self.key}-{name}", self.keep)

    def remove_stale(self) -> int:
        """Delete checkpoint folders of other keys (another database or other options)."""
        n = 0
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name != self.key and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                    n += 1
        return n

    def _files(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.glob("*.pt"):
            m = re.match(r"^(\d+)-", p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def save(self, ck: Checkpoint) -> Path:
        payload = {
            "format": FORMAT_VERSION, "key": self.key, "seq": ck.seq, "name": ck.name, "phase": ck.phase,
            "component": ck.component, "step": ck.step, "base_seq": ck.base_seq,
            "rec": reconstruction_state(ck.rec, ck.base),
            "models": [reconstruction_state(m, ck.base) for m in ck.models], "report": ck.report, "rng": ck.rng,
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        safe = re.sub(r"[^A-Za-z0-9_.]+", "-", ck.name)
        path = self.dir / f"{ck.seq:04d}-{ck.phase}-{safe}.pt"
        # not fsynced (~6 ms per stage): a checkpoint an OS crash truncated fails to load and is skipped
        atomic_write_bytes(path, buf.getvalue(), durable=False)
        self._prune(ck.seq, ck.base_seq)
        log.debug("checkpoint %s written (%d bytes)", path, buf.tell())
        return path

    def _prune(self, newest: int, base_seq: int) -> None:
        """Keep the newest common checkpoint, the base in use and the `keep` newest others."""
        files = self._files()
        commons = [s for s, p in files if "-common-" in p.name]
        protected = {newest, base_seq, commons[-1] if commons else -1}
        others = [(s, p) for s, p in files if s not in protected]
        for s, p in others[:max(0, len(others) - (self.keep - 1))]:
            p.unlink(missing_ok=True)

    def _payload(self, path: Path) -> dict | None:
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is skipped, never fatal
            log.warning("ignoring unreadable checkpoint %s: %s", path, e)
            return None
        if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION or d.get("key") != self.key:
            log.warning("ignoring checkpoint %s of another format or computation", path)
            return None
        return d

    def _load(self, path: Path, device=None) -> Checkpoint | None:
        d = self._payload(path)
        if d is None:
            return None
        try:
            base, base_seq = None, int(d.get("base_seq", -1))
            if base_seq >= 0:
                bpath = next((p for s, p in self._files() if s == base_seq), None)
                bd = self._payload(bpath) if bpath is not None else None
                if bd is None:
                    return None
                base = reconstruction_from_state(bd["rec"], device)
            return Checkpoint(seq=d["seq"], name=d["name"], phase=d["phase"], component=d["component"], step=d["step"],
                              rec=reconstruction_from_state(d["rec"], device, base),
                              models=[reconstruction_from_state(m, device, base) for m in d["models"]],
                              report=d["report"], rng=d["rng"], path=path, base=base, base_seq=base_seq)
        except Exception as e:  # noqa: BLE001
            log.warning("ignoring unusable checkpoint %s: %s", path, e)
            return None

    def latest(self, device=None, phase: str | None = None) -> Checkpoint | None:
        """The newest checkpoint that loads (of `phase` when given)."""
        for _, p in reversed(self._files()):
            if phase is not None and f"-{phase}-" not in p.name:
                continue
            ck = self._load(p, device)
            if ck is not None:
                return ck
        return None

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.root.rmdir()  # only when empty
        except OSError:
            pass
