"""Run reports: per-stage time and counts, skipped inputs, versions, and a terminal summary."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    """What one stage did: the one report shape that every stage fills (the front end's extract
    and match, each mapper step, export, ...). `counts` are JSON scalars, logged with the stage's
    line and shown in summaries; `details` are JSON lists and dicts (report.json only)."""

    name: str
    seconds: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # peak_rss_mb / rss_mb (host), cuda_peak_mb / cuda_mb (device) over the stage (peak_memory)
    memory: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # the process's CPU time in the stage: comparable on a busy machine
    details: dict[str, Any] = field(default_factory=dict)

    def record(self, result: Any, exclude: tuple[str, ...] = ()) -> None:
        """Fill `counts` and `details` from a stage's typed result (a dataclass, an object or a
        dict; see `stage_counts`), leaving out the fields named in `exclude`."""
        counts, details = stage_counts(result, exclude)
        self.counts.update(counts)
        self.details.update(details)


_SCALARS = (bool, int, float, str)


def _jsonable(v: Any) -> Any:
    """`v` as plain JSON (dataclasses and paths converted), or None when it holds anything else
    (tensors, arrays: the caller of a stage has those, report.json does not need them)."""
    from .config import to_dict

    v = to_dict(v)
    if v is None or isinstance(v, _SCALARS):
        return v
    if isinstance(v, list):
        items = [_jsonable(x) for x in v]
        return None if any(y is None and x is not None for x, y in zip(v, items)) else items
    if isinstance(v, dict):
        items = {k: _jsonable(x) for k, x in v.items()}
        return None if any(items[k] is None and v[k] is not None for k in v) else items
    return None


def stage_counts(result: Any, exclude: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(counts, details) of a stage's typed result: its scalar fields (bool, int, float, str) are
    counts, its JSON lists and dicts are details, private fields, None and tensors are left out.
    The one serialisation of every stage result (ExtractReport, MatchReport, the mapper's per-step
    reports, plain dicts of counts)."""
    if isinstance(result, dict):
        items = result.items()
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        items = ((f.name, getattr(result, f.name)) for f in dataclasses.fields(result))
    else:
        items = vars(result).items()
    counts, details = {}, {}
    for k, v in items:
        if k.startswith("_") or k in exclude or v is None:
            continue
        if isinstance(v, _SCALARS):
            counts[k] = v
        elif isinstance(v, (list, tuple, dict)) and (j := _jsonable(v)) is not None:
            details[k] = j
    return counts, details


@dataclass
class RunReport:
    """report.json: one per command, the stages it ran in order, what was skipped and why, a
    summary, the resolved options, seed, device and package versions."""

    command: str = ""
    seed: int | None = None
    device: str = "cpu"
    config: dict = field(default_factory=dict)
    stages: list[StageReport] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file" or "image": name, "reason": ..., ["detail"]}
    summary: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=lambda: versions())

    @contextmanager
    def stage(self, name: str, device: torch.device | None = None):
        """Time a stage (synchronising CUDA so the time is real), measure its peak memory and
        collect its report."""
        from .runtime import peak_memory  # here: the report module stays torch-free (extraction workers)

        rep = StageReport(name)
        sync = (lambda: _cuda_sync(device)) if device is not None and device.type == "cuda" else (lambda: None)
        sync()
        mem = peak_memory.begin()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield rep
        finally:
            sync()
            rep.seconds = time.perf_counter() - t0
            rep.cpu_seconds = time.process_time() - c0
            rep.memory = {k: round(v, 1) for k, v in peak_memory.end(mem).items() if v is not None}
            self.stages.append(rep)
            # the log file's record of every stage; on the console the stages' own lines and the
            # summary's time per stage say it once
            log.debug("%-28s %7.2f s %s %s", name, rep.seconds, _fmt_memory(rep.memory), _fmt_counts(rep.counts))

    def skip_files(self, skipped) -> None:
        """Add files skipped by the front end (objects with name, reason, detail)."""
        self.skipped.extend({"file": s.name, "reason": s.reason, **({"detail": s.detail} if s.detail else {})}
                            for s in skipped)

    def to_dict(self) -> dict:
        from .config import to_dict

        return to_dict(self)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write the report atomically (a reader sees the old file or the new one)."""
        from .io.atomic import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str))
        return path

    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def stage_named(self, name: str) -> StageReport | None:
        return next((s for s in self.stages if s.name == name), None)


def _fmt_memory(memory: dict) -> str:
    """'peak 1234 MB' (host), plus the device peak on CUDA."""
    out = f"peak {memory['peak_rss_mb']:6.0f} MB" if "peak_rss_mb" in memory else ""
    if "cuda_peak_mb" in memory:
        out += f", cuda {memory['cuda_peak_mb']:.0f} MB"
    return out


def memory_summary(report: RunReport) -> dict:
    """The run's peaks so far: the largest stage peaks (host, and device on CUDA) and their stages."""
    out = {}
    for key in ("peak_rss_mb", "cuda_peak_mb"):
        st = [s for s in report.stages if key in (s.memory or {})]
        if st:
            top = max(st, key=lambda s: s.memory[key])
            out[key], out[key.replace("_mb", "_stage")] = top.memory[key], top.name
    return out


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in counts.items())


