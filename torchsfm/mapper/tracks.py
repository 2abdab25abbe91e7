"""Track establishment: connected components of the keypoint match graph, vectorised.

Keypoints are the nodes and the inlier matches of valid pairs the edges. Components (torch
label propagation, `graph.connected_components`, any device) are the candidate tracks. As in
GLOMAP, a track is discarded when one image holds two of its keypoints farther apart than
`max_keypoint_distance_px` (an outlier match merged two tracks); otherwise repeated
observations in one image are reduced to the one with the smallest keypoint index.
Tracks with fewer than `min_track_length` or more than `max_track_length` images are dropped.
When more than `max_num_tracks` remain, each image first keeps its `min_tracks_per_image`
longest tracks and the rest are filled longest-first (long tracks constrain positions best).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.model import Points3D, Reconstruction, Tracks
from .graph import connected_components, stage_copy

log = logging.getLogger(__name__)


@dataclass
class TrackOptions:
    min_track_length: int = 3  # images per track (GLOMAP / InstantSfM: 3)
    max_track_length: int = 200  # longer tracks are dropped (InstantSfM: 200)
    max_keypoint_distance_px: float = 10.0  # two keypoints of one image in a track farther apart: drop it
    max_num_tracks: int | None = None  # keep at most this many tracks (None: all)
    min_tracks_per_image: int = 50  # when capping, tracks kept first for every image


@dataclass
class TrackReport:
    num_matches: int = 0  # inlier matches of valid pairs used as edges
    num_invalid_matches: int = 0  # keypoint index out of range, ignored
    num_candidates: int = 0  # connected components
    num_inconsistent: int = 0  # dropped: two distant keypoints in one image
    num_duplicates_removed: int = 0  # repeated (track, image) observations merged
    num_too_short: int = 0
    num_too_long: int = 0
    num_capped: int = 0  # dropped by max_num_tracks
    num_tracks: int = 0
    num_observations: int = 0
    mean_track_length: float = 0.0


def _segment_starts(key: Tensor) -> Tensor:
    """For a sorted key (N,), bool (N,) marking the first item of each run."""
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    return first


def _rank_in_segment(first: Tensor) -> Tensor:
    """Position of each item within its run, given the run-start flags of a sorted array."""
    pos = torch.arange(first.numel(), device=first.device)
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    return pos - start


def select_tracks(track: Tensor, image: Tensor, num_tracks: int, num_images: int, max_num_tracks: int,
                  min_tracks_per_image: int) -> Tensor:
    """Bool (T,) of the tracks to keep under a cap: every image's `min_tracks_per_image` longest
    tracks first, then longest-first. track/image (O,) are the observations."""
    length = torch.bincount(track, minlength=num_tracks)
    # Sort observations by (image, length desc, track): successive stable sorts, last key first.
    o = torch.argsort(track, stable=True)
    o = o[torch.argsort(-length[track[o]], stable=True)]
    o = o[torch.argsort(image[o], stable=True)]
    rank = _rank_in_segment(_segment_starts(image[o]))
    needed = torch.zeros(num_tracks, dtype=torch.bool, device=track.device)
    needed[track[o][rank < min_tracks_per_image]] = True
    order = torch.argsort(torch.arange(num_tracks, device=track.device), stable=True)
    order = order[torch.argsort(-length[order], stable=True)]
    order = order[torch.argsort((~needed[order]).to(torch.int8), stable=True)]
    keep = torch.zeros(num_tracks, dtype=torch.bool, device=track.device)
    keep[order[:max_num_tracks]] = True
    return keep


def establish_tracks(rec: Reconstruction, options: TrackOptions | None = None) -> tuple[Reconstruction, TrackReport]:
    """Tracks from the inlier matches of the valid pairs of `rec.view_graph`.

    Returns a new reconstruction whose `tracks` hold (point = track row, image, keypoint)
    sorted by track then image, and whose `points3D` has one untriangulated row per track
    (xyz = 0, error = -1, point3D_id = row + 1). Track rows follow the smallest flat keypoint
    index of the track, so the result does not depend on the order of pairs or matches.
    """
    options = options or TrackOptions()
    vg, kp = rec.view_graph, rec.keypoints
    device = kp.xy.device
    num_images = len(rec.images)
    report = TrackReport()

    pm = vg.pair_of_match()
    m = vg.matches
    if not bool(vg.valid.all()):
        use = vg.valid[pm]
        m, pm = m[use], pm[use]
    ends = vg.pairs[pm]  # (M, 2) image rows of both keypoints
    ok = ((m >= 0) & (m < kp.count()[ends])).all(1)
    flat = kp.offsets[ends] + m  # (M, 2) rows into keypoints.xy
    report.num_invalid_matches = int((~ok).sum())
    if report.num_invalid_matches:
        log.warning("tracks: %d matches index keypoints out of range; ignored", report.num_invalid_matches)
        flat = flat[ok]
    report.num_matches = int(flat.shape[0])

    # Components over all keypoints; those in no match are singletons and are not tracks.
    labels = connected_components(len(kp), flat)
    used = torch.zeros(len(kp), dtype=torch.bool, device=device)
    used[flat.reshape(-1)] = True
    nodes = torch.nonzero(used, as_tuple=True)[0]  # flat keypoint rows, increasing
    # labels are the smallest keypoint of each component; compact them to 0..T-1 in that order.
    roots, track = torch.unique(labels[nodes], return_inverse=True)
    num_candidates = roots.numel()
    report.num_candidates = num_candidates
    image = torch.searchsorted(kp.offsets, nodes, right=True) - 1
    keypoint = nodes - kp.offsets[image]

    # Group observations by (track, image), members ordered by keypoint index.
    o = torch.argsort(keypoint, stable=True)
    o = o[torch.argsort(image[o], stable=True)]
    o = o[torch.argsort(track[o], stable=True)]
    track, image, keypoint, nodes = track[o], image[o], keypoint[o], nodes[o]
    group_first = _segment_starts(track * num_images + image)
    group = torch.cumsum(group_first.to(torch.int64), 0) - 1
    first_idx = torch.nonzero(group_first, as_tuple=True)[0]
    xy = kp.xy[nodes]
    dist = (xy - xy[first_idx[group]]).norm(dim=-1)
    spread = torch.zeros(first_idx.numel(), dtype=dist.dtype, device=device).scatter_reduce_(
        0, group, dist, "amax", include_self=True)
    bad_group = spread > options.max_keypoint_distance_px
    inconsistent = torch.zeros(num_candidates, dtype=torch.bool, device=device)
    inconsistent[track[first_idx[bad_group]]] = True
    report.num_inconsistent = int(inconsistent.sum())
    report.num_duplicates_removed = int((~group_first).sum() - (~group_first & inconsistent[track]).sum())

    # One observation per (track, image): the group's first (smallest keypoint index).
    track, image, keypoint = track[group_first], image[group_first], keypoint[group_first]
    length = torch.bincount(track, minlength=num_candidates)
    too_short = ~inconsistent & (length < options.min_track_length)
    too_long = ~inconsistent & (length > options.max_track_length)
    report.num_too_short, report.num_too_long = int(too_short.sum()), int(too_long.sum())
    keep = ~(inconsistent | too_short | too_long)
    if options.max_num_tracks is not None and int(keep.sum()) > options.max_num_tracks:
        sel = keep[track]
        kept_ids = torch.nonzero(keep, as_tuple=True)[0]
        local = torch.searchsorted(kept_ids, track[sel])
        cap = select_tracks(local, image[sel], kept_ids.numel(), num_images, options.max_num_tracks,
                            options.min_tracks_per_image)
        report.num_capped = int((~cap).sum())
        keep = torch.zeros_like(keep)
        keep[kept_ids[cap]] = True

    sel = keep[track]
    new_id = torch.cumsum(keep.to(torch.int64), 0) - 1
    tracks = Tracks(point=new_id[track[sel]], image=image[sel], keypoint=keypoint[sel])
    num_tracks = int(keep.sum())
    dtype = rec.images.quat.dtype
    points = Points3D(
        point3D_id=torch.arange(1, num_tracks + 1, device=device),
        xyz=torch.zeros(num_tracks, 3, dtype=dtype, device=device),
        rgb=torch.zeros(num_tracks, 3, dtype=torch.uint8, device=device),
        error=torch.full((num_tracks,), -1.0, dtype=dtype, device=device),
    )
    report.num_tracks = num_tracks
    report.num_observations = len(tracks)
    report.mean_track_length = len(tracks) / max(num_tracks, 1)
    log.info("tracks: %d from %d matches (%d candidates; dropped %d inconsistent, %d short, %d long, %d capped)",
             num_tracks, report.num_matches, num_candidates, report.num_inconsistent, report.num_too_short,
             report.num_too_long, report.num_capped)
    out = stage_copy(rec)
    out.points3D, out.tracks = points, tracks
    out.meta["points3D_triangulated"] = False
    return out, report
