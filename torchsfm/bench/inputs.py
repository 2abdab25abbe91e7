"""Benchmark inputs: one COLMAP database per dataset, made once and cached, that every mapper reads.

Datasets by name:
- `ringN` (object ring, exhaustive matching), `turntableN` (ring, sequential matching),
  `corridorN` (forward motion, sequential matching), `sphereN` (sphere, exhaustive), `loopsN`
  (three laps around a circular corridor, images in random order, each matched with the 20
  images sharing the most points, as retrieval would pair an unordered collection: loop closures
  everywhere): synthetic scenes of N images from `torchsfm.synthetic` (objects of 2,000 points,
  corridors of 40 points per image and lap; 0.5 px noise, 20% wrong matches, data seed 0). Their raw matches are verified by pycolmap's two-view geometry
  estimation with the front end's options (`MatchOptions`), as real matches are, so the mappers
  get a real front end's kind of input: inlier sets with a few surviving outliers and estimated
  (not true) relative poses. The ground truth is written next to the database as a COLMAP model.
- `colmapsphereN`: the layout of `pycolmap.synthesize_dataset` (N cameras on a sphere, all fixating
  its centre; 2,000 points; no focal prior; pycolmap seed 0), images rendered with
  `pycolmap.synthesize_images`, then torchsfm's front end as for real images. The GT is pycolmap's
  synthetic model. GLOMAP's view-graph calibration is expected to be degenerate on this layout.
- `templeRing`, `dtu_scan24`, `kitchen` (and any folder of images): torchsfm's front end (SIFT,
  exhaustive matching, one shared SIMPLE_RADIAL camera), with the GT model in `gt/` if present.
- an existing database (`database:PATH`): used as it is.
- `PARENT-subK` (`PARENT-subK-nN`): seeded subset K of a real dataset (12-20 images, or N),
  its database made as `extract` + `match` on those photos would make it (`bench.subsets`).

The cache folder WORK/NAME holds database.db, gt/ and input.json (the spec, the content hash,
input statistics). A cached input is reused only when its spec is unchanged and its database
still has the recorded content hash.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .child import database_hash
from .subsets import (REFERENCE_FULL_COLMAP, copy_features, full_scene_reference, image_names, link_images,
                      parse_subset, restrict_reference, subset_names)

log = logging.getLogger(__name__)

DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SYNTHETIC_FAMILIES = {  # name prefix -> (layout, match graph)
    "ring": ("ring", "exhaustive"),
    "turntable": ("ring", "sequential"),
    "corridor": ("forward", "sequential"),
    "sphere": ("sphere", "exhaustive"),
    "loops": ("loop", "retrieval"),
}
LOOP_LAPS, RETRIEVAL_NEIGHBORS = 3, 20  # loopsN
REAL_DATASETS = ("templeRing", "dtu_scan24", "kitchen")
_PAIR_ID_BASE = 2147483647  # COLMAP's pair_id = id1 * base + id2


@dataclass
class InputSpec:
    """What a dataset's database is made from; equal specs give equal databases."""
    name: str
    kind: str  # synthetic | rendered | images | subset | database
    synthetic: dict = field(default_factory=dict)  # SyntheticOptions fields
    image_dir: str | None = None
    gt: str | None = None  # GT COLMAP model folder (images, database kinds)
    database: str | None = None  # database kind: the given file
    frontend: dict = field(default_factory=dict)  # extract / match options
    subset: dict = field(default_factory=dict)  # subset kind: parent dataset, index, image names


def spec_key(spec: dict) -> dict:
    """A spec (as a dict) without its empty fields: fields added later keep old caches valid."""
    return {k: v for k, v in spec.items() if v not in (None, {}, [], "")}


@dataclass
class PreparedInput:
    spec: InputSpec
    database: Path
    input_hash: str
    gt: Path | None
    image_dir: Path | None
    stats: dict
    prepare_seconds: float

    def to_dict(self) -> dict:
        return {"name": self.spec.name, "kind": self.spec.kind, "spec": asdict(self.spec),
                "database": str(self.database), "input_hash": self.input_hash,
                "gt": None if self.gt is None else str(self.gt),
                "image_dir": None if self.image_dir is None else str(self.image_dir),
                "stats": self.stats, "prepare_seconds": self.prepare_seconds}


