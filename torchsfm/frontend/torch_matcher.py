"""The torch front end's matching and geometric verification of candidate pairs (`--verifier torch`).

The driver (`match_and_verify`) reads the keypoints and descriptors of the images involved once,
plans the matching units from the feature counts (`descriptor_matching.plan_matches`: inverted-
file blocks on the CPU, chunks of exact pairs on a GPU) and hands them to an executor as tasks
(`match_units.match_task`). Each matched unit's pairs with enough raw matches are cut into the
verifier's padded batches (`verification.plan_pair_batches`), each a follow-up task
(`match_units.verify_task`). The driver is the only database writer: raw matches and two-view
geometries are committed as COLMAP writes them, one transaction per chunk of pairs, so an
interrupted run resumes from the last committed chunk. The local executor runs the tasks in this
process in order; the Ray executor on a cluster; the database is the same.
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
from .colmap_db import pair_ids, read_features, read_turned, write_pair_results
from .descriptor_matching import DescriptorMatchOptions, MatchUnit, plan_matches
from .executors import ExecutorStats, LocalExecutor, Task
from .extractors import feature_type_of_colmap_type
from .match_units import (TWO_VIEW_DEGENERATE, FeaturePack, UnitMatches, VerifiedBatch, assemble_pack, cap_matches,
                          image_features, lightglue_task, match_task, verify_task)
from .options import MatchOptions
from .verification import VerificationOptions, plan_pair_batches

logger = logging.getLogger(__name__)


@dataclass
class TorchMatchStats:
    num_raw_matches: int = 0
    time_s: dict = field(default_factory=dict)  # read / match+verify / write
    images_without_features: list[int] = field(default_factory=list)
    executor: ExecutorStats = field(default_factory=ExecutorStats)


def descriptor_match_options(options: MatchOptions, descriptor_norm: float = 512.0) -> DescriptorMatchOptions:
    return DescriptorMatchOptions(
        max_ratio=options.max_ratio, max_distance=options.max_distance, cross_check=options.cross_check,
        engine=options.nn_engine, seed=options.seed, descriptor_norm=descriptor_norm,
        ivf_probes=options.ivf_probes, ivf_exact_check=options.ivf_exact_check)


def _descriptor_norm(types: np.ndarray, desc: np.ndarray) -> float:
    """The L2 norm the distance threshold is relative to: the registered feature type's, else
    COLMAP's SIFT convention for uint8 descriptors and 1 for float ones."""
    known = {feature_type_of_colmap_type(int(t)) for t in np.unique(types[types >= 0])} - {None}
    if len(known) == 1:
        return known.pop().descriptor_norm
    return 512.0 if desc.dtype == np.uint8 else 1.0


