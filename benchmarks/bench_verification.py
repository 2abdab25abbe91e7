"""Parity and speed of torchsfm's batched two-view verification against pycolmap (issue 15).

    python benchmarks/bench_verification.py                         # dtu_scan24 + templeRing
    python benchmarks/bench_verification.py --scenes dtu_scan24 --threads 2 --map

Per scene: SIFT features as `torchsfm extract` makes them (pycolmap, one shared camera), raw
matches of all pairs (pycolmap's exhaustive matcher with verification switched off), then both
verifiers on the same matches with the same options: pycolmap.estimate_two_view_geometry per
pair (one thread) and `verify_all` (torch, --threads). Camera layouts: `shared` (the database as
extracted: COLMAP takes its shared-focal path) and `per_image` (one camera per image: COLMAP's
F + H path). Reported: time, accept/reject agreement, inlier-set Jaccard (median / mean), the
configuration confusion, inliers per pair and the fraction of inliers that the ground-truth
geometry explains (Sampson error <= 2 px). With --map, the shared-camera database is written
with each verification (pycolmap's through `pycolmap.verify_matches`, two threads) and mapped
by `torchsfm map`; pose AUC against the ground truth.

Everything is cached under --work (features, raw matches, pycolmap's results), so a rerun times
only what changed. Timings on a shared machine are noisy: compare the ratio within one run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torchsfm.frontend.verification import VerificationOptions, verify_all  # noqa: E402
from torchsfm.frontend.verification.parity import (compare, flat_inputs, match_without_verification,  # noqa: E402
                                                   pycolmap_options, pycolmap_verify)


def prepare(scene: str, data: Path, work: Path) -> Path:
    """Features (`torchsfm extract`) and raw matches (no verification), cached in WORK/SCENE."""
    from torchsfm.frontend import ExtractOptions, extract

    d = work / scene
    d.mkdir(parents=True, exist_ok=True)
    raw_db = d / "raw_matches.db"
    if raw_db.exists():
        return raw_db
    db = d / "database.db"
    if not db.exists():
        extract(data / scene / "images", db, ExtractOptions())
    tmp = d / "raw_matches.tmp.db"
    copy_database(db, tmp)
    t = time.perf_counter()
    match_without_verification(tmp)
    print(f"{scene}: raw matches in {time.perf_counter() - t:.1f} s", flush=True)
    tmp.rename(raw_db)
    return raw_db


def gt_consistent(d: dict, inliers: torch.Tensor, gt_dir: Path, max_px: float = 2.0) -> float | None:
    """Fraction of inlier matches with Sampson error <= max_px under the ground-truth geometry."""
    import pycolmap

    if not gt_dir.exists():
        return None
    rec = pycolmap.Reconstruction(str(gt_dir))
    by_name = {im.name: im for im in rec.images.values()}
    P = d["pairs"].shape[0]
    Fs = torch.zeros(P, 3, 3, dtype=torch.float64)
    have = torch.zeros(P, dtype=torch.bool)
    for p, (a, b) in enumerate(d["pairs"].tolist()):
        ia, ib = by_name.get(d["names"][a]), by_name.get(d["names"][b])
        if ia is None or ib is None:
            continue
        rel = ib.cam_from_world() * ia.cam_from_world().inverse()
        R, tt = rel.rotation.matrix(), rel.translation
        E = np.array([[0, -tt[2], tt[1]], [tt[2], 0, -tt[0]], [-tt[1], tt[0], 0]]) @ R
        K1 = rec.cameras[ia.camera_id].calibration_matrix()
        K2 = rec.cameras[ib.camera_id].calibration_matrix()
        Fs[p] = torch.from_numpy(np.linalg.inv(K2).T @ E @ np.linalg.inv(K1))
        have[p] = True
    from torchsfm.segments import rows_of

    pair = rows_of(d["match_offsets"])
    m, off, xy = d["matches"], d["offsets"], d["xy"]
    pa = d["pairs"][pair]
    x1 = torch.cat([xy[off[pa[:, 0]] + m[:, 0]], torch.ones(len(m), 1, dtype=torch.float64)], 1)
    x2 = torch.cat([xy[off[pa[:, 1]] + m[:, 1]], torch.ones(len(m), 1, dtype=torch.float64)], 1)
    F = Fs[pair]
    Fx1 = (F @ x1[:, :, None])[..., 0]
    Ftx2 = (F.transpose(1, 2) @ x2[:, :, None])[..., 0]
    err = (x2 * Fx1).sum(1).abs() / (Fx1[:, :2].square().sum(1) + Ftx2[:, :2].square().sum(1)).sqrt()
    sel = inliers & have[pair]
    return float((err[sel] <= max_px).float().mean()) if bool(sel.any()) else None


def run_ours(d: dict, opt: VerificationOptions, device: str, repeat: int):
    best, geoms = None, None
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        geoms = verify_all(d["xy"], d["offsets"], d["pairs"], d["matches"], d["match_offsets"], d["cameras"],
                           d["image_camera"], opt, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        best = (wall, cpu) if best is None or wall < best[0] else best
    return geoms, best


def copy_database(src: Path, dst: Path) -> None:
    """Copy a database file, removing the destination's stale SQLite journal files first."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(dst) + suffix).unlink(missing_ok=True)
    shutil.copy(src, dst)


