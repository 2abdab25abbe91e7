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
NN_ENGINES = ("auto", "exact", "ivf")
DEVICES = ("auto", "cpu", "cuda")


def normalize_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """'per-folder' and 'PER_FOLDER' both mean 'per_folder'; anything else is a ValueError."""
    v = str(value).strip().lower().replace("-", "_")
    if v not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return v


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

    def __post_init__(self) -> None:
        self.camera_mode = normalize_choice(self.camera_mode, CAMERA_MODES, "camera mode")
        self.device = normalize_choice(self.device, DEVICES, "device")
        from ..data.camera_models import model_info

        self.camera_model = model_info(str(self.camera_model).upper()).name
        self.extensions = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions)
        if self.max_image_size <= 0 or self.max_num_features <= 0:
            raise ValueError("max_image_size and max_num_features must be positive")
        if self.default_focal_length_factor <= 0:
            raise ValueError("default_focal_length_factor must be positive")
        self.image_names = tuple(self.image_names)
        self.camera_params = str(self.camera_params or "").strip()
        self.parsed_camera_params()  # a malformed or wrong-sized list is an error before any work

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
    # torch verifier's nearest-neighbour engine: exact (batched products; the default on CUDA),
    # ivf (an inverted file over all images; the default on the CPU), auto
    nn_engine: str = "auto"
    # geometric verification (COLMAP TwoViewGeometryOptions)
    min_num_inliers: int = 15
    max_error: float = 4.0
    confidence: float = 0.999
    max_num_trials: int = 10000
    compute_relative_pose: bool = True  # fills qvec/tvec of two_view_geometries
    verification: dict = field(default_factory=dict)  # extra TwoViewGeometryOptions / VerificationOptions fields
    seed: int = 0  # RANSAC seed (per pair), for repeatable databases
    num_threads: int = -1  # pycolmap matcher threads; -1 = all cores
    device: str = "auto"  # pycolmap matcher device and torch device for retrieval
    chunk_size: int = 256  # pairs per pycolmap call: the progress and resume granularity
    progress: bool = True

    def __post_init__(self) -> None:
        self.mode = normalize_choice(self.mode, MATCH_MODES, "match mode")
        self.verifier = normalize_choice(self.verifier, VERIFIERS, "verifier")
        self.nn_engine = normalize_choice(self.nn_engine, NN_ENGINES, "nearest-neighbour engine")
        self.device = normalize_choice(self.device, DEVICES, "device")
        if self.overlap < 1 or self.num_neighbors < 1 or self.num_words < 2 or self.chunk_size < 1:
            raise ValueError("overlap, num_neighbors and chunk_size must be >= 1 and num_words >= 2")
