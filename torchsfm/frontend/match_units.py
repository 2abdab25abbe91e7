"""The torch front end's units of work, as pure functions: arrays in, arrays out, no database.

`match_task` computes the raw matches of one planned matching unit (`descriptor_matching.
plan_matches`), `verify_task` the two-view geometries of one verification batch
(`verification.plan_pair_batches`). Both read a `FeaturePack`: the keypoints, descriptors and
cameras of the images they touch. The local executor hands them the driver's arrays in place;
the Ray executor ships each image's features through the object store once (`image_features`)
and a task assembles the compact pack of its images (`assemble_pack`). Results are numpy arrays
either way, so the driver writes the same rows whichever ran them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..data.model import Cameras
from .descriptor_matching import DescriptorMatchOptions, MatchUnit, RawMatches, match_unit
from .verification import VerificationOptions, gather_pair_batch, verify_pairs

TWO_VIEW_DEGENERATE = 1


@dataclass
class FeaturePack:
    """Features of some images, flat: image i's rows are offsets[i]:offsets[i+1]."""

    xy: torch.Tensor | np.ndarray  # (K, 2) float64 keypoint positions
    desc: torch.Tensor | np.ndarray  # (K, D) descriptors (uint8 or float32)
    offsets: torch.Tensor | np.ndarray  # (I+1,) int64
    image_camera: torch.Tensor | np.ndarray  # (I,) row of each image in `cameras`
    cameras: Cameras

    def on(self, device: torch.device) -> "FeaturePack":
        """Tensors on `device`, without a copy where they are there already. Arrays from Ray's
        object store are read-only; the unit functions never write to their inputs."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = [torch.as_tensor(a).to(device) for a in (self.xy, self.desc, self.offsets, self.image_camera)]
        return FeaturePack(t[0], t[1], t[2].long(), t[3].long(), self.cameras.to(device))


def image_features(xy: np.ndarray, desc: np.ndarray, offsets: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's (keypoint xy, descriptors): what the Ray executor ships per image, once."""
    a, b = int(offsets[row]), int(offsets[row + 1])
    return xy[a:b], desc[a:b]


def assemble_pack(images: list[tuple[np.ndarray, np.ndarray]], image_camera: np.ndarray, cameras: Cameras,
                  descriptors: bool = True) -> FeaturePack:
    """The FeaturePack of per-image (xy, descriptors) parts, in order (a worker's side of
    `image_features`); without `descriptors` (verification reads keypoints only) they stay out."""
    counts = np.asarray([len(x) for x, _ in images], dtype=np.int64)
    desc = np.concatenate([d for _, d in images]) if descriptors else images[0][1][:0]
    return FeaturePack(np.concatenate([x for x, _ in images]), desc,
                       np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), image_camera, cameras)


@dataclass
class UnitMatches:
    """Raw matches of a unit's P pairs, CSR by pair (in the unit's order), best match first."""

    counts: np.ndarray  # (P,) int64
    matches: np.ndarray  # (sum(counts), 2) int64 keypoint indices (first image, second image)


def match_task(pack: FeaturePack, pairs: np.ndarray, unit: MatchUnit, options: DescriptorMatchOptions,
               device: str | torch.device) -> UnitMatches:
    """Raw matches of `unit`, whose pair k is pairs[k] ((P, 2) image rows of `pack`)."""
    device = torch.device(device)
    p = pack.on(device)
    pairs_t = torch.as_tensor(pairs).to(device).long()
    return unit_matches(match_unit(p.desc, p.offsets, pairs_t, unit, options), len(pairs_t))


def lightglue_task(pack: FeaturePack, pairs: np.ndarray, unit, feature: str, options,
                   device: str | torch.device) -> UnitMatches:
    """LightGlue raw matches of one planned batch (`learned.lightglue_matcher.plan_lightglue`),
    whose pair k is pairs[k] ((P, 2) image rows of `pack`); the network is loaded once per process."""
    from .learned.lightglue_matcher import lightglue_unit

    device = torch.device(device)
    p = pack.on(device)
    wh = torch.stack([p.cameras.width[p.image_camera], p.cameras.height[p.image_camera]], 1)
    pairs_t = torch.as_tensor(pairs).to(device).long()
    return unit_matches(lightglue_unit(p.desc, p.offsets, p.xy, wh, pairs_t, unit, feature, options), len(pairs_t))


