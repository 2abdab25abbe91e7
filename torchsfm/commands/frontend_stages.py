"""The front end's stages as `extract`, `match` and `run` report them: one StageReport each,
files skipped with their reason, a summary line, the option flags of both stages."""
from __future__ import annotations

from pathlib import Path

from ..data.camera_models import MODELS
from ..frontend.extractors import feature_types
from ..frontend.options import (CAMERA_MODES, DEVICES, EXECUTORS, FALLBACK_FEATURES, MATCH_MODES, MATCHERS,
                                NN_ENGINES, REFINE_WEIGHTINGS, VERIFIERS, ExtractOptions, FallbackOptions, MatchOptions,
                                RefineOptions)
from ..report import RunReport
from . import CLIError
from .options import Flag


def read_image_list(path: str) -> tuple[str, ...]:
    """COLMAP's image list file: one image name (relative to the image folder) a line."""
    import argparse

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read image list {path}: {e.strerror or e}") from None
    names = tuple(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"image list {path} names no image")
    return names


# where the work units run (ExecutorOptions, one table for extract, match and run)
EXECUTOR_FLAGS = [
    Flag("executor.kind", "--executor", help="where the work units run: local (this machine) or ray (tasks on a Ray "
         "cluster, this process the only database writer; needs the torchsfm[ray] extra)", choices=EXECUTORS),
    Flag("executor.address", "--ray-address", help="Ray cluster: none starts a Ray runtime on this machine "
         "(--threads CPUs), auto joins the cluster `ray start` runs here, HOST:PORT joins that head node, "
         "ray://HOST:PORT through Ray Client", metavar="ADDRESS"),
    Flag("executor.max_retries", "--ray-max-retries", help="resubmissions of a task whose worker process or node died"),
    Flag("executor.cpus_per_task", "--ray-cpus-per-task", help="CPUs a Ray task reserves (and torch threads it uses)"),
    Flag("executor.gpus_per_task", "--ray-gpus-per-task", help="GPUs a Ray task reserves when the device is cuda "
         "(0.5: two tasks share a GPU)"),
    Flag("executor.max_tasks_in_flight", "--ray-max-tasks-in-flight",
         help="Ray tasks submitted at once, bounding the object store's inputs and results; 0: 2 per task slot"),
    Flag("executor.images_per_task", "--ray-images-per-task",
         help="images per Ray extraction task; 0: from the image count and the cluster's size"),
]
EXECUTOR_FIELDS = tuple(f.field for f in EXECUTOR_FLAGS)