def _cuda_sync(device) -> None:
    import torch

    torch.cuda.synchronize(device)


def versions() -> dict[str, str]:
    import torch  # here, not at import: the front end's worker processes import this module

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__}
    try:
        from ._version import __version__

        out["torchsfm"] = __version__
    except ImportError:  # pragma: no cover
        pass
    for mod in ("pycolmap", "numpy", "scipy", "poselib"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            out[mod] = "absent"
    return out


# Below this registered fraction of the images, the summary adds a hint (like nerfstudio's).
LOW_COVERAGE = 0.8
# summary keys that format_summary shows in its own lines
_MODEL_KEYS = ("models", "model_sizes", "registered_images", "images_in_no_model", "num_images")


def registered_fraction(summary: dict) -> tuple[int, int] | None:
    """(images in some model, all images) from a summary: the mapper's `model_sizes` and
    `images_in_no_model`, else numbers under `registered_images` and `num_images`, or the string
    "N / M" (the largest model); None when absent or unreadable."""
    sizes, none = summary.get("model_sizes"), summary.get("images_in_no_model")
    if isinstance(sizes, list) and isinstance(none, int):
        reg = sum(int(m.get("registered_images", 0)) for m in sizes)
        return reg, reg + none
    reg, total = summary.get("registered_images"), summary.get("num_images")
    if isinstance(reg, int) and isinstance(total, int):
        return reg, total
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(reg)) if reg is not None else None
    return (int(m[1]), int(m[2])) if m else None


def _match_mode(report: RunReport) -> str | None:
    """The pair selection this run used (its "match" stage), None when the run did not match."""
    st = report.stage_named("match")
    return None if st is None else st.counts.get("mode")


def hints(report: RunReport) -> list[str]:
    """What to try when few images were registered, naming only options this run did not use."""
    frac = registered_fraction(report.summary)
    if frac is None or frac[1] == 0 or frac[0] >= LOW_COVERAGE * frac[1]:
        return []
    text = f"only {frac[0] / frac[1]:.0%} of images registered ({frac[0]} / {frac[1]})"
    tries = []
    models = report.summary.get("models")
    if isinstance(models, int) and models > 1:
        text += f", in {models} models that share no verified image pair"
        tries.append("photos that overlap two models join them")
    mode = _match_mode(report)
    if mode is None:
        tries.append("if the database was not matched exhaustively: `torchsfm match --mode exhaustive`")
    elif mode != "exhaustive":
        tries.append(f"--match-mode exhaustive (this run matched {mode})")
    tries.append("photos with more overlap")
    if report.skipped:
        tries.append("the reasons in report.json's skipped list")
    return [f"{text}: try " + "; ".join(tries)]


def _model_lines(summary: dict) -> list[str]:
    sizes = summary.get("model_sizes")
    lines = []
    if isinstance(sizes, list) and sizes:
        each = "; ".join(f"sparse/{k}: {m.get('registered_images')} images, {m.get('points3D')} points"
                         for k, m in enumerate(sizes))
        lines.append(f"  {'models':<28} {len(sizes)} ({each})")
        frac = registered_fraction(summary)
        if frac is not None:
            none = frac[1] - frac[0]
            lines.append(f"  {'registered images':<28} {frac[0]} of {frac[1]}"
                         + (f"; {none} in no model (reasons in report.json)" if none else ""))
    else:
        lines += [f"  {k:<28} {summary[k]}" for k in ("models", "registered_images") if k in summary]
    return lines


