"""Non-finite values (NaN/Inf) after a stage: quarantine what carries them, never pass them on.

Checked, in this order, on the mapper's working Reconstruction:
- camera parameters: images of a camera with non-finite parameters are taken out of play;
- keypoints: matches and track observations that use a non-finite keypoint are removed;
- view graph: valid pairs with non-finite two-view geometry (F, E, H, relative pose) become
  invalid (F/E/H of zero mean "absent" and are fine);
- poses: registered images with a non-finite pose are unregistered;
- points: points with non-finite coordinates lose their observations.
Every quarantined image gets a reason in `meta["image_reason"]`. When more than
`max_fraction` of the images in play are hit at once, the stage is considered broken and a
`NonFiniteError` naming it is raised instead.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..data.model import Reconstruction, Tracks, offsets_from_counts
from .graph import active_images, mark_images
from .triangulation import compact_tracks

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A stage produced non-finite values for too many images."""


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t).flatten(1).all(1)


def check_finite(rec: Reconstruction, stage: str, max_fraction: float = 0.5) -> tuple[Reconstruction, list[str]]:
    """Quarantine non-finite data (see the module docstring). Returns the cleaned reconstruction
    (a copy-on-write of `rec`: the input's containers are not modified) and the warnings."""
    rec = Reconstruction(*(None if p is None else dataclasses.replace(p) for p in
                           (rec.cameras, rec.images, rec.keypoints, rec.points3D, rec.tracks, rec.view_graph)),
                         dict(rec.meta))
    warnings: list[str] = []
    n_img = len(rec.images)
    in_play = active_images(rec.meta, n_img, rec.device) | rec.images.registered
    hit = torch.zeros(n_img, dtype=torch.bool, device=rec.device)

    def warn(msg: str) -> None:
        log.warning(msg)
        warnings.append(msg)

    bad_cam = ~_all_finite(rec.cameras.params)
    if bool(bad_cam.any()):
        imgs = bad_cam[rec.images.camera] & in_play
        warn(f"{stage}: {int(bad_cam.sum())} camera(s) have non-finite parameters; their {int(imgs.sum())} image(s) "
             "are taken out")
        mark_images(rec.meta, n_img, imgs, f"non-finite camera parameters after {stage}")
        rec.images.registered = rec.images.registered & ~imgs
        hit |= imgs

    kp_bad = ~torch.isfinite(rec.keypoints.xy).all(1)
    vg = rec.view_graph
    if bool(kp_bad.any()):
        n_bad = int(kp_bad.sum())
        if vg is not None and vg.matches.shape[0]:
            pm = vg.pair_of_match()
            ends = rec.keypoints.offsets[vg.pairs[pm]] + vg.matches
            ok = ~(kp_bad[ends.clamp(0, len(rec.keypoints) - 1)]).any(1)
            if not bool(ok.all()):
                vg.matches = vg.matches[ok]
                vg.match_offsets = offsets_from_counts(torch.bincount(pm[ok], minlength=len(vg)))
            warn(f"{stage}: {n_bad} keypoint(s) are not finite; {int((~ok).sum())} match(es) using them removed")
        else:
            warn(f"{stage}: {n_bad} keypoint(s) are not finite")
        tr = rec.tracks
        if len(tr):
            keep = ~kp_bad[rec.keypoints.flat_index(tr.image, tr.keypoint)]
            rec.tracks = Tracks(tr.point[keep], tr.image[keep], tr.keypoint[keep])

    if vg is not None and len(vg):
        geo = torch.cat([vg.F.flatten(1), vg.E.flatten(1), vg.H.flatten(1), vg.rel_quat, vg.rel_trans], 1)
        bad_pair = vg.valid & ~torch.isfinite(geo).all(1)
        if bool(bad_pair.any()):
            warn(f"{stage}: {int(bad_pair.sum())} image pair(s) have non-finite two-view geometry; they are "
                 "no longer used")
            vg.valid = vg.valid & ~bad_pair

    bad_img = ~(_all_finite(rec.images.quat) & _all_finite(rec.images.trans)) & rec.images.registered
    if bool(bad_img.any()):
        warn(f"{stage} produced non-finite poses for {int(bad_img.sum())} image(s); they are unregistered")
        rec.images.registered = rec.images.registered & ~bad_img
        mark_images(rec.meta, n_img, bad_img, f"non-finite pose after {stage}")
        hit |= bad_img

    if rec.points3D is not None and len(rec.points3D):
        bad_pt = ~_all_finite(rec.points3D.xyz)
        if bool(bad_pt.any()):
            warn(f"{stage} produced {int(bad_pt.sum())} non-finite point(s); they are dropped")
            keep_obs = torch.ones(len(rec.tracks), dtype=torch.bool, device=rec.device)
            xyz = torch.nan_to_num(rec.points3D.xyz, nan=0.0, posinf=0.0, neginf=0.0)
            rec = compact_tracks(rec, xyz, rec.tracks, keep_obs, ~bad_pt, 1)

    n_play = int(in_play.sum())
    if n_play and int(hit.sum()) > max_fraction * n_play:
        raise NonFiniteError(f"{stage} produced non-finite values for {int(hit.sum())} of {n_play} images "
                             f"(more than {100 * max_fraction:.0f}%): the stage failed, not the data")
    return rec, warnings
