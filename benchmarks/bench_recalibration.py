"""The mapper with and without its recalibrated second pass (`--recalibration-passes 1`, the
default, against 0) on the same matched database: registered images, pose AUC against ground
truth, the focal lengths and the mapping time, each run in its own process, back to back.

Inputs and databases as in bench_refine.py (the same --subsets / --scenes / --features /
--extract-args, and the same OUT cache of matched databases, so both benchmarks can share one;
--subset-databases maps the robustness suite's own SIFT databases instead).
--run-args go to both runs (e.g. `--run-args=--refine-keypoints`). Writes
OUT/bench_recalibration.json and a Markdown table (--md).

    python benchmarks/bench_recalibration.py [--subsets out/bench] [--scenes templeRing,dtu_scan24]
        [--features aliked] [--run-args "..."] [--out out/bench_refine] [--md docs/bench_recalibration.md]
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from bench_learned import add_input_arguments, add_output_arguments, aucs
from bench_refine import add_feature_arguments, run_rows, run_variant, source_database

VARIANTS = (("one_pass", ["--recalibration-passes", "0"]), ("recalibrated", ["--recalibration-passes", "1"]))


def run_row(name: str, images: Path, gt: Path, features: str, extract_args: list[str], run_args: list[str],
            out: Path, threads: int, own_database: bool = False) -> dict:
    own = images.parent / "database.db"
    own_database = own_database and own.exists()
    source = own if own_database else source_database(name, images, features, extract_args, out, threads)
    row: dict = {"dataset": name, "features": features}
    for variant, extra in VARIANTS:
        row[variant], report = run_variant(source, out / name / f"{features}-{variant}", images, gt, features,
                                           extract_args, [*run_args, *extra], threads, own_database)
        stage = next((s for s in report.get("stages", []) if s["name"] == "recalibration"), {"counts": {}})
        row[variant]["focal_change"] = stage["counts"].get("max_focal_change")
        row[variant]["mapped_again"] = bool(stage["counts"].get("mapped_again"))
        row[variant]["map_s"] = round(sum(s["seconds"] for s in report.get("stages", [])
                                          if s["name"] not in ("extract", "match", "refine_keypoints", "write")), 2)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [("| dataset | features | registered: one pass → recalibrated | AUC@1 / 3 / 10: one pass | "
               "AUC@1 / 3 / 10: recalibrated | first pass's focal change | mapping s: one pass → recalibrated |"),
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["one_pass"], r["recalibrated"]
        change = f"{100 * b['focal_change']:.0f}%" if b.get("focal_change") is not None else "-"
        lines.append(f"| {r['dataset']} | {r['features']} | {a['num_registered']} → {b['num_registered']} | "
                     f"{aucs(a)} | {aucs(b)} | {change}{'' if b.get('mapped_again') else ' (once)'} | "
                     f"{a['map_s']:.0f} → {b['map_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(ap)
    add_feature_arguments(ap)
    ap.add_argument("--run-args", default="", help="more `torchsfm run` flags for both runs")
    ap.add_argument("--subset-databases", action="store_true",
                    help="map each subset's own database.db (as the robustness suite matched it; SIFT) when it has one")
    add_output_arguments(ap, "bench_recalibration")
    ap.add_argument("--json", help="write the rows here (default: OUT/bench_recalibration.json)")
    a = ap.parse_args()
    run_rows(a, "bench_recalibration", lambda name, images, gt, out: run_row(
        name, images, gt, a.features, shlex.split(a.extract_args), shlex.split(a.run_args), out, a.threads,
        a.subset_databases), markdown, {"run_args": a.run_args, "subset_databases": a.subset_databases})


if __name__ == "__main__":
    main()
