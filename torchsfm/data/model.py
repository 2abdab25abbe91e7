"""The data model: struct-of-arrays tensors with COLMAP semantics and names.

Conventions (the same as COLMAP's):
- `cam_from_world`: x_cam = R x_world + t. Rotations are stored as w-first unit quaternions.
- Pixel coordinates: the top-left corner of the top-left pixel is (0, 0); its centre is (0.5, 0.5).
- Camera axes: x right, y down, z forward (looking along +z).
- Rows are dense indices (0..N-1); the COLMAP ids (`camera_id`, `image_id`, `point3D_id`) are
  kept alongside so that models round-trip unchanged.
- Variable-length lists (keypoints per image, matches per pair, observations per track) are flat
  arrays plus `offsets` (CSR): the items of row i are `offsets[i]:offsets[i+1]`.

Every container is a dataclass of tensors; `.to(device=..., dtype=...)` moves all of them
(integer and boolean tensors keep their dtype). Nothing here assumes CUDA.

Compact storage (memory grows with matches and observations, so these arrays dominate it):
- the per-match and per-observation indices (`ViewGraph.matches`, `Tracks.*`) are int32
  whenever the values fit (`compact_index`, applied when a container is made); code that
  combines them into keys (`a * n + b`) must widen them first (`.long()`);
- keypoints keep the precision they were measured in: float32 from a COLMAP database (which
  stores float32), float64 from a model file; `.to(dtype=...)` does not change them, and code
  that computes with them casts what it gathers (`Reconstruction.observation_xy_of`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..geometry import so3
# CSR helpers of the data model's flat lists; they live below `geometry`, which uses them too
from ..segments import group_pairs, offsets_from_counts, rows_of, spread_subset  # noqa: F401

# Largest parameter count over the supported camera models (FULL_OPENCV-sized); params rows
# are zero-padded to this width so that mixed-model cameras live in one tensor.
MAX_CAMERA_PARAMS = 12

# COLMAP's TwoViewGeometry configuration types (src/colmap/geometry/two_view_geometry.h).
TWO_VIEW_UNDEFINED = 0
TWO_VIEW_DEGENERATE = 1
TWO_VIEW_CALIBRATED = 2
TWO_VIEW_UNCALIBRATED = 3
TWO_VIEW_PLANAR = 4
TWO_VIEW_PANORAMIC = 5
TWO_VIEW_PLANAR_OR_PANORAMIC = 6
TWO_VIEW_WATERMARK = 7
TWO_VIEW_MULTIPLE = 8


class _TensorBag:
    """Mixin: `.to()`/`.clone()` over every tensor field, other fields copied as they are."""

    def _map(self, fn):
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = fn(v) if isinstance(v, Tensor) else (list(v) if isinstance(v, list) else v)
        return type(self)(**out)

    def to(self, device=None, dtype: torch.dtype | None = None):
        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self._map(move)

    def clone(self):
        return self._map(lambda t: t.clone())

    @property
    def device(self) -> torch.device:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                return v.device
        return torch.device("cpu")


INDEX_DTYPE = torch.int32  # storage of per-match / per-observation indices (see the module doc)
_INT32_MAX = 2**31 - 1


def compact_index(t: Tensor) -> Tensor:
    """`t` as int32 when it is an integer tensor whose values fit, else unchanged."""
    if t.dtype == INDEX_DTYPE or t.is_floating_point() or t.dtype == torch.bool:
        return t
    if t.numel() and (int(t.max()) > _INT32_MAX or int(t.min()) < -_INT32_MAX):
        return t
    return t.to(INDEX_DTYPE)


def storage_bytes(obj) -> int:
    """Bytes held by the tensors of a container or Reconstruction (views counted at their size)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if obj is None or not dataclasses.is_dataclass(obj):
        return 0
    return sum(storage_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))


def wide_indices(rec: "Reconstruction") -> list[str]:
    """The per-match and per-observation index tensors of `rec` that are wider than they need
    to be (int64 where int32 holds the values): an empty list when the storage is compact."""
    out = []
    fields = [("tracks." + f, getattr(rec.tracks, f)) for f in ("point", "image", "keypoint")]
    if rec.view_graph is not None:
        fields.append(("view_graph.matches", rec.view_graph.matches))
    for name, t in fields:
        if compact_index(t).dtype != t.dtype:
            out.append(f"{name} is {t.dtype} ({t.numel()} values fit in {INDEX_DTYPE})")
    return out


