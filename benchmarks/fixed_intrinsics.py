"""What the keypoints of a matched database allow: the database mapped with the true intrinsics
held fixed (the ground truth's PINHOLE camera written into it as a trusted prior; no focal length,
principal point or distortion refined), so that no self-calibration or start of the mapper can
pass the AUC it gives; and the median symmetric epipolar distance of the verified inliers under
the true geometry (a measure of keypoint precision; pairs the ground truth says are wrong count too,
which the median tolerates).

    python benchmarks/fixed_intrinsics.py DATABASE GT OUT [--threads 1]

GT: a COLMAP model with one PINHOLE camera (../shared/data/NAME/gt). DATABASE is copied to OUT
first; it is not changed.
"""
from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchsfm.frontend.colmap_db import pair_ids_to_images  # noqa: E402
from torchsfm.io.colmap_model import read_model  # noqa: E402
from torchsfm.metrics import evaluate  # noqa: E402

PINHOLE = 1  # COLMAP's model id


def epipolar_distances(database: Path, gt: Path) -> np.ndarray:
    """Symmetric epipolar distance (px) of every verified inlier match under the GT poses and K."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(gt))
    by_name = {im.name: im for im in rec.images.values()}
    with sqlite3.connect(database) as c:
        names = dict(c.execute("SELECT image_id, name FROM images"))
        kp = {i: np.frombuffer(d, np.float32).reshape(r, k)[:, :2].astype(np.float64)
              for i, r, k, d in c.execute("SELECT image_id, rows, cols, data FROM keypoints") if r}
        rows = list(c.execute("SELECT pair_id, rows, data FROM two_view_geometries WHERE rows > 0"))
    first, second = pair_ids_to_images(np.array([r[0] for r in rows], np.int64))
    out = []
    for (_, n, data), i1, i2 in zip(rows, first.tolist(), second.tolist()):
        a, b = by_name[names[i1]], by_name[names[i2]]
        rel = b.cam_from_world() * a.cam_from_world().inverse()
        t = rel.translation
        tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
        ka, kb = (rec.cameras[im.camera_id].calibration_matrix() for im in (a, b))
        f = np.linalg.inv(kb).T @ tx @ rel.rotation.matrix() @ np.linalg.inv(ka)
        m = np.frombuffer(data, np.uint32).reshape(n, 2)
        x1 = np.c_[kp[i1][m[:, 0]], np.ones(n)]
        x2 = np.c_[kp[i2][m[:, 1]], np.ones(n)]
        l2, l1 = x1 @ f.T, x2 @ f
        e = np.abs(np.sum(x2 * l2, 1))
        out.append(0.5 * (e / np.hypot(l2[:, 0], l2[:, 1]) + e / np.hypot(l1[:, 0], l1[:, 1])))
    return np.concatenate(out) if out else np.zeros(0)


def with_true_intrinsics(database: Path, gt: Path, out: Path) -> Path:
    """A copy of the database whose one camera is the GT's PINHOLE camera, marked as trusted."""
    cams = [ln.split() for ln in (gt / "cameras.txt").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    if len(cams) != 1 or cams[0][1] != "PINHOLE":
        raise SystemExit(f"{gt}: needs one PINHOLE camera, found {[c[1] for c in cams]}")
    params = np.array([float(v) for v in cams[0][4:8]], np.float64)
    db = out / "database.db"
    shutil.copyfile(database, db)
    with sqlite3.connect(db) as c:
        if c.execute("SELECT COUNT(*) FROM cameras").fetchone()[0] != 1:
            raise SystemExit(f"{database}: needs one shared camera (extract with --camera-mode single)")
        c.execute("UPDATE cameras SET model = ?, params = ?, prior_focal_length = 1", (PINHOLE, params.tobytes()))
    return db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("database")
    ap.add_argument("gt")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    gt, out = Path(a.gt), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    d = epipolar_distances(Path(a.database), gt)
    print(f"verified inliers: {len(d)}, median epipolar distance {np.median(d):.3f} px, under 1 px {np.mean(d < 1):.1%}")
    db = with_true_intrinsics(Path(a.database), gt, out)
    subprocess.run([sys.executable, "-m", "torchsfm.cli", "--threads", str(a.threads), "-q", "map", str(db),
                    str(out / "map"), "--no-refine-focal-length", "--no-refine-extra-params",
                    "--refine-principal-point", "never"], check=True, stdout=(out / "map.log").open("w"))
    ev = evaluate(read_model(out / "map" / "sparse" / "0"), read_model(gt))
    print(f"true intrinsics held fixed: {ev['num_registered']} registered, AUC@1 / 3 / 5 / 10 "
          + " / ".join(f"{ev[f'auc@{k}']:.1f}" for k in (1, 3, 5, 10)))


if __name__ == "__main__":
    main()
