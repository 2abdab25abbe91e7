"""Image ingest: which files of a folder are usable images, and what we know about each.

Policy (see .notes/README_frontend.md):
- Files are found recursively (hidden folders are not entered); the image key is the path
  relative to the image root with POSIX separators, never the bare file name.
- A file is used only if its extension is on the allowlist (case-insensitive) **and** it
  decodes fully with Pillow. Everything else is skipped with a reason code, never a crash.
- Byte-identical files: the first in name order is kept, the others are skipped as duplicates.
- EXIF orientation is ignored: geometry uses the stored pixel grid (as COLMAP and hloc do), so
  photos from one body keep one set of intrinsics. It is recorded for the report only.
- EXIF focal length becomes a prior in pixels (35 mm equivalent, else focal length x focal
  plane resolution); a value giving an absurd field of view is ignored with a warning.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .options import ExtractOptions

# EXIF tags (Exif 2.3).
_TAG_MAKE, _TAG_MODEL, _TAG_ORIENTATION, _TAG_EXIF_IFD = 0x010F, 0x0110, 0x0112, 0x8769
_TAG_FOCAL, _TAG_FOCAL_35MM = 0x920A, 0xA405
_TAG_FPLANE_XRES, _TAG_FPLANE_UNIT, _TAG_PIXEL_X = 0xA20E, 0xA210, 0xA002
_FPLANE_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}
_FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)


class IngestError(ValueError):
    """A user error found while reading the image folder (message says what to do)."""


@dataclass
class SkippedFile:
    name: str  # path relative to the image root (POSIX)
    reason: str  # unsupported_extension | empty_file | unreadable | decode_error | duplicate | ...
    detail: str = ""


@dataclass
class ImageRecord:
    name: str
    path: Path
    width: int
    height: int
    mode: str  # Pillow mode as decoded (e.g. RGB, L, I;16, RGBA, P)
    digest: str
    make: str | None = None
    model: str | None = None
    focal_px: float | None = None  # EXIF prior in pixels; None when absent or rejected
    focal_note: str = ""  # why an EXIF focal length was rejected
    orientation: int = 1

    @property
    def folder(self) -> str:
        return self.name.rsplit("/", 1)[0] if "/" in self.name else ""


@dataclass
class ScanResult:
    images: list[ImageRecord] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    num_files: int = 0


def natural_key(name: str) -> list:
    """Name order in which 'f2' < 'f10' (video frames without zero padding)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def list_files(root: Path) -> list[tuple[str, Path]]:
    """All files under root, as (relative POSIX name, path), sorted by name; hidden folders skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            p = Path(dirpath) / fn
            out.append((p.relative_to(root).as_posix(), p))
    out.sort(key=lambda t: t[0])
    return out


def _ratio(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if math.isfinite(f) else None


def exif_focal_px(exif, width: int, height: int, options: ExtractOptions) -> tuple[float | None, str]:
    """EXIF focal length in pixels of the stored image, or (None, why-rejected).

    The 35 mm equivalent is defined by the diagonal field of view of a 36x24 mm frame, so it is
    converted with the image diagonal (which is exact for any aspect ratio). The second source,
    FocalLength x FocalPlaneXResolution, is rescaled when the file was resized after capture.
    An absent tag gives (None, ""); a present but unusable one gives (None, reason)."""
    try:
        sub = exif.get_ifd(_TAG_EXIF_IFD)
    except Exception:  # noqa: BLE001 - malformed EXIF is just "no EXIF"
        sub = {}
    candidates = []
    f35 = _ratio(sub.get(_TAG_FOCAL_35MM))
    if f35 is not None:
        candidates.append(("FocalLengthIn35mmFilm", f35, f35 * math.hypot(width, height) / _FULL_FRAME_DIAGONAL_MM))
    fmm, xres = _ratio(sub.get(_TAG_FOCAL)), _ratio(sub.get(_TAG_FPLANE_XRES))
    unit = _FPLANE_UNIT_MM.get(int(sub.get(_TAG_FPLANE_UNIT, 2) or 2))
    if fmm is not None and xres is not None and unit is not None:
        px_per_mm = xres / unit
        orig_w = _ratio(sub.get(_TAG_PIXEL_X))
        scale = width / orig_w if orig_w and orig_w > 0 else 1.0
        candidates.append(("FocalLength", fmm, fmm * px_per_mm * scale))
    elif fmm is not None and fmm <= 0:
        candidates.append(("FocalLength", fmm, float("nan")))
    if not candidates:
        return None, ""
    size = max(width, height)
    reasons = []
    for tag, raw, f in candidates:
        if not (f > 0 and math.isfinite(f)):
            reasons.append(f"{tag}={raw:g}")
            continue
        fov = math.degrees(2.0 * math.atan(size / (2.0 * f)))
        if options.min_fov_deg <= fov <= options.max_fov_deg:
            return f, ""
        reasons.append(f"{tag}={raw:g} (field of view {fov:.1f} deg)")
    return None, "; ".join(reasons)


def _exif_fields(im: Image.Image, width: int, height: int, options: ExtractOptions) -> dict:
    try:
        exif = im.getexif()
    except Exception:  # noqa: BLE001
        return {"orientation": 1}
    clean = lambda s: (str(s).strip("\x00 ").strip() or None) if s is not None else None  # noqa: E731
    try:
        orientation = int(exif.get(_TAG_ORIENTATION, 1))
    except (TypeError, ValueError):
        orientation = 0
    focal, note = exif_focal_px(exif, width, height, options)
    return {
        "make": clean(exif.get(_TAG_MAKE)),
        "model": clean(exif.get(_TAG_MODEL)),
        "orientation": orientation,
        "focal_px": focal,
        "focal_note": note,
    }


def scan_images(root: str | os.PathLike, options: ExtractOptions, trusted: set[str] | frozenset = frozenset()) -> ScanResult:
    """Find the usable images under root. Files named in `trusted` (already complete in the
    database) are only hashed and their header read, not decoded again."""
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"image folder {root} does not exist or is not a folder")
    res = ScanResult()
    seen: dict[str, str] = {}  # digest -> name of the kept file
    # A truncated file must fail to decode even if the caller told Pillow to tolerate truncation.
    tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    files = list_files(root)
    if options.image_names:  # COLMAP's image list: only these names; one that is not there is an error
        wanted = set(options.image_names)
        files = [(n, p) for n, p in files if n in wanted]
        missing = sorted(wanted - {n for n, _ in files})
        if missing:
            raise IngestError(f"{len(missing)} image(s) of the image list are not in {root}: "
                              + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    try:
        for name, path in files:
            _scan_one(name, path, options, trusted, seen, res)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
    return res


def _scan_one(name: str, path: Path, options: ExtractOptions, trusted, seen: dict, res: ScanResult) -> None:
    res.num_files += 1
    if path.suffix.lower() not in options.extensions:
        res.skipped.append(SkippedFile(name, "unsupported_extension", path.suffix or "(no extension)"))
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        res.skipped.append(SkippedFile(name, "unreadable", str(e)))
        return
    if not data:
        res.skipped.append(SkippedFile(name, "empty_file", "0 bytes"))
        return
    digest = hashlib.blake2b(data, digest_size=20).hexdigest()
    if digest in seen:
        res.skipped.append(SkippedFile(name, "duplicate", f"byte-identical to {seen[digest]}"))
        return
    try:
        with Image.open(io.BytesIO(data)) as im:
            if name not in trusted:
                im.load()  # a full decode: truncated or corrupt data fails here
            width, height = im.size
            mode = im.mode
            meta = _exif_fields(im, width, height, options)
    except UnidentifiedImageError:
        res.skipped.append(SkippedFile(name, "decode_error", "not a recognised image format"))
        return
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not usable"
        res.skipped.append(SkippedFile(name, "decode_error", f"{type(e).__name__}: {e}"))
        return
    if width < 1 or height < 1:
        res.skipped.append(SkippedFile(name, "decode_error", f"empty image {width}x{height}"))
        return
    seen[digest] = name
    res.images.append(ImageRecord(name=name, path=path, width=width, height=height, mode=mode, digest=digest, **meta))


def to_uint8(im: Image.Image) -> np.ndarray:
    """Normalise any decoded image to 8 bits: (H, W) for single-channel images, (H, W, 3) else.

    16-bit data is scaled by its type's range (not clipped, as Pillow's convert('L') would),
    float data by its range, alpha is dropped, palette/CMYK/YCbCr become RGB."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float64)
        top = a.max(initial=0.0)
        rng = 255.0 if top <= 255 else 65535.0 if top <= 65535 and a.min(initial=0.0) >= 0 else top
        lo = min(a.min(initial=0.0), 0.0) if rng == top else 0.0
        return np.clip(np.rint((a - lo) * (255.0 / max(rng - lo, 1e-12))), 0, 255).astype(np.uint8)
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = min(a.min(initial=0.0), 0.0), a.max(initial=1.0)
        hi = 1.0 if hi <= 1.0 and lo >= 0.0 else hi
        return np.clip(np.rint((a - lo) * (255.0 / max(hi - lo, 1e-12))), 0, 255).astype(np.uint8)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"))
    if mode == "RGB":
        return np.asarray(im)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"))


