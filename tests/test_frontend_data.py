"""Front end on real images (../shared/data): the database must let pycolmap's global mapper
register every image. One fast-ish check on a templeRing subset; full datasets are slow."""
from __future__ import annotations

import contextlib
import shutil
import sqlite3

import pycolmap
import pytest
import torch

from conftest import shared_data
from torchsfm.frontend import ExtractOptions, MatchOptions, extract, match
from torchsfm.frontend.matching import _images_with_features, candidate_pairs

pytestmark = pytest.mark.data


def global_map(db, images, out) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    opts = pycolmap.GlobalPipelineOptions()
    opts.random_seed = 0
    opts.num_threads = 1
    recs = pycolmap.global_mapping(str(db), str(images), str(out), opts)
    return recs


def assert_all_registered(db, images, out, expected: int) -> None:
    recs = global_map(db, images, out)
    assert recs, "global mapping produced no model"
    best = max(recs.values(), key=lambda r: r.num_reg_images())
    assert best.num_reg_images() == expected, {k: r.num_reg_images() for k, r in recs.items()}


@pytest.fixture(scope="module")
def temple10(tmp_path_factory):
    src = shared_data("templeRing") / "images"
    root = tmp_path_factory.mktemp("temple10")
    (root / "images").mkdir()
    for p in sorted(src.glob("*.png"))[:10]:
        shutil.copy(p, root / "images" / p.name)
    db = root / "features.db"
    rep = extract(root / "images", db, ExtractOptions(camera_mode="single", num_workers=1, progress=False))
    assert rep.num_images == 10 and rep.num_cameras == 1 and not rep.skipped
    return root, db


def test_temple_subset_sequential_registers_all(temple10, tmp_path):
    root, features = temple10
    db = tmp_path / "db.db"
    shutil.copy(features, db)
    rep = match(db, MatchOptions(mode="sequential", overlap=3, num_threads=1, progress=False))
    assert rep.num_candidate_pairs == 30 and rep.num_verified >= 15
    assert_all_registered(db, root / "images", tmp_path / "sparse", 10)


def test_temple_subset_retrieval_finds_ring_neighbours(temple10):
    """Known answer: templeRing is a ring of views in name order, so retrieved pairs should be
    close in index (views 1-10 span a third of the ring)."""
    _, db = temple10
    with contextlib.closing(sqlite3.connect(str(db))) as c:
        ids, _ = _images_with_features(c)
        pairs = candidate_pairs(c, ids, MatchOptions(mode="retrieval", num_neighbors=3), torch.device("cpu"))
    gap = pairs[:, 1] - pairs[:, 0]
    assert len(pairs) >= 15
    assert float((gap <= 3).float().mean()) >= 0.8
    consecutive = {(int(a), int(b)) for a, b in pairs.tolist() if b - a == 1}
    assert len(consecutive) >= 7  # of 9


def test_temple_subset_loop_detection_adds_long_range_pairs(temple10):
    _, db = temple10
    opts = MatchOptions(mode="sequential", overlap=2, quadratic_overlap=False, loop_detection=True,
                        loop_period=3, num_neighbors=2)
    with contextlib.closing(sqlite3.connect(str(db))) as c:
        ids, _ = _images_with_features(c)
        pairs = candidate_pairs(c, ids, opts, torch.device("cpu"))
    gap = pairs[:, 1] - pairs[:, 0]
    assert int((gap <= 2).sum()) == 17  # the sequential window is all there
    extra = pairs[gap > 2]
    assert 0 < len(extra) <= 2 * 4  # queries 0, 3, 6, 9 with 2 neighbours each
    assert all(a % 3 == 0 or b % 3 == 0 for a, b in extra.tolist())


def test_view_graph_loads_into_the_data_model(temple10, tmp_path):
    pytest.importorskip("torchsfm.io.database", reason="torchsfm.io.database (read_view_graph) not built yet")
    from torchsfm.frontend.matching import load_view_graph

    root, features = temple10
    db = tmp_path / "db.db"
    shutil.copy(features, db)
    rep = match(db, MatchOptions(mode="sequential", overlap=2, quadratic_overlap=False, num_threads=1, progress=False))
    cameras, images, keypoints, vg = load_view_graph(db)
    assert len(cameras) == 1 and len(images) == 10
    assert len(vg) == rep.num_verified and rep.num_verified >= 12  # of 17 candidate pairs
    names = images.name
    gaps = {abs(int(names[i][-6:-4]) - int(names[j][-6:-4])) for i, j in vg.pairs.tolist()}
    assert gaps <= {1, 2}
    counts = keypoints.count()
    per_match_pair = vg.pairs[vg.pair_of_match()]
    assert bool((vg.matches < counts[per_match_pair]).all())


@pytest.mark.slow
@pytest.mark.parametrize("name,mode,camera_mode", [("templeRing", "exhaustive", "single"), ("kitchen", "exhaustive", "auto")])
def test_full_dataset_registers_all(name, mode, camera_mode, tmp_path):
    images = shared_data(name) / "images"
    n = len([p for p in images.rglob("*") if p.is_file()])
    db = tmp_path / "database.db"
    rep = extract(images, db, ExtractOptions(camera_mode=camera_mode, progress=False))
    assert rep.num_images == n and not rep.skipped and rep.num_cameras == 1
    m = match(db, MatchOptions(mode=mode, progress=False))
    assert m.num_candidate_pairs == n * (n - 1) // 2
    assert_all_registered(db, images, tmp_path / "sparse", n)


@pytest.mark.slow
def test_temple_sequential_loop_closure_registers_all(tmp_path):
    images = shared_data("templeRing") / "images"
    db = tmp_path / "database.db"
    extract(images, db, ExtractOptions(camera_mode="single", progress=False))
    m = match(db, MatchOptions(mode="sequential", overlap=5, loop_closure=True, progress=False))
    assert m.num_verified > 0
    assert_all_registered(db, images, tmp_path / "sparse", 47)