def unit_matches(raw: RawMatches, num_pairs: int) -> UnitMatches:
    """RawMatches of a unit (raw.pair: the position in the unit) as CSR by pair, order within a
    pair kept."""
    counts = torch.bincount(raw.pair, minlength=num_pairs)
    order = torch.argsort(raw.pair, stable=True)
    return UnitMatches(counts.cpu().numpy(), torch.stack([raw.idx1, raw.idx2], dim=1)[order].cpu().numpy())


def cap_matches(um: UnitMatches, max_per_pair: int) -> UnitMatches:
    """At most `max_per_pair` raw matches per pair, the first (best) of each pair's kept
    (COLMAP's SiftMatchingOptions.max_num_matches); <= 0: no cap."""
    if max_per_pair <= 0 or not len(um.counts) or um.counts.max() <= max_per_pair:
        return um
    start = np.repeat(np.cumsum(um.counts) - um.counts, um.counts)
    keep = (np.arange(len(um.matches)) - start) < max_per_pair
    return UnitMatches(np.minimum(um.counts, max_per_pair), um.matches[keep])


@dataclass
class VerifiedBatch:
    """Two-view geometries of a batch of pairs, as COLMAP stores them (degenerate where failed)."""

    config: np.ndarray  # (B,) int64
    F: np.ndarray  # (B, 3, 3) float64; zeros where not estimated
    E: np.ndarray
    H: np.ndarray
    qvec: np.ndarray  # (B, 4) w-first cam2_from_cam1
    tvec: np.ndarray  # (B, 3)
    pose_valid: np.ndarray  # (B,) bool
    inlier: np.ndarray  # (sum of the batch's match counts,) bool, aligned with its raw matches


def verify_task(pack: FeaturePack, pairs: np.ndarray, counts: np.ndarray, matches: np.ndarray,
                pair_seed: np.ndarray, options: VerificationOptions, device: str | torch.device) -> VerifiedBatch:
    """Verify B pairs (pairs[b]: image rows of `pack`; raw matches CSR by `counts`), each with its
    own RANSAC stream `pair_seed[b]`, in one padded batch."""
    device = torch.device(device)
    p = pack.on(device)
    counts_t = torch.as_tensor(counts).long()
    moff = torch.cat([counts_t.new_zeros(1), counts_t.cumsum(0)]).to(device)
    rows = torch.arange(len(counts_t))
    batch = gather_pair_batch(p.xy, p.offsets, torch.as_tensor(pairs).to(device).long(),
                              torch.as_tensor(matches).to(device).long(), moff, p.cameras, p.image_camera, rows,
                              torch.as_tensor(pair_seed).long(), device=device)
    g = reset_failed(verify_pairs(batch, options), options.min_num_inliers)
    valid = torch.arange(g.inliers.shape[1], device=device)[None] < counts_t.to(device)[:, None]
    return VerifiedBatch(g.config.cpu().numpy(), g.F.double().cpu().numpy(), g.E.double().cpu().numpy(),
                         g.H.double().cpu().numpy(), g.rel_quat.double().cpu().numpy(),
                         g.rel_trans.double().cpu().numpy(), g.pose_valid.cpu().numpy(),
                         g.inliers[valid].cpu().numpy())


def reset_failed(g, min_num_inliers: int):
    """A pair verified with fewer than min_num_inliers inliers is stored as COLMAP stores it: a
    default (degenerate) geometry without inliers, F, E, H or pose."""
    bad = g.num_inliers < min_num_inliers
    g.config = torch.where(bad, torch.full_like(g.config, TWO_VIEW_DEGENERATE), g.config)
    g.inliers = g.inliers & ~bad[:, None]
    for name in ("F", "E", "H"):
        setattr(g, name, getattr(g, name).masked_fill(bad[:, None, None], 0))
    g.pose_valid = g.pose_valid & ~bad
    return g