EXTRACT_FLAGS = [
    Flag("camera_mode", "--camera-mode", help="which images share intrinsics: auto = same EXIF make, model and "
         "focal length and the same size", choices=CAMERA_MODES),
    Flag("camera_model", "--camera-model", ("--ImageReader.camera_model",), "camera model", choices=tuple(MODELS)),
    Flag("camera_params", "--camera-params", ("--ImageReader.camera_params",),
         "known intrinsics of every camera, comma-separated in the model's parameter order (SIMPLE_RADIAL: f,cx,cy,k); "
         "the focal length is then a prior", metavar="P1,P2,..."),
    Flag("image_names", "--image-list", ("--image_list_path", "--image-list-path"),
         "file of image names relative to IMAGES, one a line: only these images are used", metavar="FILE",
         type=read_image_list),
    Flag("mask_path", "--mask-path", ("--ImageReader.mask_path",),
         "folder of masks named <image name>.png: no features where the mask is 0; an image without its mask "
         "is skipped", metavar="DIR"),
    Flag("default_focal_length_factor", "--focal-factor",
         ("--ImageReader.default_focal_length_factor", "--default-focal-length-factor"),
         "focal length without EXIF = factor * max(width, height)"),
    Flag("features", "--features", help="feature extractor: sift (COLMAP's), or learned ones from the `learned` "
         "extra: xfeat, aliked (n16rot), disk", choices=tuple(sorted(feature_types()))),
    Flag("learned_max_image_size", "--learned-max-image-size",
         help="learned features run on a copy whose longer side is at most this; keypoints are scaled back"),
    Flag("learned_min_image_size", "--learned-min-image-size",
         help="smaller images are upscaled for learned features until their longer side is this (0: never): "
         "finer keypoints"),
    Flag("learned_detection_threshold", "--learned-detection-threshold",
         help="learned detector's score threshold: -1 = the network's own (aliked 0.2, xfeat 0.05, disk 0); 0 = none, "
         "the --learned-max-keypoints best (more keypoints on dark or low-texture images)"),
    Flag("learned_max_keypoints", "--learned-max-keypoints", help="most learned keypoints per image (best scores)"),
    Flag("learned_batch_size", "--learned-batch-size", help="images of one size per network batch"),
    Flag("learned_rotations", "--learned-rotations", help="learned features are also described on each image "
         "turned by quarter turns, so --matcher lightglue matches images rotated against each other: 1 (upright "
         "only), 2 (and upside down), 4 (every quarter turn)", metavar="{1,2,4}", type=int),
    Flag("max_image_size", "--max-image-size", ("--SiftExtraction.max_image_size",),
         "SIFT runs on a copy downscaled to this size; keypoints are scaled back"),
    Flag("max_num_features", "--max-features", ("--SiftExtraction.max_num_features", "--max-num-features"),
         "most SIFT features per image"),
    Flag("min_fov_deg", "--min-fov", help="EXIF focal lengths giving a narrower field of view (degrees) are ignored"),
    Flag("max_fov_deg", "--max-fov", help="EXIF focal lengths giving a wider field of view (degrees) are ignored"),
    Flag("device", "--device", help="extraction device; auto: SIFT uses CUDA only when the installed pycolmap has "
         "it, learned features when torch has it", choices=DEVICES),
    Flag("min_images", ""),  # set by the verb (run needs as many as the mapper)
    *EXECUTOR_FLAGS,
]
# set by the verbs (--threads, -q) or only from Python
EXTRACT_EXCLUDE = ("num_workers", "progress", "extensions", "sift")

