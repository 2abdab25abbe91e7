"""`extract()`: image folder -> COLMAP database.db with cameras, images and features.

Images are decoded and normalised by our ingest code (`ingest.to_uint8`) and handed to the
extractor of `options.features` (`extractors`: SIFT through pycolmap by default; RGB becomes
grey with COLMAP's own conversion, so an 8-bit image gives exactly the features
`pycolmap.extract_features` gives). pycolmap's extractor holds the GIL, so CPU extraction runs
in worker processes; the parent process is the only database writer and commits each image's
features in one transaction.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from ..data.camera_models import model_info
from .colmap_db import FrontendDatabase
from .extractors import Extractor, create_extractor, feature_types
from .ingest import IngestError, ImageRecord, SkippedFile, group_cameras, load_uint8, scan_images
from .options import ExtractOptions
from .report import ExtractReport, log_aggregated, progress

logger = logging.getLogger(__name__)


def resolve_sift_device(device: str) -> str:
    """'auto' -> 'cuda' only if the installed pycolmap was built with CUDA; asking for CUDA
    without it is an error, never a silent fallback."""
    import pycolmap

    if device == "cuda" and not pycolmap.has_cuda:
        raise IngestError("--device cuda was requested but the installed pycolmap has no CUDA support; use --device cpu")
    return "cuda" if device == "cuda" or (device == "auto" and pycolmap.has_cuda) else "cpu"


def make_extractor(options: ExtractOptions, device: str = "cpu") -> Extractor:
    """The extractor of `options.features` (SIFT unless a learned extractor is registered)."""
    return create_extractor(options, device)


# ---- worker processes (one extractor each) ----
_WORKER: dict = {}


def _init_worker(options: ExtractOptions, device: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pycolmap

    pycolmap.logging.minloglevel = 1
    _WORKER["extractor"] = make_extractor(options, device)


def mask_keypoints(kp: np.ndarray, de: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COLMAP's masking: a keypoint is kept where the grey mask's pixel (int(x), int(y)) exists and
    is not zero."""
    x, y = kp[:, 0].astype(np.int64), kp[:, 1].astype(np.int64)
    h, w = mask.shape
    keep = (x >= 0) & (y >= 0) & (x < w) & (y < h)
    keep[keep] = mask[y[keep], x[keep]] != 0
    return kp[keep], de[keep]


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image as grey (H, W) uint8, read as COLMAP reads it (colour converted to grey)."""
    from PIL import Image

    m = load_uint8(path)
    return np.asarray(Image.fromarray(m).convert("L")) if m.ndim == 3 else m


def _extract_file(job: tuple[str, str | None]):
    """(keypoints, descriptors, None, None) or (None, None, error text, skip reason) for (image
    path, mask path or None); never raises."""
    path, mask_path = job
    try:
        kp, de = _WORKER["extractor"].extract(load_uint8(path))
    except Exception as e:  # noqa: BLE001 - a file that changed since the scan must not stop the run
        return None, None, f"{type(e).__name__}: {e}", "decode_error"
    if mask_path is None:
        return kp, de, None, None
    try:
        kp, de = mask_keypoints(kp, de, load_mask(mask_path))
    except Exception as e:  # noqa: BLE001 - an unreadable mask skips its image, not the run
        return None, None, f"mask {mask_path}: {type(e).__name__}: {e}", "mask_error"
    return kp, de, None, None


def default_num_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _iter_features(paths: list[tuple[str, str | None]], options: ExtractOptions, device: str):
    """Results for (image path, mask path or None) jobs, in input order. One in-process extractor
    for CUDA or one worker; a spawn pool
    (safe with threads in the parent) otherwise."""
    # Spawning a worker costs seconds (imports), so small jobs run in-process.
    auto = min(default_num_workers(), max(1, len(paths) // 8))
    n = 1 if device == "cuda" else min(options.num_workers or auto, len(paths))
    if n <= 1:
        _init_worker(options, device)
        for p in paths:
            yield _extract_file(p)
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(options, device)) as pool:
        try:
            yield from pool.map(_extract_file, paths, chunksize=1)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ---- the front end's first stage ----
def _mask_of(name: str, options: ExtractOptions) -> str | None:
    """COLMAP's mask of an image: MASK_PATH/<image name>.png (None without --mask-path)."""
    return str(Path(options.mask_path) / f"{name}.png") if options.mask_path else None


