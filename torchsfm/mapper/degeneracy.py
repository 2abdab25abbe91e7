"""Degenerate-geometry checks of the global mapper: no parallax, symmetric structure, outlier cameras.

- `rotation_only_fit`: per pair, how well a pure rotation explains its matches (the homography
  of a rotating camera, H = K_j R K_i^-1). COLMAP calls a pair PANORAMIC when H explains about as
  many matches as E; with all pairs panoramic (a tripod panorama, near-duplicate images), camera
  positions are not observable and global positioning would return noise of any size.
- `symmetry_warning`: rotation averaging that has to drop many edges with large residuals is
  the signature of repetitive or symmetric structure (the Doppelganger problem), or of badly
  matched pairs; it cannot be fixed here, only reported.
- `outlier_cameras`: after positioning, cameras that are far from all others (robust z-score and
  ratio to the median of the distance to their nearest registered neighbour); the pipeline also
  drops images that keep too few observations after the last filtering.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cameras.models import focal_length
from ..data.model import Reconstruction, spread_subset

log = logging.getLogger(__name__)


@dataclass
class DegeneracyOptions:
    # no parallax: a pair is rotation-only when a rotation explains this fraction of its matches
    # within rotation_only_max_error pixels (COLMAP's max_H_inlier_ratio / max_error defaults)
    rotation_only_max_error: float = 4.0
    rotation_only_inlier_ratio: float = 0.8
    # the scene is rotation-only when this fraction of the valid pairs is
    rotation_only_pair_fraction: float = 0.8
    # symmetry / repetitive structure: share of the rotation-averaging edges dropped
    symmetry_dropped_edge_fraction: float = 0.1
    symmetry_min_dropped_edges: int = 3
    # outlier cameras after global positioning: nearest-neighbour distance above both this robust
    # z-score and this multiple of the median nearest-neighbour distance (regular layouts have a
    # tiny spread of that distance, so the z-score alone would flag ordinary cameras)
    outlier_camera_z: float = 8.0
    outlier_camera_ratio: float = 5.0
    min_camera_observations: int = 10  # registered images keeping fewer observations are dropped
    # the rotation-only fit uses at most this many matches per pair, evenly spread (None: all)
    rotation_only_max_matches: int | None = 256
    chunk_matches: int = 1 << 19  # matches per pass of the rotation-only fit (whole pairs)


def _bearings_of_matches(rec: Reconstruction, table: Tensor, select: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Unit bearings (M', 3) of both ends of the matches in the bool mask `select` (all when
    None) and their pair index (M',); `table`: the graph's `unprojected_keypoints`."""
    from .triangulation import normalized_matches

    pm = rec.view_graph.pair_of_match()
    out = []
    for xy in normalized_matches(rec, select, table):
        ray = torch.cat([xy, torch.ones_like(xy[:, :1])], 1)
        out.append(ray / ray.norm(dim=1, keepdim=True))
    return out[0], out[1], (pm if select is None else pm[select])


def rotation_only_fit(rec: Reconstruction, options: DegeneracyOptions | None = None) -> tuple[Tensor, Tensor]:
    """(E,) fraction of each pair's matches explained by a pure rotation within
    `rotation_only_max_error` pixels, and (E, 3, 3) that rotation (cam_j_from_cam_i).

    The rotation is the trimmed least-squares (Kabsch) fit of the bearings, batched over pairs
    with segment sums: fit all matches, keep those within 3x the threshold, fit again. Pairs
    without finite matches get ratio 0. Both use at most `rotation_only_max_matches` per pair,
    evenly spread: a ratio and a 3-DoF fit need no more, and the pass over all matches was the
    run's memory peak (1 GB on a 300-image corridor). Pairs are fitted in chunks of about
    `chunk_matches` matches, so the temporaries stay bounded at any size.
    """
    o = options or DegeneracyOptions()
    vg = rec.view_graph
    E, dt, dev = len(vg), rec.dtype, rec.device
    ratio = torch.zeros(E, dtype=dt, device=dev)
    Rfit = torch.eye(3, dtype=dt, device=dev).repeat(E, 1, 1)
    if E == 0 or vg.matches.shape[0] == 0:
        return ratio, Rfit
    from .triangulation import unprojected_keypoints

    table = unprojected_keypoints(rec)  # once: per chunk it cost O(keypoints) each
    for e0, e1 in vg.chunks(o.chunk_matches):  # whole pairs: each pair's fit is its own
        sub = Reconstruction(rec.cameras, rec.images, rec.keypoints, rec.points3D, rec.tracks, vg.pair_slice(e0, e1),
                             rec.meta)
        select = None
        if o.rotation_only_max_matches:
            select = spread_subset(sub.view_graph.pair_of_match(), e1 - e0, o.rotation_only_max_matches)
        ratio[e0:e1], Rfit[e0:e1] = _rotation_only_fit(sub, table, select, o)
    return ratio, Rfit


