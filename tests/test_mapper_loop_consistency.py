"""Loop consistency: triangles of the view graph, and the pairs no triangle confirms."""
import itertools
import math

import pytest
import torch

from test_mapper_scene import rotation_error_deg
from torchsfm.geometry import so3
from torchsfm.mapper.graph import connected_components, triangles
from torchsfm.mapper.loop_consistency import LoopConsistencyOptions, cycle_errors_deg, filter_by_loop_consistency
from torchsfm.mapper.rotation_averaging import rotation_averaging
from torchsfm.synthetic import SyntheticOptions, synthesize


@pytest.mark.parametrize("chunk", [1, 5, 1 << 22])
def test_triangles_are_each_found_once(device, chunk):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(3, 25, (1,), generator=g))
        p = float(torch.rand(1, generator=g))
        edges = [e for e in itertools.combinations(range(n), 2) if float(torch.rand(1, generator=g)) < p]
        if not edges:
            continue
        flip = torch.rand(len(edges), generator=g) < 0.5  # either orientation
        e = torch.tensor(edges)
        e = torch.where(flip[:, None], e.flip(1), e).to(device)
        tri = triangles(n, e, chunk).cpu()
        S = {frozenset(x) for x in edges}
        truth = {frozenset(c) for c in itertools.combinations(range(n), 3)
                 if all(frozenset(q) in S for q in itertools.combinations(c, 2))}
        found = [frozenset(e[tri[k]].reshape(-1).tolist()) for k in range(tri.shape[0])]
        assert len(found) == len(set(found)) and set(found) == truth
        for xy, xz, yz in tri.tolist():  # xy and xz share x; yz joins the other two ends
            a, b, c = (set(e[i].tolist()) for i in (xy, xz, yz))
            assert len(a & b) == 1 and (a | b) - (a & b) == c


def test_cycle_error_of_a_known_triangle():
    R = so3.exp(torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.4, 0.1], [0.5, 0.0, 0.0]], dtype=torch.float64))
    pairs = torch.tensor([[0, 1], [0, 2], [2, 1]])  # the last one stored the other way round
    R_rel = torch.stack([R[1] @ R[0].T, R[2] @ R[0].T, R[1] @ R[2].T])
    tri = torch.tensor([[0, 1, 2]])
    assert float(cycle_errors_deg(pairs, R_rel, tri)) < 1e-6
    R_rel[2] = so3.exp(torch.tensor([0.0, 0.0, math.radians(7)], dtype=torch.float64)) @ R_rel[2]
    assert abs(float(cycle_errors_deg(pairs, R_rel, tri)) - 7.0) < 1e-6


def _ring(seed=0):
    sc = synthesize(SyntheticOptions(num_images=20, num_points=600, layout="ring", seed=seed))
    return sc.gt.images.rotation, sc.mapper_input()


def test_wrong_pairs_are_dropped_and_right_ones_kept(device):
    """A ring whose relative rotations carry 0.5 deg of noise, with 12 pairs rotated by 40-180
    deg (as a folded pair is): those 12 are dropped, at most one right pair is lost, and a pair in
    no triangle is kept unchecked."""
    R_gt, rec = _ring()
    vg = rec.view_graph
    E = len(vg)
    g = torch.Generator().manual_seed(3)
    R_rel = so3.exp(torch.randn(E, 3, generator=g, dtype=torch.float64) * math.radians(0.5)) @ so3.quat_to_matrix(vg.rel_quat)
    bad = torch.randperm(E, generator=g)[:12]
    axis = torch.nn.functional.normalize(torch.randn(12, 3, generator=g, dtype=torch.float64), dim=-1)
    angle = math.radians(40) + torch.rand(12, 1, generator=g, dtype=torch.float64) * math.radians(140)
    R_rel[bad] = so3.exp(axis * angle) @ R_rel[bad]
    vg.rel_quat = so3.matrix_to_quat(R_rel)
    out, rep = filter_by_loop_consistency(rec.to(device), LoopConsistencyOptions(mode="always"))
    valid = out.view_graph.valid.cpu()
    assert not bool(valid[bad].any())
    assert rep.num_pairs_dropped <= 12 + 1 and rep.num_pairs_in == E
    assert bool(rec.view_graph.valid.all()), "the input is not modified"
    # rotation averaging on what is left recovers the rotations
    rot, _ = rotation_averaging(out)
    assert float(rotation_error_deg(R_gt, rot.images.rotation.cpu().double()).max()) < 1.0