def _keep_masked(records: list[ImageRecord], options: ExtractOptions, report: ExtractReport) -> list[ImageRecord]:
    """With a mask folder, an image without its mask is skipped, as COLMAP's image reader does."""
    if not options.mask_path:
        return records
    have = [r for r in records if Path(_mask_of(r.name, options)).is_file()]
    missing = [r.name for r in records if not Path(_mask_of(r.name, options)).is_file()]
    report.skipped += [SkippedFile(n, "mask_missing", f"no {n}.png in {options.mask_path}") for n in missing]
    log_aggregated(logger, f"no mask in {options.mask_path} for {len(missing)} images (skipped):", missing)
    return have


def _camera_params(model: str, focal: float, width: int, height: int) -> np.ndarray:
    import pycolmap

    return np.asarray(pycolmap.Camera.create_from_model_name(0, model, focal, width, height).params, dtype=np.float64)


def _report_scan(report: ExtractReport, records: list[ImageRecord]) -> None:
    log_aggregated(
        logger,
        f"skipped {len(report.skipped)} of {report.num_files} files (not usable as images):",
        [f"{s.name}: {s.reason}" + (f" ({s.detail})" if s.detail else "") for s in report.skipped],
    )
    bad_focal = [r for r in records if r.focal_note]
    report.exif_focal_ignored = [{"name": r.name, "detail": r.focal_note} for r in bad_focal]
    log_aggregated(
        logger,
        f"ignored an absurd EXIF focal length in {len(bad_focal)} images (using the image-size default):",
        [f"{r.name}: {r.focal_note}" for r in bad_focal],
    )
    report.exif_orientation = {r.name: r.orientation for r in records if r.orientation != 1}
    invalid = [r.name for r in records if not 1 <= r.orientation <= 8]
    log_aggregated(logger, f"invalid EXIF orientation in {len(invalid)} images (treated as 1):", invalid)
    if len(report.exif_orientation) > len(invalid):
        logger.info(
            "%d images carry an EXIF rotation/flip; features and cameras use the stored pixel grid "
            "(orientation ignored, as COLMAP does)", len(report.exif_orientation) - len(invalid)
        )


def _register(db: FrontendDatabase, records: list[ImageRecord], options: ExtractOptions, report: ExtractReport) -> dict[str, int]:
    """Write cameras, rigs, frames and images for records not yet in the database, in one
    transaction. Images already there keep their camera; new images of the same group join it."""
    existing = db.images()
    sizes = db.camera_sizes()
    usable = []
    for r in records:
        if r.name in existing and sizes.get(existing[r.name][1]) != (r.width, r.height):
            report.skipped.append(SkippedFile(r.name, "size_mismatch_with_database",
                                              f"file is {r.width}x{r.height}, its database camera {sizes.get(existing[r.name][1])}"))
        else:
            usable.append(r)
    groups = group_cameras(usable, options)
    mid = model_info(options.camera_model).model_id
    known = options.parsed_camera_params()  # COLMAP's camera_params: every new camera, focal known
    group_camera: dict[int, int] = {}
    for g, group in enumerate(groups):
        for i in group.members:
            r = usable[i]
            if r.name in existing:
                group_camera.setdefault(g, existing[r.name][1])
    new = [(usable[i].name, g) for g, group in enumerate(groups) for i in group.members if usable[i].name not in existing]
    new.sort(key=lambda t: t[0])
    ids = {r.name: existing[r.name][0] for r in usable if r.name in existing}
    if new:
        with db.transaction():
            for name, g in new:
                if g not in group_camera:
                    grp = groups[g]
                    params = (np.asarray(known, dtype=np.float64) if known is not None
                              else _camera_params(options.camera_model, grp.focal, grp.width, grp.height))
                    group_camera[g] = db.add_camera(mid, grp.width, grp.height, params,
                                                    known is not None or grp.has_prior_focal_length)
                ids[name] = db.add_image(name, group_camera[g])
    report.num_registered = len(new)
    report.num_cameras = len({existing[r.name][1] for r in usable if r.name in existing} | set(group_camera.values()))
    return ids