def _rotation_only_fit(rec: Reconstruction, table: Tensor, select: Tensor | None, o: DegeneracyOptions
                       ) -> tuple[Tensor, Tensor]:
    vg = rec.view_graph
    E, dt, dev = len(vg), rec.dtype, rec.device
    ratio = torch.zeros(E, dtype=dt, device=dev)
    Rfit = torch.eye(3, dtype=dt, device=dev).repeat(E, 1, 1)
    if vg.matches.shape[0] == 0:
        return ratio, Rfit
    bi, bj, pm = _bearings_of_matches(rec, table, select)
    finite = torch.isfinite(bi).all(1) & torch.isfinite(bj).all(1)
    bi, bj = torch.nan_to_num(bi), torch.nan_to_num(bj)
    f = focal_length(rec.cameras)[rec.images.camera[vg.pairs[pm, 1]]]
    w = finite.to(dt)
    # per-match 3x3 algebra on (3, M) rows: batched tiny matrix products are slow on the CPU
    bi_r, bj_r = bi.T.contiguous(), bj.T.contiguous()
    for _ in range(2):
        outer = torch.stack([w * bj_r[a] * bi_r[b] for a in range(3) for b in range(3)])  # (9, M)
        M = torch.zeros(9, E, dtype=dt, device=dev).index_add_(1, pm, outer).T.reshape(E, 3, 3)
        U, _, Vh = torch.linalg.svd(M)
        d = torch.linalg.det(U @ Vh)
        D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
        Rfit = U @ D @ Vh
        Rm = torch.index_select(Rfit.reshape(E, 9).T.contiguous(), 1, pm)  # (9, M)
        pred = [Rm[3 * a] * bi_r[0] + Rm[3 * a + 1] * bi_r[1] + Rm[3 * a + 2] * bi_r[2] for a in range(3)]
        cross = torch.stack([pred[1] * bj_r[2] - pred[2] * bj_r[1], pred[2] * bj_r[0] - pred[0] * bj_r[2],
                             pred[0] * bj_r[1] - pred[1] * bj_r[0]])
        err_px = cross.square().sum(0).sqrt().clamp(max=1.0).asin() * f
        w = (finite & (err_px <= 3 * o.rotation_only_max_error)).to(dt)
    good = (finite & (err_px <= o.rotation_only_max_error)).to(dt)
    n = torch.bincount(pm, minlength=E).to(dt).clamp_min(1)  # matches used, per pair
    ratio = torch.zeros(E, dtype=dt, device=dev).index_add_(0, pm, good) / n
    return ratio, Rfit


def detect_no_parallax(rec: Reconstruction, options: DegeneracyOptions | None = None
                       ) -> tuple[bool, dict, torch.Tensor]:
    """Whether (almost) every valid pair is explained by a pure rotation (no parallax), counts,
    and the rotation-only fit of every pair (E, 3, 3) cam_j_from_cam_i. For such pairs that fit
    is the right relative rotation: an essential matrix has no unique decomposition without a
    baseline, so the relative-pose stage's rotations are then off by up to a degree or so."""
    o = options or DegeneracyOptions()
    vg = rec.view_graph
    ratio, Rfit = rotation_only_fit(rec, o)
    valid = vg.valid
    n = int(valid.sum())
    rot_only = valid & (ratio >= o.rotation_only_inlier_ratio)
    frac = int(rot_only.sum()) / max(n, 1)
    counts = {"pairs": n, "rotation_only_pairs": int(rot_only.sum()), "rotation_only_fraction": round(frac, 4)}
    return n > 0 and frac >= o.rotation_only_pair_fraction, counts, Rfit


def symmetry_warning(edges_in: int, edges_dropped: int, options: DegeneracyOptions | None = None,
                     by: str = "rotation averaging") -> str | None:
    """A warning text when a stage (`by`) dropped a suspicious share of the image pairs."""
    o = options or DegeneracyOptions()
    if edges_in <= 0 or edges_dropped < o.symmetry_min_dropped_edges:
        return None
    frac = edges_dropped / edges_in
    if frac < o.symmetry_dropped_edge_fraction:
        return None
    return (f"{by} dropped {edges_dropped} of {edges_in} image pairs ({100 * frac:.0f}%) as "
            "inconsistent: the scene may be symmetric or repetitive (or many pairs are mismatched); check the "
            "model for folded or duplicated parts (Doppelganger-style pair filtering or retrieval can help)")


def outlier_cameras(rec: Reconstruction, options: DegeneracyOptions | None = None) -> Tensor:
    """(I,) bool: registered cameras far from every other camera: the distance to the nearest
    registered neighbour has a robust z-score above `outlier_camera_z` and is more than
    `outlier_camera_ratio` times the median such distance."""
    o = options or DegeneracyOptions()
    reg = rec.images.registered
    out = torch.zeros_like(reg)
    idx = torch.nonzero(reg)[:, 0]
    if idx.numel() < 5:
        return out
    c = rec.images.centers[idx]
    d = torch.cdist(c, c)
    d.fill_diagonal_(float("inf"))
    nn = d.min(1).values
    med = nn.median()
    mad = (nn - med).abs().median().clamp_min(1e-12)
    z = (nn - med) / (1.4826 * mad)
    out[idx] = (z > o.outlier_camera_z) & (nn > o.outlier_camera_ratio * med)
    return out