def write_database(src_db: Path, dst_db: Path, d: dict, config, inliers, F, E, H) -> None:
    """A copy of the raw-match database with these two-view geometries."""
    import pycolmap

    copy_database(src_db, dst_db)
    db = pycolmap.Database.open(str(dst_db))
    db.clear_two_view_geometries()
    mo = d["match_offsets"]
    with pycolmap.DatabaseTransaction(db):
        for p, (a, b) in enumerate(d["pairs"].tolist()):
            g = pycolmap.TwoViewGeometry()
            g.config = pycolmap.TwoViewGeometryConfiguration(int(config[p]))
            m = d["matches"][mo[p]:mo[p + 1]]
            g.inlier_matches = m[inliers[mo[p]:mo[p + 1]]].numpy().astype(np.uint32)
            g.F, g.E, g.H = F[p].numpy(), E[p].numpy(), H[p].numpy()
            db.write_two_view_geometry(int(d["image_ids"][a]), int(d["image_ids"][b]), g)
    db.close()


def map_and_score(db: Path, out: Path, gt_dir: Path) -> dict:
    from torchsfm.api import map_database
    from torchsfm.io.colmap_model import read_model
    from torchsfm.metrics import evaluate

    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    models, _ = map_database(db, out)
    r = evaluate(models[0], read_model(gt_dir)) if models else {}
    return {"map_seconds": time.perf_counter() - t, **{k: r.get(k) for k in
            ("num_registered", "auc@1", "auc@3", "auc@5", "auc@10")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "torchsfm_bench_verification")
    ap.add_argument("--scenes", nargs="+", default=["dtu_scan24", "templeRing"])
    ap.add_argument("--layouts", nargs="+", default=["shared", "per_image"], choices=["shared", "per_image"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of our verifier (pycolmap runs on one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="time ours this many times, keep the fastest")
    ap.add_argument("--map", action="store_true", help="also map the shared-camera databases and score AUC")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="VerificationOptions fields")
    ap.add_argument("--output", type=Path, default=None, help="JSON results (default WORK/bench_verification.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    opt = VerificationOptions()
    for kv in args.set:
        k, v = kv.split("=", 1)
        setattr(opt, k, type(getattr(opt, k))(v) if not isinstance(getattr(opt, k), bool) else v.lower() in ("1", "true"))
    opt.check()
    results = []
    for scene in args.scenes:
        if not (args.data / scene).exists():
            print(f"skipping {scene}: {args.data / scene} is absent")
            continue
        raw = prepare(scene, args.data, args.work)
        gt_dir = args.data / scene / "gt"
        for layout in args.layouts:
            d = flat_inputs(raw, per_image_cameras=layout == "per_image")
            key = hashlib.sha1(str(sorted(pycolmap_options(opt).todict().items())).encode()).hexdigest()[:10]
            ref_path = args.work / scene / f"pycolmap_{layout}_{key}.npz"
            if ref_path.exists():
                z = np.load(ref_path)
                ref_cfg, ref_inl = torch.from_numpy(z["config"]), torch.from_numpy(z["inliers"])
                ref_s, ref_cpu = float(z["seconds"]), float(z["cpu_seconds"]) if "cpu_seconds" in z else None
            else:
                ref_cfg, ref_inl, ref_s, ref_cpu = pycolmap_verify(d["xy"], d["offsets"], d["pairs"], d["matches"],
                                                                   d["match_offsets"], d["cameras"], d["image_camera"],
                                                                   opt)
                np.savez(ref_path, config=ref_cfg.numpy(), inliers=ref_inl.numpy(), seconds=ref_s, cpu_seconds=ref_cpu)
            geoms, (wall, cpu) = run_ours(d, opt, args.device, args.repeat)
            cfg, inl = geoms.config.cpu(), geoms.inliers.cpu()
            cmp = compare(ref_cfg, ref_inl, cfg, inl, d["match_offsets"])
            row = {"scene": scene, "layout": layout, "pairs": int(cfg.numel()), "raw_matches": int(d["matches"].shape[0]),
                   "pycolmap_seconds": ref_s, "pycolmap_cpu_seconds": ref_cpu, "torch_seconds": wall,
                   "torch_cpu_seconds": cpu, "ratio": wall / ref_s if ref_s else None,
                   "cpu_ratio": cpu / ref_cpu if ref_cpu else None, "threads": args.threads, "device": args.device,
                   "trials_mean": float(geoms.num_trials.float().mean()),
                   "inliers_per_pair_pycolmap": cmp["inliers_a"] / cfg.numel(),
                   "inliers_per_pair_torch": cmp["inliers_b"] / cfg.numel(),
                   "gt_consistent_pycolmap": gt_consistent(d, ref_inl, gt_dir),
                   "gt_consistent_torch": gt_consistent(d, inl, gt_dir), **cmp}
            results.append(row)
            ref_cpu_txt = f"cpu {ref_cpu:.1f} s" if ref_cpu else "cpu n/a"
            print(f"{scene} {layout}: pycolmap {ref_s:.1f} s ({ref_cpu_txt}), torch {wall:.2f} s (cpu {cpu:.2f} s, "
                  f"{args.threads} thr) = {row['ratio']:.3f}x wall | accepted {cmp['accepted_a']} / "
                  f"{cmp['accepted_b']} | agreement "
                  f"{100 * cmp['agreement']:.2f} % | Jaccard median {cmp['jaccard_median']:.3f} mean "
                  f"{cmp['jaccard_mean']:.3f}", flush=True)
            print(f"  confusion (pycolmap->torch): {cmp['confusion']}", flush=True)
            if args.map and layout == "shared" and gt_dir.exists():
                import pycolmap

                src = raw
                mine = args.work / scene / "verified_torch.db"
                write_database(src, mine, d, cfg, inl, geoms.F.cpu(), geoms.E.cpu(), geoms.H.cpu())
                theirs = args.work / scene / "verified_pycolmap.db"
                copy_database(src, theirs)
                pairs_txt = args.work / scene / "pairs.txt"
                pairs_txt.write_text("".join(f"{d['names'][a]} {d['names'][b]}\n" for a, b in d["pairs"].tolist()))
                h = pycolmap.Database.open(str(theirs))
                h.clear_two_view_geometries()
                h.close()
                vo = pycolmap_options(opt)
                vo.ransac.num_threads = 1
                t = time.perf_counter()
                pycolmap.verify_matches(str(theirs), str(pairs_txt), vo)
                row["pycolmap_verify_matches_seconds"] = time.perf_counter() - t
                row["map_torch"] = map_and_score(mine, args.work / scene / "map_torch", gt_dir)
                row["map_pycolmap"] = map_and_score(theirs, args.work / scene / "map_pycolmap", gt_dir)
                print(f"  mapped (torchsfm map): torch-verified {row['map_torch']}, pycolmap-verified "
                      f"{row['map_pycolmap']}", flush=True)
    out = args.output or args.work / "bench_verification.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"options": vars(opt), "results": results}, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