def load_uint8(path: str | os.PathLike) -> np.ndarray:
    """Decode a file (first frame of multi-page files) and normalise it with `to_uint8`."""
    with Image.open(path) as im:
        im.load()
        return to_uint8(im)


def load_grey(path: str | os.PathLike) -> np.ndarray:
    """`load_uint8` as grey (H, W): colour converted as COLMAP converts it (ITU-R 601 luma)."""
    a = load_uint8(path)
    return np.asarray(Image.fromarray(a).convert("L")) if a.ndim == 3 else a



@dataclass
class CameraGroup:
    """Images that share one camera (intrinsics)."""

    members: list[int]  # indices into the record list
    width: int
    height: int
    focal: float
    has_prior_focal_length: bool


def group_cameras(records: list[ImageRecord], options: ExtractOptions) -> list[CameraGroup]:
    """Camera grouping as COLMAP's CameraMode, with sizes never shared.

    auto: one camera per (EXIF make, model, focal prior, width, height); images without EXIF of
    the same size share one. single / per_folder: one camera (per folder); mixed sizes are an
    error that names the files. per_image: one camera each."""
    mode = options.camera_mode
    if mode == "per_image":
        keys = [(i,) for i in range(len(records))]
    elif mode == "single":
        keys = [()] * len(records)
    elif mode == "per_folder":
        keys = [(r.folder,) for r in records]
    else:
        keys = [
            (r.make, r.model, None if r.focal_px is None else round(r.focal_px, 2), r.width, r.height) for r in records
        ]
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out = []
    for key, members in groups.items():
        sizes: dict[tuple[int, int], list[str]] = {}
        for i in members:
            sizes.setdefault((records[i].width, records[i].height), []).append(records[i].name)
        if len(sizes) > 1:
            where = f" in folder '{key[0] or '.'}'" if mode == "per_folder" else ""
            listing = "; ".join(
                f"{w}x{h}: {', '.join(n[:3])}{' ...' if len(n) > 3 else ''} ({len(n)} files)" for (w, h), n in sizes.items()
            )
            raise IngestError(
                f"camera mode '{mode}' needs images of one size{where}, found {len(sizes)} sizes: {listing}. "
                "Use --camera-mode auto (one camera per size) or per-folder/per-image."
            )
        (w, h), = sizes
        priors = [records[i].focal_px for i in members if records[i].focal_px is not None]
        if priors:
            focal, has_prior = float(np.median(priors)), True
        else:
            focal, has_prior = options.default_focal_length_factor * max(w, h), False
        out.append(CameraGroup(members=members, width=w, height=h, focal=focal, has_prior_focal_length=has_prior))
    return out
