"""SIFT against learned features (XFeat, ALIKED, DISK with LightGlue) on the same images: registered
images, pose AUC against ground truth, time per image (extraction) and per pair (matching,
verification), each run in its own processes (`torchsfm extract` / `match` / `map`), back to back.

Scenes: the rendered low-texture object (`torchsfm.synthetic.low_texture`, made once into
OUT/low_texture), and ../shared/data's templeRing and dtu_scan24. Every run: one shared
SIMPLE_RADIAL camera, exhaustive pairs, torch verification (seed 0), the global mapper.
Writes OUT/bench_learned.json and a Markdown table (docs/bench_learned.md with --md). Extractions
are cached in OUT per scene, feature and --extract-args; runs in parallel need separate --out
folders, joined into one table by --table-from.

    python benchmarks/bench_learned.py [--scenes low_texture,templeRing,dtu_scan24]
        [--configs sift:nn,xfeat:lightglue,aliked:lightglue,disk:lightglue] [--threads 2] [--out out/bench_learned]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_CONFIGS = "sift:nn,xfeat:lightglue,aliked:lightglue,disk:lightglue"


def scene_paths(name: str, out: Path) -> tuple[Path, Path]:
    if name in ("low_texture", "low_texture_medium"):  # the faint and the medium preset
        folder = out / name
        if not (folder / "gt" / "images.txt").exists():
            from torchsfm.synthetic.low_texture import PRESETS, LowTextureScene, write_scene

            write_scene(folder, LowTextureScene(**PRESETS["medium" if name.endswith("medium") else "faint"]))
        return folder / "images", folder / "gt"
    return DATA / name / "images", DATA / name / "gt"


def torchsfm(args: list[str], threads: int, check: bool = True) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torchsfm.cli", "--threads", str(threads), "-q", *args],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(r.stderr)
    if r.returncode and check:
        raise RuntimeError(f"torchsfm {args[0]} failed: {r.stderr.strip()[-300:]}")
    return time.perf_counter() - t


def extracted(scene: str, feature: str, out: Path, threads: int, extra: list[str]) -> tuple[Path, float]:
    """The database with `feature` keypoints of `scene` (extracted once, reused by every matcher)."""
    images, _ = scene_paths(scene, out)
    folder = out / scene / (f"{feature}-extract" + (f"-{hashlib.sha1(' '.join(extra).encode()).hexdigest()[:8]}" if extra else ""))
    db, done = folder / "database.db", folder / "extract_s.txt"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        seconds = torchsfm(["extract", str(images), "--database", str(db), "--features", feature,
                            "--camera-mode", "single", "--camera-model", "SIMPLE_RADIAL", *extra], threads)
        done.write_text(f"{seconds:.3f}")
    return db, float(done.read_text())


def work_dir(out: Path, scene: str, feature: str, matcher: str, tag: str) -> Path:
    """The folder of one row: its matched database and its map."""
    return out / scene / f"{feature}-{matcher}{tag and '-' + tag}"


def remap(row: dict, out: Path, threads: int) -> dict:
    """The row again with only its map step rerun on its matched database (the mapper changed,
    the database did not): new map time, registered images and AUCs."""
    work = work_dir(out, row["scene"], row["features"], row["matcher"], row.get("variant", ""))
    shutil.rmtree(work / "map", ignore_errors=True)
    row = dict(row, map_s=torchsfm(["map", str(work / "database.db"), str(work / "map")], threads, check=False))
    return row | _scores(work, scene_paths(row["scene"], out)[1])


def _scores(work: Path, gt: Path) -> dict:
    from torchsfm.io.colmap_model import read_model
    from torchsfm.metrics import evaluate

    model = work / "map" / "sparse" / "0"
    if model.is_dir():
        ev = evaluate(read_model(model), read_model(gt))
        return {k: ev[k] for k in ("num_registered", "auc@1", "auc@3", "auc@5", "auc@10")}
    return {"num_registered": 0, "auc@1": 0.0, "auc@3": 0.0, "auc@5": 0.0, "auc@10": 0.0}


def run_one(scene: str, feature: str, matcher: str, out: Path, threads: int, extra: list[str],
            match_extra: list[str], tag: str = "") -> dict:
    _, gt = scene_paths(scene, out)
    source, extract_s = extracted(scene, feature, out, threads, extra)
    work = work_dir(out, scene, feature, matcher, tag)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = work / "database.db"
    shutil.copyfile(source, db)
    shutil.copyfile(source.with_suffix(".extract.json"), db.with_suffix(".extract.json"))
    row: dict = {"scene": scene, "features": feature, "matcher": matcher, "variant": tag, "extract_s": extract_s,
                 "extract_args": " ".join(extra), "match_args": " ".join(match_extra)}
    row["match_s"] = torchsfm(["match", "--database", str(db), "--mode", "exhaustive", "--matcher", matcher,
                               "--seed", "0", *match_extra], threads)
    row["map_s"] = torchsfm(["map", str(db), str(work / "map")], threads, check=False)  # may find no model
    ex = json.loads((work / "database.extract.json").read_text())["stages"][0]
    ma = json.loads((work / "database.match.json").read_text())["stages"][0]
    n_img, n_pairs = ex["counts"]["num_images"], ma["counts"]["num_candidate_pairs"]
    row.update(images=n_img, pairs=n_pairs, keypoints_per_image=ex["counts"]["num_keypoints"] / max(1, n_img),
               extract_s_per_image=ex["seconds"] / max(1, n_img),
               # matching and verification run unit by unit, interleaved: timed together
               match_verify_s_per_pair=ma["details"]["stage_times"]["match+verify"] / max(1, n_pairs),
               verified_pairs=ma["counts"]["num_verified"],
               inliers_per_verified_pair=ma["counts"]["num_inlier_matches"] / max(1, ma["counts"]["num_verified"]))
    return row | _scores(work, gt)


def aucs(scores: dict, at: tuple[int, ...] = (1, 3, 10)) -> str:
    """A table cell of AUCs: 'a / b / c' at these thresholds (degrees), one decimal."""
    return " / ".join(f"{scores[f'auc@{k}']:.1f}" for k in at)


def add_input_arguments(ap) -> None:
    """The input flags of the benchmarks that take robustness subsets and scenes."""
    ap.add_argument("--subsets", help="a `torchsfm bench --suite robustness` work dir (its *-subK inputs)")
    ap.add_argument("--datasets", default="", help="only these subsets (comma-separated names)")
    ap.add_argument("--scenes", default="", help="comma-separated: templeRing, dtu_scan24, low_texture_medium")


def add_output_arguments(ap, name: str) -> None:
    """--threads, --out (default out/NAME) and --md of every benchmark here."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "out" / name))
    ap.add_argument("--md", default=None, help=f"also write the table here (e.g. docs/{name}.md)")