def synthetic_spec(name: str, object_points: int = 2000, points_per_image: int = 40, pixel_noise: float = 0.5,
                   outlier_ratio: float = 0.2, sequential_overlap: int = 10, seed: int = 0) -> InputSpec | None:
    """Object layouts (ring, turntable, sphere) have `object_points` points, each image seeing
    ~30% of them (~600 observations); the corridor has `points_per_image` points per image,
    each seen by ~16 images (~650 observations per image)."""
    m = re.fullmatch(r"([a-z]+)(\d+)", name)
    if not m or m.group(1) not in SYNTHETIC_FAMILIES:
        return None
    layout, graph = SYNTHETIC_FAMILIES[m.group(1)]
    n = int(m.group(2))
    extra = {}
    if layout == "loop":  # the same density of points along the corridor as `corridorN`
        extra = dict(loop_laps=LOOP_LAPS, retrieval_neighbors=RETRIEVAL_NEIGHBORS)
        points = points_per_image * n // LOOP_LAPS
    else:
        points = points_per_image * n if layout == "forward" else object_points
    return InputSpec(name, "synthetic", synthetic=dict(
        num_images=n, num_points=points, layout=layout, match_graph=graph,
        sequential_overlap=sequential_overlap, pixel_noise=pixel_noise, outlier_ratio=outlier_ratio, seed=seed,
        **extra))


def rendered_spec(name: str, num_points: int = 2000, seed: int = 0) -> InputSpec | None:
    m = re.fullmatch(r"colmapsphere(\d+)", name)
    if not m:
        return None
    return InputSpec(name, "rendered", synthetic=dict(num_images=int(m.group(1)), num_points=num_points, seed=seed),
                     frontend={"extract": {"camera_mode": "single"}, "match": {"mode": "exhaustive", "seed": 0}})


def resolve_spec(name: str, data_root: Path = DATA_ROOT) -> InputSpec:
    """A dataset name (see the module doc), `database:PATH[@GT]` or `images:PATH[@GT]`."""
    spec = synthetic_spec(name) or rendered_spec(name)
    if spec is not None:
        return spec
    sub = parse_subset(name)
    if sub is not None and not (data_root / name).is_dir():
        parent, k, size = sub
        ps = resolve_spec(parent, data_root)
        if ps.kind != "images":
            raise ValueError(f"{name}: subsets are drawn from image folders, and {parent} is {ps.kind}")
        names = subset_names(parent, image_names(Path(ps.image_dir)), k, size)
        return InputSpec(name, "subset", image_dir=ps.image_dir, gt=ps.gt, frontend=ps.frontend,
                         subset={"parent": asdict(ps), "index": k, "images": names})
    if name.startswith(("database:", "images:")):
        kind, rest = name.split(":", 1)
        path, _, gt = rest.partition("@")
        p = Path(path).resolve()
        if not p.exists():
            raise FileNotFoundError(f"{kind} {p} does not exist")
        label = (p.parent.name if kind == "database" else p.name) or kind
        gt_path = str(Path(gt).resolve()) if gt else None
        if kind == "database":
            return InputSpec(label, "database", database=str(p), gt=gt_path)
        return InputSpec(label, "images", image_dir=str(p), gt=gt_path, frontend=_frontend_options())
    root = data_root / name
    if name in REAL_DATASETS or root.is_dir():
        if not (root / "images").is_dir():
            raise FileNotFoundError(f"dataset {name}: {root / 'images'} is absent (shared data at {data_root})")
        gt = root / "gt"
        return InputSpec(name, "images", image_dir=str(root / "images"), gt=str(gt) if gt.is_dir() else None,
                         frontend=_frontend_options())
    raise ValueError(f"unknown dataset {name!r}: use ringN, turntableN, corridorN, sphereN, loopsN, colmapsphereN, one of {REAL_DATASETS}, "
                     "database:PATH[@GT] or images:PATH[@GT]")


def _frontend_options() -> dict:
    """The reference setting of ../shared/data/README.md: SIFT, exhaustive, one SIMPLE_RADIAL camera,
    matched and verified by COLMAP (the mapper benchmark compares mappers on COLMAP's own database;
    the front-end benchmark compares the front ends)."""
    return {"extract": {"camera_mode": "single", "camera_model": "SIMPLE_RADIAL"},
            "match": {"mode": "exhaustive", "seed": 0, "verifier": "colmap"}}


