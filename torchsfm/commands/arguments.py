"""What every verb shares on the command line: its paths, the global flags, one-line usage errors.

One convention for every verb: a path is a named option (`--images`, `--database`, `--input`,
`--output`, with COLMAP's `--image_path`, `--database_path`, `--input_path`, `--output_path`
accepted), and may also be given positionally, in the verb's order (inputs, then the output);
the named form wins its slot and the positionals fill the others. `-v`, `-q` and `--threads`
are accepted before or after the verb.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .options import HelpFormatter


class UsageError(Exception):
    """A mistake on the command line: one line on stderr, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as UsageError, so `main` returns 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


@dataclass(frozen=True)
class PathArg:
    name: str  # attribute set on the parsed arguments (a Path, or a list of Paths when `many`)
    flags: tuple[str, ...]  # named forms, ours first, then COLMAP's
    help: str
    required: bool = True
    many: bool = False  # one or more paths (view's models)
    positional: bool = True  # may also be given positionally


def add_common(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    """-v / -q / --threads. On the verbs they default to "not given", so that the value given
    before the verb is kept."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("global options (before or after the verb)")
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="debug logging, tracebacks, and COLMAP's own log lines")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="warnings and errors only, no progress bars")
    g.add_argument("--threads", "--num-threads", "--num_threads", type=int, default=d(None), metavar="N",
                   help="CPU threads of every stage (torch, SIFT workers, matcher) (default: cores, at most 8)")


def add_paths(p: argparse.ArgumentParser, paths: list[PathArg]) -> None:
    g = p.add_argument_group("paths (named, or positional in this order)")
    for a in paths:
        meta = a.name.upper()
        if a.positional:
            g.add_argument(f"_pos_{a.name}", nargs="*" if a.many else "?", metavar=meta, default=None,
                           help=f"{a.help}; or {a.flags[0]}")
        g.add_argument(*a.flags, dest=f"_named_{a.name}", nargs="+" if a.many else None, metavar=meta, type=str,
                       default=None, help=a.help if not a.positional else f"same as the positional {meta}")
    p.set_defaults(_paths=paths, _prog=p.prog)
    shown = " ".join(f"[{a.name.upper()}{' ...' if a.many else ''}]" for a in paths if a.positional)
    p.usage = f"%(prog)s {shown} [options]"


def resolve_paths(args: argparse.Namespace, extra: list[str]) -> None:
    """Set each declared path on `args` from its named form or, in order, the positionals
    (argparse leaves positionals that follow an option in `extra`)."""
    unknown = [e for e in extra if e.startswith("-") and e != "-"]
    prog = getattr(args, "_prog", "torchsfm")
    if unknown:
        raise UsageError(f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see {prog} --help)")
    paths: list[PathArg] = getattr(args, "_paths", [])
    values: list[str] = []
    for a in paths:
        v = getattr(args, f"_pos_{a.name}", None)
        values += (v or []) if a.many else ([] if v is None else [v])
    values += [e for e in extra if not e.startswith("-") or e == "-"]
    for a in paths:
        named = getattr(args, f"_named_{a.name}", None)
        if named is None and a.positional and values:
            named = values if a.many else values.pop(0)
            if a.many:
                values = []
        if named is None and a.required:
            how = (f"give it as {a.flags[0]} {a.name.upper()}" + (" or positionally" if a.positional else ""))
            raise UsageError(f"{prog}: error: {a.name.upper()} is required: {how} (see {prog} --help)")
        setattr(args, a.name, None if named is None else [Path(x) for x in named] if a.many else Path(named))
    if values:
        raise UsageError(f"{prog}: error: unexpected argument(s): {' '.join(values)} (see {prog} --help)")


def writable_folder(path: Path, what: str = "output folder") -> Path:
    """Create `path` if needed; a file in its place or a folder that cannot be written is a
    one-line error naming it."""
    import os

    from . import CLIError

    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create {what} {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {path} is not writable")
    return path


IMAGES = PathArg("images", ("--images", "--image_path", "--image-path"), "image folder (searched recursively)")
DATABASE = PathArg("database", ("--database", "--database_path", "--database-path"), "COLMAP database.db")
OUTPUT = PathArg("output", ("--output", "--output_path", "--output-path", "-o"), "output folder")
INPUT_MODEL = PathArg("input", ("--input", "--input_path", "--input-path"), "COLMAP model folder (.bin or .txt)")
