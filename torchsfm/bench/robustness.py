"""The robustness benchmark's summary: per subset, torchsfm against the better baseline.

Targets (issue 16): on every subset, torchsfm's AUC@1 and AUC@3 at least the better of COLMAP
incremental and GLOMAP minus 1 point, and at least as many images registered as the better
baseline. `robustness_rows` computes the margins from a benchmark result; `robustness_table`
writes them as markdown with the worst case per scene.
"""
from __future__ import annotations

import math

AUC_TOLERANCE = 1.0  # points of AUC torchsfm may trail the better baseline by
BASELINES = ("colmap", "glomap")


def is_subset(ds: dict) -> bool:
    return (ds.get("spec") or {}).get("kind") == "subset"


def _first_ok(ds: dict, method: str) -> dict | None:
    return next((r for r in ds.get("runs", []) if r["method"] == method and r.get("status") == "ok"), None)


def _value(run: dict | None, key: str) -> float:
    """AUC (or registered images) of a run; a failed run scores 0 (it registered nothing)."""
    if run is None:
        return 0.0
    if key == "registered":
        return float((run.get("accuracy") or {}).get("num_registered", run["model_stats"]["registered"]))
    v = (run.get("accuracy") or {}).get(key)
    return float(v) if v is not None and math.isfinite(v) else 0.0


def robustness_rows(result: dict) -> list[dict]:
    """One row per subset dataset: per method registered / AUC@1 / AUC@3, torchsfm's margins over
    the better baseline, and whether the targets hold."""
    rows = []
    for ds in result["datasets"]:
        if not is_subset(ds) or ds.get("skipped"):
            continue
        spec = ds["spec"]["subset"]
        row = {"dataset": ds["name"], "parent": spec["parent"]["name"], "images": ds["stats"]["images"],
               "reference": ds["stats"].get("reference"), "methods": {}}
        for m in (*BASELINES, "torchsfm"):
            run = _first_ok(ds, m)
            row["methods"][m] = {k: _value(run, k) for k in ("registered", "auc@1", "auc@3")}
            row["methods"][m]["ok"] = run is not None
            if m == "torchsfm" and run is not None:
                row["intrinsics"] = (run.get("summary") or {}).get("intrinsics")
        t = row["methods"]["torchsfm"]
        for k in ("registered", "auc@1", "auc@3"):
            best = max(row["methods"][m][k] for m in BASELINES)
            row[f"margin_{k}"] = t[k] - best
        row["meets"] = (row["margin_registered"] >= 0 and row["margin_auc@1"] >= -AUC_TOLERANCE
                        and row["margin_auc@3"] >= -AUC_TOLERANCE)
        rows.append(row)
    return rows


def _f(v: float, fmt: str = "{:.1f}") -> str:
    return fmt.format(v)


def robustness_table(result: dict) -> str:
    rows = robustness_rows(result)
    if not rows:
        return ""
    head = ["subset", "images", "registered C / G / T", "AUC@1 C / G / T", "AUC@3 C / G / T", "T − best: reg.",
            "AUC@1", "AUC@3", "torchsfm intrinsics", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def triple(r, k, fmt="{:.1f}"):
        return " / ".join(_f(r["methods"][m][k], fmt) if r["methods"][m]["ok"] else "failed"
                          for m in (*BASELINES, "torchsfm"))

    for parent in dict.fromkeys(r["parent"] for r in rows):
        group = [r for r in rows if r["parent"] == parent]
        for r in group:
            lines.append("| " + " | ".join([
                r["dataset"], str(r["images"]), triple(r, "registered", "{:.0f}"), triple(r, "auc@1"),
                triple(r, "auc@3"), f"{r['margin_registered']:+.0f}", f"{r['margin_auc@1']:+.1f}",
                f"{r['margin_auc@3']:+.1f}", r.get("intrinsics") or "–", "met" if r["meets"] else "**not met**"]) + " |")
        worst = {k: min(r[f"margin_{k}"] for r in group) for k in ("registered", "auc@1", "auc@3")}
        met = sum(r["meets"] for r in group)
        lines.append(f"| **{parent}: worst** | | | | | **{worst['registered']:+.0f}** | **{worst['auc@1']:+.1f}** | "
                     f"**{worst['auc@3']:+.1f}** | | {met} of {len(group)} met |")
    ref = sorted({r["reference"] for r in rows if r["reference"]})
    legend = (f"C = COLMAP incremental, G = GLOMAP, T = torchsfm, on the same database per subset; AUC against "
              f"{' / '.join(ref)} (restricted to the subset's images); a failed run registers 0 images and scores 0. "
              f"Target per subset: T's registered images ≥ the better baseline's, T's AUC@1 and AUC@3 ≥ the better "
              f"baseline's − {AUC_TOLERANCE:g}.")
    return "\n".join(lines) + "\n\n" + legend
