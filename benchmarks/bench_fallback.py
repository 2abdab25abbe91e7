"""SIFT alone against SIFT with the learned fallback (`torchsfm run --fallback-features`) on the same
SIFT database: registered images and pose AUC against ground truth, the images the fallback found
weak, the pairs it merged and its time, each run in its own process, back to back.

Inputs: the sparse subsets of a `torchsfm bench --suite robustness` work dir (--subsets; each
folder has images/, the SIFT database.db and reference/), and scenes whose SIFT database is made
here by `torchsfm run` (--scenes: templeRing, dtu_scan24 from ../shared/data, low_texture_medium
rendered once as bench_learned does). One shared SIMPLE_RADIAL camera, exhaustive pairs.
Writes OUT/bench_fallback.json and a Markdown table (--md).

    python benchmarks/bench_fallback.py [--subsets out/bench] [--datasets templeRing-sub0,...]
        [--scenes low_texture_medium,templeRing,dtu_scan24] [--features aliked]
        [--run-args "--learned-detection-threshold 0"] [--out out/bench_fallback] [--md docs/bench_fallback.md]
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import time
from pathlib import Path

from bench_learned import (_scores, add_input_arguments, add_output_arguments, aucs, scene_paths, selected_inputs,
                           torchsfm, write_results)

CAMERA = ["--camera-mode", "single", "--camera-model", "SIMPLE_RADIAL"]


def inputs(subsets: Path | None, datasets: list[str], scenes: list[str], out: Path, threads: int
           ) -> list[tuple[str, Path, Path, Path]]:
    """(name, images, SIFT database, ground truth) of every input, the scenes' databases made here."""
    found = []
    if subsets is not None:
        for d in sorted(subsets.iterdir()):
            if "-sub" in d.name and (d / "database.db").is_file() and (not datasets or d.name in datasets):
                found.append((d.name, d / "images", d / "database.db", d / "reference"))
    for s in scenes:
        images, gt = scene_paths(s, out)
        sift = out / s / "sift-source"
        if not (sift / "sparse").is_dir():  # extract + match (+ map, unused) once
            torchsfm(["run", str(images), str(sift), *CAMERA], threads, check=False)
        found.append((s, images, sift / "database.db", gt))
    return found


def run_row(name: str, images: Path, database: Path, gt: Path, features: str, out: Path, threads: int,
            run_args: list[str]) -> dict:
    row: dict = {"dataset": name, "features": features}
    for variant, extra in (("sift", []), ("fallback", ["--fallback-features", features, *run_args])):
        work = out / name / variant
        if not (work / "database.db").exists():  # a rerun keeps the learned database (resume)
            work.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(database, work / "database.db")
        shutil.rmtree(work / "sparse", ignore_errors=True)
        seconds = torchsfm(["run", str(images), str(work), *CAMERA, *extra], threads, check=False)
        (work / "map").mkdir(exist_ok=True)  # _scores reads WORK/map/sparse/0
        if (work / "sparse").is_dir():
            shutil.rmtree(work / "map" / "sparse", ignore_errors=True)
            shutil.copytree(work / "sparse", work / "map" / "sparse")
        row[variant] = {"run_s": round(seconds, 2), **_scores(work, gt)}
        report = json.loads((work / "report.json").read_text()) if (work / "report.json").exists() else {}
        stage = next((s for s in report.get("stages", []) if s["name"] == "fallback"), None)
        if stage is not None:
            row[variant].update(fallback_s=round(stage["seconds"], 2), images=stage["counts"]["num_images"],
                                weak=len(stage["details"].get("weak_images", [])),
                                still_weak=len(stage["details"].get("still_weak", [])),
                                learned_images=stage["counts"]["num_learned_images"],
                                pairs=stage["counts"]["num_candidate_pairs"],
                                merged=stage["counts"]["num_merged_pairs"])
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["| dataset | weak images (still weak) | learned images / pairs matched / merged | registered: SIFT → "
              "fallback | AUC@1 / 3 / 10: SIFT | AUC@1 / 3 / 10: fallback | fallback s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s, f = r["sift"], r["fallback"]
        n = f.get("images", "?")
        lines.append(f"| {r['dataset']} | {f.get('weak', 0)} of {n} ({f.get('still_weak', 0)}) | "
                     f"{f.get('learned_images', 0)} / {f.get('pairs', 0)} / {f.get('merged', 0)} | "
                     f"{s['num_registered']} → {f['num_registered']} | "
                     f"{aucs(s)} | {aucs(f)} | {f.get('fallback_s', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(ap)
    ap.add_argument("--features", default="aliked", choices=("aliked", "disk", "xfeat"))
    ap.add_argument("--run-args", default="", help="more `torchsfm run` flags for the fallback runs")
    add_output_arguments(ap, "bench_fallback")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for name, images, db, gt in inputs(*selected_inputs(a), out, a.threads):
        rows.append(run_row(name, images, db, gt, a.features, out, a.threads, shlex.split(a.run_args)))
        print(markdown(rows[-1:], {}).splitlines()[-1], flush=True)
    meta = {"machine": f"{platform.machine()}, {a.threads} threads", "features": a.features,
            "run_args": a.run_args, "seconds": round(time.time() - t0)}
    write_results(rows, meta, out / "bench_fallback.json", a.md, markdown)


if __name__ == "__main__":
    main()
