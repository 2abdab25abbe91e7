"""Seeded synthetic scenes with known answers: true poses, points, tracks, noisy keypoints and a
view graph of (optionally contaminated) matches. Degenerate scenes built from explicit poses and
points (no parallax, a plane, a symmetric object) are in `torchsfm.synthetic.degenerate`.

Everything is generated on the CPU in float64 from one torch.Generator, so a seed gives the
same scene on every machine, then moved to the requested device/dtype. Projection goes through
`torchsfm.cameras.models` (COLMAP's camera models), so keypoints are what COLMAP would predict.

Layouts (world axes as the camera's: x right, y down, z forward):
- ring: cameras evenly spaced on a horizontal circle around an object, looking at its centre;
- sphere: cameras on a sphere around the object looking at the centre (as pycolmap's
  synthesize_dataset);
- random: cameras at random distances and directions, aimed near the centre, random roll;
- forward: a camera moving along +z through a corridor whose walls carry the points;
- loop: a camera driving `loop_laps` times around a closed circular corridor (every place is
  seen once per lap: loop closures everywhere), with the images in random order (nothing in the
  image ids follows the path), for unordered collections matched by retrieval.
Object points lie in a shell around the origin and are seen only from the side they face
(`max_view_angle_deg`), so tracks are partial, as on real objects. A point is observed by an
image when it is in front of it, projects inside it (with a margin that keeps noisy keypoints
inside too) and, for the corridors, is closer than 15 units (only the images near a point are
tested then, so generation stays linear in the number of images). Only points seen by >= 2 images are
kept; every image must see at least `min_pair_matches` points and the view graph must be
connected, else ValueError (with what to change).

Keypoints are exactly the observations (one per track element), in random order within each
image so that indices carry no information. The view graph holds every pair (per `match_graph`)
sharing >= `min_pair_matches` points, with all their true matches plus outliers; `retrieval` keeps, for every image, its
`retrieval_neighbors` pairs sharing the most points (what image retrieval would propose). Its geometry is
the ground truth: rel_quat/rel_trans = cam_j_from_cam_i (metric translation), E = [t/|t|]x R,
F = K_j^-T E K_i^-1 scaled to unit Frobenius norm (exact for undistorted pixels; distortion
moves distorted keypoints off the epipolar lines, by ~0.1 pixel at the default distortion), H = 0 (absent).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..cameras.models import calibration_matrix, default_params, project_cameras
from ..data.camera_models import model_info
from ..data.model import (
    TWO_VIEW_CALIBRATED,
    TWO_VIEW_UNCALIBRATED,
    Cameras,
    Images,
    Keypoints,
    Points3D,
    Reconstruction,
    Tracks,
    ViewGraph,
    group_pairs,
    offsets_from_counts,
)
from ..geometry import se3, so3
from ..io.database import first_occurrence, write_database

logger = logging.getLogger(__name__)

LAYOUTS = ("ring", "sphere", "forward", "random", "loop")
MATCH_GRAPHS = ("exhaustive", "sequential", "sparse", "retrieval")
_LOCAL_LAYOUTS = ("forward", "loop")  # points are seen only from nearby images

# Small distortion by default, per model (COLMAP parameter order after f/cx/cy).
DEFAULT_DISTORTION = {
    "SIMPLE_PINHOLE": (),
    "PINHOLE": (),
    "SIMPLE_RADIAL": (-0.02,),
    "RADIAL": (-0.02, 0.005),
    "OPENCV": (-0.02, 0.005, 0.0005, -0.0005),
    "OPENCV_FISHEYE": (0.01, -0.005, 0.001, 0.0),
}

_OBJECT_RADIUS = 1.0  # object points lie in the shell [0.6, 1.0] * radius
_CAMERA_DISTANCE = 4.5  # ring / sphere
_CORRIDOR = (2.0, 1.5)  # half width, half height
_CORRIDOR_STEP = 0.6  # forward motion per image
_CORRIDOR_MAX_DEPTH = 15.0
_LOOP_LANE = 0.4  # loop: radial offset between the lanes of successive laps


@dataclass
class SyntheticOptions:
    num_images: int = 20
    num_points: int = 500
    layout: str = "ring"  # ring | sphere | forward | random | loop
    camera_model: str = "SIMPLE_RADIAL"
    # 1: all images share one camera; num_images: one camera per image; k: k contiguous groups.
    num_cameras: int = 1
    width: int = 640
    height: int = 480
    focal: float | None = None  # default 1.2 * max(width, height)
    focal_jitter: float = 0.0  # per-camera focal = focal * (1 + U(-jitter, jitter))
    distortion: tuple[float, ...] | None = None  # default DEFAULT_DISTORTION[camera_model]
    # true principal point = image centre + this (pixels); mapper_input() starts from the centre,
    # as a database without calibration does
    principal_point_offset: tuple[float, float] = (0.0, 0.0)
    pixel_noise: float = 0.0  # std of the Gaussian added to each keypoint coordinate (pixels)
    outlier_ratio: float = 0.0  # wrong matches / all matches of every pair
    match_graph: str = "exhaustive"  # exhaustive | sequential | sparse | retrieval
    sequential_overlap: int = 5  # sequential: pairs (i, j) with j - i <= overlap
    retrieval_neighbors: int = 20  # retrieval: pairs per image, most shared points first
    loop_laps: int = 3  # loop: laps around the corridor
    sparse_ratio: float = 0.5  # sparse: fraction of co-visible pairs kept beyond a spanning tree
    min_pair_matches: int = 15  # pairs with fewer true matches are not in the view graph
    max_view_angle_deg: float = 75.0  # object layouts: largest angle between normal and view ray
    seed: int = 0
    has_prior_focal_length: bool = True

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.match_graph not in MATCH_GRAPHS:
            raise ValueError(f"match_graph must be one of {MATCH_GRAPHS}, not {self.match_graph!r}")
        if self.num_images < 2 or self.num_points < 1:
            raise ValueError("need at least 2 images and 1 point")
        if not 1 <= self.num_cameras <= self.num_images:
            raise ValueError(f"num_cameras must be in [1, num_images={self.num_images}], not {self.num_cameras}")
        if not 0.0 <= self.outlier_ratio < 1.0:
            raise ValueError(f"outlier_ratio must be in [0, 1), not {self.outlier_ratio}")
        if self.loop_laps < 1 or self.retrieval_neighbors < 1:
            raise ValueError("loop_laps and retrieval_neighbors must be >= 1")
        if not 0.0 <= self.sparse_ratio <= 1.0:
            raise ValueError(f"sparse_ratio must be in [0, 1], not {self.sparse_ratio}")
        if self.pixel_noise < 0:
            raise ValueError("pixel_noise must be >= 0")
        info = model_info(self.camera_model)
        if self.distortion is not None and len(self.distortion) != len(info.extra):
            raise ValueError(f"{info.name} takes {len(info.extra)} distortion parameters, got {self.distortion}")


@dataclass
class SyntheticScene:
    gt: Reconstruction  # true poses/points/intrinsics; keypoints are the noisy observed pixels
    view_graph: ViewGraph  # true matches of the chosen pairs plus outliers, GT geometry
    options: SyntheticOptions
    is_outlier: Tensor  # (M,) bool, aligned with view_graph.matches

    def mapper_input(self) -> Reconstruction:
        """What a mapper starts from: the same cameras, keypoints and view graph, no poses or points."""
        gt = self.gt
        n = len(gt.images)
        quat = torch.zeros_like(gt.images.quat)
        quat[:, 0] = 1
        images = Images(gt.images.image_id.clone(), list(gt.images.name), gt.images.camera.clone(), quat,
                        torch.zeros_like(gt.images.trans), torch.zeros(n, dtype=torch.bool, device=gt.device))
        z = gt.points3D.xyz
        points = Points3D(gt.points3D.point3D_id[:0], z[:0], gt.points3D.rgb[:0], gt.points3D.error[:0])
        tracks = Tracks(gt.tracks.point[:0], gt.tracks.image[:0], gt.tracks.keypoint[:0])
        cameras = gt.cameras.clone()
        cameras.params[:, list(model_info(int(gt.cameras.model_id[0])).principal)] -= torch.tensor(
            self.options.principal_point_offset, dtype=cameras.params.dtype, device=cameras.params.device)
        return Reconstruction(cameras, images, gt.keypoints.clone(), points, tracks,
                              self.view_graph.clone(), {"synthetic": dict(gt.meta.get("synthetic", {}))})


# ---------------------------------------------------------------------------------------------
# Poses


def _look_at(centers: Tensor, targets: Tensor, roll: Tensor) -> Tensor:
    """cam_from_world rotations (N, 3, 3) of cameras at `centers` looking at `targets`, with the
    image y axis as close to world +y (down) as possible, then rolled about the optical axis."""
    z = torch.nn.functional.normalize(targets - centers, dim=-1)
    down = torch.tensor([0.0, 1.0, 0.0], dtype=z.dtype).expand_as(z)
    alt = torch.tensor([0.0, 0.0, 1.0], dtype=z.dtype).expand_as(z)
    x = torch.linalg.cross(down, z)
    degenerate = x.norm(dim=-1, keepdim=True) < 1e-6  # looking straight up or down
    x = torch.where(degenerate, torch.linalg.cross(alt, z), x)
    x = torch.nn.functional.normalize(x, dim=-1)
    y = torch.linalg.cross(z, x)
    world_from_cam = torch.stack([x, y, z], -1)
    c, s = torch.cos(roll), torch.sin(roll)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    Rz = torch.stack([torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1),
                      torch.stack([zero, zero, one], -1)], -2)
    return Rz @ world_from_cam.transpose(-1, -2)


def _unit(n: int, g: torch.Generator) -> Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)


def _poses(o: SyntheticOptions, g: torch.Generator) -> tuple[Tensor, Tensor]:
    n = o.num_images
    rnd = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if o.layout == "forward":
        centers = torch.zeros(n, 3, dtype=torch.float64)
        centers[:, 2] = torch.arange(n, dtype=torch.float64) * _CORRIDOR_STEP
        centers[:, :2] += 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        R = so3.exp(math.radians(2.0) * torch.randn(n, 3, generator=g, dtype=torch.float64))
    elif o.layout == "loop":
        radius, path = _loop_geometry(o)
        theta = path / radius
        lap = torch.floor(path * o.loop_laps / (n * _CORRIDOR_STEP)).clamp_max(o.loop_laps - 1)
        r = radius + _LOOP_LANE * (lap - (o.loop_laps - 1) / 2) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        y = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        centers = torch.stack([r * torch.cos(theta), y, r * torch.sin(theta)], -1)
        ahead = torch.stack([-torch.sin(theta), torch.zeros_like(theta), torch.cos(theta)], -1)  # driving direction
        R = _look_at(centers, centers + ahead, torch.zeros(n, dtype=torch.float64))
        R = so3.exp(math.radians(2.0) * torch.randn(n, 3, generator=g, dtype=torch.float64)) @ R
        perm = torch.randperm(n, generator=g)  # unordered: image ids do not follow the path
        centers, R = centers[perm], R[perm]
    else:
        targets = 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64)
        roll = torch.zeros(n, dtype=torch.float64)
        if o.layout == "ring":
            theta = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
            r = _CAMERA_DISTANCE * (1 + 0.05 * (2 * rnd(n) - 1))
            centers = torch.stack([r * torch.cos(theta), 0.3 * (2 * rnd(n) - 1), r * torch.sin(theta)], -1)
        elif o.layout == "sphere":
            centers = _CAMERA_DISTANCE * _unit(n, g)
        else:  # random
            centers = _unit(n, g) * (3.5 + 3.5 * rnd(n))[:, None]
            targets = 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
            roll = math.pi * (2 * rnd(n) - 1)
        R = _look_at(centers, targets, roll)
    t = -(R @ centers[..., None])[..., 0]
    return R, t


# ---------------------------------------------------------------------------------------------
# Points and visibility


def _loop_geometry(o: SyntheticOptions) -> tuple[float, Tensor]:
    """Loop layout: the corridor's centre-line radius and each image's distance along the path
    (all laps one after the other)."""
    circumference = o.num_images * _CORRIDOR_STEP / o.loop_laps
    return circumference / (2 * math.pi), torch.arange(o.num_images, dtype=torch.float64) * _CORRIDOR_STEP


def _candidate_points(o: SyntheticOptions, n: int, g: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """(n, 3) points and their surface normals (None: no facing test)."""
    rnd = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if o.layout == "loop":  # the walls, floor and ceiling of a circular corridor
        a, b = _CORRIDOR
        radius, _ = _loop_geometry(o)
        a = a + _LOOP_LANE * (o.loop_laps - 1) / 2  # room for every lap's lane
        theta = 2 * math.pi * rnd(n)
        s = 2 * rnd(n) - 1
        wall = torch.multinomial(torch.tensor([b, b, a, a], dtype=torch.float64), n, replacement=True, generator=g)
        r = radius + torch.where(wall == 0, -a, torch.where(wall == 1, a, s * a))
        y = torch.where(wall == 2, -b, torch.where(wall == 3, b, s * b))
        return torch.stack([r * torch.cos(theta), y, r * torch.sin(theta)], -1), None
    if o.layout == "forward":
        a, b = _CORRIDOR
        z_max = (o.num_images - 1) * _CORRIDOR_STEP + _CORRIDOR_MAX_DEPTH
        z = -1.0 + (z_max + 1.0) * rnd(n)
        s = 2 * rnd(n) - 1
        wall = torch.multinomial(torch.tensor([b, b, a, a], dtype=torch.float64), n, replacement=True, generator=g)
        x = torch.where(wall == 0, -a, torch.where(wall == 1, a, s * a))
        y = torch.where(wall == 2, -b, torch.where(wall == 3, b, s * b))
        return torch.stack([x, y, z], -1), None
    d = _unit(n, g)
    r = _OBJECT_RADIUS * (0.6 + 0.4 * rnd(n))
    return d * r[:, None], d


def _visible(o: SyntheticOptions, cameras: Cameras, cam_of_img: Tensor, R: Tensor, t: Tensor, X: Tensor,
             normals: Tensor | None, point: Tensor, image: Tensor, p_cam: Tensor) -> tuple[Tensor, Tensor]:
    """For candidate (point, image) pairs (K,) with camera-frame points p_cam (K, 3): visible (K,)
    bool and true pixels uv (K, 2)."""
    cam = cam_of_img[image]
    uv = project_cameras(cameras, cam, p_cam)
    z = p_cam[:, 2]
    margin = 1.0 + 4.0 * o.pixel_noise
    W = cameras.width[cam].to(X.dtype)
    H = cameras.height[cam].to(X.dtype)
    inside = (uv[:, 0] >= margin) & (uv[:, 0] <= W - margin) & (uv[:, 1] >= margin) & (uv[:, 1] <= H - margin)
    # Distortion polynomials fold back far outside the field of view; bound the pinhole ray too.
    f = calibration_matrix(cameras)[cam, 0, 0]
    r_max = 1.5 * 0.5 * torch.maximum(W, H) / f
    zs = z.clamp_min(1e-9)
    r_pinhole = (p_cam[:, :2] / zs[:, None]).norm(dim=-1)
    vis = (z > 0.05) & inside & (r_pinhole < r_max) & torch.isfinite(uv).all(-1)
    if o.layout in _LOCAL_LAYOUTS:
        vis &= z < _CORRIDOR_MAX_DEPTH
    if normals is not None:
        ray = torch.nn.functional.normalize(se3.center(R[image], t[image]) - X[point], dim=-1)
        vis &= (ray * normals[point]).sum(-1) > math.cos(math.radians(o.max_view_angle_deg))
    return vis, uv


def _observations(o: SyntheticOptions, cameras: Cameras, cam_of_img: Tensor, R: Tensor, t: Tensor, X: Tensor,
                  normals: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Visible observations (point, image, true uv) of points X (P, 3), sorted by (point, image).
    Corridors only test the images within reach of each point (a visible point is at most ~1.2x
    the maximum depth away), so the cost follows the observations, not points x images."""
    P, N = X.shape[0], R.shape[0]
    if o.layout in _LOCAL_LAYOUTS:
        near = torch.cdist(X, se3.center(R, t)) < 1.5 * _CORRIDOR_MAX_DEPTH
        point, image = torch.nonzero(near, as_tuple=True)
        p_cam = (R[image] @ X[point][:, :, None])[:, :, 0] + t[image]
    else:
        point = torch.arange(P).repeat_interleave(N)
        image = torch.arange(N).repeat(P)
        p_cam = (torch.einsum("nij,pj->pni", R, X) + t[None]).reshape(-1, 3)
    vis, uv = _visible(o, cameras, cam_of_img, R, t, X, normals, point, image, p_cam)
    return point[vis], image[vis], uv[vis]