def extract(image_dir: str | os.PathLike, database: str | os.PathLike, options: ExtractOptions | None = None) -> ExtractReport:
    """Image folder -> COLMAP database with cameras, images and SIFT features.

    Rerunning resumes: images already in the database with features are not redone, new files
    are added. Raises IngestError (nothing written) when fewer than `min_images` images are
    usable; the error carries the report as `.report`."""
    import pycolmap

    t0 = time.perf_counter()
    options = options or ExtractOptions()
    image_dir, database = Path(image_dir), Path(database)
    if options.mask_path and not Path(options.mask_path).is_dir():
        raise IngestError(f"mask folder {options.mask_path} does not exist or is not a folder")
    device = resolve_sift_device(options.device)
    feature_type = feature_types()[options.features] if options.features in feature_types() else None
    if feature_type is None:
        raise IngestError(f"unknown --features {options.features!r}; available: {', '.join(sorted(feature_types()))}")
    report = ExtractReport(image_dir=str(image_dir), database=str(database), device=device)

    trusted: set[str] = set()
    if database.exists():
        with FrontendDatabase(database) as db:
            complete, _ = db.feature_state()
            trusted = {n for n, (iid, _) in db.images().items() if iid in complete}
    scan = scan_images(image_dir, options, trusted)
    report.num_files, report.skipped = scan.num_files, list(scan.skipped)
    records = _keep_masked(scan.images, options, report)
    _report_scan(report, records)
    if len(records) < options.min_images:
        err = IngestError(
            f"found {len(records)} usable image(s) in {image_dir} ({report.num_files} files), need at least "
            f"{options.min_images}" + (f"; skipped: {', '.join(f'{n} {k}' for k, n in report.skipped_by_reason.items())}" if report.skipped else "")
        )
        err.report = report
        raise err
    group_cameras(records, options)  # a grouping error (mixed sizes in one camera) before any write

    old_level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = max(old_level, 1)
    try:
        with FrontendDatabase(database) as db:
            ids = _register(db, records, options, report)
            complete, _ = db.feature_state()
            todo = [r for r in records if r.name in ids and ids[r.name] not in complete]
            report.num_resumed = sum(1 for r in records if r.name in ids and ids[r.name] in complete)
            failed = []
            bar = progress(total=len(todo), enabled=options.progress, desc="extract", unit="img")
            try:
                jobs = [(str(r.path), _mask_of(r.name, options)) for r in todo]
                report.num_masked = len(todo) if options.mask_path else 0
                for r, (kp, de, err, why) in zip(todo, _iter_features(jobs, options, device)):
                    iid = ids[r.name]
                    if err is not None:
                        with db.transaction():
                            db.remove_image(iid)
                        failed.append(SkippedFile(r.name, why, err))
                    else:
                        db.write_features(iid, kp, de, feature_type.colmap_type)  # replaces a partial set
                        report.num_extracted += 1
                        if len(kp) == 0:
                            report.no_features.append(r.name)
                    bar.update(1)
            finally:
                bar.close()
            report.skipped += failed
            log_aggregated(logger, f"{len(failed)} images failed during feature extraction and were removed:",
                           [f"{s.name}: {s.detail}" for s in failed])
            log_aggregated(logger, f"SIFT found no features in {len(report.no_features)} images:", report.no_features)
            report.num_images = len(ids) - len(failed)
            report.num_keypoints = db.num_keypoints()
    finally:
        pycolmap.logging.minloglevel = old_level
    report.elapsed_s = time.perf_counter() - t0
    logger.debug(report.summary())
    return report