MATCH_FLAGS = [
    Flag("mode", "--mode", ("--match-mode",), "pair selection: exhaustive (up to a few hundred images), "
         "sequential (video, ordered captures), retrieval (large unordered collections)", choices=MATCH_MODES),
    Flag("overlap", "--overlap", ("--SequentialMatching.overlap",),
         "sequential: image i is matched with i+1 ... i+overlap in natural name order"),
    Flag("quadratic_overlap", "--quadratic-overlap", ("--SequentialMatching.quadratic_overlap",),
         "sequential: also match i+2^k (k < overlap), long links that close loops"),
    Flag("loop_closure", "--loop-closure", help="sequential: the sequence is a closed loop (turntable, ring): "
         "match its end with its start"),
    Flag("loop_detection", "--loop-detection", ("--SequentialMatching.loop_detection",),
         "sequential: every --loop-period images, add retrieval neighbours outside the overlap window"),
    Flag("loop_period", "--loop-period", ("--SequentialMatching.loop_detection_period",),
         "sequential: loop-detection period in images"),
    Flag("num_neighbors", "--neighbors", ("--VocabTreeMatching.num_nearest_neighbors", "--num-neighbors"),
         "retrieval and loop detection: neighbours per image"),
    Flag("num_words", "--num-words", help="retrieval: size of the VLAD codebook"),
    Flag("verifier", "--verifier", help="who matches and verifies: torch (batched nearest neighbours and RANSAC "
         "on the device) or colmap (pycolmap's matcher and verifier, the reference)", choices=VERIFIERS),
    Flag("matcher", "--matcher", help="raw matches of --verifier torch: nn (mutual nearest neighbours, ratio test) "
         "or lightglue (LightGlue / LighterGlue for xfeat, aliked, disk features: the learned extra)",
         choices=MATCHERS),
    Flag("lightglue_threshold", "--lightglue-threshold", help="LightGlue: least match confidence"),
    Flag("lightglue_batch_size", "--lightglue-batch-size", help="LightGlue: pairs per batch (0: 1 on the CPU, 16 on CUDA)"),
    Flag("lightglue_depth_confidence", "--lightglue-depth-confidence",
         help="LightGlue early stop: a batch stops at a layer once this share of points is confident in each pair; "
         "-1 runs all layers"),
    Flag("nn_engine", "--nn-engine", help="torch verifier's nearest-neighbour search: exact (batched products), "
         "ivf (an inverted file over all images), auto (exact on CUDA, ivf on the CPU)", choices=NN_ENGINES),
    Flag("ivf_probes", "--ivf-probes", help="inverted file (--nn-engine ivf): lists each descriptor is compared with "
         "(more: closer to exact search, slower)"),
    Flag("ivf_exact_check", "--ivf-exact-check", help="inverted file: re-check its matches by exact search (only "
         "matches exact search makes; about twice the time)"),
    Flag("max_ratio", "--max-ratio", ("--SiftMatching.max_ratio",), "SIFT ratio test"),
    Flag("max_distance", "--max-distance", ("--SiftMatching.max_distance",), "largest descriptor distance of a match"),
    Flag("cross_check", "--cross-check", ("--SiftMatching.cross_check",), "keep mutual best matches only"),
    Flag("max_num_matches", "--max-num-matches", ("--SiftMatching.max_num_matches",), "most matches per pair (the best by ratio kept)"),
    Flag("guided_matching", "--guided-matching", ("--SiftMatching.guided_matching",),
         "match again guided by the verified geometry (--verifier colmap only)"),
    Flag("min_num_inliers", "--min-inliers", ("--TwoViewGeometry.min_num_inliers", "--min-num-inliers"),
         "a pair counts as verified with at least this many inliers"),
    Flag("min_inlier_ratio", "--min-inlier-ratio", ("--TwoViewGeometry.min_inlier_ratio",),
         "a verified pair's geometry must explain at least this share of its matches; -1 = auto: 0.8 with "
         "--matcher lightglue (its matches between overlapping images are nearly all right, so many outliers mean "
         "a wrong pair), else COLMAP's 0"),
    Flag("max_error", "--max-error", ("--TwoViewGeometry.max_error",), "RANSAC threshold in pixels"),
    Flag("confidence", "--confidence", ("--TwoViewGeometry.confidence",), "RANSAC confidence"),
    Flag("max_num_trials", "--max-num-trials", ("--TwoViewGeometry.max_num_trials",), "most RANSAC iterations"),
    Flag("seed", "--seed", help="RANSAC seed: reruns give the same database"),
    Flag("device", "--device", help="matcher device (CUDA when pycolmap has it) and torch device of retrieval",
         choices=DEVICES),
    *(f for f in EXECUTOR_FLAGS if f.field != "executor.images_per_task"),
]
MATCH_EXCLUDE = ("num_threads", "progress", "verification", "image_pairs")

FALLBACK_FLAGS = [
    Flag("features", "--fallback-features", help="learned features for the images SIFT leaves weak (--features sift "
         "only): they and their candidate partners get these features (the --learned-* settings, the learned "
         "extra), their pairs SIFT did not verify are matched by LightGlue, and the verified ones are merged into "
         "the database; none: SIFT alone", choices=FALLBACK_FEATURES),
    Flag("min_pairs", "--fallback-min-pairs", help="an image with fewer SIFT-verified pairs than this is weak"),
    Flag("min_inlier_ratio", "--fallback-min-inlier-ratio", help="a learned pair is merged when its geometry explains "
         "at least this share of LightGlue's matches"),
]

REFINE_FLAGS = [
    Flag("enabled", "--refine-keypoints", help="after matching, align every verified inlier match's image patches by "
         "an affine warp and correct each keypoint by least squares over its matches (sub-pixel keypoints for "
         "learned features; reads the images again)"),
    Flag("prior", "--refine-prior", help="pull of the corrections towards the detections, against one match of "
         "median information: larger moves keypoints less"),
    Flag("patch_radius", "--refine-patch-radius", help="aligned patches are 2 r + 1 pixels wide"),
    Flag("min_ncc", "--refine-min-ncc", help="a match counts when its aligned patches correlate at least this much"),
    Flag("max_shift", "--refine-max-shift", help="a match counts when its alignment moved the keypoint less than "
         "this (pixels)"),
    Flag("weighting", "--refine-weighting", help="information: each match weighs what its patch says about the "
         "shift (an edge only across itself); uniform: every match alike", choices=REFINE_WEIGHTINGS),
    Flag("cache_mb", "--refine-cache-mb", help="decoded images held at once (megabytes); images are processed "
         "block by block"),
]
REFINE_EXCLUDE = ("iterations", "batch_size", "min_num_inliers", "device")  # from the match stage, or Python only


