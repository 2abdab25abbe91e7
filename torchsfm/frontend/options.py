"""Options of the front end (image folder -> COLMAP database.db), as dataclasses.

Defaults follow COLMAP 4.2's (`ImageReaderOptions`, `SiftExtractionOptions`,
`SiftMatchingOptions`, `TwoViewGeometryOptions`) so that a database made here behaves like one
made by `colmap feature_extractor` + `colmap exhaustive_matcher`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Case-insensitive allowlist. A file must also decode (PIL) to be used; HEIC/RAW are not listed
# because Pillow cannot decode them without plugins.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".bmp", ".webp", ".pgm", ".ppm", ".pbm", ".pnm", ".jp2"}
)

CAMERA_MODES = ("auto", "single", "per_folder", "per_image")
MATCH_MODES = ("exhaustive", "sequential", "retrieval")
VERIFIERS = ("torch", "colmap")
MATCHERS = ("nn", "lightglue")
# LightGlue has no ratio test: between images that do not overlap it matches look-alike parts
# (a symmetric or repetitive object), and a geometry then explains only some of those matches.
# Against ground truth (templeRing, dtu_scan24; ALIKED and XFeat), right pairs had a median of
# 94-99 % inliers and wrong ones 71-84 %: 0.8 drops most wrong pairs and keeps nearly all right ones
LIGHTGLUE_MIN_INLIER_RATIO = 0.8
NN_ENGINES = ("auto", "exact", "ivf")
FALLBACK_FEATURES = ("none", "aliked", "disk", "xfeat")
DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("local", "ray")


def normalize_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """'per-folder' and 'PER_FOLDER' both mean 'per_folder'; anything else is a ValueError."""
    v = str(value).strip().lower().replace("-", "_")
    if v not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return v


@dataclass
class ExecutorOptions:
    """Where the front end's work units run. `local`: this machine (extraction in worker
    processes, matching in this process). `ray`: tasks on a Ray cluster (the `torchsfm[ray]`
    extra); this process stays the only database writer. Results are the same either way."""

    kind: str = "local"  # local | ray
    # ray: "" (or "local") starts a Ray runtime on this machine; "auto" joins the cluster that
    # `ray start` runs here; HOST:PORT joins that cluster's head; ray://HOST:PORT via Ray Client
    address: str = ""
    max_retries: int = 3  # ray: resubmissions of a task whose worker process or node died
    cpus_per_task: float = 1.0  # ray: CPUs a task reserves (and torch threads it uses)
    gpus_per_task: float = 1.0  # ray: GPUs a task reserves when the device is cuda (0.5: two per GPU)
    max_tasks_in_flight: int = 0  # ray: tasks submitted at once (object-store memory); 0: 2 per task slot
    images_per_task: int = 0  # ray: images per extraction task; 0: from the image count and cluster size

    def __post_init__(self) -> None:
        self.kind = normalize_choice(self.kind, EXECUTORS, "executor")
        self.address = str(self.address or "").strip()
        if self.address.lower() == "local":
            self.address = ""
        if self.max_retries < 0 or self.cpus_per_task <= 0 or self.gpus_per_task < 0 \
                or self.max_tasks_in_flight < 0 or self.images_per_task < 0:
            raise ValueError("executor: max_retries, gpus_per_task, max_tasks_in_flight and images_per_task must be "
                             ">= 0 and cpus_per_task > 0")


def _executor_options(value) -> ExecutorOptions:
    return ExecutorOptions(**value) if isinstance(value, dict) else value


@dataclass
class ExtractOptions:
    camera_mode: str = "auto"  # auto | single | per_folder | per_image (COLMAP's CameraMode)
    camera_model: str = "SIMPLE_RADIAL"
    # Fallback focal length when EXIF gives none: factor * max(width, height), prior flag off.
    default_focal_length_factor: float = 1.2
    # EXIF focal lengths giving a field of view outside this range are ignored with a warning.
    min_fov_deg: float = 5.0
    max_fov_deg: float = 170.0
    features: str = "sift"  # the extractor (torchsfm.frontend.extractors); learned ones come with an extra
    max_image_size: int = 3200  # SIFT runs on a downscaled copy; keypoints are scaled back
    max_num_features: int = 8192
    sift: dict = field(default_factory=dict)  # extra pycolmap.SiftExtractionOptions fields
    # learned extractors (xfeat, aliked, disk; the `learned` extra): they run on a copy whose
    # longer side is at most learned_max_image_size (LightGlue's default 1024), keep the
    # learned_max_keypoints best-scored keypoints, and batch images of one size on --device
    learned_max_image_size: int = 1024
    # ... and a smaller image is upscaled until its longer side is this (0: never): the networks
    # place keypoints to a fraction of their own pixel, so a finer grid gives finer keypoints
    learned_min_image_size: int = 0
    # the detector's score threshold; -1: each network's own (ALIKED 0.2, XFeat 0.05, DISK 0);
    # 0: no threshold, the learned_max_keypoints best-scored local maxima
    learned_detection_threshold: float = -1.0
    learned_max_keypoints: int = 2048
    learned_batch_size: int = 4
    # learned features are described again on each image turned by quarter turns (1: upright
    # only; 2: and upside down; 4: every quarter turn) so that LightGlue matches rotated images
    learned_rotations: int = 4
    extensions: frozenset[str] = IMAGE_EXTENSIONS
    min_images: int = 2
    device: str = "auto"  # SIFT device: auto uses CUDA only when the installed pycolmap has it
    num_workers: int = 0  # extraction processes; 0 = one per available core (at most 8)
    progress: bool = True
    # COLMAP's ImageReaderOptions: only these images (names relative to the image folder; empty:
    # all); known intrinsics of every new camera ("f,cx,cy,k" in the model's parameter order,
    # focal marked as a prior); masks MASK_PATH/<image name>.png, no features on zero pixels
    # (an image without its mask file is skipped).
    image_names: tuple[str, ...] = ()
    camera_params: str = ""
    mask_path: str | None = None
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)

    def __post_init__(self) -> None:
        self.camera_mode = normalize_choice(self.camera_mode, CAMERA_MODES, "camera mode")
        self.device = normalize_choice(self.device, DEVICES, "device")
        from ..data.camera_models import model_info

        self.camera_model = model_info(str(self.camera_model).upper()).name
        self.extensions = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions)
        if min(self.max_image_size, self.max_num_features, self.learned_max_image_size, self.learned_max_keypoints,
               self.learned_batch_size) <= 0:
            raise ValueError("max_image_size, max_num_features and the learned_* sizes must be positive")
        if not 0 <= self.learned_min_image_size <= self.learned_max_image_size:
            raise ValueError("learned_min_image_size must be between 0 and learned_max_image_size")
        if not (self.learned_detection_threshold == -1 or self.learned_detection_threshold >= 0):
            raise ValueError(f"learned_detection_threshold must be >= 0 or -1 (the network's own), "
                             f"not {self.learned_detection_threshold}")
        if self.learned_rotations not in (1, 2, 4):
            raise ValueError(f"learned_rotations must be 1, 2 or 4, not {self.learned_rotations}")
        if self.default_focal_length_factor <= 0:
            raise ValueError("default_focal_length_factor must be positive")
        self.image_names = tuple(self.image_names)
        self.camera_params = str(self.camera_params or "").strip()
        self.parsed_camera_params()  # a malformed or wrong-sized list is an error before any work
        self.executor = _executor_options(self.executor)

    def parsed_camera_params(self) -> list[float] | None:
        """`camera_params` as numbers, checked against the camera model; None when not given."""
        if not self.camera_params:
            return None
        from ..data.camera_models import model_info

        try:
            values = [float(v) for v in self.camera_params.replace(" ", ",").split(",") if v]
        except ValueError:
            raise ValueError(f"camera_params {self.camera_params!r}: not a comma-separated list of numbers") from None
        info = model_info(self.camera_model)
        if len(values) != info.num_params:
            raise ValueError(f"camera_params gives {len(values)} values; {info.name} has {info.num_params}: "
                             f"{','.join(info.params)}")
        return values


@dataclass
class MatchOptions:
    mode: str = "exhaustive"  # exhaustive | sequential | retrieval
    # sequential (video): image i is matched with i+1..i+overlap in natural name order, and with
    # i+2^k (k < overlap) when quadratic_overlap; loop_closure wraps indices around (turntables,
    # closed walks); loop_detection adds retrieval neighbours every loop_period images.
    overlap: int = 10
    quadratic_overlap: bool = True
    loop_closure: bool = False
    loop_detection: bool = False
    loop_period: int = 10
    # retrieval: top-k neighbours by a VLAD descriptor built from the database's SIFT features
    # over a codebook trained on the fly (nothing to download).
    num_neighbors: int = 20
    num_words: int = 64
    kmeans_iterations: int = 20
    kmeans_samples: int = 100_000
    # descriptor matching (COLMAP SiftMatchingOptions)
    max_ratio: float = 0.8
    max_distance: float = 0.7
    cross_check: bool = True
    max_num_matches: int = 32768
    guided_matching: bool = False
    # who matches and verifies: "torch" (ours: batched nearest neighbours and RANSAC on --device)
    # or "colmap" (pycolmap's matcher and verifier; the reference)
    verifier: str = "torch"
    # raw matches of the torch verifier: nn (mutual nearest neighbours with COLMAP's ratio and
    # distance tests) or lightglue (LightGlue for aliked/disk, LighterGlue for xfeat: the
    # `learned` extra), pairs batched on --device; lightglue_threshold is LightGlue's match
    # confidence threshold, lightglue_batch_size its pairs per batch, and lightglue_depth_confidence
    # its early stop (a batch stops at a layer when all of its pairs are confident; -1: all layers);
    # batch size 0 = auto: 1 on the CPU (batching saves nothing there, and a pair alone stops at
    # its own layer), 16 on CUDA
    matcher: str = "nn"
    lightglue_threshold: float = 0.1
    lightglue_batch_size: int = 0
    lightglue_depth_confidence: float = 0.95
    # torch verifier's nearest-neighbour engine: exact (batched products; the default on CUDA),
    # ivf (an inverted file over all images; the default on the CPU), auto
    nn_engine: str = "auto"
    # the inverted file: lists each descriptor is compared with (COLMAP's nprobe), and an exact
    # re-check of its matches (only matches exact search makes, for about twice its time)
    ivf_probes: int = 8
    ivf_exact_check: bool = False
    # geometric verification (COLMAP TwoViewGeometryOptions)
    min_num_inliers: int = 15
    # least share of a pair's matches its geometry must explain (COLMAP's min_inlier_ratio);
    # -1 = auto: LIGHTGLUE_MIN_INLIER_RATIO with --matcher lightglue, else COLMAP's 0
    min_inlier_ratio: float = -1.0
    max_error: float = 4.0
    confidence: float = 0.999
    max_num_trials: int = 10000
    compute_relative_pose: bool = True  # fills qvec/tvec of two_view_geometries
    verification: dict = field(default_factory=dict)  # extra TwoViewGeometryOptions / VerificationOptions fields
    seed: int = 0  # RANSAC seed (per pair), for repeatable databases
    num_threads: int = -1  # pycolmap matcher threads; -1 = all cores
    device: str = "auto"  # pycolmap matcher device and torch device for retrieval
    chunk_size: int = 256  # pairs per pycolmap call / per transaction: the progress and resume granularity
    progress: bool = True
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)  # torch verifier only
    # only these pairs (image names) instead of the mode's: the learned fallback's (run)
    image_pairs: tuple[tuple[str, str], ...] = ()

    def effective_min_inlier_ratio(self) -> float:
        if self.min_inlier_ratio >= 0:
            return float(self.min_inlier_ratio)
        return LIGHTGLUE_MIN_INLIER_RATIO if self.matcher == "lightglue" else 0.0

    def __post_init__(self) -> None:
        self.mode = normalize_choice(self.mode, MATCH_MODES, "match mode")
        self.verifier = normalize_choice(self.verifier, VERIFIERS, "verifier")
        self.matcher = normalize_choice(self.matcher, MATCHERS, "matcher")
        if not (self.min_inlier_ratio == -1 or 0 <= self.min_inlier_ratio <= 1):
            raise ValueError(f"min_inlier_ratio must be in [0, 1] or -1 (auto), not {self.min_inlier_ratio}")
        if self.matcher == "lightglue" and self.verifier == "colmap":
            raise ValueError("--matcher lightglue needs --verifier torch (pycolmap's matcher cannot run LightGlue here)")
        if self.guided_matching and self.verifier == "torch":
            raise ValueError("--guided-matching needs --verifier colmap (the torch verifier does not re-match "
                             "guided by the geometry)")
        if self.ivf_probes < 1:
            raise ValueError("ivf_probes must be >= 1")
        if self.lightglue_batch_size < 0:
            raise ValueError("lightglue_batch_size must be >= 0 (0: auto)")
        self.nn_engine = normalize_choice(self.nn_engine, NN_ENGINES, "nearest-neighbour engine")
        self.device = normalize_choice(self.device, DEVICES, "device")
        if self.overlap < 1 or self.num_neighbors < 1 or self.num_words < 2 or self.chunk_size < 1:
            raise ValueError("overlap, num_neighbors and chunk_size must be >= 1 and num_words >= 2")
        self.executor = _executor_options(self.executor)
        self.image_pairs = tuple((str(a), str(b)) for a, b in self.image_pairs)
        if self.executor.kind == "ray" and self.verifier == "colmap":
            raise ValueError("--executor ray runs the torch verifier's work units; --verifier colmap (pycolmap's "
                             "matcher) runs on this machine only: drop one of them")


@dataclass
class FallbackOptions:
    """Learned features where SIFT is weak (`frontend.fallback`, run's --fallback-features): an
    image with fewer than `min_pairs` SIFT-verified pairs gets `features` (with the extraction's
    learned_* settings), and its candidate pairs that SIFT did not verify are matched by LightGlue."""

    features: str = "none"  # none | aliked | disk | xfeat
    min_pairs: int = 5
    # a learned pair is merged when its geometry explains this share of LightGlue's matches. Pairs
    # SIFT could not verify are mostly distant views: against ground truth, 46 % (dtu_scan24) and
    # 84 % (templeRing) of those passing LightGlue's 0.8 gate were wrong by 5 degrees or more on
    # the robustness subsets, 35 % and 38 % of those at 0.9 (README)
    min_inlier_ratio: float = 0.9

    def __post_init__(self) -> None:
        self.features = normalize_choice(self.features, FALLBACK_FEATURES, "fallback features")
        if self.min_pairs < 1:
            raise ValueError(f"fallback min_pairs must be >= 1, not {self.min_pairs}")
        if not 0 <= self.min_inlier_ratio <= 1:
            raise ValueError(f"fallback min_inlier_ratio must be in [0, 1], not {self.min_inlier_ratio}")


REFINE_WEIGHTINGS = ("information", "uniform")


@dataclass
class RefineOptions:
    """Sub-pixel keypoint refinement (`frontend.keypoint_refinement`, run's --refine-keypoints):
    each verified inlier match's patches are aligned by an affine warp, and one correction per
    keypoint is solved over all its matches. For learned features, whose keypoints are less
    precise than SIFT's (README: ALIKED's AUC@3 gains more than a point on 18 of 20 sparse subsets,
    and loses on templeRing, whose principal point bundle adjustment then finds worse)."""

    enabled: bool = False
    patch_radius: int = 5  # 11x11 patches
    iterations: int = 15  # Gauss-Newton steps per match
    min_ncc: float = 0.9  # a match whose aligned patches correlate less says nothing
    max_shift: float = 2.5  # pixels: a larger alignment shift is a different structure, not a refinement
    # pull towards the detections, against one match of average information: 1 applies about
    # two thirds of a lone match's shift; 0.01 (nearly all of it) lost on 3 of 20 subsets (README)
    prior: float = 1.0
    weighting: str = "uniform"  # or information: a match weighs what its patch says about the shift
    min_num_inliers: int = 15  # pairs with fewer verified inliers are left out (match's --min-inliers)
    batch_size: int = 20000  # matches aligned per batch
    cache_mb: int = 2048  # decoded images held at once: images are processed block by block
    device: str = "auto"

    def __post_init__(self) -> None:
        self.weighting = normalize_choice(self.weighting, REFINE_WEIGHTINGS, "refinement weighting")
        self.device = normalize_choice(self.device, DEVICES, "device")
        if self.patch_radius < 1 or self.iterations < 1 or self.batch_size < 1 or self.cache_mb < 1:
            raise ValueError("refinement patch_radius, iterations, batch_size and cache_mb must be >= 1")
        if not -1 <= self.min_ncc <= 1:
            raise ValueError(f"refinement min_ncc must be in [-1, 1], not {self.min_ncc}")
        if self.max_shift <= 0 or self.prior <= 0:
            raise ValueError("refinement max_shift and prior must be > 0")
