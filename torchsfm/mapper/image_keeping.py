"""No image lost that the data can hold: weak or misplaced images are repaired before any is dropped.

Two places used to drop registered images outright:

- after global positioning, a camera far from all others (`reliability.degeneracy.outlier_cameras`).
  On sparse captures (a ring with gaps) a camera can be far from the others and right. Its
  translation is now re-estimated from its own observations of the positioned points with its
  rotation fixed (`resect_translations`: the linear cross-product system, Cauchy-reweighted), and
  the camera is kept when that explains its observations; only a camera whose observations no
  position fits is dropped.
- after the last filtering, an image with too few observations (`min_camera_observations`). Before
  that, `complete_weak_images` gives such an image what its matches support: a keypoint matched to
  an observation of a 3D point joins that point when the point reprojects into the image within
  `max_reprojection_error` (COLMAP's track completion); two matched keypoints that are in no point
  make a new two-view point when they triangulate within the same threshold and angle. A bundle
  adjustment then refines the model with them. An image still short is dropped with its counts.

Everything is vectorised over the observations and matches of all weak images at once.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.model import Points3D, Reconstruction, Tracks
from ..segments import first_per_key, segment_median
from .triangulation import bearings, max_triangulation_angle, reprojection_errors, triangulate

log = logging.getLogger(__name__)


@dataclass
class ImageKeepingOptions:
    enabled: bool = True  # (the minimum itself: DegeneracyOptions.min_camera_observations)
    # observations a weak image gets back from its matches: reprojection error at most this (the
    # second BA round's filter threshold), new two-view points at least this triangulation angle
    max_reprojection_error: float = 4.0
    min_triangulation_angle: float = 1.0  # degrees (COLMAP 4.2 global mapper: 1.0)
    # a camera far from all others after global positioning is kept when its resected position
    # explains its observations: median reprojection error at most this (pixels), or at most
    # `resection_error_ratio` times the median over the other cameras (global positioning is not
    # pixel-accurate before the first BA)
    max_resection_error: float = 8.0
    resection_error_ratio: float = 3.0
    resection_iterations: int = 5


def _normal_equations_solve(A: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Batched 3x3 solves; (x, ok) with ok False where the system is singular."""
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    ev = torch.linalg.eigvalsh(A)
    ok = torch.isfinite(A).all(2).all(1) & (ev[:, 0] > 1e-12 * ev[:, 2].abs().clamp_min(1e-300))
    x = torch.linalg.solve(torch.where(ok[:, None, None], A, eye.expand_as(A)), torch.where(ok[:, None], b, 0 * b))
    return x, ok


def resect_translations(rec: Reconstruction, images: Tensor, iterations: int = 5) -> tuple[Tensor, Tensor]:
    """Translations (len(images), 3) of the given image rows from their observations of the
    model's points, rotations fixed: minimises the distances of R X + t to the observation rays
    (sum of |(I - b b^T)(R X + t)|^2, linear in t), reweighted by a Cauchy loss on the ray
    distance relative to its median. Returns (t, ok)."""
    dev, dt = rec.device, rec.dtype
    n = images.numel()
    local = torch.full((len(rec.images),), -1, dtype=torch.long, device=dev)
    local[images] = torch.arange(n, device=dev)
    tr = rec.tracks
    sel = local[tr.image] >= 0
    img, pt, kp = tr.image[sel], tr.point[sel], tr.keypoint[sel]
    k = local[img]
    b = bearings(rec, img, kp)  # (O, 3) unit rays
    RX = (rec.images.rotation[img] @ rec.points3D.xyz[pt][:, :, None])[:, :, 0]
    P = torch.eye(3, dtype=dt, device=dev) - b[:, :, None] * b[:, None, :]  # projector off the ray
    w = torch.ones(img.numel(), dtype=dt, device=dev)
    t = torch.zeros(n, 3, dtype=dt, device=dev)
    ok = torch.zeros(n, dtype=torch.bool, device=dev)
    for _ in range(max(1, iterations)):
        A = torch.zeros(n, 3, 3, dtype=dt, device=dev).index_add_(0, k, w[:, None, None] * P)
        rhs = torch.zeros(n, 3, dtype=dt, device=dev).index_add_(0, k, -w[:, None] * (P @ RX[:, :, None])[:, :, 0])
        t, ok = _normal_equations_solve(A, rhs)
        p = RX + t[k]
        dist = (P @ p[:, :, None])[:, :, 0].norm(dim=1) / p.norm(dim=1).clamp_min(1e-300)  # sine of the ray angle
        scale = segment_median(dist, k, n).clamp_min(1e-12)
        w = 1.0 / (1.0 + (dist / (2 * scale[k])) ** 2)
    return t, ok


