"""The mapper with and without its recalibrated second pass (`--recalibration-passes 1`, the
default, against 0) on the same matched database: registered images, pose AUC against ground
truth, the focal lengths and the mapping time, each run in its own process, back to back.

Inputs and databases as in bench_refine.py (the same --subsets / --scenes / --features /
--extract-args, and the same OUT cache of matched databases, so both benchmarks can share one;
--subset-databases maps the robustness suite's own SIFT databases instead). --synthetic maps
synthetic scenes instead, in this process: 15 images, 0.5 px keypoint noise, the prior focal length
0.5 / 0.7 / 1.3 x the true one, ring / sphere / forward / random layouts, two seeds.
--run-args go to both runs (e.g. `--run-args=--refine-keypoints`). Writes
OUT/bench_recalibration.json and a Markdown table (--md).

    python benchmarks/bench_recalibration.py [--subsets out/bench] [--scenes templeRing,dtu_scan24]
        [--features aliked] [--run-args "..."] [--out out/bench_refine] [--md docs/bench_recalibration.md]
"""
from __future__ import annotations

import argparse
import platform
import shlex
from pathlib import Path

from bench_learned import add_input_arguments, add_output_arguments, aucs, write_results
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


def synthetic_rows(seeds: tuple[int, ...] = (0, 1)) -> list[dict]:
    """Known answers: every layout and wrong prior focal length, mapped with one and two passes."""
    import itertools
    import logging

    from torchsfm import metrics
    from torchsfm.cameras.models import focal_length, scaled_focal_params
    from torchsfm.mapper.pipeline import MapperOptions, global_mapping
    from torchsfm.mapper.recalibration import RecalibrationOptions
    from torchsfm.synthetic import SyntheticOptions, synthesize

    logging.disable(logging.WARNING)
    rows = []
    for layout, prior, seed in itertools.product(("ring", "sphere", "forward", "random"), (0.5, 0.7, 1.3), seeds):
        s = synthesize(SyntheticOptions(num_images=15, num_points=600, layout=layout, pixel_noise=0.5, seed=seed))
        inp = s.mapper_input()
        inp.cameras.params = scaled_focal_params(inp.cameras, prior)
        row: dict = {"dataset": f"{layout}, prior x{prior}, seed {seed}", "features": "synthetic"}
        for (variant, _), passes in zip(VARIANTS, (0, 1)):
            models, rep = global_mapping(inp, MapperOptions(recalibration=RecalibrationOptions(max_passes=passes)))
            ev = metrics.evaluate(models[0], s.gt)
            stage = next((st for st in rep.stages if st.name == "recalibration"), None)
            row[variant] = {**{k: ev[k] for k in ("num_registered", "auc@1", "auc@3", "auc@5", "auc@10")},
                            "focal_error": float(focal_length(models[0].cameras)[0] / focal_length(s.gt.cameras)[0] - 1),
                            "focal_change": stage.counts["max_focal_change"] if stage else None,
                            "mapped_again": bool(stage and stage.counts["mapped_again"]),
                            "map_s": sum(st.seconds for st in rep.stages)}
        rows.append(row)
        print(markdown(rows[-1:], {}).splitlines()[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(ap)
    add_feature_arguments(ap)
    ap.add_argument("--run-args", default="", help="more `torchsfm run` flags for both runs")
    ap.add_argument("--subset-databases", action="store_true",
                    help="map each subset's own database.db (as the robustness suite matched it; SIFT) when it has one")
    ap.add_argument("--synthetic", action="store_true", help="the synthetic known-answer scenes instead of inputs")
    add_output_arguments(ap, "bench_recalibration")
    ap.add_argument("--json", help="write the rows here (default: OUT/bench_recalibration.json)")
    a = ap.parse_args()
    if a.synthetic:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_results(synthetic_rows(), {"machine": f"{platform.machine()}"},
                      Path(a.json or out / "bench_recalibration_synthetic.json"), a.md, markdown)
        return
    run_rows(a, "bench_recalibration", lambda name, images, gt, out: run_row(
        name, images, gt, a.features, shlex.split(a.extract_args), shlex.split(a.run_args), out, a.threads,
        a.subset_databases), markdown, {"run_args": a.run_args, "subset_databases": a.subset_databases})


if __name__ == "__main__":
    main()
