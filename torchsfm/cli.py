"""Command-line interface: a thin layer over the Python API.

Each verb lives in `torchsfm/commands/<verb>.py` and exposes
`register(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`.
Exit codes: 0 success, 2 a mistake or a problem with the input (one line on stderr), 1 anything
unforeseen (`-v` adds the traceback), 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ._version import __version__
from .commands import CLIError
from .commands.arguments import ArgumentParser, UsageError, add_common, resolve_paths
from .runtime import configure_threads

# Order is the order shown by --help; modules that do not exist yet are skipped.
VERBS = ["demo", "extract", "match", "map", "run", "ba", "export", "view", "bench"]


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = ArgumentParser(prog="torchsfm", description="Global structure-from-motion on PyTorch (CPU and GPU).")
    parser.add_argument("--version", action="version", version=f"torchsfm {__version__}")
    add_common(parser, defaults=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    handlers = {}
    for verb in VERBS:
        try:
            mod = importlib.import_module(f".commands.{verb}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"commands.{verb}"):
                continue
            raise
        p = mod.register(sub)
        add_common(p)
        handlers[verb] = mod.run
    return parser, handlers


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def quiet_colmap(verbose: bool) -> None:
    """COLMAP's own (glog) info and warning lines only with -v."""
    if verbose:
        return
    try:
        import pycolmap
    except ImportError:  # pragma: no cover - a dependency
        return
    pycolmap.logging.minloglevel = max(pycolmap.logging.minloglevel, 2)  # errors only


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, dict, argparse.Namespace]:
    parser, handlers = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb:
        resolve_paths(args, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return parser, handlers, args


def main(argv: list[str] | None = None) -> int:
    try:
        parser, handlers, args = parse(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    if not args.verb:
        parser.print_help()
        return 0
    setup_logging(args.verbose, args.quiet)
    quiet_colmap(args.verbose)
    configure_threads(args.threads)
    from .runtime.signals import interrupt_exit_code, terminate_as_interrupt

    try:
        with terminate_as_interrupt():  # SIGTERM takes the Ctrl-C path below
            return int(handlers[args.verb](args) or 0)
    except CLIError as e:
        print(f"torchsfm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except (PermissionError, FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        # a path the user can fix: an output that exists as a file, a read-only folder, ...
        where = f": {e.filename}" if e.filename else ""
        print(f"torchsfm {args.verb}: error: {e.strerror or e}{where}", file=sys.stderr)
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