def verification_options(options: MatchOptions) -> VerificationOptions:
    vo = VerificationOptions(
        min_num_inliers=options.min_num_inliers, two_view_min_inlier_ratio=options.effective_min_inlier_ratio(),
        max_error=options.max_error, confidence=options.confidence,
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


class PairWriter:
    """The driver's writes: raw matches and two-view geometries of finished pairs, committed in
    transactions of `chunk_size` pairs (the resume granularity; never part of a pair's rows)."""

    def __init__(self, conn: sqlite3.Connection, id1: np.ndarray, id2: np.ndarray, chunk_size: int, bar=None):
        self.conn, self.id1, self.id2 = conn, id1, id2  # COLMAP image ids of every pair, id1 < id2
        self.chunk_size, self.bar = max(1, chunk_size), bar
        self.pending: list[tuple] = []
        self.num_pending = 0
        self.time_s = 0.0

    def add(self, pairs: np.ndarray, raw: list[np.ndarray], inliers: list[np.ndarray], v) -> None:
        """Results of pairs (indices into id1/id2); `v` has config, F, E, H, qvec, tvec, pose_valid."""
        self.pending.append((pairs, raw, inliers, v.config, v.F, v.E, v.H, v.qvec, v.tvec, v.pose_valid))
        self.num_pending += len(pairs)
        if self.num_pending >= self.chunk_size:
            self.flush()

    def add_degenerate(self, pairs: np.ndarray, raw: list[np.ndarray]) -> None:
        n = len(pairs)
        z = np.zeros((n, 3, 3))
        self.pending.append((pairs, raw, [np.zeros((0, 2), np.int64)] * n, np.full(n, TWO_VIEW_DEGENERATE), z, z, z,
                             np.zeros((n, 4)), np.zeros((n, 3)), np.zeros(n, bool)))
        self.num_pending += n
        if self.num_pending >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Commit the pending pairs, one transaction per chunk of chunk_size."""
        if not self.pending:
            return
        tw = time.perf_counter()
        sel = np.concatenate([p[0] for p in self.pending])
        cfg, F, E, H, q, t, pose_ok = (np.concatenate([p[k] for p in self.pending]) for k in range(3, 10))
        raw = [m for p in self.pending for m in p[1]]
        inl = [m for p in self.pending for m in p[2]]
        has = [np.abs(X).sum((1, 2)) > 0 for X in (F, E, H)]
        self.pending.clear()
        self.num_pending = 0
        step = self.chunk_size
        for a in range(0, len(sel), step):
            b = slice(a, a + step)
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                write_pair_results(self.conn, self.id1[sel[b]], self.id2[sel[b]], raw[b], inl[b], cfg[b], F[b], E[b],
                                   H[b], q[b], t[b], has[0][b], has[1][b], has[2][b], pose_ok[b])
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            if self.bar is not None:
                self.bar.update(len(sel[b]))
        self.time_s += time.perf_counter() - tw


@dataclass
class PlannedUnit:
    """A matching unit as the driver hands it out: its pairs, the images it reads, and the task
    (fn(pack, pairs, *args(image rows in the pack), device) -> UnitMatches); fn None: pairs with
    an image without features, nothing to run."""

    pair_index: np.ndarray  # (P,) into the pairs being matched
    images: np.ndarray  # sorted image rows the unit reads
    fn: object = None
    args: object = None  # image rows as the task sees them -> the task's unit arguments


def _plan_units(offsets: np.ndarray, pairs: np.ndarray, types: np.ndarray, options: MatchOptions,
                dm_options: DescriptorMatchOptions, device: torch.device, executor) -> list[PlannedUnit]:
    """The matching units of `options.matcher` from the feature counts: nearest-neighbour units
    (`plan_matches`) or LightGlue's batches (`plan_lightglue`)."""
    off_t, pairs_t = torch.from_numpy(offsets), torch.from_numpy(pairs)
    out = []
    if options.matcher == "lightglue":
        from .learned.lightglue_matcher import LightGlueUnit, lightglue_setup, load_lightglue, plan_lightglue

        feature, lg = lightglue_setup(types, options, device)
        heads = load_lightglue(feature, torch.device("cpu") if executor.ships_data else device).conf.num_heads
        empty, lg_units = plan_lightglue(off_t, pairs_t, heads, lg)
        if len(empty):
            out.append(PlannedUnit(empty.numpy(), np.zeros(0, np.int64)))
        for u in lg_units:
            n, w = len(u.pair_index), u.width
            out.append(PlannedUnit(u.pair_index.numpy(), np.unique(pairs[u.pair_index.numpy()]), lightglue_task,
                                   lambda images, n=n, w=w: (LightGlueUnit(torch.arange(n), w), feature, lg)))
        return out
    for u in plan_matches(off_t, pairs_t, dm_options, device):
        if u.engine == "none":
            out.append(PlannedUnit(u.pair_index.numpy(), np.zeros(0, np.int64)))
            continue
        n = len(u.pair_index)
        out.append(PlannedUnit(u.pair_index.numpy(), u.image_rows(pairs_t).numpy(), match_task,
                               lambda images, u=u, n=n: (MatchUnit(u.engine, torch.arange(n), u.width,
                                                                   None if u.images is None else torch.from_numpy(images),
                                                                   u.seed), dm_options)))
    return out


def match_and_verify(database: Path, image_ids: list[int], rows: np.ndarray, options: MatchOptions,
                     device: torch.device, bar=None, executor=None) -> TorchMatchStats:
    """Match and verify the pairs `rows` ((E, 2) indices into `image_ids`) and write the results
    to `database`, one transaction per chunk of `options.chunk_size` pairs. The units (matching
    units, then their verification batches) run on `executor` (default: this process)."""
    stats = TorchMatchStats()
    executor = executor or LocalExecutor()
    stats.executor = executor.stats
    if len(rows) == 0:
        return stats
    t0 = time.perf_counter()
    ids = np.asarray(image_ids, dtype=np.int64)
    rows = _orient(ids, np.asarray(rows, dtype=np.int64))
    involved, local = np.unique(rows, return_inverse=True)
    local = local.reshape(-1, 2)
    inv_ids = ids[involved]
    cameras, images = read_cameras_images(database)
    row_of_id = {int(i): r for r, i in enumerate(images.image_id.tolist())}
    image_camera = images.camera[torch.tensor([row_of_id[int(i)] for i in inv_ids], dtype=torch.long)].numpy()
    with contextlib.closing(sqlite3.connect(str(database))) as conn:
        xy, desc, offsets, types = read_features(conn, inv_ids.tolist())
        if options.matcher == "lightglue":  # the turned copies' descriptors too, (K, R, D)
            turned = read_turned(conn, inv_ids.tolist(), np.diff(offsets), desc.shape[1])
            if turned is not None:
                desc = np.concatenate([desc[:, None], turned], 1)
    stats.images_without_features = inv_ids[np.diff(offsets) == 0].tolist()
    dm_options = descriptor_match_options(options, _descriptor_norm(types, desc))
    vopts = verification_options(options)
    pid = pair_ids(ids[rows[:, 0]], ids[rows[:, 1]])
    units = _plan_units(offsets, local, types, options, dm_options, device, executor)
    if executor.ships_data:  # each image's features through the object store, once
        whole = None
        shipped: dict[int, object] = {}
        last_use = np.full(len(offsets) - 1, -1)
        for k, unit in enumerate(units):
            last_use[unit.images] = k
    else:  # the driver's arrays, moved to the device once, read in place
        whole = FeaturePack(xy, desc, offsets, image_camera, cameras).on(device)
    t1 = time.perf_counter()
    times = {"read": t1 - t0}

    def unit_tasks():
        for k, unit in enumerate(units):
            if unit.fn is None:  # an image without features: nothing to match
                writer.add_degenerate(unit.pair_index, [np.zeros((0, 2), np.int64)] * len(unit.pair_index))
                continue
            pairs, images = local[unit.pair_index], unit.images
            if whole is None:
                # a task assembles its pack from per-image objects: a node fetches an image once
                # however many units read it; the driver drops an image after its last unit
                # (the tasks that hold it keep it alive)
                for r in images.tolist():
                    if r not in shipped:
                        shipped[r] = executor.share(image_features(xy, desc, offsets, r))
                parts = [shipped[r] for r in images.tolist()]
                pack = executor.composite(assemble_pack, parts, image_camera[images], cameras)
                keypoints = executor.composite(assemble_pack, parts, image_camera[images], cameras, False)
                for r in images[last_use[images] == k].tolist():
                    del shipped[r]
                remap = np.full(len(offsets) - 1, -1, np.int64)
                remap[images] = np.arange(len(images))
                pairs, images = remap[pairs], remap[images]
            else:
                pack = keypoints = whole
            yield Task(unit.fn, (pack, pairs, *unit.args(images), executor.device or device.type),
                       key=("match", unit.pair_index, pairs, keypoints), name=f"match-{k}")

    def verification_tasks(task: Task, um: UnitMatches):
        _, covered, pairs, pack = task.key
        um = cap_matches(um, options.max_num_matches)
        stats.num_raw_matches += len(um.matches)
        raw_of = _split(um.matches, um.counts)
        # COLMAP neither verifies nor keeps the raw matches of pairs with fewer than
        # min_num_inliers matches (feature_matching_utils.cc): empty, degenerate
        few = um.counts < max(vopts.min_num_inliers, 1)
        if few.any():
            writer.add_degenerate(covered[few], [np.zeros((0, 2), np.int64)] * int(few.sum()))
        todo = np.nonzero(~few)[0]
        follow = []
        for b, brows in enumerate(plan_pair_batches(torch.from_numpy(um.counts[todo]))):
            k = todo[brows.numpy()]
            raw = [raw_of[i] for i in k]
            follow.append(Task(verify_task, (pack, pairs[k], um.counts[k], np.concatenate(raw), pid[covered[k]], vopts,
                                             executor.device or device.type),
                               key=("verify", covered[k], raw), name=f"{task.name}-verify-{b}"))
        return follow

    def write_verified(task: Task, v: VerifiedBatch) -> None:
        _, covered, raw = task.key
        inl_of = _split(v.inlier, np.asarray([len(r) for r in raw]))
        writer.add(covered, raw, [r[m] for r, m in zip(raw, inl_of)], v)

    def dispatch(task: Task, result):
        if task.key[0] == "match":
            return verification_tasks(task, result)
        write_verified(task, result)
        return ()

    tm = time.perf_counter()
    with contextlib.closing(sqlite3.connect(str(database), isolation_level=None, timeout=60.0)) as conn:
        writer = PairWriter(conn, ids[rows[:, 0]], ids[rows[:, 1]], options.chunk_size, bar)
        executor.run(unit_tasks(), dispatch)
        writer.flush()
    times["match+verify"] = time.perf_counter() - tm - writer.time_s
    times["write"] = writer.time_s
    stats.time_s = times
    return stats
