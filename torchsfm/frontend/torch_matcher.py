"""The torch front end's matching and geometric verification of candidate pairs (`--verifier torch`).

Descriptors and keypoints of the images involved are read once from the database; raw matches
of all pairs come from `descriptor_matching` (exact batched products on a GPU, an inverted file
on the CPU); the batched RANSAC engine of `verification` verifies them chunk by chunk, and each
chunk's raw matches and two-view geometries are committed in one transaction, exactly as COLMAP
writes them (so COLMAP, GLOMAP and our mapper read the database alike, and an interrupted run
resumes from the last committed chunk).
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io.database import read_cameras_images
from .colmap_db import pair_ids, read_features, write_pair_results
from .descriptor_matching import DescriptorMatchOptions, iter_matches
from .extractors import feature_type_of_colmap_type
from .options import MatchOptions
from .verification import VerificationOptions, make_pair_batches, verify_pairs

logger = logging.getLogger(__name__)

TWO_VIEW_DEGENERATE = 1


@dataclass
class TorchMatchStats:
    num_raw_matches: int = 0
    time_s: dict = field(default_factory=dict)  # read / match / verify / write
    images_without_features: list[int] = field(default_factory=list)


def descriptor_match_options(options: MatchOptions, descriptor_norm: float = 512.0) -> DescriptorMatchOptions:
    return DescriptorMatchOptions(
        max_ratio=options.max_ratio, max_distance=options.max_distance, cross_check=options.cross_check,
        engine=options.nn_engine, seed=options.seed, descriptor_norm=descriptor_norm)


def _descriptor_norm(types: np.ndarray, desc: np.ndarray) -> float:
    """The L2 norm the distance threshold is relative to: the registered feature type's, else
    COLMAP's SIFT convention for uint8 descriptors and 1 for float ones."""
    known = {feature_type_of_colmap_type(int(t)) for t in np.unique(types[types >= 0])} - {None}
    if len(known) == 1:
        return known.pop().descriptor_norm
    return 512.0 if desc.dtype == np.uint8 else 1.0


def verification_options(options: MatchOptions) -> VerificationOptions:
    vo = VerificationOptions(
        min_num_inliers=options.min_num_inliers, max_error=options.max_error, confidence=options.confidence,
        max_num_trials=options.max_num_trials, compute_relative_pose=options.compute_relative_pose, seed=options.seed)
    for k, v in dict(options.verification).items():
        if not hasattr(vo, k):
            raise ValueError(f"unknown verification option {k!r} for --verifier torch")
        setattr(vo, k, type(getattr(vo, k))(v))
    return vo.check()


