"""Learned features with and without sub-pixel keypoint refinement (`torchsfm run --refine-keypoints`)
on the same matched database: registered images and pose AUC against ground truth, and the
refinement's time, each run in its own process, back to back.

Inputs: the sparse subsets of a `torchsfm bench --suite robustness` work dir (--subsets; each
folder has images/ and reference/) and scenes (--scenes: templeRing, dtu_scan24 from
../shared/data, low_texture_medium rendered once as bench_learned does). Each input's learned
database is made once here (`extract --features F` with --extract-args, one shared SIMPLE_RADIAL
camera; `match --matcher lightglue`, nn for sift, exhaustive pairs, seed 0) and copied for both runs, so the
two differ by the refinement alone. Writes OUT/bench_refine.json and a Markdown table (--md).

    python benchmarks/bench_refine.py [--subsets out/bench] [--datasets templeRing-sub0,...]
        [--scenes templeRing,dtu_scan24] [--features aliked] [--extract-args "..."]
        [--refine-args "--refine-prior 1"] [--out out/bench_refine] [--md docs/bench_refine.md]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import shutil
import time
from pathlib import Path

from bench_frontend import _copy_db
from bench_learned import (_scores, add_input_arguments, add_output_arguments, aucs, scene_paths, selected_inputs,
                           torchsfm, write_results)

CAMERA = ["--camera-mode", "single", "--camera-model", "SIMPLE_RADIAL"]


def matcher(features: str) -> str:
    return "nn" if features == "sift" else "lightglue"


def source_database(name: str, images: Path, features: str, extract_args: list[str], out: Path, threads: int) -> Path:
    """NAME's learned database, extracted and matched once (reused by every later run)."""
    tag = f"-{hashlib.sha1(' '.join(extract_args).encode()).hexdigest()[:8]}" if extract_args else ""
    folder = out / name / f"{features}-source{tag}"
    db = folder / "database.db"
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        torchsfm(["extract", str(images), "--database", str(db), "--features", features, *CAMERA, *extract_args], threads)
        torchsfm(["match", "--database", str(db), "--mode", "exhaustive", "--matcher", matcher(features), "--seed", "0"],
                 threads)
        (folder / "done").write_text("")
    return db


def inputs(subsets: Path | None, datasets: list[str], scenes: list[str], out: Path) -> list[tuple[str, Path, Path]]:
    """(name, images, ground truth) of every input."""
    found = []
    if subsets is not None:
        for d in sorted(subsets.iterdir()):
            if "-sub" in d.name and (d / "images").is_dir() and (not datasets or d.name in datasets):
                found.append((d.name, d / "images", d / "reference"))
    for s in scenes:
        images, gt = scene_paths(s, out)
        found.append((s, images, gt))
    return found


def run_variant(source: Path, work: Path, images: Path, gt: Path, features: str, extract_args: list[str],
                extra: list[str], threads: int, own_database: bool = False) -> tuple[dict, dict]:
    """Map a copy of `source` in WORK (`torchsfm run` resuming after the front end, or `torchsfm
    map` for a database of its own): (scores and run time, report.json)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _copy_db(source, work / "database.db")  # what its write-ahead log holds too
    if own_database:
        args = ["map", str(work / "database.db"), str(work)]
    else:  # run resumes: extraction and matching find nothing to do
        args = ["run", str(images), str(work), *CAMERA, "--features", features, "--matcher", matcher(features),
                "--match-mode", "exhaustive", *extract_args]
    seconds = torchsfm([*args, *extra], threads, check=False)
    (work / "map").mkdir(exist_ok=True)  # _scores reads WORK/map/sparse/0
    if (work / "sparse").is_dir():
        shutil.copytree(work / "sparse", work / "map" / "sparse")
    report = json.loads((work / "report.json").read_text()) if (work / "report.json").exists() else {}
    return {"run_s": round(seconds, 2), **_scores(work, gt)}, report


def run_row(name: str, images: Path, gt: Path, features: str, extract_args: list[str], refine_args: list[str],
            out: Path, threads: int) -> dict:
    source = source_database(name, images, features, extract_args, out, threads)
    row: dict = {"dataset": name, "features": features}
    for variant, extra in (("detected", []), ("refined", ["--refine-keypoints", *refine_args])):
        row[variant], report = run_variant(source, out / name / f"{features}-{variant}", images, gt, features,
                                           extract_args, extra, threads)
        stage = next((s for s in report.get("stages", []) if s["name"] == "refine_keypoints"), None)
        if stage is not None:
            row[variant].update(refine_s=round(stage["seconds"], 2), matches=stage["counts"]["num_matches"],
                                kept=stage["counts"]["num_kept"], keypoints=stage["counts"]["num_keypoints"],
                                median_correction_px=stage["counts"]["median_correction_px"])
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [("| dataset | features | registered: detected → refined | AUC@1 / 3 / 10: detected | "
               "AUC@1 / 3 / 10: refined | matches kept | median correction px | refinement s |"),
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, f = r["detected"], r["refined"]
        lines.append(f"| {r['dataset']} | {r['features']} | {d['num_registered']} → {f['num_registered']} | "
                     f"{aucs(d)} | {aucs(f)} | {f.get('kept', 0)} of {f.get('matches', 0)} | "
                     f"{f.get('median_correction_px', 0):.2f} | {f.get('refine_s', 0):.0f} |")
    return "\n".join(lines) + "\n"


def add_feature_arguments(ap) -> None:
    """--features and --extract-args of the benchmarks that map one matched database twice."""
    ap.add_argument("--features", default="aliked", choices=("aliked", "disk", "xfeat", "sift"))
    ap.add_argument("--extract-args", default="", help="more `torchsfm extract` flags for the learned database")


def run_rows(a, name: str, row, markdown, meta: dict) -> None:
    """One row per input (`row(name, images, gt, out)`), printed as it comes; then OUT/NAME.json
    (or --json) and --md."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for input_name, images, gt in inputs(*selected_inputs(a), out):
        rows.append(row(input_name, images, gt, out))
        print(markdown(rows[-1:], {}).splitlines()[-1], flush=True)
    meta = {"machine": f"{platform.machine()}, {a.threads} threads", "features": a.features,
            "extract_args": a.extract_args, **meta, "seconds": round(time.time() - t0)}
    write_results(rows, meta, Path(a.json or out / f"{name}.json"), a.md, markdown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(ap)
    add_feature_arguments(ap)
    ap.add_argument("--refine-args", default="", help="more `torchsfm run` flags for the refined runs")
    add_output_arguments(ap, "bench_refine")
    ap.add_argument("--json", help="write the rows here (default: OUT/bench_refine.json)")
    a = ap.parse_args()
    run_rows(a, "bench_refine", lambda name, images, gt, out: run_row(
        name, images, gt, a.features, shlex.split(a.extract_args), shlex.split(a.refine_args), out, a.threads),
        markdown, {"refine_args": a.refine_args})


if __name__ == "__main__":
    main()