def test_pairs_in_no_triangle_are_kept_and_disabled_changes_nothing():
    _, rec = _ring(seed=1)
    vg = rec.view_graph
    chain = (vg.pairs[:, 1] - vg.pairs[:, 0]) == 1  # a chain: no triangle at all
    vg.valid = chain.clone()
    R_rel = so3.quat_to_matrix(vg.rel_quat)
    R_rel[0] = so3.exp(torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)) @ R_rel[0]  # wrong, unverifiable
    vg.rel_quat = so3.matrix_to_quat(R_rel)
    out, rep = filter_by_loop_consistency(rec, LoopConsistencyOptions(mode="always"))
    assert rep.num_triangles == 0 and rep.num_pairs_dropped == 0 and rep.num_pairs_in_no_triangle == int(chain.sum())
    assert torch.equal(out.view_graph.valid, chain)
    vg.valid = torch.ones_like(chain)
    out, rep = filter_by_loop_consistency(rec, LoopConsistencyOptions(mode="never"))
    assert out is rec and rep.num_pairs_dropped == 0


def test_a_pair_with_one_consistent_triangle_is_kept():
    """min(min_consistent_triangles, its triangles): a chain with skip links (i, i+2) puts each
    skip link in one triangle only; with right rotations every pair stays."""
    _, rec = _ring(seed=2)
    vg = rec.view_graph
    d = vg.pairs[:, 1] - vg.pairs[:, 0]
    vg.valid = (d == 1) | (d == 2)
    _, rep = filter_by_loop_consistency(rec, LoopConsistencyOptions(mode="always"))
    assert rep.num_triangles > 0 and rep.num_pairs_dropped == 0


def test_right_bridge_over_a_gap_is_kept_beside_wrong_pairs():
    """A capture with a gap (templeRing jumps 45 deg between two of its images): two runs of
    images joined by two right pairs, (8, 10) and (9, 10), while every other pair across the gap
    is wrong. Each bridge has one consistent triangle and several that run through wrong pairs; the
    wrong pairs, which no triangle confirms, go first, after which the bridges stand on the
    triangle left. (Judging the bridges on their first triangle count, as before, cut the graph in
    two and lost half of the images.)"""
    _, rec = _ring(seed=5)
    vg = rec.view_graph
    i, j = vg.pairs[:, 0], vg.pairs[:, 1]
    vg.valid = (j - i) <= 3
    across = vg.valid & (i <= 9) & (j >= 10)
    bridges = across & (j == 10) & (i >= 8)
    bad = torch.nonzero(across & ~bridges)[:, 0]
    g = torch.Generator().manual_seed(11)
    R_rel = so3.quat_to_matrix(vg.rel_quat)
    axis = torch.nn.functional.normalize(torch.randn(len(bad), 3, generator=g, dtype=torch.float64), dim=-1)
    R_rel[bad] = so3.exp(axis * math.radians(60)) @ R_rel[bad]
    vg.rel_quat = so3.matrix_to_quat(R_rel)
    out, rep = filter_by_loop_consistency(rec, LoopConsistencyOptions(mode="always"))
    valid = out.view_graph.valid
    assert not bool(valid[bad].any()) and bool(valid[bridges].all())
    assert rep.num_pairs_dropped == len(bad)
    assert len(set(connected_components(len(rec.images), vg.pairs, valid).tolist())) == 1


def test_auto_filters_only_a_mostly_inconsistent_graph():
    """mode auto: a ring with a few wrong pairs (most triangles close) is left as it is; with 35 % of
    the pairs wrong (most triangles do not close) nearly all wrong ones are dropped."""
    _, rec = _ring(seed=4)
    vg = rec.view_graph
    E = len(vg)
    g = torch.Generator().manual_seed(7)
    R_rel = so3.quat_to_matrix(vg.rel_quat)
    order = torch.randperm(E, generator=g)
    for bad, applied in ((order[:4], False), (order[: int(0.35 * E)], True)):
        axis = torch.nn.functional.normalize(torch.randn(len(bad), 3, generator=g, dtype=torch.float64), dim=-1)
        angle = math.radians(40) + torch.rand(len(bad), 1, generator=g, dtype=torch.float64) * math.radians(140)
        wrong = R_rel.clone()
        wrong[bad] = so3.exp(axis * angle) @ wrong[bad]
        vg.rel_quat = so3.matrix_to_quat(wrong)
        out, rep = filter_by_loop_consistency(rec)
        assert rep.applied == applied
        if applied:
            assert rep.num_consistent_triangles <= 0.6 * rep.num_triangles
            assert int(out.view_graph.valid[bad].sum()) <= 0.1 * len(bad)
        else:
            assert out is rec and rep.num_consistent_triangles > 0.6 * rep.num_triangles


