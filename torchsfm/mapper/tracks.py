"""Track establishment: connected components of the keypoint match graph, vectorised.

Keypoints are the nodes and the inlier matches of valid pairs the edges. Components (torch
label propagation, `graph.connected_components`, any device) are the candidate tracks. A
component holding two keypoints of one image farther apart than `max_keypoint_distance_px` was
merged by a wrong match: first the matches of such components that close no triangle of the match
graph are cut (`split_merged_tracks`), then a component still merged is discarded, as in GLOMAP
(which discards at once, so one wrong match costs it every point it joined). Otherwise repeated
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

from ..data.model import INDEX_DTYPE, Points3D, Reconstruction, Tracks
from .graph import connected_components, edge_triangle_support, certified_support, stage_copy

log = logging.getLogger(__name__)


@dataclass
class TrackOptions:
    min_track_length: int = 3  # images per track (GLOMAP / InstantSfM: 3)
    max_track_length: int = 200  # longer tracks are dropped (InstantSfM: 200)
    max_keypoint_distance_px: float = 10.0  # two keypoints of one image in a track farther apart: drop it
    split_rounds: int = 2  # rounds of cutting weak matches out of merged tracks (0: drop them, as GLOMAP)
    max_num_tracks: int | None = None  # keep at most this many tracks (None: all)
    min_tracks_per_image: int = 50  # when capping, tracks kept first for every image


@dataclass
class TrackReport:
    num_matches: int = 0  # inlier matches of valid pairs used as edges
    num_invalid_matches: int = 0  # keypoint index out of range, ignored
    num_matches_cut: int = 0  # wrong matches cut out of merged tracks (split_merged_tracks)
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


def _spread_groups(comp: Tensor, image: Tensor, xy: Tensor, num_images: int, max_dist: float
                   ) -> tuple[Tensor, Tensor]:
    """Observations sorted by (comp, image): (first of each (comp, image) group, and whether that
    observation starts a group whose keypoints lie more than `max_dist` apart), both bool (N,)."""
    first = _segment_starts(comp * num_images + image)
    group = torch.cumsum(first.to(torch.int64), 0) - 1
    first_idx = torch.nonzero(first, as_tuple=True)[0]
    dist = (xy - xy[first_idx[group]]).norm(dim=-1)
    spread = torch.zeros(first_idx.numel(), dtype=dist.dtype, device=xy.device).scatter_reduce_(
        0, group, dist, "amax", include_self=True)
    bad = torch.zeros_like(first)
    bad[first_idx[spread > max_dist]] = True
    return first, bad


def _merged_nodes(labels: Tensor, flat: Tensor, kp_offsets: Tensor, xy: Tensor, num_images: int,
                  max_dist: float) -> Tensor:
    """Bool (num_nodes,): keypoints whose match component (`labels`) holds two distant keypoints
    of one image."""
    num_nodes = labels.numel()
    used = torch.zeros(num_nodes, dtype=torch.bool, device=flat.device)
    used[flat.reshape(-1)] = True
    nodes = torch.nonzero(used, as_tuple=True)[0]
    image = torch.searchsorted(kp_offsets, nodes, right=True) - 1
    lab = labels[nodes]
    o = torch.argsort(image, stable=True)
    o = o[torch.argsort(lab[o], stable=True)]
    _, bad = _spread_groups(lab[o], image[o], xy[nodes[o]], num_images, max_dist)
    bad_label = torch.zeros(num_nodes, dtype=torch.bool, device=flat.device)
    bad_label[lab[o][bad]] = True
    return bad_label[labels]


def split_merged_tracks(num_nodes: int, flat: Tensor, kp_offsets: Tensor, xy: Tensor, num_images: int,
                        max_dist: float, rounds: int) -> tuple[Tensor, int, Tensor]:
    """Cut the wrong matches that merge tracks: (kept edges, number cut, component labels of the
    kept edges' graph, as `connected_components` gives them).

    Only components with two distant keypoints in one image are touched. In round r, their
    matches that close at most r triangles in the match graph are cut: inside a track, matched
    over many pairs, an edge closes many; a wrong match between two tracks closes none. GLOMAP
    drops such a component whole, losing every point it merged. Triangles are only counted for
    the matches that MinHash cannot already prove to close more than r (`certified_support`):
    counting them all would walk every neighbour of every match, 47M lookups on a 200-image
    turntable. Components are labelled once; after a cut only the merged ones are relabelled.
    """
    cut = 0
    labels = connected_components(num_nodes, flat)
    for r in range(rounds):
        if flat.shape[0] == 0:
            break
        merged = _merged_nodes(labels, flat, kp_offsets, xy, num_images, max_dist)
        query = torch.nonzero(merged[flat[:, 0]], as_tuple=True)[0]
        if query.numel() == 0:
            break
        query = query[~certified_support(num_nodes, flat, query, r + 1, seed=r)]
        weak = edge_triangle_support(num_nodes, flat, query) <= r
        if not bool(weak.any()):
            continue
        keep = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        keep[query[weak]] = False
        cut += int(weak.sum())
        flat = flat[keep]
        # cuts only split merged components (whole components): relabel their nodes alone
        labels = torch.where(merged, connected_components(num_nodes, flat[merged[flat[:, 0]]]), labels)
    return flat, cut, labels


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

    # (M, 2) rows into keypoints.xy of the matches of valid pairs, built per pair (no per-match
    # pair index): int32 while they fit, as this is the largest array of the stage
    idx = INDEX_DTYPE if len(kp) <= torch.iinfo(INDEX_DTYPE).max else torch.long
    counts, pairs, m = vg.num_matches(), vg.pairs, vg.matches
    if not bool(vg.valid.all()):
        m = m[torch.repeat_interleave(vg.valid, counts)]
        counts, pairs = counts[vg.valid], pairs[vg.valid]
    flat = torch.repeat_interleave(kp.offsets[pairs].to(idx), counts, dim=0) + m.to(idx)
    ok = ((m >= 0) & (m < torch.repeat_interleave(kp.count()[pairs].to(idx), counts, dim=0))).all(1)
    report.num_invalid_matches = int((~ok).sum())
    if report.num_invalid_matches:
        log.warning("tracks: %d matches index keypoints out of range; ignored", report.num_invalid_matches)
        flat = flat[ok]
    report.num_matches = int(flat.shape[0])
    flat, report.num_matches_cut, labels = split_merged_tracks(
        len(kp), flat, kp.offsets, kp.xy, num_images, options.max_keypoint_distance_px, options.split_rounds)

    # Components over all keypoints; those in no match are singletons and are not tracks.
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
    group_first, bad_group = _spread_groups(track, image, kp.xy[nodes], num_images, options.max_keypoint_distance_px)
    inconsistent = torch.zeros(num_candidates, dtype=torch.bool, device=device)
    inconsistent[track[bad_group]] = True
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
    log.info("tracks: %d from %d matches (%d cut; %d candidates; dropped %d inconsistent, %d short, %d long, %d capped)",
             num_tracks, report.num_matches, report.num_matches_cut, num_candidates, report.num_inconsistent, report.num_too_short,
             report.num_too_long, report.num_capped)
    out = stage_copy(rec)
    out.points3D, out.tracks = points, tracks
    out.meta["points3D_triangulated"] = False
    return out, report