# ---------------------------------------------------------------------------------------------
# Matches


def _select_pairs(o: SyntheticOptions, keys: Tensor, counts: Tensor, g: torch.Generator) -> Tensor:
    """Keys (i * N + j) of the pairs in the view graph, sorted."""
    N = o.num_images
    cand = counts >= o.min_pair_matches
    keys, counts = keys[cand], counts[cand]
    i, j = keys // N, keys % N
    if o.match_graph == "exhaustive":
        return keys
    if o.match_graph == "sequential":
        return keys[(j - i) <= o.sequential_overlap]
    if o.match_graph == "retrieval":  # each image's neighbours sharing the most points
        img = torch.cat([i, j])
        cnt = torch.cat([counts, counts])
        order = torch.argsort(-cnt, stable=True)
        order = order[torch.argsort(img[order], stable=True)]
        first = torch.ones(order.numel(), dtype=torch.bool)
        first[1:] = img[order][1:] != img[order][:-1]
        pos = torch.arange(order.numel())
        rank = pos - torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
        top = torch.zeros(img.numel(), dtype=torch.bool)
        top[order[rank < o.retrieval_neighbors]] = True
        return keys[top[: keys.numel()] | top[keys.numel():]]
    # sparse: a maximum co-visibility spanning tree keeps the graph connected; other pairs are
    # kept at random with probability sparse_ratio.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    w = coo_matrix(((1.0 / counts.double()).numpy(), (i.numpy(), j.numpy())), shape=(N, N))
    tree = minimum_spanning_tree(w).tocoo()
    tree_keys = torch.from_numpy(tree.row.astype(np.int64) * N + tree.col.astype(np.int64))
    in_tree = torch.isin(keys, tree_keys)
    extra = torch.rand(keys.numel(), generator=g, dtype=torch.float64) < o.sparse_ratio
    return keys[in_tree | extra]


