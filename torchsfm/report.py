"""Run reports: per-stage time and counts, skipped inputs, versions, and a terminal summary."""
from __future__ import annotations

import logging
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    name: str
    seconds: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


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
        """Time a stage (synchronising CUDA so the time is real) and collect its report."""
        rep = StageReport(name)
        sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            yield rep
        finally:
            sync()
            rep.seconds = time.perf_counter() - t0
            self.stages.append(rep)
            log.info("%-28s %7.2f s  %s", name, rep.seconds, _fmt_counts(rep.counts))

    def to_dict(self) -> dict:
        from .config import to_dict

        return to_dict(self)

    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in counts.items())


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__}
    try:
        from . import __version__

        out["torchsfm"] = __version__
    except ImportError:  # pragma: no cover
        pass
    for mod in ("pycolmap", "numpy", "scipy", "poselib"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            out[mod] = "absent"
    return out


def format_summary(report: RunReport) -> str:
    lines = [f"torchsfm {report.command}: done in {report.total_seconds():.2f} s on {report.device}"]
    for k, v in report.summary.items():
        lines.append(f"  {k:<28} {v:.4g}" if isinstance(v, float) else f"  {k:<28} {v}")
    if report.stages:
        lines.append("  time per stage:")
        for s in report.stages:
            lines.append(f"    {s.name:<26} {s.seconds:8.2f} s")
    if report.skipped:
        lines.append(f"  skipped inputs: {len(report.skipped)} (reasons in report.json)")
    return "\n".join(lines)