def _orient(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pairs of rows ordered so that the first image has the smaller COLMAP image id."""
    a, b = rows[:, 0], rows[:, 1]
    swap = ids[a] > ids[b]
    return np.stack([np.where(swap, b, a), np.where(swap, a, b)], axis=1)


def _split(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(counts)[:-1]) if len(counts) else []


def match_and_verify(database: Path, image_ids: list[int], rows: np.ndarray, options: MatchOptions,
                     device: torch.device, bar=None) -> TorchMatchStats:
    """Match and verify the pairs `rows` ((E, 2) indices into `image_ids`) and write the results
    to `database`, one transaction per chunk of `options.chunk_size` pairs."""
    stats = TorchMatchStats()
    if len(rows) == 0:
        return stats
    t0 = time.perf_counter()
    ids = np.asarray(image_ids, dtype=np.int64)
    rows = _orient(ids, np.asarray(rows, dtype=np.int64))
    involved, local = np.unique(rows, return_inverse=True)
    local = local.reshape(-1, 2)
    inv_ids = ids[involved]
    cameras, images = read_cameras_images(database, device=device)
    row_of_id = {int(i): r for r, i in enumerate(images.image_id.tolist())}
    image_camera = images.camera[torch.tensor([row_of_id[int(i)] for i in inv_ids], dtype=torch.long, device=device)]
    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        xy, desc, offsets, types = read_features(conn, inv_ids.tolist())
    counts = np.diff(offsets)
    stats.images_without_features = inv_ids[counts == 0].tolist()
    xy_t = torch.from_numpy(xy).to(device)
    off_t = torch.from_numpy(offsets).to(device)
    desc_t = torch.from_numpy(np.ascontiguousarray(desc)).to(device)
    pairs_t = torch.from_numpy(local).to(device)
    t1 = time.perf_counter()

    vopts = verification_options(options)
    pid_t = torch.from_numpy(pair_ids(ids[rows[:, 0]], ids[rows[:, 1]])).to(device)
    times = {"match": 0.0, "verify": 0.0, "write": 0.0}
    pending: list[tuple] = []

    def flush(conn) -> None:
        """Commit the pending pairs' raw matches and geometries in one transaction."""
        if not pending:
            return
        tw = time.perf_counter()
        sel = np.concatenate([p[0] for p in pending])
        cat = [np.concatenate([p[k] for p in pending]) for k in range(3, 10)]
        cfg, F, E, H, q, t, pose_ok = cat
        raw = [m for p in pending for m in p[1]]
        inl = [m for p in pending for m in p[2]]
        has = [np.abs(X).sum((1, 2)) > 0 for X in (F, E, H)]
        pending.clear()
        step = max(1, options.chunk_size)
        for a in range(0, len(sel), step):  # one transaction per chunk: the resume granularity
            b = slice(a, a + step)
            conn.execute("BEGIN IMMEDIATE")
            try:
                write_pair_results(conn, ids[rows[sel[b], 0]], ids[rows[sel[b], 1]], raw[b], inl[b], cfg[b], F[b], E[b],
                                   H[b], q[b], t[b], has[0][b], has[1][b], has[2][b], pose_ok[b])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            if bar is not None:
                bar.update(len(sel[b]))
        times["write"] += time.perf_counter() - tw

    def add_degenerate(sel: np.ndarray, raw: list[np.ndarray]) -> None:
        n = len(sel)
        z = np.zeros((n, 3, 3))
        pending.append((sel, raw, [np.zeros((0, 2), np.int64)] * n, np.full(n, TWO_VIEW_DEGENERATE), z, z, z,
                        np.zeros((n, 4)), np.zeros((n, 3)), np.zeros(n, bool)))

    with contextlib.closing(sqlite3.connect(str(database), isolation_level=None, timeout=60.0)) as conn:
        units = iter_matches(desc_t, off_t, pairs_t, descriptor_match_options(options, _descriptor_norm(types, desc)))
        while True:
            tm = time.perf_counter()
            unit = next(units, None)
            times["match"] += time.perf_counter() - tm
            if unit is None:
                break
            covered, raw = unit
            stats.num_raw_matches += len(raw)
            # CSR of the unit's pairs (raw is sorted by pair, best match first)
            local_of = torch.full((len(rows),), -1, dtype=torch.long, device=device)
            local_of[covered] = torch.arange(len(covered), device=device)
            cnt = torch.bincount(local_of[raw.pair], minlength=len(covered))
            moff = torch.cat([cnt.new_zeros(1), cnt.cumsum(0)])
            order = torch.argsort(local_of[raw.pair], stable=True)
            mlist = torch.stack([raw.idx1, raw.idx2], dim=1)[order]
            mlist_np, cnt_np = mlist.cpu().numpy(), cnt.cpu().numpy()
            covered_np = covered.cpu().numpy()
            raw_of = _split(mlist_np, cnt_np)
            # COLMAP neither verifies nor keeps the raw matches of pairs with fewer than
            # min_num_inliers matches (feature_matching_utils.cc): empty, degenerate
            few = cnt_np < max(vopts.min_num_inliers, 1)
            if few.any():
                add_degenerate(covered_np[few], [np.zeros((0, 2), np.int64)] * int(few.sum()))
            todo = torch.from_numpy(np.nonzero(~few)[0]).to(device)
            if len(todo):
                tv = time.perf_counter()
                sub_off = torch.cat([moff.new_zeros(1), cnt[todo].cumsum(0)])
                for brows, batch in make_pair_batches(xy_t, off_t, pairs_t[covered[todo]], _gather_ranges(mlist, moff, todo),
                                                      sub_off, cameras, image_camera, pair_seed=pid_t[covered[todo]],
                                                      device=device):
                    g = _reset_failed(verify_pairs(batch, vopts), vopts.min_num_inliers)
                    k_local = todo[brows].cpu().numpy()
                    inl_mask = g.inliers.cpu().numpy()
                    inl = [raw_of[k][inl_mask[b, : cnt_np[k]]] for b, k in enumerate(k_local)]
                    pending.append((covered_np[k_local], [raw_of[k] for k in k_local], inl, g.config.cpu().numpy(),
                                    g.F.double().cpu().numpy(), g.E.double().cpu().numpy(), g.H.double().cpu().numpy(),
                                    g.rel_quat.double().cpu().numpy(), g.rel_trans.double().cpu().numpy(),
                                    g.pose_valid.cpu().numpy()))
                times["verify"] += time.perf_counter() - tv
            if sum(len(p[0]) for p in pending) >= options.chunk_size:
                flush(conn)
        flush(conn)
    del desc_t
    times["read"] = t1 - t0
    stats.time_s = times
    return stats


def _reset_failed(g, min_num_inliers: int):
    """A pair verified with fewer than min_num_inliers inliers is stored as COLMAP stores it: a
    default (degenerate) geometry without inliers, F, E, H or pose."""
    bad = g.num_inliers < min_num_inliers
    g.config = torch.where(bad, torch.full_like(g.config, TWO_VIEW_DEGENERATE), g.config)
    g.inliers = g.inliers & ~bad[:, None]
    for name in ("F", "E", "H"):
        setattr(g, name, getattr(g, name).masked_fill(bad[:, None, None], 0))
    g.pose_valid = g.pose_valid & ~bad
    return g


def _gather_ranges(values: torch.Tensor, offsets: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Concatenation of values[offsets[w]:offsets[w+1]] for w in `which`, without a Python loop."""
    n = offsets[which + 1] - offsets[which]
    total = int(n.sum())
    start = torch.cat([n.new_zeros(1), n.cumsum(0)[:-1]])
    seg = torch.arange(len(which), device=values.device).repeat_interleave(n, output_size=total)
    idx = offsets[which][seg] + torch.arange(total, device=values.device) - start[seg]
    return values[idx]