def format_summary(report: RunReport) -> str:
    """The terminal summary of a command, from its report: every model's size and the images in
    none, the other summary values, hints, time per stage, skipped inputs."""
    lines = [f"torchsfm {report.command}: done in {report.total_seconds():.2f} s on {report.device}"]
    lines += _model_lines(report.summary)
    for k, v in report.summary.items():
        if k not in _MODEL_KEYS:
            lines.append(f"  {k:<28} {v:.4g}" if isinstance(v, float) else f"  {k:<28} {v}")
    lines += [f"  hint: {h}" for h in hints(report)]
    if report.stages:
        lines.append("  time and peak memory per stage:")
        width = max(26, *(len(s.name) for s in report.stages))  # pass2/... names are longer
        for s in report.stages:
            lines.append(f"    {s.name:<{width}} {s.seconds:8.2f} s  {_fmt_memory(s.memory or {})}".rstrip())
    if report.skipped:
        lines.append(f"  skipped inputs: {len(report.skipped)} (reasons in report.json)")
    return "\n".join(lines)


class _ConsoleGate(logging.Handler):
    """While "torchsfm" is lowered to DEBUG for the log file, passes on to the root handlers exactly
    the records that would have reached them before (the originating logger's former effective
    level), so that the terminal keeps its level."""

    def __init__(self, pkg: logging.Logger, pkg_level: int):
        super().__init__()
        self.pkg, self.pkg_level = pkg, pkg_level

    def _former_level(self, name: str) -> int:
        lg: logging.Logger | None = logging.getLogger(name)
        while lg is not None:
            lvl = self.pkg_level if lg is self.pkg else lg.level
            if lvl:
                return lvl
            lg = lg.parent
        return logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < self._former_level(record.name):
            return
        for h in logging.getLogger().handlers:
            if record.levelno >= h.level:
                h.handle(record)


@contextmanager
def log_to_file(path: str | os.PathLike):
    """Append every "torchsfm" log record (DEBUG and up) to `path` for the duration of the block;
    the console keeps its level. Nested calls for the same file are no-ops (`run` wraps the front
    end and `map_database` again)."""
    path = Path(path).resolve()
    pkg = logging.getLogger("torchsfm")
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in pkg.handlers):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    level, propagate = pkg.level, pkg.propagate
    gate = _ConsoleGate(pkg, level) if propagate else None
    pkg.addHandler(fh)
    if gate is not None:
        pkg.addHandler(gate)
        pkg.propagate = False
    pkg.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        pkg.setLevel(level)
        pkg.propagate = propagate
        if gate is not None:
            pkg.removeHandler(gate)
        pkg.removeHandler(fh)
        fh.close()


def progress_enabled() -> bool:
    """Progress bars only on a terminal and when the console shows INFO messages (not with
    --quiet; inside `log_to_file` the console's former level counts, not the file's DEBUG)."""
    if not sys.stderr.isatty():
        return False
    pkg = logging.getLogger("torchsfm")
    gate = next((h for h in pkg.handlers if isinstance(h, _ConsoleGate)), None)
    return logging.INFO >= gate._former_level(pkg.name) if gate is not None else pkg.isEnabledFor(logging.INFO)


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """The one progress bar: tqdm on stderr, drawn only when `progress_enabled()` (a terminal whose
    console shows INFO: never in a redirected log, never with -q) and `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and progress_enabled()), file=sys.stderr, dynamic_ncols=True, **kwargs)


@contextmanager
def solver_progress(options, desc: str):
    """A copy of `options` (a dataclass with a `solver: SolverOptions` field) whose solver callback
    also advances a tqdm bar of iterations; the bar is closed after the block."""
    from contextlib import nullcontext

    from tqdm.contrib.logging import logging_redirect_tqdm

    enabled = progress_enabled()
    bar = progress_bar(total=options.solver.max_iterations, desc=desc, unit="it", leave=False)
    prev = options.solver.callback

    def callback(rec) -> None:
        if prev is not None:
            prev(rec)
        bar.update(max(0, rec.iteration - bar.n))
        bar.set_postfix(cost=f"{rec.cost:.4g}", refresh=False)

    try:
        with logging_redirect_tqdm() if enabled else nullcontext():  # log lines above the bar, not inside it
            yield dataclasses.replace(options, solver=dataclasses.replace(options.solver, callback=callback))
    finally:
        bar.close()
