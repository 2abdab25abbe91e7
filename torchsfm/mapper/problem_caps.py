"""Fewer observations where they add nothing: the tracks that global positioning and the early
bundle-adjustment rounds solve on.

A camera's position and orientation are fixed by a few dozen well-spread, long tracks; the other
observations of a corridor or a video (hundreds per image) mostly add cost: every observation is a
residual, and every pair of images sharing a point is a block of the reduced system. So each image
nominates at most `max_tracks_per_image` of its tracks, spread over the image (a grid of cells,
the longest track of every cell first, then the second longest of every cell, ...), and the problem
holds the nominated tracks with all their observations. Every image keeps min(K, its tracks)
tracks; a track seen by many images is nominated by several, so the problem shrinks most where
tracks are long. The other points are not lost: after positioning they are triangulated from the
solved cameras, after a capped bundle adjustment they are triangulated again from the adjusted
cameras and refined with the cameras held fixed, and the final rounds (after retriangulation) use
every observation.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from ..ba.bundle_adjustment import BundleAdjustmentOptions, bundle_adjust
from ..data.model import Reconstruction, Tracks
from ..segments import rank_in_runs
from ..solver.options import SolverSummary
from .triangulation import bearings, triangulate


def nominated_tracks(track: Tensor, image: Tensor, xy: Tensor, size: Tensor, num_tracks: int, max_per_image: int,
                     grid: int = 4) -> Tensor:
    """Bool (T,): the tracks some image nominates. Observations (O,): track, image, pixel xy and
    the image's (width, height) `size` (O, 2). Each image takes at most `max_per_image` tracks:
    round-robin over a grid x grid partition of the image, longest track first in each cell
    (ties: lower track id), so the chosen ones are long and spread."""
    length = torch.bincount(track.long(), minlength=num_tracks)
    cell = (xy / size * grid).long().clamp(0, grid - 1)
    cell = cell[:, 1] * grid + cell[:, 0]
    img = image.long()
    # rank within (image, cell) by length desc: sort by track, -length, cell, image (last key first)
    o = torch.argsort(track, stable=True)
    o = o[torch.argsort(-length[track[o].long()], stable=True)]
    o = o[torch.argsort(cell[o], stable=True)]
    o = o[torch.argsort(img[o], stable=True)]
    rank_cell = torch.empty_like(o)
    rank_cell[o] = rank_in_runs(img[o] * (grid * grid) + cell[o])
    # then within the image by (rank in cell, length desc, track)
    o = torch.argsort(track, stable=True)
    o = o[torch.argsort(-length[track[o].long()], stable=True)]
    o = o[torch.argsort(rank_cell[o], stable=True)]
    o = o[torch.argsort(img[o], stable=True)]
    take = rank_in_runs(img[o]) < max_per_image
    keep = torch.zeros(num_tracks, dtype=torch.bool, device=track.device)
    keep[track[o][take].long()] = True
    return keep


def nominated_points(rec: Reconstruction, max_per_image: int, grid: int = 4) -> Tensor:
    """`nominated_tracks` over the observations of `rec` in registered images: bool (P,)."""
    tr = rec.tracks
    reg = rec.images.registered[tr.image]
    cams = rec.cameras
    cam = rec.images.camera[tr.image[reg]]
    size = torch.stack([cams.width[cam], cams.height[cam]], 1).to(torch.float64)
    xy = rec.keypoints.xy[rec.keypoints.flat_index(tr.image[reg], tr.keypoint[reg])].to(torch.float64)
    return nominated_tracks(tr.point[reg], tr.image[reg], xy, size, len(rec.points3D), max_per_image, grid)


def _with_tracks(rec: Reconstruction, keep: Tensor) -> Reconstruction:
    tr = rec.tracks
    return Reconstruction(rec.cameras, rec.images, rec.keypoints, rec.points3D,
                          Tracks(tr.point[keep], tr.image[keep], tr.keypoint[keep]), rec.view_graph, dict(rec.meta))


def points_only(options: BundleAdjustmentOptions) -> BundleAdjustmentOptions:
    """The same solver settings with poses and intrinsics held: each point on its own."""
    return dataclasses.replace(options, refine_focal_length=False, refine_principal_point=False,
                               refine_extra_params=False, refine_poses=False, refine_points=True)


def capped_bundle_adjust(rec: Reconstruction, options: BundleAdjustmentOptions, max_tracks_per_image: int | None,
                         bundle_adjust: Callable = bundle_adjust) -> tuple[Reconstruction, SolverSummary, dict]:
    """Bundle adjustment on the nominated tracks (all when the cap is None or nominates all),
    then the other points refined with the adjusted cameras held fixed. Returns the adjusted
    reconstruction (every observation kept), the solver summary of the joint problem, and counts.
    `bundle_adjust` is the adjustment to run (the caller's, so that it can be instrumented)."""
    if not max_tracks_per_image:
        out, summary = bundle_adjust(rec, options)
        return out, summary, {}
    chosen = nominated_points(rec, max_tracks_per_image)
    in_problem = chosen[rec.tracks.point.long()]
    counts = {"observations_solved": int(in_problem.sum()), "points_solved": int(chosen.sum())}
    if bool(in_problem.all()):
        out, summary = bundle_adjust(rec, options)
        return out, summary, counts
    adjusted, summary = bundle_adjust(_with_tracks(rec, in_problem), options)
    # the other points: triangulated anew from the adjusted cameras (they were placed against the
    # cameras before the adjustment, often hundreds of pixels off now), then each refined alone
    # with the cameras held (templeRing's first round: cost 3.9e9 -> 1.6e6 in 63 iterations from
    # the old positions, 7.5e5 -> 7.6e3 in 5 from the new ones)
    t = rec.tracks
    rays = bearings(adjusted, t.image[~in_problem], t.keypoint[~in_problem])
    X, ok = triangulate(adjusted.images.rotation, adjusted.images.trans, rays, t.image[~in_problem],
                        t.point[~in_problem], len(rec.points3D))
    xyz = torch.where((ok & ~chosen)[:, None], X, adjusted.points3D.xyz)
    posed = Reconstruction(adjusted.cameras, adjusted.images, rec.keypoints,
                           dataclasses.replace(adjusted.points3D, xyz=xyz), rec.tracks, rec.view_graph, rec.meta)
    rest, _ = bundle_adjust(_with_tracks(posed, ~in_problem), points_only(options))
    pts = dataclasses.replace(adjusted.points3D, xyz=torch.where(chosen[:, None], adjusted.points3D.xyz, rest.points3D.xyz),
                              error=torch.where(chosen, adjusted.points3D.error, rest.points3D.error))
    out = Reconstruction(adjusted.cameras, adjusted.images, rec.keypoints, pts, rec.tracks, rec.view_graph,
                         dict(adjusted.meta))
    return out, summary, counts
