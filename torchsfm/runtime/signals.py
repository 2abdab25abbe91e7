"""SIGTERM as a clean interruption: the same path as Ctrl-C (KeyboardInterrupt).

Batch schedulers and `kill` send SIGTERM, whose default action ends the process at once, in the
middle of whatever it was writing. `terminate_as_interrupt()` turns it into a `Terminated`
exception (a KeyboardInterrupt) raised in the main thread, so `finally` blocks, atomic writers
and SQLite transactions roll back exactly as on Ctrl-C; the CLI then exits with 143 (128 +
SIGTERM) instead of 130 (128 + SIGINT).
"""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM received."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated(f"received signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM raises `Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    return getattr(e, "exit_code", 128 + signal.SIGINT)