# ---------------------------------------------------------------------------------------------
# statistics of a database


def database_stats(path: Path) -> dict:
    """Images, cameras, verified pairs and matches, and observations: keypoints with at least one
    verified match (what a mapper can put into tracks; the x axis of the scaling curve)."""
    from ..io.database import UNVERIFIED_CONFIGS

    con = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        n_img = con.execute("SELECT count(*) FROM images").fetchone()[0]
        n_cam = con.execute("SELECT count(*) FROM cameras").fetchone()[0]
        n_kp = con.execute("SELECT coalesce(sum(rows), 0) FROM keypoints").fetchone()[0]
        bad = ",".join(str(int(c)) for c in UNVERIFIED_CONFIGS)
        rows = con.execute(f"SELECT pair_id, rows, data FROM two_view_geometries WHERE rows > 0 AND config NOT IN ({bad})").fetchall()
    finally:
        con.close()
    if rows:
        pid = np.array([r[0] for r in rows], dtype=np.int64)
        cnt = np.array([r[1] for r in rows], dtype=np.int64)
        m = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.uint32).reshape(-1, 2).astype(np.int64)
        id1 = np.repeat(pid // _PAIR_ID_BASE, cnt)
        id2 = np.repeat(pid % _PAIR_ID_BASE, cnt)
        base = int(m.max()) + 1
        obs = np.unique(np.concatenate([id1 * base + m[:, 0], id2 * base + m[:, 1]])).size
    else:
        cnt, obs = np.zeros(0, np.int64), 0
    return {"images": int(n_img), "cameras": int(n_cam), "keypoints": int(n_kp), "verified_pairs": len(rows),
            "verified_matches": int(cnt.sum()), "observations": int(obs)}


# ---------------------------------------------------------------------------------------------
# preparation


def _make_synthetic(spec: InputSpec, folder: Path, num_threads: int) -> tuple[Path, Path]:
    from ..frontend.options import MatchOptions
    from ..frontend.raw_matches import verify_raw_matches
    from ..io.colmap_model import write_model
    from ..synthetic import SyntheticOptions, synthesize, write_synthetic_database

    scene = synthesize(SyntheticOptions(**spec.synthetic))
    db = folder / "database.db"
    write_synthetic_database(scene, db, overwrite=True)
    names = scene.gt.images.name
    verify_raw_matches(db, [(names[i], names[j]) for i, j in scene.view_graph.pairs.tolist()],
                       MatchOptions(seed=0, num_threads=num_threads, progress=False))
    gt = folder / "gt"
    write_model(scene.gt, gt, format="bin")
    return db, gt


def _make_rendered(spec: InputSpec, folder: Path, num_threads: int) -> tuple[Path, Path, Path]:
    """pycolmap's synthetic scene (one camera per image, no focal prior) rendered to images."""
    import pycolmap

    o = pycolmap.SyntheticDatasetOptions()
    o.num_rigs, o.num_cameras_per_rig, o.num_frames_per_rig = spec.synthetic["num_images"], 1, 1
    o.num_points3D = spec.synthetic["num_points"]
    o.camera_has_prior_focal_length = False
    pycolmap.set_random_seed(spec.synthetic["seed"])
    scratch = pycolmap.Database.open(str(folder / "synthetic.db"))  # the synthesiser's own matches: unused
    try:
        gt = pycolmap.synthesize_dataset(o, scratch)
    finally:
        scratch.close()
    (folder / "synthetic.db").unlink()
    images = folder / "images"
    images.mkdir()
    pycolmap.synthesize_images(pycolmap.SyntheticImageOptions(), gt, str(images))
    gt_dir = folder / "gt"
    gt_dir.mkdir()
    gt.write(str(gt_dir))
    spec_img = InputSpec(spec.name, "images", image_dir=str(images), frontend=spec.frontend)
    return _make_from_images(spec_img, folder, num_threads), gt_dir, images


def _make_from_images(spec: InputSpec, folder: Path, num_threads: int) -> Path:
    from ..frontend import extract, match
    from ..frontend.options import ExtractOptions, MatchOptions

    db = folder / "database.db"
    fo = spec.frontend
    extract(spec.image_dir, db, ExtractOptions(**fo.get("extract", {}), progress=False))
    match(db, MatchOptions(**fo.get("match", {}), num_threads=num_threads, progress=False))
    return db


def cached_input(spec: InputSpec, work_dir: Path) -> PreparedInput | None:
    """The cached input of `spec` in WORK/NAME when its spec and database content are unchanged."""
    meta = Path(work_dir) / spec.name / "input.json"
    if not meta.is_file():
        return None
    old = json.loads(meta.read_text())
    db = Path(old["database"])
    if spec_key(old.get("spec", {})) != spec_key(json.loads(json.dumps(asdict(spec)))) or not db.is_file():
        return None
    h = database_hash(db)
    if h != old["input_hash"]:
        log.warning("%s: cached database changed (hash %s, recorded %s); making it again", spec.name, h[:12],
                    old["input_hash"][:12])
        return None
    log.info("%s: reusing %s (%s)", spec.name, db, h[:12])
    return PreparedInput(spec, db, h, Path(old["gt"]) if old["gt"] else None,
                         Path(old["image_dir"]) if old["image_dir"] else None, old["stats"], old["prepare_seconds"])


def _make_subset(spec: InputSpec, folder: Path, work_dir: Path, num_threads: int) -> tuple[Path, Path, Path, str]:
    """(database, reference model, image folder, reference kind) of a subset: its photos linked into
    folder/images, then the front end on them, with the parent's features when it is cached."""
    names = spec.subset["images"]
    parent_spec = InputSpec(**spec.subset["parent"])
    parent = cached_input(parent_spec, work_dir)
    if parent is None and not spec.gt:  # the reference is made from the parent's database
        parent = prepare(parent_spec, work_dir, num_threads)
    images = folder / "images"
    link_images(Path(spec.image_dir), names, images)
    if parent is not None:  # the parent's SIFT features: the ones extraction would compute
        copy_features(parent.database, folder / "database.db", names)
    # extraction then finds every image done (resume) and only checks the folder
    db = _make_from_images(dataclasses.replace(spec, image_dir=str(images)), folder, num_threads)
    if spec.gt:
        ref, kind = Path(spec.gt), "ground truth"
    else:
        ref, kind = full_scene_reference(parent.database, Path(spec.image_dir), num_threads), REFERENCE_FULL_COLMAP
    restrict_reference(ref, names, folder / "reference")
    return db, folder / "reference", images, kind


def prepare(spec: InputSpec, work_dir: Path, num_threads: int = -1, force: bool = False) -> PreparedInput:
    """Make (or reuse) the dataset's database in WORK/NAME; returns it with its content hash."""
    folder = Path(work_dir) / spec.name
    meta = folder / "input.json"
    cached = None if force else cached_input(spec, work_dir)
    if cached is not None:
        return cached
    if spec.kind != "database" and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gt = Path(spec.gt) if spec.gt else None
    reference = "ground truth"
    image_dir = Path(spec.image_dir) if spec.image_dir else None
    if spec.kind == "synthetic":
        log.info("%s: synthesising and verifying %s", spec.name, spec.synthetic)
        db, gt = _make_synthetic(spec, folder, num_threads)
    elif spec.kind == "rendered":
        log.info("%s: rendering pycolmap's synthetic scene %s, then the front end", spec.name, spec.synthetic)
        db, gt, image_dir = _make_rendered(spec, folder, num_threads)
    elif spec.kind == "images":
        log.info("%s: front end on %s", spec.name, spec.image_dir)
        db = _make_from_images(spec, folder, num_threads)
    elif spec.kind == "subset":
        log.info("%s: %d images of %s", spec.name, len(spec.subset["images"]), spec.subset["parent"]["name"])
        db, gt, image_dir, reference = _make_subset(spec, folder, Path(work_dir), num_threads)
    elif spec.kind == "database":
        db = Path(spec.database)
    else:
        raise ValueError(f"unknown input kind {spec.kind!r}")
    seconds = time.perf_counter() - t0
    stats = database_stats(db)
    if gt is not None:
        stats["reference"] = reference
    prep = PreparedInput(spec, db, database_hash(db), gt, image_dir, stats, seconds)
    meta.write_text(json.dumps(prep.to_dict(), indent=2))
    log.info("%s: %s, hash %s (%.1f s)", spec.name, prep.stats, prep.input_hash[:12], seconds)
    return prep
