"""Command-line interface: a thin layer over the Python API.

Each verb lives in `torchsfm/commands/<verb>.py` and exposes
`register(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ._version import __version__
from .commands import CLIError
from .runtime import configure_threads

# Order is the order shown by --help; modules that do not exist yet are skipped.
VERBS = ["demo", "extract", "match", "map", "run", "ba", "export", "view", "bench"]


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="torchsfm",
        description="Global structure-from-motion on PyTorch (CPU and GPU).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"torchsfm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores, at most 8)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    handlers = {}
    for verb in VERBS:
        try:
            mod = importlib.import_module(f".commands.{verb}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"commands.{verb}"):
                continue
            raise
        mod.register(sub)
        handlers[verb] = mod.run
    return parser, handlers


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 0
    setup_logging(args.verbose, args.quiet)
    configure_threads(args.threads)
    from .runtime.signals import interrupt_exit_code, terminate_as_interrupt

    try:
        with terminate_as_interrupt():  # SIGTERM takes the Ctrl-C path below
            return int(handlers[args.verb](args) or 0)
    except CLIError as e:
        print(f"torchsfm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        code = interrupt_exit_code(e)
        what = "terminated (SIGTERM)" if code == 143 else "interrupted"
        print(f"torchsfm {args.verb}: {what}; no partial output was written. Completed stages are kept: rerun the "
              "same command to resume", file=sys.stderr)
        return code
    except Exception as e:  # noqa: BLE001 - never a bare traceback for users; -v shows it
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"torchsfm {args.verb}: error: {type(e).__name__}: {e}"
              + ("" if args.verbose else " (run with -v for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
