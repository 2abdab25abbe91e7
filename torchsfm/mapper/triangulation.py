"""Batched multi-view triangulation, observation filtering and retriangulation.

All tracks are handled at once: per-observation 3x3 normal-equation blocks are summed per track
with `index_add_`, then one batched 3x3 solve gives every point. No loop over tracks.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cameras.models import project_cameras, unproject_cameras
from ..data.model import Points3D, Reconstruction, Tracks, group_pairs, offsets_from_counts
from ..runtime.chunks import row_chunks, rows_per_chunk

log = logging.getLogger(__name__)


@dataclass
class TriangulationOptions:
    max_reprojection_error: float = 4.0  # pixels, for keeping an observation
    min_triangulation_angle: float = 1.5  # degrees, for keeping a point
    min_track_length: int = 2
    refinement_rounds: int = 3  # triangulate, drop the worst observations, repeat
    # tracks with >= 2 observations off their least-squares point: best of `split_hypotheses`
    # two-view points keeps its inliers, the rest become a new track; `split_rounds` times (0: off).
    # On the synthetic ring (ring50) it recovers 25 tracks of two points and lifts AUC@1/3 from
    # 91.97/97.32 to 92.33/97.44
    split_rounds: int = 2
    split_hypotheses: int = 16
    seed: int = 0
    max_pairs_for_angle: int = 2_000_000  # chunk size of the pairwise angle computation


def _match_keypoints(rec: Reconstruction, select: Tensor | None) -> Tensor:
    """Flat keypoint rows (2M,) of both ends of the view-graph matches (those in `select`)."""
    kp, vg = rec.keypoints, rec.view_graph
    pm, m = vg.pair_of_match(), vg.matches
    if select is not None:
        pm, m = pm[select], m[select]
    return torch.cat([kp.offsets[vg.pairs[pm, side]] + m[:, side] for side in (0, 1)])


def unprojected_keypoints(rec: Reconstruction, pairs: Tensor | None = None) -> Tensor:
    """(K, 2) undistorted normalised coordinates of every keypoint in a view-graph match (of the
    pairs in the bool mask `pairs` (E,), when given), NaN for the others.

    Each such keypoint is unprojected once: a keypoint takes part in many matches (13 on average
    on a 1,000-image corridor), undistortion is iterative, and keypoints in no match (most of
    SIFT's on real images) are left out. A stage that walks the view graph in chunks builds the
    table once and passes it to `normalized_matches`: built per chunk, its O(keypoints) work
    made the stage quadratic in the scene size. The matches are read in cache-sized ranges of
    pairs, with no per-match array of the whole graph (45M matches at 10,000 images)."""
    kp, vg = rec.keypoints, rec.view_graph
    used = torch.zeros(len(kp), dtype=torch.bool, device=kp.xy.device)
    for e0, e1 in vg.chunks(rows_per_chunk(kp.xy.device, vg.matches.shape[0])):
        sub = vg.pair_slice(e0, e1)
        p, m = sub.pair_of_match(), sub.matches
        if pairs is not None:
            keep = pairs[e0:e1][p]
            p, m = p[keep], m[keep]
        for side in (0, 1):
            used[kp.offsets[sub.pairs[p, side]] + m[:, side]] = True
    rows = torch.nonzero(used)[:, 0]
    out = torch.full((len(kp), 2), float("nan"), dtype=rec.dtype, device=kp.xy.device)
    out[rows] = unproject_cameras(rec.cameras, rec.images.camera[kp.image_of()[rows]], kp.xy[rows].to(rec.dtype))
    return out


def normalized_matches(rec: Reconstruction, select: Tensor | None = None,
                       table: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Undistorted normalised coordinates (M, 2) of both ends of every view-graph match (of the
    matches in the bool mask `select` only, when given); `table`: `unprojected_keypoints` of
    a graph holding these matches (made here when not given)."""
    flat = _match_keypoints(rec, select)
    xn = (unprojected_keypoints(rec) if table is None else table)[flat]
    half = flat.numel() // 2
    return xn[:half], xn[half:]


def bearings(rec: Reconstruction, image: Tensor, keypoint: Tensor) -> Tensor:
    """Unit rays in the camera frame of the observations (image row, keypoint index)."""
    out = torch.empty(image.shape[0], 3, dtype=rec.dtype, device=image.device)
    for c in row_chunks(image.shape[0], image.device):
        uv = rec.keypoints.xy[rec.keypoints.flat_index(image[c], keypoint[c])].to(rec.dtype)
        xy = unproject_cameras(rec.cameras, rec.images.camera[image[c]], uv)
        ray = torch.cat([xy, torch.ones_like(xy[:, :1])], 1)
        out[c] = ray / ray.norm(dim=1, keepdim=True)
    return out


def triangulate(R: Tensor, t: Tensor, rays: Tensor, obs_image: Tensor, obs_track: Tensor, num_tracks: int,
                weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Least-squares point per track minimising the squared distances to the observation rays.

    R, t: cam_from_world rotations (I,3,3) and translations (I,3); rays: unit bearings (O,3) in
    camera frames.
    Returns points (T,3) and a bool mask of tracks whose 3x3 system was well conditioned.
    """
    num_obs, dt, dev = rays.shape[0], rays.dtype, rays.device
    AA = torch.zeros(num_tracks, 3, 3, dtype=dt, device=dev)
    bb = torch.zeros(num_tracks, 3, dtype=dt, device=dev)
    eye = torch.eye(3, dtype=dt, device=dev)
    centers = -(R.transpose(1, 2) @ t[:, :, None])[:, :, 0]
    for c in row_chunks(num_obs, dev):
        img, ray = obs_image[c], rays[c]
        # Distance of X from the ray: |(I - b b^T)(R X + t)|.  Normal equations per observation:
        # A = R^T (I - b b^T) R = I - w w^T and rhs = -R^T (I - b b^T) t = c + w (b.t), with the
        # world ray w = R^T b and the centre c = -R^T t (R a rotation): no 3x3 products per ray.
        w = torch.einsum("nji,nj->ni", R[img], ray)
        A = eye - w[:, :, None] * w[:, None, :]
        b = centers[img] + w * (ray * t[img]).sum(1, keepdim=True)
        if weight is not None:
            A = A * weight[c, None, None]
            b = b * weight[c, None]
        AA.index_add_(0, obs_track[c], A)
        bb.index_add_(0, obs_track[c], b)
    # Non-finite input (a NaN ray or pose) and tracks with (nearly) parallel rays, whose system is
    # near-singular, are flagged and solved against the identity instead.
    finite = torch.isfinite(AA).all(2).all(1) & torch.isfinite(bb).all(1)
    AA = torch.where(finite[:, None, None], AA, eye.expand_as(AA))
    bb = torch.where(finite[:, None], bb, torch.zeros_like(bb))
    ev = torch.linalg.eigvalsh(AA)
    rcond = max(1e-9, 100 * torch.finfo(dt).eps)  # what float32 can still solve
    ok = finite & (ev[:, 0] > rcond * ev[:, 2].clamp_min(torch.finfo(dt).tiny))
    X, info = torch.linalg.solve_ex(torch.where(ok[:, None, None], AA, eye.expand_as(AA)), bb)
    return X, ok & (info == 0)


def reprojection_errors(rec: Reconstruction, xyz: Tensor, tracks: Tracks) -> tuple[Tensor, Tensor]:
    """Pixel reprojection error of every observation and whether its point is in front (depth > 0)."""
    n, dev = len(tracks), xyz.device
    err = torch.empty(n, dtype=xyz.dtype, device=dev)
    front = torch.empty(n, dtype=torch.bool, device=dev)
    R_all = rec.images.rotation
    for c in row_chunks(n, dev):
        sub = Tracks(tracks.point[c], tracks.image[c], tracks.keypoint[c])
        p_cam = (R_all[sub.image] @ xyz[sub.point][:, :, None])[:, :, 0] + rec.images.trans[sub.image]
        front[c] = p_cam[:, 2] > 1e-8 * p_cam.norm(dim=1).clamp_min(1e-300)
        safe = torch.where(front[c, None], p_cam, torch.ones_like(p_cam))
        uv = project_cameras(rec.cameras, rec.images.camera[sub.image], safe)
        e = (uv - rec.observation_xy_of(sub)).norm(dim=1)
        err[c] = torch.where(front[c], e, torch.full_like(e, float("inf")))
    return err, front


def max_triangulation_angle(centers: Tensor, xyz: Tensor, obs_image: Tensor, obs_track: Tensor, num_tracks: int,
                            chunk: int = 2_000_000) -> Tensor:
    """Largest angle (degrees) between any two viewing rays of each track (T,)."""
    d = centers[obs_image] - xyz[obs_track]
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    a, b = track_observation_pairs(obs_track, num_tracks)
    out = torch.zeros(num_tracks, dtype=xyz.dtype, device=xyz.device)
    for s in range(0, a.numel(), chunk):
        aa, bb = a[s : s + chunk], b[s : s + chunk]
        cos = (d[aa] * d[bb]).sum(1).clamp(-1, 1)
        ang = torch.rad2deg(torch.arccos(cos))
        out.scatter_reduce_(0, obs_track[aa], ang, reduce="amax")
    return out


def has_triangulation_angle(centers: Tensor, xyz: Tensor, obs_image: Tensor, obs_track: Tensor, num_tracks: int,
                            min_angle: float) -> Tensor:
    """max_triangulation_angle(...) >= min_angle per track (T,), without the all-pairs pass for most.

    With m the largest angle of a track's rays to its first ray, the largest pairwise angle lies
    in [m, 2m] (triangle inequality on the sphere): m >= min_angle keeps a track, 2m < min_angle
    drops it, and only the tracks in between get the exact O(length^2) pass. Tracks of 50 views
    cost 1,225 pairs each in that pass, so this is what makes filtering long tracks cheap.
    obs must be sorted by track.
    """
    dev = xyz.device
    if obs_track.numel() == 0:
        return torch.zeros(num_tracks, dtype=torch.bool, device=dev)
    d = centers[obs_image] - xyz[obs_track]
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    counts = torch.bincount(obs_track, minlength=num_tracks)
    first = offsets_from_counts(counts)[:-1]
    cos0 = (d * d[first.clamp_max(d.shape[0] - 1)][obs_track]).sum(1).clamp(-1, 1)
    min_cos = torch.full((num_tracks,), 2.0, dtype=d.dtype, device=dev).scatter_reduce_(0, obs_track, cos0, reduce="amin")
    thr = math.radians(min_angle)
    keep = min_cos <= math.cos(thr)
    unsure = ~keep & (min_cos <= math.cos(thr / 2)) & (counts > 2)
    if bool(unsure.any()):
        sel = unsure[obs_track]
        renum = torch.cumsum(unsure.long(), 0) - 1
        ids = torch.nonzero(unsure)[:, 0]
        ang = max_triangulation_angle(centers, xyz, obs_image[sel], renum[obs_track[sel]], int(ids.numel()))
        keep[ids] = ang >= min_angle
    return keep


def track_observation_pairs(obs_track: Tensor, num_tracks: int) -> tuple[Tensor, Tensor]:
    """All unordered pairs (a < b) of observations of the same track; obs must be sorted by track."""
    return group_pairs(obs_track, num_tracks)


def compact_tracks(rec: Reconstruction, xyz: Tensor, tracks: Tracks, keep_obs: Tensor, keep_point: Tensor,
                   min_track_length: int) -> Reconstruction:
    """Drop observations and points; renumber points densely; drop short tracks."""
    num = xyz.shape[0]
    keep_obs = keep_obs & keep_point[tracks.point]
    lengths = torch.bincount(tracks.point[keep_obs], minlength=num)
    keep_point = keep_point & (lengths >= min_track_length)
    keep_obs = keep_obs & keep_point[tracks.point]
    new_index = torch.cumsum(keep_point.long(), 0) - 1
    tr = Tracks(new_index[tracks.point[keep_obs]], tracks.image[keep_obs], tracks.keypoint[keep_obs])
    order = torch.argsort(tr.point, stable=True)
    tr = Tracks(tr.point[order], tr.image[order], tr.keypoint[order])
    old = rec.points3D
    n_keep = int(keep_point.sum())
    dev = xyz.device
    if old is not None and len(old) == num:
        pts = Points3D(old.point3D_id[keep_point], xyz[keep_point], old.rgb[keep_point], old.error[keep_point])
    else:
        # new points keep their track id (+1, COLMAP ids start at 1) so they can be traced back
        pts = Points3D(torch.nonzero(keep_point)[:, 0] + 1, xyz[keep_point],
                       torch.zeros(n_keep, 3, dtype=torch.uint8, device=dev),
                       -torch.ones(n_keep, dtype=xyz.dtype, device=dev))
    return Reconstruction(rec.cameras, rec.images, rec.keypoints, pts, tr, rec.view_graph, dict(rec.meta))


def _track_errors(rec: Reconstruction, X: Tensor, obs_image: Tensor, obs_keypoint: Tensor, point: Tensor) -> Tensor:
    """Reprojection error of observations (image, keypoint) of points X[point]; inf behind."""
    err, _ = reprojection_errors(rec, X, Tracks(point, obs_image, obs_keypoint))
    return err


def split_inconsistent_tracks(rec: Reconstruction, tracks: Tracks, rays: Tensor, opt: TriangulationOptions
                              ) -> tuple[Tracks, int]:
    """Relabel tracks that hold two 3D points (joined by a wrong match between images that do
    not share a keypoint, so the track-building conflict test cannot see it).

    A track with at least two observations off its least-squares point is suspect; for each,
    `split_hypotheses` random pairs of its observations are triangulated, the pair whose point
    most observations reproject to within the threshold wins, and the observations it does not
    explain become a new track (split again in the next round). All suspects are handled at once.
    On the synthetic ring of 50 images, 25 such tracks of two points (~750 correct observations)
    are otherwise dropped whole (`TriangulationOptions.split_rounds`).
    Returns the tracks (sorted by track) and the number of splits.
    """
    R, t = rec.images.rotation, rec.images.trans
    g = torch.Generator(device="cpu").manual_seed(opt.seed)
    splits = 0
    thr = opt.max_reprojection_error
    for _ in range(opt.split_rounds):
        order = torch.argsort(tracks.point, stable=True)
        tracks = Tracks(tracks.point[order], tracks.image[order], tracks.keypoint[order])
        rays = rays[order]
        num = int(tracks.point.max()) + 1 if len(tracks) else 0
        X, _ = triangulate(R, t, rays, tracks.image, tracks.point, num)
        bad = ~(_track_errors(rec, X, tracks.image, tracks.keypoint, tracks.point) <= thr)
        counts = torch.bincount(tracks.point, minlength=num)
        suspect = (torch.bincount(tracks.point[bad], minlength=num) >= 2) & (counts >= 3)
        ids = torch.nonzero(suspect)[:, 0]
        S, H = int(ids.numel()), opt.split_hypotheses
        if S == 0:
            break
        dev = tracks.point.device
        start = offsets_from_counts(counts)[:-1][ids]  # (S,)
        L = counts[ids]
        u = torch.rand(S, H, 2, generator=g, dtype=torch.float64).to(dev)
        i = (u[..., 0] * L[:, None]).long().clamp_max(L[:, None] - 1)
        j = (u[..., 1] * (L[:, None] - 1)).long().clamp_max(L[:, None] - 2)
        j = j + (j >= i).long()  # a second, different observation
        a, b = (start[:, None] + i).reshape(-1), (start[:, None] + j).reshape(-1)
        obs2 = torch.stack([a, b], 1).reshape(-1)
        hyp = torch.arange(S * H, device=dev).repeat_interleave(2)
        Xh, okh = triangulate(R, t, rays[obs2], tracks.image[obs2], hyp, S * H)
        # every observation of a suspect track against each of its track's hypotheses
        local = torch.full((num,), -1, dtype=torch.long, device=dev)
        local[ids] = torch.arange(S, device=dev)
        obs = torch.nonzero(suspect[tracks.point])[:, 0]
        s_of = local[tracks.point[obs]]
        o_rep = obs.repeat_interleave(H)
        h_rep = (s_of[:, None] * H + torch.arange(H, device=dev)[None, :]).reshape(-1)
        inl = (_track_errors(rec, Xh, tracks.image[o_rep], tracks.keypoint[o_rep], h_rep) <= thr) & okh[h_rep]
        score = torch.zeros(S * H, dtype=torch.long, device=dev).index_add_(0, h_rep, inl.long()).view(S, H)
        best = score.argmax(1)  # (S,)
        keep = inl.view(-1, H).gather(1, best[s_of][:, None])[:, 0]
        good = score.gather(1, best[:, None])[:, 0] >= 3  # a point that three views agree on
        rest = torch.zeros(S, dtype=torch.long, device=dev).index_add_(0, s_of, (~keep).long())
        # The unexplained observations become a track when they are three or more: any two rays of
        # a verified (epipolar-consistent) wrong match meet, and such a two-view "point" is a
        # ghost (seen on a symmetric object). Fewer stay and are rejected by the refinement below.
        move = ~keep & (good & (rest >= 3))[s_of]
        if not bool(move.any()):
            break
        new_id = num + s_of[move]  # the unexplained observations of track s: one new track
        point = tracks.point.clone()
        point[obs[move]] = new_id.to(point.dtype)
        splits += int(torch.unique(s_of[move]).numel())
        tracks = Tracks(point, tracks.image, tracks.keypoint)
    order = torch.argsort(tracks.point, stable=True)
    return Tracks(tracks.point[order], tracks.image[order], tracks.keypoint[order]), splits


def triangulate_tracks(rec: Reconstruction, tracks: Tracks, options: TriangulationOptions | None = None
                       ) -> tuple[Reconstruction, dict]:
    """Triangulate every track from the registered images' poses, then iteratively drop
    observations above the reprojection threshold and re-triangulate; finally drop points with
    too small a triangulation angle or too few observations. `tracks.point` is the track id."""
    opt = options or TriangulationOptions()
    reg = rec.images.registered[tracks.image]
    tracks = Tracks(tracks.point[reg], tracks.image[reg], tracks.keypoint[reg])
    R, t = rec.images.rotation, rec.images.trans
    rays = bearings(rec, tracks.image, tracks.keypoint)
    splits = 0
    if opt.split_rounds > 0 and len(tracks):
        tracks, splits = split_inconsistent_tracks(rec, tracks, rays, opt)
        rays = bearings(rec, tracks.image, tracks.keypoint)
    num = int(tracks.point.max()) + 1 if len(tracks) else 0
    keep = torch.ones(len(tracks), dtype=torch.bool, device=rays.device)
    xyz = torch.zeros(num, 3, dtype=rays.dtype, device=rays.device)
    ok = torch.zeros(num, dtype=torch.bool, device=rays.device)
    for _ in range(max(1, opt.refinement_rounds)):
        xyz, ok = triangulate(R, t, rays, tracks.image, tracks.point, num, weight=keep.to(rays.dtype))
        err, front = reprojection_errors(rec, xyz, tracks)
        # One outlier drags a least-squares point so that good observations exceed the threshold
        # too: drop only the worst observation of each track per round, then re-triangulate.
        err = torch.where(keep & front, err, torch.zeros_like(err))
        worst = torch.full((num,), -1.0, dtype=err.dtype, device=err.device).scatter_reduce(
            0, tracks.point, err, reduce="amax")
        drop = keep & ((err == worst[tracks.point]) & (err > opt.max_reprojection_error) | ~front)
        if not bool(drop.any()):
            break
        keep = keep & ~drop
    xyz, ok = triangulate(R, t, rays, tracks.image, tracks.point, num, weight=keep.to(rays.dtype))
    err, front = reprojection_errors(rec, xyz, tracks)
    keep = keep & front & (err <= opt.max_reprojection_error)
    lengths = torch.bincount(tracks.point[keep], minlength=num)
    ok = ok & (lengths >= opt.min_track_length)
    angle_ok = has_triangulation_angle(rec.images.centers, xyz, tracks.image[keep], tracks.point[keep], num,
                                       opt.min_triangulation_angle)
    ok = ok & angle_ok
    out = compact_tracks(_without_points(rec), xyz, tracks, keep, ok, opt.min_track_length)
    counts = {
        "tracks_in": num, "points": len(out.points3D), "observations": len(out.tracks),
        "observations_rejected": int((~keep).sum()), "points_low_angle": int((~angle_ok).sum()),
        "tracks_split": splits,
    }
    return out, counts


def _without_points(rec: Reconstruction) -> Reconstruction:
    return Reconstruction(rec.cameras, rec.images, rec.keypoints, None, rec.tracks, rec.view_graph, dict(rec.meta))


@dataclass
class FilterOptions:
    max_reprojection_error: float = 4.0  # pixels
    min_triangulation_angle: float = 1.5  # degrees
    min_track_length: int = 2
    # > 0: the threshold is also at most this many noise sigmas (sigma estimated from the median
    # reprojection error), but not below min_reprojection_error
    noise_sigmas: float = 0.0
    min_reprojection_error: float = 0.5  # pixels


def noise_sigma(err: Tensor, point: Tensor, num_points: int) -> float:
    """Per-coordinate keypoint noise from reprojection errors `err` of observations of `point`,
    NaN without any finite error on a track of 2+ views.

    For Gaussian noise the 2D error norm is Rayleigh, median = 1.1774 sigma. A point fitted to its
    track absorbs 3 of its 2L coordinates, so the errors of a track of length L are scaled by
    sqrt(2L / (2L - 3)) first (x2 for two views)."""
    L = torch.bincount(point, minlength=num_points)[point].to(err.dtype)
    ok = torch.isfinite(err) & (L >= 2)
    if not bool(ok.any()):
        return math.nan
    scaled = err[ok] * (2 * L[ok] / (2 * L[ok] - 3)).sqrt()
    return float(scaled.median()) / 1.1774


def reprojection_threshold(err: Tensor, point: Tensor, num_points: int, opt: FilterOptions) -> float:
    """min(max_reprojection_error, max(min_reprojection_error, noise_sigmas * sigma)), sigma the
    keypoint noise (`noise_sigma`). For Gaussian noise P(|e| > k sigma) = exp(-k^2/2) (k = 4:
    0.03%). Precise keypoints (rendered images: sigma 0.27 px) then get a ~1 px threshold instead
    of a fixed 2 px, which keeps their heavy tail out of the final adjustment.
    """
    if opt.noise_sigmas <= 0:
        return opt.max_reprojection_error
    sigma = noise_sigma(err, point, num_points)
    if not math.isfinite(sigma):
        return opt.max_reprojection_error
    return min(opt.max_reprojection_error, max(opt.min_reprojection_error, opt.noise_sigmas * sigma))


def filter_reconstruction(rec: Reconstruction, options: FilterOptions | None = None) -> tuple[Reconstruction, dict]:
    """Drop observations with large reprojection error or behind the camera, then points seen
    under too small an angle or by too few images (GLOMAP's filtering between BA rounds)."""
    opt = options or FilterOptions()
    num = len(rec.points3D)
    err, front = reprojection_errors(rec, rec.points3D.xyz, rec.tracks)
    thr = reprojection_threshold(err, rec.tracks.point, num, opt)  # err is inf behind the camera
    keep = front & (err <= thr)
    ok = has_triangulation_angle(rec.images.centers, rec.points3D.xyz, rec.tracks.image[keep], rec.tracks.point[keep],
                                 num, opt.min_triangulation_angle)
    out = compact_tracks(rec, rec.points3D.xyz, rec.tracks, keep, ok, opt.min_track_length)
    # mean reprojection error per surviving point
    e, _ = reprojection_errors(out, out.points3D.xyz, out.tracks)
    n = len(out.points3D)
    s = torch.zeros(n, dtype=e.dtype, device=e.device).index_add_(0, out.tracks.point, e)
    c = torch.bincount(out.tracks.point, minlength=n).clamp_min(1)
    out.points3D.error = s / c
    return out, {"observations_removed": int((~keep).sum()), "points_removed": num - len(out.points3D),
                 "points": len(out.points3D), "threshold_px": thr}