def image_errors(rec: Reconstruction) -> Tensor:
    """(I,) median reprojection error of each image's observations (inf without any)."""
    err, _ = reprojection_errors(rec, rec.points3D.xyz, rec.tracks)
    return segment_median(err, rec.tracks.image, len(rec.images))


def keep_far_cameras(rec: Reconstruction, far: Tensor, opt: ImageKeepingOptions) -> tuple[Reconstruction, Tensor, dict]:
    """Cameras flagged far from all others: their translations resected; those whose resected
    pose explains their observations stay. Returns (model, still-bad bool (I,), counts)."""
    idx = torch.nonzero(far)[:, 0]
    counts: dict = {"far_cameras": int(idx.numel())}
    if idx.numel() == 0:
        return rec, far, counts
    t, ok = resect_translations(rec, idx, opt.resection_iterations)
    out = rec.clone()
    out.images.trans[idx[ok]] = t[ok]
    err = image_errors(out)
    others = rec.images.registered & ~far
    ref = float(err[others][torch.isfinite(err[others])].median()) if bool(others.any()) else math.inf
    limit = max(opt.max_resection_error, opt.resection_error_ratio * ref) if math.isfinite(ref) else opt.max_resection_error
    good = torch.zeros_like(far)
    good[idx] = ok & (err[idx] <= limit)
    counts.update(kept_after_resection=int(good.sum()), resection_error_px={
        rec.images.name[i]: float(err[i]) for i in idx.tolist()}, resection_error_limit_px=limit)
    # cameras that stay keep the resected translation; the others keep GP's (they are dropped)
    final = rec.clone()
    final.images.trans[good] = out.images.trans[good]
    return final, far & ~good, counts


