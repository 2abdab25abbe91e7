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
from .executors import Task
from .extractors import Extractor, create_extractor, feature_types
from .ingest import IngestError, ImageRecord, SkippedFile, group_cameras, load_grey, load_uint8, scan_images
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


def resolve_extract_device(options: ExtractOptions) -> str:
    """SIFT runs where pycolmap can run it; learned extractors on torch's device (auto: CUDA when
    torch has it)."""
    if options.features == "sift":
        return resolve_sift_device(options.device)
    from ..runtime import resolve_device

    try:
        return resolve_device(options.device).type
    except RuntimeError as e:
        raise IngestError(str(e)) from None


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
    _WORKER["key"] = (options, device)


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
    return load_grey(path)


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


def extract_task(jobs: list[tuple[str, str | None]], options: ExtractOptions, device: str,
                 sizes: list[tuple[int, int]] | None = None) -> list[tuple]:
    """The extraction unit (a Ray task): the result of `_extract_file` (or, with the image
    `sizes`, of `_iter_batched`: a batched extractor's local batches) for each (image path, mask
    path or None), with one extractor per worker process. An image that this node cannot see is
    reported as such ("missing_on_node", with the node's name), for the driver to tell a folder
    that is not shared from a file deleted since the scan."""
    import socket

    if _WORKER.get("key") != (options, device):
        _init_worker(options, device)
    here = [os.path.exists(path) for path, _ in jobs]
    ok = [j for j, h in zip(jobs, here) if h]
    if sizes is None:
        found = iter([_extract_file(j) for j in ok])
    else:
        found = _iter_batched(ok, [s for s, h in zip(sizes, here) if h], _WORKER["extractor"])
    node = socket.gethostname()
    return [next(found) if h else (None, None, f"{path} does not exist on node {node}", "missing_on_node")
            for (path, _), h in zip(jobs, here)]


def default_num_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _iter_features(paths: list[tuple[str, str | None]], options: ExtractOptions, device: str,
                   sizes: list[tuple[int, int]] | None = None, extractor: Extractor | None = None):
    """Results for (image path, mask path or None) jobs, in input order. One in-process extractor
    for CUDA or one worker; a spawn pool
    (safe with threads in the parent) otherwise. With `sizes` (a batched, learned extractor):
    one in-process model (`extractor`), consecutive images of one size in one batch."""
    if sizes is not None:
        yield from _iter_batched(paths, sizes, extractor or make_extractor(options, device))
        return
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


def _decode(path: str):
    try:
        return load_uint8(path), None
    except Exception as e:  # noqa: BLE001 - a file that changed since the scan must not stop the run
        return None, f"{type(e).__name__}: {e}"


def _runs(sizes: list[tuple[int, int]], batch_size: int) -> list[range]:
    """Runs of up to `batch_size` consecutive jobs of one image size: one network batch each."""
    runs, s = [], 0
    while s < len(sizes):
        e = s + 1
        while e < len(sizes) and e - s < batch_size and sizes[e] == sizes[s]:
            e += 1
        runs.append(range(s, e))
        s = e
    return runs


def _iter_batched(jobs: list[tuple[str, str | None]], sizes: list[tuple[int, int]], extractor):
    """`_iter_features` for an extractor with `extract_batch`: runs of up to its batch size of
    consecutive same-size jobs; the next run is decoded on threads while the network runs."""
    runs = _runs(sizes, extractor.batch_size)
    with cf.ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(_decode, jobs[k][0]) for k in runs[0]] if runs else []
        for r, run in enumerate(runs):
            decoded = [f.result() for f in pending]
            pending = [pool.submit(_decode, jobs[k][0]) for k in runs[r + 1]] if r + 1 < len(runs) else []
            ok = [i for i, (im, _) in enumerate(decoded) if im is not None]
            feats = dict(zip(ok, extractor.extract_batch([decoded[i][0] for i in ok]))) if ok else {}
            for i, k in enumerate(run):
                if i not in feats:
                    yield None, None, decoded[i][1], "decode_error"
                    continue
                kp, de = feats[i]
                mask_path = jobs[k][1]
                if mask_path is not None:
                    try:
                        kp, de = mask_keypoints(kp, de, load_mask(mask_path))
                    except Exception as e:  # noqa: BLE001 - an unreadable mask skips its image, not the run
                        yield None, None, f"mask {mask_path}: {type(e).__name__}: {e}", "mask_error"
                        continue
                yield kp, de, None, None