def frontend_options(args, *, extract: ExtractOptions | None = None, match: MatchOptions | None = None,
                     fixed_extract: dict | None = None, fixed_match: dict | None = None
                     ) -> tuple[ExtractOptions | None, MatchOptions | None]:
    """The options of the stages whose flags the verb has: their flags, --threads, -q, then the
    values the verb fixes itself."""
    from .options import options_from_args

    threads = getattr(args, "threads", None)
    progress = not getattr(args, "quiet", False)
    ex = None if extract is None else options_from_args(
        args, "extract", extract, num_workers=threads or 0, progress=progress, **(fixed_extract or {}))
    ma = None if match is None else options_from_args(
        args, "match", match, num_threads=threads or -1, progress=progress, **(fixed_match or {}))
    return ex, ma


def extract_stage(report: RunReport, image_dir: Path, database: Path, options: ExtractOptions):
    """`frontend.extract` as a stage of `report`; a failure is a CLIError, the files skipped until
    then are in the report either way."""
    from ..frontend import IngestError, extract
    from ..frontend.colmap_db import DatabaseError
    from ..frontend.executors import ExecutorError

    with report.stage("extract") as st:
        try:
            ex = extract(image_dir, database, options)
        except (IngestError, DatabaseError, ExecutorError, ValueError) as e:
            partial = getattr(e, "report", None)
            if partial is not None:
                st.record(partial, exclude=("skipped",))
                report.skip_files(partial.skipped)
            raise CLIError(str(e)) from e
        st.record(ex, exclude=("skipped",))
    report.skip_files(ex.skipped)
    report.summary["extract"] = ex.summary()
    return ex


def fallback_stage(report: RunReport, image_dir: Path, database: Path, options: FallbackOptions,
                   extract: ExtractOptions, match: MatchOptions):
    """`frontend.fallback.learned_fallback` as a stage of `report`; a failure is a CLIError."""
    from ..frontend import IngestError
    from ..frontend.colmap_db import DatabaseError
    from ..frontend.fallback import learned_fallback

    with report.stage("fallback") as st:
        try:
            fr = learned_fallback(image_dir, database, options, extract, match)
        except (IngestError, DatabaseError, ValueError, RuntimeError) as e:
            raise CLIError(str(e)) from e
        st.record(fr)
    report.summary["fallback"] = fr.summary()
    return fr


def match_stage(report: RunReport, database: Path, options: MatchOptions):
    """`frontend.match` as a stage of `report`; a failure is a CLIError."""
    from ..frontend import IngestError, match
    from ..frontend.colmap_db import DatabaseError

    with report.stage("match") as st:
        try:
            mr = match(database, options)
        except (IngestError, DatabaseError, ValueError, RuntimeError) as e:
            raise CLIError(str(e)) from e
        st.record(mr)
    report.summary["match"] = mr.summary()
    return mr


def refine_stage(report: RunReport, image_dir: Path, database: Path, options: RefineOptions):
    """`frontend.keypoint_refinement.refine_keypoints` as a stage of `report`; a failure is a CLIError."""
    from ..frontend import IngestError
    from ..frontend.colmap_db import DatabaseError
    from ..frontend.keypoint_refinement import refine_keypoints

    with report.stage("refine_keypoints") as st:
        try:
            rr = refine_keypoints(image_dir, database, options, progress_bar=True)
        except (IngestError, DatabaseError, ValueError, RuntimeError) as e:
            raise CLIError(str(e)) from e
        st.record(rr)
        st.record({"options": options})  # written with the run's other stage options
    report.summary["refine_keypoints"] = rr.summary()
    return rr
