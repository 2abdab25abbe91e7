"""Markdown tables of a benchmark result (as written by harness.run_benchmark / merge_results)."""
from __future__ import annotations

import math
import re
import statistics

from .harness import METHOD_LABELS, STAGE_GROUPS, check_comparable, stage_group_peaks, stage_groups
from .robustness import is_subset, robustness_table

_STAGE_HEAD = {"relative_poses": "rel. poses", "rotation_averaging": "rot. avg.", "tracks": "tracks",
               "global_positioning": "glob. pos.", "bundle_adjustment": "BA rounds",
               "retriangulation": "retri. + BA", "other": "other"}


def _num(v, fmt: str = "{:.1f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def _median(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def series(ds: dict) -> list[tuple[str, list[dict]]]:
    """Runs of a dataset grouped by (method, device, machine), in method order; repeats pool."""
    machines = sorted({r.get("machine", "") for r in ds.get("runs", [])})
    groups: dict[tuple, list[dict]] = {}
    for r in ds.get("runs", []):
        dev = r.get("device", "cpu") or "cpu"
        groups.setdefault((r["method"], dev, r.get("machine", "")), []).append(r)
    out = []
    for (method, dev, mach), runs in groups.items():
        label = METHOD_LABELS.get(method, method)
        if method == "torchsfm":
            label += f" ({dev.split(':')[0]})"
        if len(machines) > 1:
            label += f" [machine {machines.index(mach) + 1}]"
        out.append((label, runs))
    order = list(METHOD_LABELS)
    out.sort(key=lambda x: (order.index(x[1][0]["method"]) if x[1][0]["method"] in order else 99, x[0]))
    return out


def _agg(runs: list[dict], get) -> float | None:
    return _median([get(r) for r in runs if r.get("status") == "ok"])


def _status(runs: list[dict]) -> str | None:
    """None when some run succeeded, else the first failure in words."""
    if any(r.get("status") == "ok" for r in runs):
        return None
    r = runs[0]
    st = r.get("status", "?")
    if st == "timeout":
        return f"timeout (> {r.get('process_seconds', 0):.0f} s)"
    if st == "skipped":
        return f"skipped: {r.get('error', '')}"
    return st


def _acc(r: dict, key: str):
    return (r.get("accuracy") or {}).get(key)


def _has_gpu(result: dict) -> bool:
    return any(r.get("gpu_peak_allocated_mb") is not None for ds in result["datasets"] for r in ds.get("runs", []))


def accuracy_table(result: dict, group: str = "table") -> str:
    gpu = _has_gpu(result)
    head = ["dataset", "images", "method", "registered", "points", "track length", "reproj. (px)", "AUC@1", "AUC@3",
            "AUC@5", "AUC@10", "med. rot. (°)", "med. transl. (°)", "time (s)", "peak RSS (MB)"]
    if gpu:
        head.append("GPU peak (MB)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in result["datasets"]:
        if group not in ds.get("groups", []) or is_subset(ds):  # subsets: robustness_table
            continue
        name = ds["name"]
        if ds.get("skipped"):
            lines.append(f"| {name} | | skipped: {ds['skipped']} |" + " |" * (len(head) - 3))
            continue
        n_img = ds.get("stats", {}).get("images")
        for label, runs in series(ds):
            st = _status(runs)
            reps = sum(r.get("status") == "ok" for r in runs)
            lab = label + (f" (median of {reps})" if reps > 1 else "")
            if st is not None:
                lines.append(f"| {name} | {n_img} | {lab} | {st} |" + " |" * (len(head) - 4))
                continue
            ref = next((_acc(r, "reference") for r in runs if r.get("accuracy")), None)
            # without ground truth, COLMAP incremental's model is the others' reference
            is_ref = runs[0]["method"] == "colmap" and not ds.get("gt") and any(
                _acc(r, "reference") == "COLMAP incremental" for r in ds["runs"])
            ref = "COLMAP incremental" if is_ref else ref
            acc = ["ref."] * 6 if is_ref else [
                _num(_agg(runs, lambda r, k=k: _acc(r, k))) for k in ("auc@1", "auc@3", "auc@5", "auc@10")] + [
                _num(_agg(runs, lambda r, k=k: _acc(r, k)), "{:.2f}") for k in
                ("median_rotation_error_deg", "median_translation_error_deg")]
            if ref is None:
                acc = ["–"] * 6
            reg = _agg(runs, lambda r: r["model_stats"]["registered"])
            cells = [name, str(n_img), lab, f"{_num(reg, '{:.0f}')} / {n_img}",
                     _num(_agg(runs, lambda r: r["model_stats"]["points"]), "{:.0f}"),
                     _num(_agg(runs, lambda r: r["model_stats"]["mean_track_length"]), "{:.2f}"),
                     _num(_agg(runs, lambda r: r["model_stats"]["mean_reprojection_error_px"]), "{:.3f}"),
                     *acc, _num(_agg(runs, lambda r: r.get("seconds"))), _rss(runs)]
            if gpu:
                cells.append(_num(_agg(runs, lambda r: r.get("gpu_peak_allocated_mb")), "{:.0f}"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_table(result: dict, group: str = "table") -> str:
    head = ["dataset", "method", *(_STAGE_HEAD[g] for g in STAGE_GROUPS), "total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in result["datasets"]:
        if group not in ds.get("groups", []) or ds.get("skipped") or is_subset(ds):
            continue
        for label, runs in series(ds):
            if _status(runs) is not None:
                continue
            method = runs[0]["method"]
            cells = [ds["name"], label]
            groups = {id(r): stage_groups(method, r.get("stages") or {}, r["seconds"]) for r in runs if "seconds" in r}
            for g in STAGE_GROUPS:
                v = _agg(runs, lambda r, g=g: groups.get(id(r), {}).get(g))
                blank = (method == "colmap" and g != "other") or (method == "glomap" and g == "relative_poses")
                cells.append("–" if blank or v is None else _num(v))
            cells.append(_num(_agg(runs, lambda r: r.get("seconds"))))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(result: dict, group: str | None = None) -> str:
    """Peak RSS (MB) per stage group of the runs that record it (torchsfm), every dataset of
    `group` (None: all datasets), and "RSS / GPU" on CUDA; the last column is the run's peak."""
    head = ["dataset", "method", *(_STAGE_HEAD[g] for g in STAGE_GROUPS), "peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in result["datasets"]:
        if (group is not None and group not in ds.get("groups", [])) or ds.get("skipped"):
            continue
        for label, runs in series(ds):
            if _status(runs) is not None or not any(r.get("stage_memory") for r in runs):
                continue
            method = runs[0]["method"]
            host = {id(r): stage_group_peaks(method, r.get("stage_memory")) for r in runs}
            dev = {id(r): stage_group_peaks(method, r.get("stage_memory"), "cuda_peak_mb") for r in runs}

            def cell(get_host, get_dev):
                h, d = _num(_agg(runs, get_host), "{:.0f}"), _agg(runs, get_dev)
                return h if d is None else f"{h} / {d:.0f}"

            cells = [ds["name"], label] + [cell(lambda r, g=g: host[id(r)].get(g), lambda r, g=g: dev[id(r)].get(g))
                                           for g in STAGE_GROUPS]
            cells.append(cell(lambda r: r.get("peak_rss_mb"), lambda r: r.get("gpu_peak_allocated_mb")))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rss(runs: list[dict]) -> str:
    """Peak RSS, and in brackets what the mapping call added to the process's start."""
    peak = _agg(runs, lambda r: r.get("peak_rss_mb"))
    start = _agg(runs, lambda r: r.get("rss_start_mb"))
    if peak is None:
        return "–"
    return f"{peak:.0f}" + (f" (+{peak - start:.0f})" if start is not None else "")


def scaling_families(result: dict) -> str:
    """'synthetic corridor' etc. for the scaling datasets' name prefixes."""
    from .inputs import SYNTHETIC_FAMILIES

    fam = sorted({re.sub(r"\d+$", "", ds["name"]) for ds in result["datasets"] if "scaling" in ds.get("groups", [])})
    words = [f"synthetic {f} ({SYNTHETIC_FAMILIES[f][1]} matching)" if f in SYNTHETIC_FAMILIES else f for f in fam]
    return ", ".join(words)


def scaling_table(result: dict) -> str:
    gpu = _has_gpu(result)
    head = ["dataset", "images", "observations", "method", "registered", "AUC@1", "AUC@5", "time (s)", "CPU time (s)",
            "peak RSS (MB)"]
    if gpu:
        head.append("GPU peak (MB)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds in result["datasets"]:
        if "scaling" not in ds.get("groups", []) or ds.get("skipped"):
            continue
        st = ds.get("stats", {})
        for label, runs in series(ds):
            s = _status(runs)
            cells = [ds["name"], str(st.get("images")), str(st.get("observations")), label]
            if s is not None:
                cells += [s] + [""] * (len(head) - 5)
            else:
                cells += [_num(_agg(runs, lambda r: r["model_stats"]["registered"]), "{:.0f}"),
                          _num(_agg(runs, lambda r: _acc(r, "auc@1"))), _num(_agg(runs, lambda r: _acc(r, "auc@5"))),
                          _num(_agg(runs, lambda r: r.get("seconds"))), _num(_agg(runs, lambda r: r.get("cpu_seconds"))),
                          _rss(runs)]
                if gpu:
                    cells.append(_num(_agg(runs, lambda r: r.get("gpu_peak_allocated_mb")), "{:.0f}"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_series(result: dict) -> dict[str, list[tuple[float, float, float, float | None]]]:
    """label -> sorted [(observations, seconds, peak RSS MB, GPU peak MB or None)] of the ok runs;
    with several dataset families on the curve (corridorN, loopsN), one series per family."""
    out: dict[str, list] = {}
    scaling = [ds for ds in result["datasets"] if "scaling" in ds.get("groups", []) and not ds.get("skipped")]
    families = {re.sub(r"\d+$", "", ds["name"]) for ds in scaling}
    for ds in scaling:
        x = ds.get("stats", {}).get("observations")
        fam = f", {re.sub(r'[0-9]+$', '', ds['name'])}" if len(families) > 1 else ""
        for label, runs in series(ds):
            label += fam
            ok = [r for r in runs if r.get("status") == "ok"]
            if not ok or not x:
                continue
            med = lambda key: sorted(r.get(key) for r in ok)[len(ok) // 2] if all(r.get(key) is not None for r in ok) else None  # noqa: E731
            out.setdefault(label, []).append((float(x), med("seconds"), med("peak_rss_mb"), med("gpu_peak_allocated_mb")))
    return {k: sorted(v) for k, v in out.items()}


def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log y against log x (y ~ x^k); None with fewer than two points."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x and y and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def scaling_exponents(series_: dict[str, list], min_x: float | None = None) -> dict[str, dict]:
    """label -> {"time": k, "memory": k} fitted over the points with x >= min_x (all points when
    fewer than two qualify)."""
    out = {}
    for label, pts in series_.items():
        sel = [p for p in pts if min_x is None or p[0] >= min_x]
        sel = sel if len(sel) >= 2 else pts
        out[label] = {"time": fit_exponent([(p[0], p[1]) for p in sel]),
                      "memory": fit_exponent([(p[0], p[2]) for p in sel]), "from": sel[0][0] if sel else None,
                      "to": sel[-1][0] if sel else None, "points": len(sel)}
    return out


def exponent_table(result: dict, min_images: int = 1000) -> str:
    """Fitted growth exponents (time and peak RSS against observations) per method, over the
    scaling datasets of at least `min_images` images (all of them when fewer than two are), and the
    memory a run added per million observations at the largest size (peak RSS minus the RSS at
    the start of mapping: what a user should budget beyond the libraries)."""
    stats = {ds.get("stats", {}).get("observations"): ds for ds in result["datasets"]
             if "scaling" in ds.get("groups", []) and not ds.get("skipped")}
    ser = scaling_series(result)
    min_x = min((x for x, ds in stats.items() if x and ds["stats"].get("images", 0) >= min_images), default=None)
    gpu = _has_gpu(result)
    lines = ["| method | images | time exponent | memory exponent | MB per million observations (largest) |"
             + (" GPU MB per million observations |" if gpu else ""), "|---|---|---|---|---|" + ("---|" if gpu else "")]
    for label, f in scaling_exponents(ser, min_x).items():
        n = f["points"]
        span = (f"{stats[f['from']]['stats']['images']}–{stats[f['to']]['stats']['images']} "
                f"({n} size{'s' if n != 1 else ''})") if f["from"] in stats and f["to"] in stats else "–"
        per_m = gpu_m = None
        big = stats.get(f["to"])
        if big is not None:
            runs = next((rs for lab, rs in series(big) if label.startswith(lab)), [])
            added = _agg(runs, lambda r: r["peak_rss_mb"] - r["rss_start_mb"] if r.get("rss_start_mb") else None)
            per_m = None if added is None else added / f["to"] * 1e6
            dev = _agg(runs, lambda r: r.get("gpu_peak_allocated_mb"))
            gpu_m = None if dev is None else dev / f["to"] * 1e6
        lines.append(f"| {label} | {span} | {_num(f['time'], '{:.2f}')} | {_num(f['memory'], '{:.2f}')} | "
                     f"{_num(per_m, '{:.0f}')} |" + (f" {_num(gpu_m, '{:.0f}')} |" if gpu else ""))
    return "\n".join(lines)


def header(result: dict) -> str:
    v = result.get("versions", {})
    git = result.get("git") or {}
    rev = f"git {git['commit'][:10]}{' + uncommitted changes' if git.get('dirty') else ''}" if git.get("commit") else "no git"
    opt = result.get("options", {})
    sources = result.get("sources") or [{"created": result.get("created"), "machine": result.get("machine_label"),
                                         "command": result.get("command")}]
    lines = []
    for k, s in enumerate(sources, 1):
        tag = f"machine {k}: " if len(sources) > 1 else "machine: "
        lines.append(f"- {tag}{s.get('machine')}; run {s.get('created')}")
        if s.get("command"):
            lines.append(f"- command: `{s['command']}`")
    lines.append(f"- versions: torchsfm {v.get('torchsfm')} ({rev}), PyTorch {v.get('torch')}, pycolmap "
                 f"{v.get('pycolmap')}, numpy {v.get('numpy')}, Python {v.get('python')}")
    lines.append(f"- every mapper: {opt.get('threads')} thread(s), seed {opt.get('seed')}, its own process, a copy of "
                 f"the same database (content hash checked); torchsfm on `{opt.get('device')}`, the pycolmap "
                 f"baselines on the CPU; per-run cap {opt.get('time_cap', 0):.0f} s"
                 + (f" ({opt['scaling_time_cap']:.0f} s on the scaling curve)" if opt.get("scaling_time_cap") else "")
                 + (f", {opt['budget']:.0f} s in all" if opt.get("budget") else ""))
    if opt.get("mapper_config"):
        lines.append(f"- torchsfm's mapper options: `{opt['mapper_config']}` (the resolved options are in each run's JSON record)")
    if opt.get("note"):
        lines.append(f"- note: {opt['note']}")
    src = {r.get("versions", {}).get("torchsfm_source_sha256") for ds in result["datasets"] for r in ds.get("runs", [])
           if r.get("method") == "torchsfm" and r.get("status") == "ok"} - {None}
    if len(src) > 1:
        lines.append(f"- warning: torchsfm's source changed while this ran: its runs used {len(src)} different "
                     "versions of the code (`torchsfm_source_sha256` in the JSON)")
    return "\n".join(lines)


LEGEND = """Accuracy: relative-pose AUC (percent) and median relative rotation / translation-direction errors over
all image pairs, against the ground truth (synthetic scenes, templeRing, dtu_scan24) or, for kitchen (no
ground truth), against COLMAP incremental's model ("ref."); an unregistered image counts as failed in every
pair it is in. Registered images, points, track length and reprojection error are computed by the harness on
each model the same way (our projection over all observations). Time: the mapping call (database load and
model write included; process start and imports excluded); CPU time: the process's CPU seconds in that call
(on a shared machine less affected by other jobs than wall time). Peak RSS: the process's resident peak during the
mapping call, interpreter and libraries included (PyTorch alone holds ~300 MB), and in brackets what the
mapping call added to the resident size at its start. Stages: COLMAP incremental interleaves its stages (total
only); GLOMAP takes relative poses from the database's verified two-view geometries ("–"), torchsfm
re-estimates them; "other" is loading, writing, view-graph calibration and what a log does not time."""


def suite_of(result: dict) -> str | None:
    if result.get("suite"):
        return result["suite"]
    m = re.search(r"--suite[ =](\w+)", result.get("command") or "")
    return m.group(1) if m else None


def to_markdown(result: dict, title: str | None = None) -> str:
    check_comparable(result)
    suite = suite_of(result)
    title = title or "torchsfm benchmark" + (f" ({suite})" if suite else "")
    parts = [f"## {title}", "", header(result), ""]
    if any("table" in ds.get("groups", []) and not is_subset(ds) for ds in result["datasets"]):
        parts += ["### Accuracy, size, time, memory", "", accuracy_table(result), "",
                  "### Time per stage (s)", "", stage_table(result), ""]
    if any(is_subset(ds) for ds in result["datasets"]):
        parts += ["### Robustness: seeded subsets of real scenes", "", robustness_table(result), ""]
    if any("scaling" in ds.get("groups", []) for ds in result["datasets"]):
        parts += [f"### Scaling: {scaling_families(result)}", "", scaling_table(result), "",
                  "Growth exponents: least-squares slopes of log time and log peak RSS against log observations "
                  "(1.0 = linear), over the sizes from 1,000 images:", "", exponent_table(result), ""]
    if any(r.get("stage_memory") for ds in result["datasets"] for r in ds.get("runs", [])):
        parts += ["### Peak memory per stage (RSS, MB)", "", memory_table(result), "",
                  "The largest resident size of the process during the stages of each group (interpreter and "
                  "libraries included; on CUDA \"RSS / GPU\", the GPU's peak allocated memory); the pycolmap "
                  "baselines record their run's peak only.", ""]
    parts += [LEGEND, ""]
    return "\n".join(parts)