def _check_connected(N: int, keys: Tensor) -> None:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = (keys // N).numpy(), (keys % N).numpy()
    n_comp, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(N, N)), directed=False)
    if n_comp > 1:
        sizes = np.bincount(labels)
        raise ValueError(
            f"the synthetic view graph has {n_comp} components (sizes {sorted(sizes.tolist(), reverse=True)[:5]}...); "
            "raise num_points, lower min_pair_matches or use a denser match_graph"
        )


def _outliers(o: SyntheticOptions, n_in: Tensor, pair_i: Tensor, pair_j: Tensor, kp_count: Tensor,
              kp_point: Tensor, kp_offsets: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Wrong matches: (pair index, (keypoint in i, keypoint in j)) with the keypoints observing
    different points, no repeats, n_out = round(n_in * r / (1 - r)) per pair."""
    r = o.outlier_ratio
    n_out = torch.round(n_in.double() * r / (1 - r)).long()
    if int(n_out.sum()) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long)
    draws = 2 * n_out + 8  # oversample; rejected draws are rare
    e = torch.repeat_interleave(torch.arange(n_in.numel()), draws)
    ci, cj = kp_count[pair_i[e]], kp_count[pair_j[e]]
    ka = (torch.rand(e.numel(), generator=g, dtype=torch.float64) * ci).long().clamp_max(ci - 1)
    kb = (torch.rand(e.numel(), generator=g, dtype=torch.float64) * cj).long().clamp_max(cj - 1)
    wrong = kp_point[kp_offsets[pair_i[e]] + ka] != kp_point[kp_offsets[pair_j[e]] + kb]
    base = int(kp_count.max()) + 1
    ok = wrong & first_occurrence((e * base + ka) * base + kb)  # no repeated (pair, ka, kb)
    # Rank of each accepted draw within its pair; the first n_out of each pair are kept.
    csum = torch.cumsum(ok.long(), 0)
    before = torch.cat([csum.new_zeros(1), csum])[offsets_from_counts(draws)[:-1]]
    rank = csum - 1 - before[e]
    take = ok & (rank < n_out[e])
    short = int(n_out.sum()) - int(take.sum())
    if short:
        logger.debug("synthetic outliers: %d fewer than requested (tiny images)", short)
    return e[take], torch.stack([ka[take], kb[take]], -1)


# ---------------------------------------------------------------------------------------------


def _cameras(o: SyntheticOptions, g: torch.Generator) -> Cameras:
    info = model_info(o.camera_model)
    C = o.num_cameras
    f0 = o.focal if o.focal is not None else 1.2 * max(o.width, o.height)
    focal = f0 * (1 + o.focal_jitter * (2 * torch.rand(C, generator=g, dtype=torch.float64) - 1))
    params = default_params(info.name, focal, torch.full((C,), o.width), torch.full((C,), o.height))
    dist = DEFAULT_DISTORTION[info.name] if o.distortion is None else tuple(o.distortion)
    if info.extra:
        params[:, list(info.extra)] = torch.tensor(dist, dtype=torch.float64)
    params[:, list(info.principal)] += torch.tensor(o.principal_point_offset, dtype=torch.float64)
    return Cameras(
        camera_id=torch.arange(1, C + 1),
        model_id=torch.full((C,), info.model_id),
        width=torch.full((C,), o.width),
        height=torch.full((C,), o.height),
        params=params,
        has_prior_focal_length=torch.full((C,), o.has_prior_focal_length),
    )


def synthesize(options: SyntheticOptions | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float64) -> SyntheticScene:
    """Generate a scene; the same options (seed included) always give the same scene."""
    o = options or SyntheticOptions()
    o.validate()
    g = torch.Generator().manual_seed(int(o.seed))
    N = o.num_images

    cameras = _cameras(o, g)
    cam_of_img = (torch.arange(N) * o.num_cameras) // N
    R, t = _poses(o, g)

    # Points: rejection rounds of candidate batches until enough are seen by >= 2 images. Only
    # the visible (point, image) entries are kept, so memory follows the observations.
    batch_cap = max(64, 4_000_000 // N)
    Xs, obs_p, obs_i, obs_uv, have, idle = [], [], [], [], 0, 0
    while have < o.num_points:
        need = o.num_points - have
        X, normals = _candidate_points(o, min(max(2 * need, 64), batch_cap), g)
        point, img, uv = _observations(o, cameras, cam_of_img, R, t, X, normals)  # sorted by (point, image)
        good = torch.nonzero(torch.bincount(point, minlength=X.shape[0]) >= 2)[:, 0][:need]
        idle = idle + 1 if good.numel() == 0 else 0
        if idle >= 20:
            raise ValueError(f"could only place {have} of {o.num_points} points visible in >= 2 images "
                             f"({o.layout} layout)")
        local = torch.full((X.shape[0],), -1, dtype=torch.long)
        local[good] = torch.arange(good.numel())
        sel = local[point] >= 0
        Xs.append(X[good])
        obs_p.append(local[point[sel]] + have)
        obs_i.append(img[sel])
        obs_uv.append(uv[sel])
        have += good.numel()
    X = torch.cat(Xs)
    P = X.shape[0]
    obs_point, obs_image, uv_true = torch.cat(obs_p), torch.cat(obs_i), torch.cat(obs_uv)
    O = obs_point.numel()

    per_image = torch.bincount(obs_image, minlength=N)
    if int(per_image.min()) < o.min_pair_matches:
        raise ValueError(
            f"image {int(per_image.argmin())} sees only {int(per_image.min())} points (< min_pair_matches="
            f"{o.min_pair_matches}); raise num_points"
        )

    # Keypoints: each image's observations, in random order (indices carry no information).
    perm = torch.randperm(O, generator=g)
    order = perm[torch.sort(obs_image[perm], stable=True).indices]  # grouped by image, random within
    kp_count = per_image
    kp_offsets = offsets_from_counts(kp_count)
    obs_keypoint = torch.empty(O, dtype=torch.long)
    obs_keypoint[order] = torch.arange(O) - kp_offsets[obs_image[order]]
    xy_obs = uv_true + o.pixel_noise * torch.randn(O, 2, generator=g, dtype=torch.float64)
    kp_flat = kp_offsets[obs_image] + obs_keypoint
    kp_xy = torch.empty(O, 2, dtype=torch.float64)
    kp_xy[kp_flat] = xy_obs
    kp_point = torch.empty(O, dtype=torch.long)
    kp_point[kp_flat] = obs_point

    # Candidate pairs: every two observations of one point (image[a] < image[b]).
    a, b = group_pairs(obs_point, P)  # obs sorted by (point, image): image[a] < image[b]
    if o.match_graph == "sequential":  # drop far pairs early: they are most of a long track's pairs
        near = (obs_image[b] - obs_image[a]) <= o.sequential_overlap
        a, b = a[near], b[near]
    key = obs_image[a] * N + obs_image[b]
    dense = N * N <= 2**24  # pair tables indexed by key beat unique/isin/searchsorted
    if dense:
        counts = torch.bincount(key, minlength=N * N)
        uniq = torch.nonzero(counts)[:, 0]
        counts = counts[uniq]
    else:
        uniq, counts = torch.unique(key, return_counts=True)
    keys = _select_pairs(o, uniq, counts, g)
    if keys.numel() == 0:
        raise ValueError("no image pair shares min_pair_matches points")
    _check_connected(N, keys)
    pair_i, pair_j = keys // N, keys % N
    E = keys.numel()

    if dense:
        table = torch.full((N * N,), -1, dtype=torch.long)
        table[keys] = torch.arange(E)
        in_pair = table[key]
        sel = in_pair >= 0
        in_pair = in_pair[sel]
    else:
        sel = torch.isin(key, keys)
        in_pair = torch.searchsorted(keys, key[sel])
    in_matches = torch.stack([obs_keypoint[a[sel]], obs_keypoint[b[sel]]], -1)
    n_in = torch.bincount(in_pair, minlength=E)
    out_pair, out_matches = _outliers(o, n_in, pair_i, pair_j, kp_count, kp_point, kp_offsets, g)
    m_pair = torch.cat([in_pair, out_pair])
    matches = torch.cat([in_matches, out_matches])
    is_out = torch.cat([torch.zeros(in_pair.numel(), dtype=torch.bool), torch.ones(out_pair.numel(), dtype=torch.bool)])
    base = int(kp_count.max()) + 1
    srt = torch.sort((m_pair * base + matches[:, 0]) * base + matches[:, 1]).indices  # outliers interleaved
    m_pair, matches, is_out = m_pair[srt], matches[srt], is_out[srt]

    # Two-view geometry from the ground truth.
    R_rel, t_rel = se3.relative(R[pair_i], t[pair_i], R[pair_j], t[pair_j])
    t_dir = torch.nn.functional.normalize(t_rel, dim=-1)
    Ess = so3.skew(t_dir) @ R_rel
    K = calibration_matrix(cameras)
    Ki, Kj = K[cam_of_img[pair_i]], K[cam_of_img[pair_j]]
    Fm = torch.linalg.inv(Kj).transpose(-1, -2) @ Ess @ torch.linalg.inv(Ki)
    Fm = Fm / Fm.flatten(1).norm(dim=-1)[:, None, None]
    calibrated = cameras.has_prior_focal_length[cam_of_img[pair_i]] & cameras.has_prior_focal_length[cam_of_img[pair_j]]
    view_graph = ViewGraph(
        pairs=torch.stack([pair_i, pair_j], -1),
        config=torch.where(calibrated, TWO_VIEW_CALIBRATED, TWO_VIEW_UNCALIBRATED),
        F=Fm, E=Ess, H=torch.zeros(E, 3, 3, dtype=torch.float64),
        rel_quat=so3.matrix_to_quat(R_rel), rel_trans=t_rel,
        matches=matches, match_offsets=offsets_from_counts(torch.bincount(m_pair, minlength=E)),
        valid=torch.ones(E, dtype=torch.bool),
    )

    # Ground truth reconstruction.
    err = torch.zeros(P, dtype=torch.float64).index_add_(0, obs_point, (xy_obs - uv_true).norm(dim=-1))
    err = err / torch.bincount(obs_point, minlength=P).double()
    gt = Reconstruction(
        cameras=cameras,
        images=Images(
            image_id=torch.arange(1, N + 1), name=[f"image{i:05d}.png" for i in range(N)], camera=cam_of_img,
            quat=so3.matrix_to_quat(R), trans=t, registered=torch.ones(N, dtype=torch.bool),
        ),
        keypoints=Keypoints(xy=kp_xy, offsets=kp_offsets),
        points3D=Points3D(
            point3D_id=torch.arange(1, P + 1), xyz=X,
            rgb=torch.randint(0, 256, (P, 3), generator=g, dtype=torch.int64).to(torch.uint8), error=err,
        ),
        tracks=Tracks(point=obs_point, image=obs_image, keypoint=obs_keypoint),
        meta={"synthetic": dataclasses.asdict(o)},
    )
    logger.info("synthetic %s scene: %s, %d pairs, %d matches (%d outliers)", o.layout, gt.summary(), E,
                matches.shape[0], int(is_out.sum()))
    return SyntheticScene(gt.to(device, dtype), view_graph.to(device, dtype), o, is_out.to(device))


def write_synthetic_database(scene: SyntheticScene, path: str | Path, overwrite: bool = False) -> None:
    """Write the scene's cameras, images, keypoints and view graph as a COLMAP database, so that
    COLMAP's / GLOMAP's mappers run on exactly the same input as ours."""
    gt = scene.gt
    write_database(path, gt.cameras, gt.images, gt.keypoints, scene.view_graph, overwrite=overwrite)
