"""Loop consistency: drop image pairs whose relative rotation no triangle of the view graph confirms.

A pair whose matches are geometrically coherent but wrong (the two sides of a near-symmetric
object, a repeated facade, columns matched one period over: all consistent with the epipolar
geometry) passes two-view verification with a confident, wrong relative pose. Learned matchers
find many such pairs (LightGlue has no ratio test), and when they carry many inliers the maximum
spanning tree of rotation averaging goes through them and folds the model. Around a correct
pair (i, j) the composed rotations R_jk R_ij and R_ik of the other pairs (i, k), (j, k) agree;
around a wrong one they do not, unless the third pair is wrong the same way.

Each triangle's cycle error angle(R_yz R_xy R_xz^T) is compared with `max_cycle_error_deg`. A
pair is kept while at least min(`min_consistent_triangles`, its live triangles) of its live
triangles (those whose three pairs are still kept) are consistent. Each round drops the pairs that
no live triangle confirms, or, when there are none, those confirmed too few times; rounds repeat
until nothing changes. A pair in no triangle (a chain link, a bridge) has nothing to check against
and is kept, and so is a pair whose triangles all ran through dropped pairs. (Zach, Klopschitz and
Pollefeys, "Disambiguating visual relations using loop constraints", CVPR 2010, use cycles the
same way; this is the triangle rule, vectorised over all triangles.)

By default (`mode` "auto") pairs are only dropped from a view graph whose triangles mostly do not
close (at most `auto_max_consistent_fraction` of them within the threshold: many wrong pairs). A
mostly consistent graph gains nothing: the pairs the rule would drop there are mostly right ones
whose rotations are noisy (wide baselines, focal lengths not yet calibrated on fixating rings), and
on sparse captures each lost pair costs accuracy (measured on the robustness subsets: README).
`torchsfm map` resolves auto to always for databases of learned features (`api`).

When the pairs it would keep hold fewer than 90 % of the images together (too few triangles
close to tell right pairs from wrong ones, or rotations too noisy), nothing is dropped and a
warning says so.

Host reads: one per round (whether anything is dropped), plus the triangle enumeration's chunking.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.model import Reconstruction
from ..geometry import so3
from .graph import largest_component, stage_copy, triangles

log = logging.getLogger(__name__)


MODES = ("auto", "always", "never")


@dataclass
class LoopConsistencyOptions:
    # auto: only on a view graph whose triangles mostly do not close (at most
    # auto_max_consistent_fraction of them within max_cycle_error_deg)
    mode: str = "auto"
    auto_max_consistent_fraction: float = 0.6
    max_cycle_error_deg: float = 5.0  # a triangle's composed rotation within this of the identity
    min_consistent_triangles: int = 2  # or all of a pair's triangles when it has fewer
    max_rounds: int = 20
    chunk: int = 1 << 22  # triangle lookups per pass (and a quarter as many cycle errors: 72 MB a matrix)
    # a denser view graph (finding its triangles would take more lookups, each a bound on one
    # triangle's 12 bytes) is left unchecked, with a warning
    max_lookups: int = 50_000_000
    # the result is not used when its largest connected component would hold fewer than this
    # share of the input's largest component's images (a graph with too few consistent
    # triangles to tell right pairs from wrong ones, or whose rotations are too noisy: better the
    # mapper's own robustness than lost images; 0.5 cut 8 of 16 images off a sparse learned ring)
    min_kept_fraction: float = 0.9


@dataclass
class LoopConsistencyReport:
    num_pairs_in: int = 0
    num_triangles: int = 0
    num_consistent_triangles: int = 0
    applied: bool = False  # pairs were filtered (mode always, or auto on a mostly inconsistent graph)
    too_dense: bool = False  # not checked: more than max_lookups triangle lookups
    too_few_kept: bool = False  # not applied: the kept pairs would hold too few images together
    num_pairs_in_no_triangle: int = 0  # kept unchecked
    num_pairs_dropped: int = 0
    rounds: int = 0


def cycle_errors_deg(pairs: Tensor, R_rel: Tensor, tri: Tensor) -> Tensor:
    """Cycle error (T,) in degrees of each triangle (edge rows xy, xz, yz) of edges `pairs` (E, 2)
    holding R_rel (E, 3, 3) = cam_j_from_cam_i for (i, j)."""
    xy, xz, yz = tri[:, 0], tri[:, 1], tri[:, 2]
    x = torch.where((pairs[xy, 0] == pairs[xz, 0]) | (pairs[xy, 0] == pairs[xz, 1]), pairs[xy, 0], pairs[xy, 1])
    y = pairs[xy].sum(1) - x

    def oriented(e: Tensor, frm: Tensor) -> Tensor:  # R_{to <- frm}
        R = R_rel[e]
        return torch.where((pairs[e, 0] == frm)[:, None, None], R, R.transpose(-1, -2))

    C = oriented(yz, y) @ oriented(xy, x) @ oriented(xz, x).transpose(-1, -2)
    return torch.rad2deg(so3.log(C).norm(dim=-1))


def filter_by_loop_consistency(
    rec: Reconstruction, options: LoopConsistencyOptions | None = None
) -> tuple[Reconstruction, LoopConsistencyReport]:
    """A new reconstruction whose view graph no longer marks unconfirmed pairs valid."""
    o = options or LoopConsistencyOptions()
    if o.mode not in MODES:
        raise ValueError(f"loop consistency mode must be one of {MODES}, not {o.mode!r}")
    vg = rec.view_graph
    rows = torch.nonzero(vg.valid)[:, 0]
    report = LoopConsistencyReport(num_pairs_in=int(rows.numel()))
    if o.mode == "never" or rows.numel() < 3:
        return rec, report
    pairs = vg.pairs[rows]
    tri = triangles(len(rec.images), pairs, o.chunk, o.max_lookups)
    if tri is None:
        report.too_dense = True
        log.warning("loop consistency: the view graph (%d pairs) has too many triangles to check (more than "
                    "max_lookups=%d lookups); its pairs are kept unchecked", rows.numel(), o.max_lookups)
        return rec, report
    report.num_triangles = int(tri.shape[0])
    E = rows.numel()
    flat = tri.reshape(-1)
    had = torch.bincount(flat, minlength=E)
    report.num_pairs_in_no_triangle = int((had == 0).sum())
    if tri.shape[0] == 0:
        return rec, report
    R_rel = so3.quat_to_matrix(vg.rel_quat[rows])
    step = max(1, o.chunk // 4)
    ok = torch.cat([cycle_errors_deg(pairs, R_rel, tri[t : t + step]) <= o.max_cycle_error_deg
                    for t in range(0, tri.shape[0], step)])
    report.num_consistent_triangles = int(ok.sum())
    if o.mode == "auto" and report.num_consistent_triangles > o.auto_max_consistent_fraction * report.num_triangles:
        return rec, report
    report.applied = True
    alive = torch.ones(E, dtype=torch.bool, device=pairs.device)
    for report.rounds in range(1, o.max_rounds + 1):
        live = alive[tri].all(1)  # triangles whose three pairs are still kept
        support = torch.bincount(tri[live & ok].reshape(-1), minlength=E)
        need = torch.bincount(tri[live].reshape(-1), minlength=E).clamp(max=o.min_consistent_triangles)
        short = alive & (support < need)
        # pairs no triangle confirms go first: a right pair next to wrong ones (a bridge over a gap
        # in the capture, whose other triangles run through wrong pairs) is judged again on the
        # triangles that remain once those are gone
        unconfirmed = short & (support == 0)
        drop = torch.where(unconfirmed.any(), unconfirmed, short)
        if not bool(drop.any()):
            break
        alive = alive & ~drop
    n = len(rec.images)
    before, _ = largest_component(n, pairs)
    after, _ = largest_component(n, pairs, alive)
    if int(after.sum()) < o.min_kept_fraction * int(before.sum()):
        report.applied, report.too_few_kept = False, True
        log.warning("loop consistency: the pairs that %d of %d triangles confirm hold only %d of %d images together; "
                    "all %d pairs are kept", report.num_consistent_triangles, report.num_triangles,
                    int(after.sum()), int(before.sum()), E)
        return rec, report
    drop = rows[~alive]
    report.num_pairs_dropped = int(drop.numel())
    if drop.numel() == 0:
        return rec, report
    out = stage_copy(rec, "view_graph")
    valid = vg.valid.clone()
    valid[drop] = False
    out.view_graph.valid = valid
    log.info("loop consistency: dropped %d of %d pairs (%d of %d triangles consistent within %g deg)",
             report.num_pairs_dropped, E, report.num_consistent_triangles, report.num_triangles,
             o.max_cycle_error_deg)
    return out, report