def _extract_with(executor, todo: list[ImageRecord], jobs: list[tuple], sizes: list[tuple[int, int]] | None,
                  options: ExtractOptions, write):
    """Extraction tasks of about `images_per_task` images on `executor` (whole network batches
    for a batched extractor, so each image is computed in the batch a local run puts it in);
    `write(record, result)` for each image as its task's results arrive."""
    per = options.executor.images_per_task or max(1, min(16, len(jobs) // (4 * getattr(executor, "slots", 1))))
    units = [range(a, min(a + per, len(jobs))) for a in range(0, len(jobs), per)]
    if sizes is not None:  # cut between the local run's batches only
        units, runs = [], _runs(sizes, max(1, int(options.learned_batch_size)))
        for run in runs:
            if units and len(units[-1]) < per:
                units[-1] = range(units[-1].start, run.stop)
            else:
                units.append(run)
    tasks = (Task(extract_task, ([jobs[i] for i in u], options, executor.device,
                                 None if sizes is None else [sizes[i] for i in u]), key=u, name=f"extract-{k}")
             for k, u in enumerate(units))

    def on_result(task: Task, results: list) -> tuple:
        for i, result in zip(task.key, results):
            write(todo[i], result)
        return ()

    return executor.run(tasks, on_result)


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


def _complete(db: FrontendDatabase, options: ExtractOptions) -> set[int]:
    """Images whose features need no extraction: keypoints and descriptors, and for learned
    features the turns `learned_rotations` asks for."""
    complete, _ = db.feature_state()
    turns = options.learned_rotations if options.features != "sift" else 1
    have = db.turned_state()
    return {i for i in complete if have.get(i, 1) == turns}


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
    feature_type = feature_types()[options.features] if options.features in feature_types() else None
    if feature_type is None:
        raise IngestError(f"unknown --features {options.features!r}; available: {', '.join(sorted(feature_types()))}")
    on_ray = options.executor.kind == "ray"
    device = "cpu" if on_ray else resolve_extract_device(options)  # on Ray: the cluster's, below
    batched = options.features != "sift"
    # a learned model is built once, before any work (a missing extra is an error here); on Ray
    # each worker builds its own
    model = make_extractor(options, device) if batched and not on_ray else None
    report = ExtractReport(image_dir=str(image_dir), database=str(database), device=device)

    trusted: set[str] = set()
    if database.exists():
        with FrontendDatabase(database) as db:
            complete = _complete(db, options)
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
    executor = None
    if on_ray:  # the cluster's device; SIFT's CUDA needs pycolmap's (workers have this one's)
        from .ray_executor import RayExecutor

        no_gpu_sift = options.features == "sift" and options.device == "auto" and not pycolmap.has_cuda
        executor = RayExecutor(options.executor, options.num_workers or None, "cpu" if no_gpu_sift else options.device)
        report.device = device = executor.device

    old_level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = max(old_level, 1)
    try:
        with FrontendDatabase(database) as db:
            ids = _register(db, records, options, report)
            complete = _complete(db, options)
            todo = [r for r in records if r.name in ids and ids[r.name] not in complete]
            report.num_resumed = sum(1 for r in records if r.name in ids and ids[r.name] in complete)
            failed = []
            bar = progress(total=len(todo), enabled=options.progress, desc="extract", unit="img")

            def write(r: ImageRecord, result: tuple) -> None:
                kp, de, err, why = result
                iid = ids[r.name]
                if why == "missing_on_node" and r.path.exists():
                    raise IngestError(f"a Ray worker cannot read {r.path}, which this machine can ({err}): the image "
                                      "folder must be on a path every node sees (see docs/distributed.md)")
                if err is not None:
                    with db.transaction():
                        db.remove_image(iid)
                    failed.append(SkippedFile(r.name, "decode_error" if why == "missing_on_node" else why, err))
                else:
                    db.write_features(iid, kp, de, feature_type.colmap_type)  # replaces a partial set
                    report.num_extracted += 1
                    if len(kp) == 0:
                        report.no_features.append(r.name)
                bar.update(1)

            try:
                if batched:  # images of one size in a row: they share the network's batches
                    todo.sort(key=lambda r: (r.width, r.height))
                jobs = [(str(r.path), _mask_of(r.name, options)) for r in todo]
                report.num_masked = len(todo) if options.mask_path else 0
                sizes = [(r.width, r.height) for r in todo] if batched else None
                if executor is not None:
                    report.set_executor(_extract_with(executor, todo, jobs, sizes, options, write))
                else:
                    for r, result in zip(todo, _iter_features(jobs, options, device, sizes, model)):
                        write(r, result)
            finally:
                bar.close()
            report.skipped += failed
            log_aggregated(logger, f"{len(failed)} images failed during feature extraction and were removed:",
                           [f"{s.name}: {s.detail}" for s in failed])
            log_aggregated(logger, f"{options.features} found no features in {len(report.no_features)} images:", report.no_features)
            report.num_images = len(ids) - len(failed)
            report.num_keypoints = db.num_keypoints()
    finally:
        pycolmap.logging.minloglevel = old_level
    report.elapsed_s = time.perf_counter() - t0
    logger.debug(report.summary())
    return report