def selected_inputs(a) -> tuple[Path | None, list[str], list[str]]:
    """The parsed input flags: subsets folder, subset names, scene names."""
    return (Path(a.subsets) if a.subsets else None, [d for d in a.datasets.split(",") if d],
            [s for s in a.scenes.split(",") if s])


def write_results(rows: list[dict], meta: dict, json_path: Path, md_path: str | None, markdown) -> None:
    """Rows and meta as JSON, the table as Markdown (when asked), and the table on stdout."""
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if md_path:
        Path(md_path).write_text(markdown(rows, meta))
    print(markdown(rows, meta))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["| scene | features + matcher | registered | AUC@1 / 3 / 5 / 10 | keypoints / image | verified pairs "
              "(inliers each) | extract s / image | match + verify s / pair |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['features']} + {r['matcher']}" + (f" ({r['variant']})" if r.get("variant") else "")
        lines.append(f"| {r['scene']} | {name} | {r['num_registered']} / {r['images']} | "
                     f"{aucs(r, (1, 3, 5, 10))} | {r['keypoints_per_image']:.0f} | {r['verified_pairs']} of {r['pairs']} "
                     f"({r['inliers_per_verified_pair']:.0f}) | {r['extract_s_per_image']:.2f} | "
                     f"{r['match_verify_s_per_pair']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", default="low_texture,templeRing,dtu_scan24")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="feature:matcher,...")
    add_output_arguments(ap, "bench_learned")
    ap.add_argument("--extract-args", default="", help="more `torchsfm extract` options, e.g. '--learned-max-keypoints 1024' "
                    "(extractions are cached in OUT per scene, feature and these options)")
    ap.add_argument("--match-args", default="", help="more `torchsfm match` options, e.g. '--lightglue-threshold 0.2'")
    ap.add_argument("--tag", default="", help="name of this variant (rows of another tag are kept)")
    ap.add_argument("--remap", action="store_true", help="rerun only the map step of the rows of --scenes, --configs "
                    "and --tag already in OUT (a changed mapper, the same matched databases)")
    ap.add_argument("--table-from", default="", help="only write --md from these bench_learned.json files "
                    "(comma-separated; runs in separate --out folders, e.g. in parallel)")
    a = ap.parse_args()
    if a.table_from:
        runs = [json.loads(Path(f).read_text()) for f in a.table_from.split(",")]
        meta = {**runs[0]["meta"], "command": "; ".join(r["meta"]["command"] for r in runs)}
        Path(a.md or "/dev/stdout").write_text(markdown([row for r in runs for row in r["rows"]], meta))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "bench_learned.json"
    before = json.loads(results.read_text()) if results.exists() else {"rows": [], "meta": {}}
    rows = before["rows"]
    command = "python " + " ".join(sys.argv)
    if before["meta"].get("command"):
        command = before["meta"]["command"] + "; then " + command
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "command": command, "threads": a.threads,
            "note": "provisional timings: a shared 2-core machine"}
    for scene in a.scenes.split(","):
        for cfg in a.configs.split(","):
            feature, matcher = cfg.split(":")
            key = (scene, feature, matcher, a.tag)
            old = [r for r in rows if (r["scene"], r["features"], r["matcher"], r.get("variant", "")) == key]
            rows = [r for r in rows if r not in old]
            if a.remap:
                if not old:
                    raise SystemExit(f"--remap: no row {key} in {results}")
                rows.append(remap(old[0], out, a.threads))
            else:
                rows.append(run_one(scene, feature, matcher, out, a.threads, a.extract_args.split(), a.match_args.split(),
                                    a.tag))
            results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            print(markdown(rows[-1:], {}).splitlines()[-1], flush=True)
    if a.md:
        Path(a.md).write_text(markdown(rows, meta))


if __name__ == "__main__":
    main()
