"""Seeded image subsets of a real dataset: the sparser captures a user with fewer photos has.

`PARENT-subK` is subset K of dataset PARENT (templeRing, dtu_scan24, kitchen or any image folder
the harness knows): a seeded number of images in [12, 20] (`-subK-nN`: exactly N), drawn without
replacement with a seed made from K and the parent's name, so every machine draws the same
subsets. The subset's database is what a user gets from `torchsfm extract` + `torchsfm match` on
a folder holding only those photos, made faster: when the parent's database is cached, its
keypoints and descriptors are copied (SIFT runs per image, so they are the ones a fresh
extraction gives) and only the matching and verification run on the subset. The result is the
same database, content hash included (`tests/test_bench_subsets.py` checks it against a fresh
extraction).

Reference: the parent's ground truth restricted to the subset's images; without ground truth
(kitchen), COLMAP incremental's model of the full parent scene, restricted the same way (made once
and cached next to the parent's database).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import tempfile
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SUBSET_RE = re.compile(r"(?P<parent>.+)-sub(?P<k>\d+)(?:-n(?P<n>\d+))?")
MIN_IMAGES, MAX_IMAGES = 12, 20
REFERENCE_FULL_COLMAP = "COLMAP incremental on the full scene"


def parse_subset(name: str) -> tuple[str, int, int | None] | None:
    """(parent, subset index, fixed size or None) of a subset name, else None."""
    m = SUBSET_RE.fullmatch(name)
    if not m:
        return None
    return m.group("parent"), int(m.group("k")), int(m.group("n")) if m.group("n") else None


def subset_names(parent: str, names: list[str], k: int, size: int | None = None,
                 min_images: int = MIN_IMAGES, max_images: int = MAX_IMAGES) -> list[str]:
    """The image names of subset k of `parent` (sorted): a seeded size in [min_images,
    max_images] (clipped to the images there are) unless `size` is given."""
    rng = np.random.default_rng([zlib.crc32(parent.encode()), k])
    names = sorted(names)
    hi = min(max_images, len(names))
    n = size if size is not None else int(rng.integers(min(min_images, hi), hi + 1))
    if not 2 <= n <= len(names):
        raise ValueError(f"subset of {n} images of {parent}, which has {len(names)}")
    pick = np.sort(rng.choice(len(names), n, replace=False))
    return [names[i] for i in pick]


def image_names(image_dir: Path) -> list[str]:
    """The image files of a folder by name, as `torchsfm extract` lists them (not decoded)."""
    from ..frontend.ingest import list_files
    from ..frontend.options import IMAGE_EXTENSIONS

    return [n for n, p in list_files(image_dir) if p.suffix.lower() in IMAGE_EXTENSIONS]


def link_images(image_dir: Path, names: list[str], dest: Path) -> None:
    """A folder of symbolic links to the chosen images (names may hold sub-folders)."""
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((image_dir / name).resolve(), target)


def copy_features(parent_db: Path, db: Path, names: list[str]) -> None:
    """Cameras, images (ids in name order, as `extract` assigns them) and features of `names`
    from the parent's database into a new database: what `extract` would write for them."""
    from ..frontend.colmap_db import FrontendDatabase

    src = sqlite3.connect(parent_db.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        rows = {n: (iid, cid) for iid, n, cid in src.execute("SELECT image_id, name, camera_id FROM images")}
        missing = [n for n in names if n not in rows]
        if missing:
            raise ValueError(f"{parent_db} has no image(s) {missing[:5]}")
        cams = {r[0]: r[1:] for r in src.execute(
            "SELECT camera_id, model, width, height, params, prior_focal_length FROM cameras")}
        with FrontendDatabase(db) as out, out.transaction():
            new_cam: dict[int, int] = {}
            for name in sorted(names):
                iid, cid = rows[name]
                if cid not in new_cam:
                    model, w, h, params, prior = cams[cid]
                    new_cam[cid] = out.add_camera(model, w, h, np.frombuffer(params, np.float64), bool(prior))
                new_id = out.add_image(name, new_cam[cid])
                kp = src.execute("SELECT rows, cols, data FROM keypoints WHERE image_id = ?", (iid,)).fetchone()
                de = src.execute("SELECT rows, cols, data FROM descriptors WHERE image_id = ?", (iid,)).fetchone()
                if kp is None or de is None:
                    raise ValueError(f"{parent_db}: image {name} has no features")
                out.write_keypoints(new_id, np.frombuffer(kp[2], np.float32).reshape(kp[0], kp[1]))
                out.write_descriptors(new_id, np.frombuffer(de[2], np.uint8).reshape(de[0], de[1]))
    finally:
        src.close()


def restrict_reference(model_dir: Path, names: list[str], dest: Path) -> None:
    """The reference model's cameras and poses of the images in `names`, as a text model
    without points (like the shared GT models)."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(model_dir))
    keep = set(names)
    with tempfile.TemporaryDirectory() as tmp:
        rec.write_text(tmp)
        lines = Path(tmp, "images.txt").read_text().splitlines()
        cams = Path(tmp, "cameras.txt").read_text()
    body = [ln for ln in lines if not ln.startswith("#")]  # points2D lines may be empty: keep them
    out = ["# the reference's poses of one benchmark subset; no points"]
    for header in body[0::2]:  # each image: a pose line, then its points2D line (dropped)
        if header.split(None, 9)[9] in keep:
            out += [header, ""]
    found = {h.split(None, 9)[9] for h in body[0::2]} & keep
    if not found:
        raise ValueError(f"the reference {model_dir} has none of the subset's images")
    tmp_dest = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp_dest, ignore_errors=True)
    tmp_dest.mkdir(parents=True)
    (tmp_dest / "cameras.txt").write_text(cams)
    (tmp_dest / "images.txt").write_text("\n".join(out) + "\n")
    (tmp_dest / "points3D.txt").write_text("")
    os.replace(tmp_dest, dest)


def full_scene_reference(parent_db: Path, image_dir: Path, threads: int) -> Path:
    """COLMAP incremental's model of the full parent scene (the reference without GT), cached
    next to the parent's database."""
    import pycolmap

    dest = parent_db.parent / "reference_colmap"
    if (dest / "images.bin").is_file():
        return dest
    work = Path(tempfile.mkdtemp(prefix="reference-", dir=parent_db.parent))
    try:
        db = work / "database.db"
        shutil.copyfile(parent_db, db)
        o = pycolmap.IncrementalPipelineOptions()
        o.num_threads, o.random_seed = threads if threads > 0 else os.cpu_count() or 1, 0
        recs = pycolmap.incremental_mapping(str(db), str(image_dir), str(work / "sparse"), o)
        if not recs:
            raise RuntimeError(f"COLMAP incremental found no model of {parent_db}: no reference for its subsets")
        best = max(recs.values(), key=lambda r: r.num_reg_images())
        out = work / "model"
        out.mkdir()
        best.write_binary(str(out))
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