def test_a_view_graph_too_dense_to_check_is_kept_with_a_warning(caplog):
    _, rec = _ring(seed=5)
    out, rep = filter_by_loop_consistency(rec, LoopConsistencyOptions(mode="always", max_lookups=10))
    assert rep.too_dense and not rep.applied and out is rec
    assert "too many triangles" in caplog.text
    assert triangles(len(rec.images), rec.view_graph.pairs, max_lookups=10) is None


def test_nothing_is_dropped_when_the_kept_pairs_would_lose_most_images(caplog):
    """Every pair wrong (no triangle closes): dropping them all would leave no model; the pairs
    are kept, with a warning, and rotation averaging's own robustness decides."""
    _, rec = _ring(seed=6)
    vg = rec.view_graph
    g = torch.Generator().manual_seed(8)
    axis = torch.nn.functional.normalize(torch.randn(len(vg), 3, generator=g, dtype=torch.float64), dim=-1)
    vg.rel_quat = so3.matrix_to_quat(so3.exp(axis * math.radians(90)) @ so3.quat_to_matrix(vg.rel_quat))
    out, rep = filter_by_loop_consistency(rec)
    assert rep.too_few_kept and not rep.applied and rep.num_pairs_dropped == 0 and out is rec
    assert "are kept" in caplog.text


def test_nothing_is_dropped_when_the_kept_pairs_would_cut_off_a_few_images():
    """A sparse ring whose last three images join the rest only through pairs with noisy
    rotations (20 deg off: a focal length not yet calibrated, a wide baseline) that no triangle
    confirms: dropping them would cut 3 of 20 images off (a 16-image low-texture ring lost 8 that
    way). Filtering is all or nothing: it is only applied when the kept pairs hold at least 90 %
    of the images together."""
    _, rec = _ring(seed=9)
    vg = rec.view_graph
    i, j = vg.pairs[:, 0], vg.pairs[:, 1]
    vg.valid = (j - i) <= 3
    across = torch.nonzero(vg.valid & (i <= 16) & (j >= 17))[:, 0]
    g = torch.Generator().manual_seed(13)  # (two noisy pairs rarely close a triangle by chance; with 12 they do)
    axis = torch.nn.functional.normalize(torch.randn(len(across), 3, generator=g, dtype=torch.float64), dim=-1)
    R_rel = so3.quat_to_matrix(vg.rel_quat)
    R_rel[across] = so3.exp(axis * math.radians(20)) @ R_rel[across]
    vg.rel_quat = so3.matrix_to_quat(R_rel)
    out, rep = filter_by_loop_consistency(rec, LoopConsistencyOptions(mode="always"))
    assert rep.too_few_kept and not rep.applied and out is rec
    _, rep = filter_by_loop_consistency(rec, LoopConsistencyOptions(mode="always", min_kept_fraction=0.5))
    assert rep.applied and rep.num_pairs_dropped == len(across)  # what the old guard let happen


@pytest.mark.parametrize("types,mode,expect", [((0,), "auto", "auto"), ((0, 1), "auto", "always"),
                                               ((1,), "never", "never"), ((), "auto", "auto")])
def test_auto_is_always_on_learned_features(tmp_path, types, mode, expect):
    """`map` resolves auto from the database: learned descriptors (any type but SIFT's 0) mean
    LightGlue-style graphs, checked always; SIFT and a database without descriptors keep auto."""
    import dataclasses
    import sqlite3

    from torchsfm.api import _resolve_loop_consistency
    from torchsfm.mapper.pipeline import MapperOptions

    db = tmp_path / "database.db"
    with sqlite3.connect(db) as c:
        if types:
            c.execute("CREATE TABLE descriptors (image_id INTEGER, rows INTEGER, cols INTEGER, data BLOB, type INTEGER)")
            c.executemany("INSERT INTO descriptors VALUES (?, 1, 128, x'00', ?)", [(i, t) for i, t in enumerate(types)])
    opt = MapperOptions()
    opt = dataclasses.replace(opt, loop_consistency=dataclasses.replace(opt.loop_consistency, mode=mode))
    assert _resolve_loop_consistency(opt, db).loop_consistency.mode == expect
    assert opt.loop_consistency.mode == mode  # the caller's options are not changed
