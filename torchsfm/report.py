"""Run reports: per-stage time and counts, skipped inputs, versions, and a terminal summary."""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .runtime import peak_memory

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    name: str
    seconds: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # peak_rss_mb / rss_mb (host), cuda_peak_mb / cuda_mb (device) over the stage (peak_memory)
    memory: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # the process's CPU time in the stage: comparable on a busy machine


@dataclass
class RunReport:
    command: str = ""
    seed: int | None = None
    device: str = "cpu"
    config: dict = field(default_factory=dict)
    stages: list[StageReport] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"item": ..., "reason": ...}
    summary: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=lambda: versions())

    @contextmanager
    def stage(self, name: str, device: torch.device | None = None):
        """Time a stage (synchronising CUDA so the time is real), measure its peak memory and
        collect its report."""
        rep = StageReport(name)
        sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
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
            log.info("%-28s %7.2f s %s %s", name, rep.seconds, _fmt_memory(rep.memory), _fmt_counts(rep.counts))

    def to_dict(self) -> dict:
        from .config import to_dict

        return to_dict(self)

    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


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


def versions() -> dict[str, str]:
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


# Below this registered fraction of the largest model, the summary adds a hint (like nerfstudio's).
LOW_COVERAGE = 0.8


def registered_fraction(summary: dict) -> tuple[int, int] | None:
    """(registered, total) of the largest model from a summary: numbers under `registered_images`
    and `num_images`, or the string "N / M" that the mapper writes; None when absent or unreadable."""
    reg, total = summary.get("registered_images"), summary.get("num_images")
    if isinstance(reg, int) and isinstance(total, int):
        return reg, total
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(reg)) if reg is not None else None
    return (int(m[1]), int(m[2])) if m else None


def coverage_hint(summary: dict) -> str | None:
    frac = registered_fraction(summary)
    if frac is None or frac[1] == 0 or frac[0] >= LOW_COVERAGE * frac[1]:
        return None
    return (f"only {frac[0] / frac[1]:.0%} of images registered ({frac[0]} / {frac[1]}): try --match-mode exhaustive "
            "or photos with more overlap, and check the skipped list in report.json")


def format_summary(report: RunReport) -> str:
    lines = [f"torchsfm {report.command}: done in {report.total_seconds():.2f} s on {report.device}"]
    for k, v in report.summary.items():
        lines.append(f"  {k:<28} {v:.4g}" if isinstance(v, float) else f"  {k:<28} {v}")
    hint = coverage_hint(report.summary)
    if hint:
        lines.append(f"  hint: {hint}")
    if report.stages:
        lines.append("  time and peak memory per stage:")
        for s in report.stages:
            lines.append(f"    {s.name:<26} {s.seconds:8.2f} s  {_fmt_memory(s.memory or {})}".rstrip())
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


@contextmanager
def solver_progress(options, desc: str):
    """A copy of `options` (a dataclass with a `solver: SolverOptions` field) whose solver callback
    also advances a tqdm bar of iterations; the bar is closed after the block."""
    from contextlib import nullcontext

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    enabled = progress_enabled()
    bar = tqdm(total=options.solver.max_iterations, desc=desc, unit="it", leave=False, disable=not enabled)
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
