"""Round-based LO-RANSAC over all pairs of a chunk at once, with COLMAP's adaptive stopping.

Each round draws K minimal samples for every pair still running, solves them in one batch, scores
the models in batched matmuls, refits the round's best model by IRLS on its inliers (local
optimisation) and keeps the best support so far. A pair leaves when COLMAP's trial bound for its
best inlier count at `confidence` is met (and `min_num_trials` done) or at its `max_trials`; the
one host sync per round is the read of which pairs still run (to shrink the batch).

Preemptive scoring: when a pair has many more matches than `preemptive_points`, all models of a
round are first counted on a stratified random subset of that many matches, and only the best
`preemptive_keep` of them are scored on all matches (the cost of a round then grows with the
number of models plus the number of matches, not their product).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .options import VerificationOptions
from .sampling import growth_pool, hash32, sample_distinct, stream_keys
from .scoring import (Frames, epipolar_residuals, epipolar_support, homography_residuals, homography_support,
                      support_key)
from .solvers import essential_seven_point, four_point_homography, refit_fundamental, refit_homography, seven_point


@dataclass(frozen=True)
class ModelKind:
    """What differs between F, E and H: sample size, solver, scoring and refit."""

    name: str
    sample_size: int
    stream: int  # random stream id, so F, E and H draw independent samples
    solve: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (B, s, 2) x 2 -> (B, r, 3, 3), (B, r)
    support: Callable[..., tuple[Tensor, Tensor | None]]  # (feats, s1, s2, models, thr2, rsum) -> count, rsum
    residuals: Callable[[Frames, Tensor], tuple[Tensor, Tensor]]  # (frames, (P, 3, 3)) -> err2, aux (P, M)
    refit: Callable[[Frames, Tensor, Tensor, Tensor], Tensor]  # (frames, weights, aux, model) -> model
    rows_per_model: int  # scoring rows per model (memory budget)


def _refit_epipolar(essential: bool):
    def refit(frames: Frames, w: Tensor, den: Tensor, model: Tensor) -> Tensor:
        # Sampson weighting: the algebraic residual over its gradient norm is the Sampson error
        w = torch.where(w > 0, w / den.to(torch.float64).clamp_min(1e-30), 0.0)
        return refit_fundamental(frames.n1, frames.n2, w, model, essential)
    return refit


def _refit_h(frames: Frames, w: Tensor, h2: Tensor, model: Tensor) -> Tensor:
    # 1 / h2^2 turns the DLT's algebraic residual into the transfer error
    w = torch.where(w > 0, w / h2.to(torch.float64).square().clamp_min(1e-30), 0.0)
    return refit_homography(frames.n1, frames.n2, w, model)


def _solve_h(x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
    H, ok = four_point_homography(x1, x2)
    return H[:, None], ok[:, None]


F_KIND = ModelKind("F", 7, 1, seven_point, epipolar_support, epipolar_residuals, _refit_epipolar(False), 5)
# E hypotheses: 7-point models on calibrated coordinates projected onto the essential manifold
# (closed form, `linalg.essential_from_rank2`), then LO with essential refits. Why not the
# 5-point solver: batched it needs a 10x10 non-symmetric eigen (or Sturm) solve per sample, which
# LAPACK runs one matrix at a time (~46 us each here, against ~3 us for this whole path) and
# cuSOLVER has no batched non-symmetric eig; the extra trials a 7-sample needs cost less.
E_KIND = ModelKind("E", 7, 2, essential_seven_point, epipolar_support, epipolar_residuals, _refit_epipolar(True), 5)
H_KIND = ModelKind("H", 4, 3, _solve_h, homography_support, homography_residuals, _refit_h, 3)


def num_trials_bound(count: Tensor, num: Tensor, sample_size: int, confidence: float, multiplier: float) -> Tensor:
    """COLMAP's ComputeNumTrials (hypergeometric form, `Fixing the RANSAC stopping criterion`):
    trials to draw one all-inlier sample at `confidence`; float64 (P,), inf when unreachable."""
    k = count.to(torch.float64)
    n = num.to(torch.float64)
    p = torch.ones_like(k)
    for i in range(sample_size):
        p = p * ((k - i) / (n - i).clamp_min(1e-300)).clamp(0.0, 1.0)
    p_out = 1.0 - p
    fail = 1.0 - confidence
    if fail <= 0:
        return torch.full_like(k, math.inf)
    bound = torch.ceil(math.log(fail) / torch.log(p_out.clamp(1e-300, 1.0 - 1e-16)) * multiplier)
    bound = torch.where(p_out <= 0, torch.ones_like(bound), bound)
    return torch.where(p_out >= 1, torch.full_like(bound, math.inf), bound)


def max_trials_for_ratio(ratio: Tensor, sample_size: int, options: VerificationOptions) -> Tensor:
    """min(max_num_trials, bound at an assumed inlier ratio), as COLMAP's RANSAC constructor."""
    n = 100000
    bound = num_trials_bound(torch.floor(ratio.to(torch.float64) * n), torch.full_like(ratio, n, dtype=torch.float64),
                             sample_size, options.confidence, options.dyn_num_trials_multiplier)
    return bound.clamp(max=options.max_num_trials).long()


