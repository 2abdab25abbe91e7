"""Hard synthetic scenes for the fault-injection suite, built from explicit poses and points.

`torchsfm.synthetic` draws poses from its layouts; the degenerate cases need poses it refuses to
make (all centres at one point) or structure it does not model (a plane, a symmetric object).
`scene_from_geometry` turns any poses + points into the same `SyntheticScene` (ground truth,
keypoints, view graph, optional database), with COLMAP's two-view conventions: pairs with a
baseline get E/F from the true relative pose, zero-baseline pairs are PANORAMIC with H = K_j R K_i^-1
and no F/E (as a matcher would report them).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..cameras.models import calibration_matrix, default_params, project_cameras
from ..data.camera_models import model_info
from ..data.model import (
    TWO_VIEW_CALIBRATED,
    TWO_VIEW_PANORAMIC,
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
from . import SyntheticOptions, SyntheticScene, _look_at


def scene_from_geometry(R: Tensor, t: Tensor, X: Tensor, *, width: int = 640, height: int = 480,
                        focal: float | None = None, camera_model: str = "PINHOLE", pixel_noise: float = 0.0,
                        has_prior_focal_length: bool = True, min_pair_matches: int = 15, seed: int = 0,
                        match_point: Tensor | None = None, normals: Tensor | None = None,
                        max_view_angle_deg: float = 75.0) -> SyntheticScene:
    """A scene seen by cameras cam_from_world (R (N,3,3), t (N,3)) of points X (P,3).

    A point is observed where it is in front of the camera and inside the image; pairs sharing
    >= `min_pair_matches` points are in the view graph with all their (true) matches.
    `match_point` (P,) optionally names, per point, the point its keypoints are *matched as*:
    observations of points p and q with match_point[p] == match_point[q] are matched across
    images as if they were one point (repetitive / symmetric structure: a pair then holds
    matches that are wrong but geometrically consistent with a wrong relative pose).
    `normals` (P,3): a point is seen only from within `max_view_angle_deg` of its normal.
    """
    g = torch.Generator().manual_seed(seed)
    R, t, X = R.double(), t.double(), X.double()
    N, P = R.shape[0], X.shape[0]
    info = model_info(camera_model)
    f = focal if focal is not None else 1.2 * max(width, height)
    w_, h_ = torch.tensor([width]), torch.tensor([height])
    cams = Cameras(camera_id=torch.tensor([1]), model_id=torch.tensor([info.model_id]), width=w_, height=h_,
                   params=default_params(info.name, torch.tensor([float(f)], dtype=torch.float64), w_, h_),
                   has_prior_focal_length=torch.tensor([has_prior_focal_length]))
    cam_of_img = torch.zeros(N, dtype=torch.long)
    p_cam = torch.einsum("nij,pj->pni", R, X) + t[None]  # (P, N, 3)
    uv = project_cameras(cams, cam_of_img[None].expand(P, N).reshape(-1), p_cam.reshape(-1, 3)).reshape(P, N, 2)
    m = 1.0 + 4.0 * pixel_noise
    vis = (p_cam[..., 2] > 0.05) & torch.isfinite(uv).all(-1)
    vis &= (uv[..., 0] >= m) & (uv[..., 0] <= width - m) & (uv[..., 1] >= m) & (uv[..., 1] <= height - m)
    if normals is not None:
        ray = torch.nn.functional.normalize(se3.center(R, t)[None] - X[:, None], dim=-1)
        vis &= (ray * normals.double()[:, None]).sum(-1) > math.cos(math.radians(max_view_angle_deg))
    seen = vis.sum(1) >= 2
    point_rows = torch.nonzero(seen)[:, 0]
    vis, uv, X = vis[seen], uv[seen], X[seen]
    key_of_point = (match_point[seen] if match_point is not None else torch.arange(P)[seen])
    P = X.shape[0]
    obs_point, obs_image = torch.nonzero(vis, as_tuple=True)  # sorted by (point, image)
    uv_true = uv[obs_point, obs_image]
    O = obs_point.numel()
    per_image = torch.bincount(obs_image, minlength=N)
    kp_offsets = offsets_from_counts(per_image)
    order = torch.sort(obs_image, stable=True).indices  # keypoints grouped by image, by point within
    obs_keypoint = torch.empty(O, dtype=torch.long)
    obs_keypoint[order] = torch.arange(O) - kp_offsets[obs_image[order]]
    xy = uv_true + pixel_noise * torch.randn(O, 2, generator=g, dtype=torch.float64)
    kp_xy = torch.empty(O, 2, dtype=torch.float64)
    kp_xy[kp_offsets[obs_image] + obs_keypoint] = xy

    # Matches: every two observations sharing a match key, in different images.
    mk = key_of_point[obs_point]
    srt = torch.sort(mk * N + obs_image, stable=True).indices
    grp = torch.unique_consecutive(mk[srt], return_inverse=True)[1]
    a, b = group_pairs(grp, int(grp.max()) + 1 if O else 0)
    a, b = srt[a], srt[b]
    diff = obs_image[a] != obs_image[b]
    a, b = a[diff], b[diff]
    swap = obs_image[a] > obs_image[b]
    a, b = torch.where(swap, b, a), torch.where(swap, a, b)
    key = obs_image[a] * N + obs_image[b]
    uniq, counts = torch.unique(key, return_counts=True)
    keys = uniq[counts >= min_pair_matches]
    sel = torch.isin(key, keys)
    pair_of = torch.searchsorted(keys, key[sel])
    mat = torch.stack([obs_keypoint[a[sel]], obs_keypoint[b[sel]]], -1)
    o = torch.argsort(pair_of * (O + 1) + mat[:, 0], stable=True)
    pair_of, mat = pair_of[o], mat[o]
    pi, pj = keys // N, keys % N
    E = keys.numel()

    Rr, tr = se3.relative(R[pi], t[pi], R[pj], t[pj])
    K = calibration_matrix(cams)[0]
    tn = tr.norm(dim=-1)
    moving = tn > 1e-9 * (1 + t.norm(dim=-1).max())
    td = tr / tn.clamp_min(1e-300)[:, None]
    Ess = torch.where(moving[:, None, None], so3.skew(td) @ Rr, torch.zeros_like(Rr))
    Fm = torch.linalg.inv(K).T @ Ess @ torch.linalg.inv(K)
    Fm = Fm / Fm.flatten(1).norm(dim=-1).clamp_min(1e-300)[:, None, None]
    Hm = torch.where(moving[:, None, None], torch.zeros_like(Rr), K @ Rr @ torch.linalg.inv(K))
    two_view = TWO_VIEW_CALIBRATED if has_prior_focal_length else TWO_VIEW_UNCALIBRATED
    vg = ViewGraph(pairs=torch.stack([pi, pj], -1), config=torch.where(moving, two_view, TWO_VIEW_PANORAMIC),
                   F=Fm, E=Ess, H=Hm, rel_quat=so3.matrix_to_quat(Rr), rel_trans=torch.where(moving[:, None], tr, 0.0),
                   matches=mat, match_offsets=offsets_from_counts(torch.bincount(pair_of, minlength=E)),
                   valid=torch.ones(E, dtype=torch.bool))
    err = torch.zeros(P, dtype=torch.float64).index_add_(0, obs_point, (xy - uv_true).norm(dim=-1))
    gt = Reconstruction(
        cameras=cams,
        images=Images(image_id=torch.arange(1, N + 1), name=[f"image{i:05d}.png" for i in range(N)],
                      camera=cam_of_img, quat=so3.matrix_to_quat(R), trans=t.clone(),
                      registered=torch.ones(N, dtype=torch.bool)),
        keypoints=Keypoints(xy=kp_xy, offsets=kp_offsets),
        points3D=Points3D(point3D_id=point_rows + 1, xyz=X, rgb=torch.zeros(P, 3, dtype=torch.uint8),
                          error=err / torch.bincount(obs_point, minlength=P).clamp_min(1)),
        tracks=Tracks(point=obs_point, image=obs_image, keypoint=obs_keypoint),
    )
    opts = SyntheticOptions(num_images=N, num_points=P, camera_model=camera_model, width=width, height=height,
                            focal=f, pixel_noise=pixel_noise, min_pair_matches=min_pair_matches, seed=seed,
                            has_prior_focal_length=has_prior_focal_length)
    return SyntheticScene(gt, vg, opts, torch.zeros(mat.shape[0], dtype=torch.bool))


def pure_rotation_scene(num_images: int = 8, num_points: int = 1500, step_deg: float = 15.0, pixel_noise: float = 0.3,
                        seed: int = 0) -> SyntheticScene:
    """A tripod panorama: every camera at the origin, yawing by `step_deg`, points far away."""
    g = torch.Generator().manual_seed(seed)
    yaw = torch.deg2rad(step_deg * torch.arange(num_images, dtype=torch.float64))
    pitch = torch.deg2rad(2.0 * torch.randn(num_images, generator=g, dtype=torch.float64))
    R = so3.exp(torch.stack([pitch, yaw, torch.zeros_like(yaw)], -1))  # cam_from_world
    d = torch.randn(num_points, 3, generator=g, dtype=torch.float64)
    d[:, 1] *= 0.3  # a band around the horizon
    X = 20.0 * torch.nn.functional.normalize(d, dim=-1) * (1 + 0.5 * torch.rand(num_points, 1, generator=g))
    t = torch.zeros(num_images, 3, dtype=torch.float64)
    return scene_from_geometry(R, t, X, pixel_noise=pixel_noise, seed=seed)


def planar_scene(num_images: int = 12, num_points: int = 800, pixel_noise: float = 0.3, seed: int = 0,
                 has_prior_focal_length: bool = True) -> SyntheticScene:
    """A nadir drone grid over flat ground: points on the plane y = 0 (y is down in our world
    frame, so the ground is below cameras at y = -height), cameras on a 3 x k grid looking down
    with a little tilt."""
    g = torch.Generator().manual_seed(seed)
    cols = math.ceil(num_images / 3)
    gx, gz = torch.meshgrid(torch.arange(cols, dtype=torch.float64), torch.arange(3, dtype=torch.float64),
                            indexing="ij")
    c = torch.stack([gx.reshape(-1) * 1.5, torch.full((cols * 3,), -8.0, dtype=torch.float64), gz.reshape(-1) * 1.5],
                    -1)[:num_images]
    c[:, [0, 2]] -= c[:, [0, 2]].mean(0)
    target = c.clone()
    target[:, 1] = 0.0
    target[:, [0, 2]] += 0.8 * torch.randn(num_images, 2, generator=g, dtype=torch.float64)
    R = _look_at(c, target, torch.deg2rad(10 * torch.randn(num_images, generator=g, dtype=torch.float64)))
    t = -(R @ c[..., None])[..., 0]
    ext = c[:, [0, 2]].abs().max(0).values + 6.0
    xz = (2 * torch.rand(num_points, 2, generator=g, dtype=torch.float64) - 1) * ext
    X = torch.stack([xz[:, 0], torch.zeros(num_points, dtype=torch.float64), xz[:, 1]], -1)
    return scene_from_geometry(R, t, X, pixel_noise=pixel_noise, seed=seed,
                               has_prior_focal_length=has_prior_focal_length)


def symmetric_scene(num_images: int = 12, num_points: int = 500, confused_pairs: float = 1.0, pixel_noise: float = 0.3,
                    seed: int = 0, fold: int = 2) -> tuple[SyntheticScene, Tensor]:
    """A `fold`-fold rotationally symmetric object on a ring of cameras: every point has copies
    rotated by 360/fold degrees about the vertical axis that look the same. Pairs of cameras
    about 360/fold degrees apart see different copies of one point and a matcher pairs them up:
    wrong matches that are consistent with a wrong relative pose.

    `confused_pairs` is the fraction of symmetric copies whose features are identical (1.0:
    fully symmetric; small: a few catastrophic outlier pairs). Returns the scene and a bool (E,)
    marking the view-graph pairs that carry such confused matches.
    """
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(num_points, 3, generator=g, dtype=torch.float64), dim=-1)
    base = d * (0.6 + 0.4 * torch.rand(num_points, 1, generator=g, dtype=torch.float64))
    copies, keys = [], []
    confused = torch.rand(num_points, generator=g) < confused_pairs
    for k in range(fold):
        a = 2 * math.pi * k / fold
        Ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]],
                          dtype=torch.float64)
        copies.append(base @ Ry.T)
        keys.append(torch.where(confused, torch.arange(num_points), torch.arange(num_points) + k * num_points))
    X, key = torch.cat(copies), torch.cat(keys)
    normals = torch.nn.functional.normalize(X, dim=-1)
    theta = 2 * math.pi * torch.arange(num_images, dtype=torch.float64) / num_images
    c = torch.stack([4.5 * torch.cos(theta), 0.3 * (2 * torch.rand(num_images, generator=g, dtype=torch.float64) - 1),
                     4.5 * torch.sin(theta)], -1)
    aim = 0.05 * torch.randn(num_images, 3, generator=g, dtype=torch.float64)
    R = _look_at(c, aim, torch.zeros(num_images, dtype=torch.float64))
    t = -(R @ c[..., None])[..., 0]
    scene = scene_from_geometry(R, t, X, pixel_noise=pixel_noise, seed=seed, match_point=key, normals=normals)
    # a pair is confused when one of its matches joins observations of different points
    gt, vg = scene.gt, scene.view_graph
    pt_of_kp = gt.point_of_keypoint()
    pm = vg.pair_of_match()
    pa = pt_of_kp[gt.keypoints.offsets[vg.pairs[pm, 0]] + vg.matches[:, 0]]
    pb = pt_of_kp[gt.keypoints.offsets[vg.pairs[pm, 1]] + vg.matches[:, 1]]
    wrong = pa != pb
    scene.is_outlier = wrong
    frac = torch.zeros(len(vg), dtype=torch.float64).index_add_(0, pm, wrong.double()) / vg.num_matches().clamp_min(1)
    return scene, frac > 0.5


def add_outlier_pairs(scene: SyntheticScene, pairs: list[tuple[int, int]], rotation_deg: float = 30.0,
                      seed: int = 0) -> SyntheticScene:
    """Catastrophic outlier pairs: for each (i, j), image j gets extra keypoints where the points
    image i sees would appear if j were rotated by `rotation_deg` (about a random axis) at the
    same centre, and the pair's matches become i's keypoints <-> those. Every such pair is a
    perfect two-view geometry (all inliers) that contradicts the rest of the view graph, as a
    repeated facade or a mismatched twin image would. Replaces the pair if it exists."""
    g = torch.Generator().manual_seed(seed)
    gt, vg = scene.gt, scene.view_graph
    N = len(gt.images)
    R, t = gt.images.rotation, gt.images.trans
    K = calibration_matrix(gt.cameras)
    kp = [gt.keypoints.of_image(i).clone() for i in range(N)]
    table = {}
    pm = vg.pair_of_match()
    for e, (i, j) in enumerate(vg.pairs.tolist()):
        sel = pm == e
        table[(i, j)] = (int(vg.config[e]), vg.F[e], vg.E[e], vg.H[e], vg.rel_quat[e], vg.rel_trans[e],
                         vg.matches[sel])
    wrong = set()
    for i, j in pairs:  # a handful of pairs: building the fixture, not a hot path
        i, j = min(i, j), max(i, j)
        axis = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
        Rw = so3.exp(math.radians(rotation_deg) * axis) @ R[j]
        tw = -(Rw @ se3.center(R[j], t[j]))
        obs = gt.tracks.image == i
        X = gt.points3D.xyz[gt.tracks.point[obs]]
        uv = project_cameras(gt.cameras, gt.images.camera[j].expand(X.shape[0]), X @ Rw.T + tw)
        z = (X @ Rw.T + tw)[:, 2]
        W, H = float(gt.cameras.width[gt.images.camera[j]]), float(gt.cameras.height[gt.images.camera[j]])
        ok = (z > 0.05) & (uv[:, 0] > 1) & (uv[:, 0] < W - 1) & (uv[:, 1] > 1) & (uv[:, 1] < H - 1)
        if int(ok.sum()) < 40:
            raise ValueError(f"pair ({i}, {j}): only {int(ok.sum())} points would be matched; pick another pair")
        new = len(kp[j]) + torch.arange(int(ok.sum()))
        kp[j] = torch.cat([kp[j], uv[ok]])
        mat = torch.stack([gt.tracks.keypoint[obs][ok], new], 1)
        Rr, tr = se3.relative(R[i], t[i], Rw, tw)
        Ess = so3.skew(tr / tr.norm()) @ Rr
        Ki, Kj = K[gt.images.camera[i]], K[gt.images.camera[j]]
        Fm = torch.linalg.inv(Kj).T @ Ess @ torch.linalg.inv(Ki)
        table[(i, j)] = (TWO_VIEW_CALIBRATED, Fm / Fm.norm(), Ess, torch.zeros(3, 3, dtype=torch.float64),
                         so3.matrix_to_quat(Rr), tr, mat)
        wrong.add((i, j))
    keys = sorted(table)
    rows = [table[k] for k in keys]
    counts = torch.tensor([r[6].shape[0] for r in rows])
    new_vg = ViewGraph(pairs=torch.tensor(keys), config=torch.tensor([r[0] for r in rows]),
                       F=torch.stack([r[1] for r in rows]), E=torch.stack([r[2] for r in rows]),
                       H=torch.stack([r[3] for r in rows]), rel_quat=torch.stack([r[4] for r in rows]),
                       rel_trans=torch.stack([r[5] for r in rows]), matches=torch.cat([r[6] for r in rows]),
                       match_offsets=offsets_from_counts(counts), valid=torch.ones(len(keys), dtype=torch.bool))
    new_gt = gt.clone()
    new_gt.keypoints = Keypoints(torch.cat(kp), offsets_from_counts(torch.tensor([len(k) for k in kp])))
    is_wrong = torch.tensor([k in wrong for k in keys])
    out = SyntheticScene(new_gt, new_vg, scene.options, torch.repeat_interleave(is_wrong, counts))
    return out
