"""Peak memory of the process per stage: host RSS (Linux VmHWM) and, when PyTorch uses CUDA, device memory.

The kernel keeps one resident high-water mark per process (VmHWM); writing "5" to
/proc/self/clear_refs resets it to the current RSS. A stage that wants its own peak must reset it,
which would hide an enclosing stage's (or the whole run's) peak. So the marks are folded: before
every reset and at every end, the current high-water mark is added to every open window (stages
nest), and the process-wide peak is the maximum over all windows. CUDA is treated the same way
with torch.cuda's peak statistics.

Only the standard library is imported: the benchmark's child process loads this file by path for
the pycolmap baselines without loading PyTorch. CUDA is measured only when PyTorch is already
imported and initialised CUDA. Where the reset is refused (not Linux, an old kernel), windows
report no peak, only the resident size at their end.
"""
from __future__ import annotations

import sys
import threading

_lock = threading.Lock()
_open: list["_Window"] = []  # the open windows, outermost first
_can_reset: bool | None = None


class _Window:
    __slots__ = ("hwm_kb", "cuda_peak", "exact")

    def __init__(self):
        self.hwm_kb, self.cuda_peak, self.exact = 0.0, None, False


def _status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """The process's resident set now (MB)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def _hwm_kb() -> float | None:
    return _status_kb("VmHWM")


def _reset_hwm() -> bool:
    global _can_reset
    if _can_reset is False:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _can_reset = True
    except OSError:
        _can_reset = False
    return _can_reset


def _cuda():
    """torch.cuda when PyTorch is loaded and CUDA initialised, else None (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken CUDA set-up only costs the device numbers
        return None


def _fold() -> None:
    """Add the current high-water marks to every open window."""
    hwm = _hwm_kb()
    cuda = _cuda()
    dev = cuda.max_memory_allocated() if cuda is not None else None
    for w in _open:
        if hwm is not None:
            w.hwm_kb = max(w.hwm_kb, hwm)
        if dev is not None and w.cuda_peak is not None:
            w.cuda_peak = max(w.cuda_peak, dev)


def begin() -> _Window:
    """Open a window; its peak is what the process reaches until `end`."""
    with _lock:
        _fold()
        w = _Window()
        _open.append(w)
        w.exact = _reset_hwm()
        w.hwm_kb = _hwm_kb() or 0.0
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
            w.cuda_peak = cuda.max_memory_allocated()
        return w


def end(w: _Window) -> dict:
    """Close window `w` (and any left open inside it). Returns {"peak_rss_mb", "rss_mb"} and, on
    CUDA, {"cuda_peak_mb", "cuda_mb"}; peak_rss_mb is None where the kernel refused the reset."""
    with _lock:
        _fold()
        for k, o in enumerate(_open):
            if o is w:
                del _open[k:]
                break
        out = {"peak_rss_mb": w.hwm_kb / 1024.0 if w.exact else None, "rss_mb": rss_mb()}
        cuda = _cuda()
        if cuda is not None and w.cuda_peak is not None:
            out["cuda_peak_mb"] = w.cuda_peak / 2**20
            out["cuda_mb"] = cuda.memory_allocated() / 2**20
        return out


class window:
    """`with window() as m: ...`; afterwards m holds `end`'s numbers."""

    def __enter__(self) -> dict:
        self._w = begin()
        self.result: dict = {}
        return self.result

    def __exit__(self, *exc) -> None:
        self.result.update(end(self._w))