@dataclass
class RansacResult:
    model: Tensor  # (P, 3, 3) in the frames' normalised coordinates; zeros where none
    num_inliers: Tensor  # (P,) int64
    inliers: Tensor  # (P, M) bool
    num_trials: Tensor  # (P,) int64
    success: Tensor  # (P,) bool: a model with >= sample_size inliers (COLMAP's report.success)


def _chunked_support(kind: ModelKind, feats: Tensor, s1: Tensor, s2: Tensor, models: Tensor, thr2: float,
                     with_rsum: bool, budget: int) -> tuple[Tensor, Tensor | None]:
    """kind.support over (P, H) models, chunked over pairs and models to `budget` elements."""
    P, Hn = models.shape[:2]
    per_model = kind.rows_per_model * max(feats.shape[-1], 1)
    hyp_step = max(1, min(Hn, budget // per_model))
    pair_step = max(1, budget // (per_model * hyp_step))
    if pair_step >= P and hyp_step >= Hn:
        return kind.support(feats, s1, s2, models, thr2, with_rsum)
    counts, rsums = [], []
    for p0 in range(0, P, pair_step):
        sl = slice(p0, p0 + pair_step)
        cs, rs = [], []
        for h0 in range(0, Hn, hyp_step):
            c, r = kind.support(feats[sl], s1[sl], s2[sl], models[sl, h0:h0 + hyp_step], thr2, with_rsum)
            cs.append(c)
            rs.append(r)
        counts.append(torch.cat(cs, 1))
        rsums.append(torch.cat(rs, 1) if with_rsum else None)
    return torch.cat(counts, 0), (torch.cat(rsums, 0) if with_rsum else None)


def _subset_features(frames: Frames, key: Tensor, size: int) -> Tensor:
    """Features (P, 11, size) of a stratified random subset of each pair's valid matches."""
    n = frames.num
    u = (hash32(key) >> 8).to(torch.float64) * (1.0 / (1 << 24))  # (P,)
    j = torch.arange(size, device=n.device, dtype=torch.float64)
    pos = torch.floor((j[None] + u[:, None]) * n[:, None].to(torch.float64) / size).long()
    pos = torch.where(n[:, None] >= size, pos, torch.arange(size, device=n.device)[None]).clamp_max(
        frames.valid.shape[1] - 1)
    sub = torch.gather(frames.feats(), 2, pos[:, None, :].expand(-1, 11, -1))
    return sub * (torch.arange(size, device=n.device)[None] < n[:, None])[:, None]


def _round_best(frames: Frames, kind: ModelKind, models: Tensor, valid: Tensor, thr2: float,
                opt: VerificationOptions, sub_key: Tensor) -> tuple[Tensor, Tensor]:
    """The best model of the round per pair (P, 3, 3) and its key (P,)."""
    P, Hn = models.shape[:2]
    M = frames.valid.shape[1]
    S = opt.preemptive_points
    keep = max(opt.preemptive_keep, 1)
    if S > 0 and M > 2 * S and Hn > keep:
        sub = _subset_features(frames, sub_key, S)
        c_sub, _ = _chunked_support(kind, sub, frames.s1, frames.s2, models, thr2, False, opt.max_elements)
        top = torch.where(valid, c_sub, -1).topk(keep, dim=1).indices
        models = torch.gather(models, 1, top[..., None, None].expand(-1, -1, 3, 3))
        valid = torch.gather(valid, 1, top)
    count, rsum = _chunked_support(kind, frames.feats(), frames.s1, frames.s2, models, thr2, True, opt.max_elements)
    key = torch.where(valid, support_key(count, rsum, frames.num, thr2), -1.0)
    pick = key.argmax(1)
    ar = torch.arange(P, device=models.device)
    return models[ar, pick], key[ar, pick]


def _local_optimize(frames: Frames, kind: ModelKind, model: Tensor, thr2: float, iterations: int):
    """IRLS refits from `model` (P, 3, 3); returns the best (model, count, key) seen."""
    err2, aux = kind.residuals(frames, model)

    def evaluate(e2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        inl = e2 < thr2
        count = inl.sum(1)
        rsum = torch.where(inl, e2, 0.0).sum(1, dtype=torch.float64)
        return inl, count, support_key(count, rsum, frames.num, thr2)

    inl, count, key = evaluate(err2)
    for _ in range(iterations):
        # IRLS on the inliers with Cauchy weights at half the threshold: matches that fall
        # inside the threshold by chance pull the fit less than the true ones
        w = torch.where(inl, 1.0 / (1.0 + err2.to(torch.float64) * (4.0 / thr2)), 0.0)
        new = kind.refit(frames, w, aux, model)
        new = torch.where(torch.isfinite(new).flatten(1).all(1)[:, None, None], new, 0.0)
        e2, ax = kind.residuals(frames, new)
        i2, c2, k2 = evaluate(e2)
        better = k2 > key
        model = torch.where(better[:, None, None], new, model)
        count = torch.where(better, c2, count)
        key = torch.where(better, k2, key)
        inl = torch.where(better[:, None], i2, inl)
        aux = torch.where(better[:, None], ax, aux)
        err2 = torch.where(better[:, None], e2, err2)
    return model, count, key


def run_ransac(frames: Frames, kind: ModelKind, options: VerificationOptions, pair_seed: Tensor,
               max_trials: Tensor, active: Tensor, decision_floor: Tensor | None = None) -> RansacResult:
    """LO-RANSAC of one model kind for the pairs with `active` (P,) set; max_trials (P,) int64.

    decision_floor (P,): the smallest inlier count that can change the pair's configuration
    (e.g. min_num_inliers). The stopping bound uses max(best count, floor): once a model with
    `floor` inliers would have been sampled at `confidence`, a pair whose best stays below it is
    decided (degenerate) and stops, where COLMAP runs on to max_num_trials.
    """
    P, M = frames.valid.shape
    dev = frames.n1.device
    s = kind.sample_size
    thr2 = float(options.max_error) ** 2
    best = torch.zeros(P, 3, 3, dtype=torch.float64, device=dev)
    best_key = torch.full((P,), -1.0, dtype=torch.float64, device=dev)
    best_count = torch.zeros(P, dtype=torch.long, device=dev)
    trials = torch.zeros(P, dtype=torch.long, device=dev)
    keys = stream_keys(options.seed, kind.stream, pair_seed)
    sub_keys = stream_keys(options.seed, kind.stream + 16, pair_seed)
    frames.feats()
    run = active & (frames.num >= s) & (max_trials > 0)
    idx = torch.nonzero(run).flatten().cpu()  # kept on the host: the rounds' only sync reads it
    k_cap = int(max_trials[run].max()) if idx.numel() else 0
    rnd = 0
    while idx.numel():
        # a round's size doubles up to max_trials_per_round, but never exceeds what any pair may still use
        K = max(1, min(options.trials_per_round << min(rnd, 30), options.max_trials_per_round, k_cap))
        ix = idx.to(dev)
        sub = frames.index(ix)
        t0 = trials[ix]
        trial = t0[:, None] + torch.arange(K, device=dev)
        pool = growth_pool(sub.num, trial, s, options.growth_trials, options.growth_start)
        samp = sample_distinct(keys[ix], t0, K, s, pool)  # (Pa, K, s)
        g = samp.flatten(1)[..., None].expand(-1, -1, 2)
        models, valid = kind.solve(torch.gather(sub.n1, 1, g).view(-1, s, 2), torch.gather(sub.n2, 1, g).view(-1, s, 2))
        Pa, r = ix.numel(), models.shape[1]
        models = models.view(Pa, K * r, 3, 3)
        valid = valid.view(Pa, K * r) & (trial < max_trials[ix][:, None]).repeat_interleave(r, 1)
        cand, _ = _round_best(sub, kind, models, valid, thr2, options, (sub_keys[ix] + t0) & 0xFFFFFFFF)
        cand, c_count, c_key = _local_optimize(sub, kind, cand, thr2, options.lo_iterations)
        better = c_key > best_key[ix]
        best[ix] = torch.where(better[:, None, None], cand, best[ix])
        best_count[ix] = torch.where(better, c_count, best_count[ix])
        best_key[ix] = torch.where(better, c_key, best_key[ix])
        done_trials = torch.minimum(t0 + K, max_trials[ix])
        trials[ix] = done_trials
        k_eff = best_count[ix] if decision_floor is None else torch.minimum(
            torch.maximum(best_count[ix], decision_floor[ix]), sub.num)
        bound = num_trials_bound(k_eff, sub.num, s, options.confidence, options.dyn_num_trials_multiplier)
        done = (done_trials >= max_trials[ix]) | ((done_trials >= bound) & (done_trials >= options.min_num_trials))
        left = torch.where(done, 0, max_trials[ix] - done_trials)
        status = torch.cat([done.long(), left.max().view(1)]).cpu()  # the round's one host sync
        idx = idx[status[:-1] == 0]
        k_cap = int(status[-1])
        rnd += 1
    err2, _ = kind.residuals(frames, best)
    inliers = (err2 < thr2) & frames.valid & (best_count > 0)[:, None]
    num_inliers = inliers.sum(1)
    success = run & (num_inliers >= s)
    return RansacResult(best, num_inliers, inliers, trials, success)