@dataclass
class Cameras(_TensorBag):
    camera_id: Tensor  # (C,) int64, COLMAP camera_id
    model_id: Tensor  # (C,) int64, COLMAP CameraModelId value
    width: Tensor  # (C,) int64
    height: Tensor  # (C,) int64
    params: Tensor  # (C, MAX_CAMERA_PARAMS) float, zero-padded in COLMAP's parameter order
    has_prior_focal_length: Tensor  # (C,) bool

    def __len__(self) -> int:
        return int(self.camera_id.numel())

    @property
    def model_names(self) -> list[str]:
        from .camera_models import model_name

        return [model_name(int(m)) for m in self.model_id.tolist()]


@dataclass
class Images(_TensorBag):
    image_id: Tensor  # (I,) int64, COLMAP image_id
    name: list[str]  # (I,) path relative to the image root, POSIX separators
    camera: Tensor  # (I,) int64 row index into Cameras
    quat: Tensor  # (I, 4) cam_from_world rotation, w-first unit quaternion
    trans: Tensor  # (I, 3) cam_from_world translation
    registered: Tensor  # (I,) bool: has a pose

    def __len__(self) -> int:
        return int(self.image_id.numel())

    @property
    def rotation(self) -> Tensor:
        """cam_from_world rotation matrices (I, 3, 3)."""
        return so3.quat_to_matrix(self.quat)

    @property
    def centers(self) -> Tensor:
        """Camera centres in world coordinates (I, 3)."""
        return -(self.rotation.transpose(-1, -2) @ self.trans[..., None])[..., 0]