def complete_weak_images(rec: Reconstruction, weak: Tensor, opt: ImageKeepingOptions) -> tuple[Reconstruction, dict]:
    """Observations for the weak images (bool (I,)) from the view graph's matches with other
    registered images (see the module doc). Returns the model with them and per-image counts."""
    vg, kp, dev = rec.view_graph, rec.keypoints, rec.device
    reg = rec.images.registered
    pm = vg.pair_of_match()
    use = vg.valid[pm]
    m, pm = vg.matches[use], pm[use]
    ia, ib = vg.pairs[pm, 0], vg.pairs[pm, 1]
    # orient every match weak -> other registered image (both orientations when both are weak)
    fwd = weak[ia] & reg[ib]
    bwd = weak[ib] & reg[ia]
    w_img = torch.cat([ia[fwd], ib[bwd]])
    o_img = torch.cat([ib[fwd], ia[bwd]])
    w_kp = torch.cat([m[fwd, 0], m[bwd, 1]])
    o_kp = torch.cat([m[fwd, 1], m[bwd, 0]])
    point_of = rec.point_of_keypoint()
    w_pt, o_pt = point_of[kp.flat_index(w_img, w_kp)], point_of[kp.flat_index(o_img, o_kp)]
    thr = opt.max_reprojection_error

    # 1. completion: the weak image's keypoint joins the point its match observes
    c = (w_pt < 0) & (o_pt >= 0)
    X = o_pt[c]
    cand = Tracks(X, w_img[c], w_kp[c])
    err, front = reprojection_errors(rec, rec.points3D.xyz, cand)
    ok = front & (err <= thr)
    seen = torch.zeros(0, dtype=torch.long, device=dev)
    if len(rec.tracks):  # a point already observed in that image keeps its observation
        seen = rec.tracks.point * len(rec.images) + rec.tracks.image
    pair_key = X * len(rec.images) + cand.image
    ok &= ~torch.isin(pair_key, seen)
    e = torch.where(ok, err, torch.full_like(err, math.inf))
    keep = ok & first_per_key(kp.flat_index(cand.image, cand.keypoint), e) & first_per_key(pair_key, e)
    added = Tracks(cand.point[keep], cand.image[keep], cand.keypoint[keep])

    # 2. new two-view points from matched keypoints in no point; a match between two weak images
    # is in both orientations above: it counts once
    n2 = (w_pt < 0) & (o_pt < 0) & ~(weak[o_img] & (w_img > o_img))
    wi, oi, wk, ok_ = w_img[n2], o_img[n2], w_kp[n2], o_kp[n2]
    taken = torch.zeros(len(kp), dtype=torch.bool, device=dev)
    taken[kp.flat_index(added.image, added.keypoint)] = True  # (the other end may be weak too)
    free = ~taken[kp.flat_index(wi, wk)] & ~taken[kp.flat_index(oi, ok_)]
    wi, oi, wk, ok_ = wi[free], oi[free], wk[free], ok_[free]
    N = wi.numel()
    new_pts = torch.zeros(0, 3, dtype=rec.dtype, device=dev)
    new_tracks = Tracks(*(torch.zeros(0, dtype=torch.long, device=dev) for _ in range(3)))
    if N:
        img2 = torch.stack([wi, oi], 1).reshape(-1)
        kp2 = torch.stack([wk, ok_], 1).reshape(-1)
        pt2 = torch.arange(N, device=dev).repeat_interleave(2)
        Xn, okn = triangulate(rec.images.rotation, rec.images.trans, bearings(rec, img2, kp2), img2, pt2, N)
        err2, front2 = reprojection_errors(rec, Xn, Tracks(pt2, img2, kp2))
        good = okn & (front2 & (err2 <= thr)).view(N, 2).all(1)
        ang = max_triangulation_angle(rec.images.centers, Xn, img2, pt2, N)
        good &= ang >= opt.min_triangulation_angle
        score = torch.where(good, err2.view(N, 2).max(1).values, torch.full((N,), math.inf, dtype=rec.dtype, device=dev))
        # a keypoint joins one new point, whichever end of its matches it is
        win = first_per_key(torch.cat([kp.flat_index(wi, wk), kp.flat_index(oi, ok_)]), score.repeat(2))
        good &= win[:N] & win[N:]
        sel = torch.nonzero(good)[:, 0]
        new_pts = Xn[sel]
        base = len(rec.points3D)
        ids = base + torch.arange(sel.numel(), device=dev)
        new_tracks = Tracks(ids.repeat_interleave(2), torch.stack([wi[sel], oi[sel]], 1).reshape(-1),
                            torch.stack([wk[sel], ok_[sel]], 1).reshape(-1))

    tracks = Tracks(torch.cat([rec.tracks.point, added.point, new_tracks.point]),
                    torch.cat([rec.tracks.image, added.image, new_tracks.image]),
                    torch.cat([rec.tracks.keypoint, added.keypoint, new_tracks.keypoint]))
    order = torch.argsort(tracks.point, stable=True)
    tracks = Tracks(tracks.point[order], tracks.image[order], tracks.keypoint[order])
    P0, P1 = len(rec.points3D), new_pts.shape[0]
    old = rec.points3D
    next_id = int(old.point3D_id.max()) + 1 if P0 else 1
    points = Points3D(torch.cat([old.point3D_id, next_id + torch.arange(P1, device=dev)]),
                      torch.cat([old.xyz, new_pts]),
                      torch.cat([old.rgb, torch.zeros(P1, 3, dtype=old.rgb.dtype, device=dev)]),
                      torch.cat([old.error, torch.full((P1,), -1.0, dtype=old.error.dtype, device=dev)]))
    out = Reconstruction(rec.cameras, rec.images, rec.keypoints, points, tracks, rec.view_graph, dict(rec.meta))
    counts = {}
    for i in torch.nonzero(weak)[:, 0].tolist():  # per weak image (a handful): report bookkeeping
        counts[rec.images.name[i]] = {
            "observations_before": int((rec.tracks.image == i).sum()),
            "matches_to_registered": int((w_img == i).sum()),
            "joined_existing_points": int((added.image == i).sum()),
            "new_two_view_points": int((new_tracks.image == i).sum()),
        }
    return out, counts