@dataclass
class Keypoints(_TensorBag):
    """2D points of all images, flat. For a COLMAP model these are the images' `points2D`."""

    xy: Tensor  # (K, 2) float pixels, stored at their measured precision (see the module doc)
    offsets: Tensor  # (I+1,) int64

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Keypoints":
        """Moves to `device`; the measurements keep their dtype (`dtype` is ignored)."""
        return super().to(device)

    def count(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def image_of(self) -> Tensor:
        return rows_of(self.offsets)

    def flat_index(self, image: Tensor, keypoint: Tensor) -> Tensor:
        """(image row, keypoint index within image) -> row in `xy`."""
        return self.offsets[image] + keypoint

    def of_image(self, i: int) -> Tensor:
        return self.xy[int(self.offsets[i]) : int(self.offsets[i + 1])]


@dataclass
class Points3D(_TensorBag):
    point3D_id: Tensor  # (P,) int64
    xyz: Tensor  # (P, 3) float, point3D_in_world
    rgb: Tensor  # (P, 3) uint8
    error: Tensor  # (P,) float, mean reprojection error in pixels (-1 when unknown)

    def __len__(self) -> int:
        return int(self.point3D_id.numel())


@dataclass
class Tracks(_TensorBag):
    """Observations of 3D points, flat and sorted by point."""

    point: Tensor  # (O,) int32 row into Points3D (or track index before triangulation)
    image: Tensor  # (O,) int32 row into Images
    keypoint: Tensor  # (O,) int32 index within that image's keypoints (COLMAP point2D_idx)

    def __post_init__(self):
        self.point, self.image, self.keypoint = (compact_index(t) for t in (self.point, self.image, self.keypoint))

    def __len__(self) -> int:
        return int(self.point.numel())

    def offsets(self, num_points: int) -> Tensor:
        return offsets_from_counts(torch.bincount(self.point, minlength=num_points))

    def lengths(self, num_points: int) -> Tensor:
        return torch.bincount(self.point, minlength=num_points)


@dataclass
class ViewGraph(_TensorBag):
    """Verified image pairs with their inlier matches and two-view geometry."""

    pairs: Tensor  # (E, 2) int64 image rows (i, j), i < j
    config: Tensor  # (E,) int64 TwoViewGeometry configuration (TWO_VIEW_*)
    F: Tensor  # (E, 3, 3) fundamental matrix (x_j^T F x_i = 0, pixels); zeros when absent
    E: Tensor  # (E, 3, 3) essential matrix; zeros when absent
    H: Tensor  # (E, 3, 3) homography (x_j ~ H x_i); zeros when absent
    rel_quat: Tensor  # (E, 4) cam_j_from_cam_i rotation, w-first (identity when unknown)
    rel_trans: Tensor  # (E, 3) cam_j_from_cam_i translation (zeros when unknown)
    matches: Tensor  # (M, 2) int32 keypoint index in image i, in image j
    match_offsets: Tensor  # (E+1,) int64
    valid: Tensor  # (E,) bool: pair still used by the mapper

    def __post_init__(self):
        self.matches = compact_index(self.matches)

    def __len__(self) -> int:
        return int(self.pairs.shape[0])

    def num_matches(self) -> Tensor:
        return self.match_offsets[1:] - self.match_offsets[:-1]

    def pair_of_match(self) -> Tensor:
        return rows_of(self.match_offsets)

    def chunks(self, max_matches: int) -> list[tuple[int, int]]:
        """Consecutive pair ranges [e0, e1) holding at most `max_matches` matches each (a pair
        with more is a range of its own): per-match passes over the graph in bounded memory."""
        off = self.match_offsets.cpu()
        out, e0, E = [], 0, len(self)
        while e0 < E:
            e1 = int(torch.searchsorted(off, off[e0] + max(int(max_matches), 1), right=True)) - 1
            e1 = min(max(e1, e0 + 1), E)
            out.append((e0, e1))
            e0 = e1
        return out

    def pair_slice(self, e0: int, e1: int) -> "ViewGraph":
        """Pairs e0..e1-1 and their matches, as views of this graph's tensors (no copy)."""
        m0, m1 = int(self.match_offsets[e0]), int(self.match_offsets[e1])
        return ViewGraph(self.pairs[e0:e1], self.config[e0:e1], self.F[e0:e1], self.E[e0:e1], self.H[e0:e1],
                         self.rel_quat[e0:e1], self.rel_trans[e0:e1], self.matches[m0:m1],
                         self.match_offsets[e0:e1 + 1] - m0, self.valid[e0:e1])

    @staticmethod
    def empty(dtype=torch.float64, device=None) -> "ViewGraph":
        z = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        return ViewGraph(
            pairs=z(0, 2, dt=torch.long), config=z(0, dt=torch.long), F=z(0, 3, 3), E=z(0, 3, 3), H=z(0, 3, 3),
            rel_quat=z(0, 4), rel_trans=z(0, 3), matches=z(0, 2, dt=torch.long),
            match_offsets=z(1, dt=torch.long), valid=z(0, dt=torch.bool),
        )


@dataclass
class Reconstruction:
    """A sparse model: what a COLMAP `sparse/N` folder holds, as tensors."""

    cameras: Cameras
    images: Images
    keypoints: Keypoints
    points3D: Points3D
    tracks: Tracks
    view_graph: ViewGraph | None = None
    meta: dict = field(default_factory=dict)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Reconstruction":
        return Reconstruction(
            self.cameras.to(device, dtype), self.images.to(device, dtype), self.keypoints.to(device, dtype),
            self.points3D.to(device, dtype), self.tracks.to(device, dtype),
            None if self.view_graph is None else self.view_graph.to(device, dtype), dict(self.meta),
        )

    def clone(self) -> "Reconstruction":
        return Reconstruction(
            self.cameras.clone(), self.images.clone(), self.keypoints.clone(), self.points3D.clone(),
            self.tracks.clone(), None if self.view_graph is None else self.view_graph.clone(), dict(self.meta),
        )

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def dtype(self) -> torch.dtype:
        return self.images.quat.dtype

    def observation_xy(self) -> Tensor:
        """Measured pixel of every track observation (O, 2)."""
        return self.observation_xy_of(self.tracks)

    def observation_xy_of(self, tracks: "Tracks") -> Tensor:
        """Measured pixel of every observation of `tracks` (O, 2), in the model's dtype."""
        return self.keypoints.xy[self.keypoints.flat_index(tracks.image, tracks.keypoint)].to(self.dtype)

    def point_of_keypoint(self) -> Tensor:
        """(K,) int64: the row in points3D (or track index) each keypoint observes, -1 for none."""
        kp = self.keypoints
        out = torch.full((len(kp),), -1, dtype=torch.long, device=kp.xy.device)
        out[kp.flat_index(self.tracks.image, self.tracks.keypoint)] = self.tracks.point.long()
        return out

    def summary(self) -> dict:
        n_reg = int(self.images.registered.sum())
        lengths = self.tracks.lengths(len(self.points3D)).to(torch.float64)
        return {
            "cameras": len(self.cameras),
            "images": len(self.images),
            "registered_images": n_reg,
            "points3D": len(self.points3D),
            "observations": len(self.tracks),
            "mean_track_length": float(lengths.mean()) if lengths.numel() else 0.0,
        }
