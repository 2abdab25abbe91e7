"""Command-line flags derived from the option dataclasses of the stages.

Every verb builds its flags from the options dataclass of each stage it runs, with a table of
`Flag`s that gives, per field, the flag name, COLMAP's spelling as an alias, the help and the
choices. Each scalar field (bool, int, float, str, and their optionals) that the table does not
list gets a flag too, named after the field (`--max-num-trials`), with its help and choices from
`field(metadata={"help": ..., "choices": (...)})` when given: a field added to ExtractOptions or
MatchOptions appears on `extract`, `match` and `run` without CLI code. A table entry with an
empty name hides a field (set it with `--config` where a verb has one).

Flags are "not given" unless typed: `options_from_args` applies the given ones over a base (the
dataclass defaults, or a `--config` file), so config files and flags compose, and `--help` shows
the base's value as the default of every flag. Choice values accept `-` for `_` (`per-image` is
`per_image`); COLMAP's boolean aliases take COLMAP's values (`--SiftMatching.cross_check 0`).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from ..config import merge, to_dict
from . import CLIError


@dataclass(frozen=True)
class Flag:
    field: str  # dotted path in the options dataclass, e.g. "bundle_adjustment.refine_focal_length"
    name: str | None = None  # "--max-features"; None: from the field name; "": no flag
    aliases: tuple[str, ...] = ()  # other spellings, COLMAP's first (`--SiftExtraction.max_num_features`)
    help: str = ""
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    type: Callable[[str], Any] | None = None  # string -> value (default: from the field's type)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is argparse.SUPPRESS
                or text.startswith("same as ") or action.required
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                       argparse._VersionAction, argparse._HelpAction))):
            return text
        return text + (" (default: none)" if action.default is None else " (default: %(default)s)")


def parse_bool(v: str) -> bool:
    """COLMAP's boolean values: 1/0, true/false, yes/no, on/off."""
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 or true/false, not {v!r}")


def choice(choices: tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    """Parse a choice, accepting `-` for `_` (and any case for upper-case choices)."""

    def parse(v: str) -> str:
        s = v.upper() if upper else v
        for c in (s, s.replace("-", "_"), s.replace("_", "-")):
            if c in choices:
                return c
        raise argparse.ArgumentTypeError(f"invalid choice {v!r} (choose from {', '.join(choices)})")

    return parse


def _leaf(cls: type, path: str) -> tuple[type, Any]:
    """The type hint and dataclass field of a dotted field path of dataclass `cls`."""
    *heads, last = path.split(".")
    top = cls
    try:
        for h in heads:
            cls = typing.get_type_hints(cls)[h]
        return typing.get_type_hints(cls)[last], {f.name: f for f in dataclasses.fields(cls)}[last]
    except KeyError:
        raise KeyError(f"{top.__name__} has no field {path!r}: a stale Flag in a verb's table") from None


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


_SCALAR = (bool, int, float, str)


def _scalar_type(tp) -> type | None:
    """bool, int, float or str for a hint of one of them or its optional; None for anything else."""
    if tp in _SCALAR:
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALAR:
            return args[0]
    return None


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v) or "none"
    return "none" if v is None or v == "" else str(v)


def _flag_name(field: str) -> str:
    return "--" + field.rsplit(".", 1)[-1].replace("_", "-")


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, key: str, base: Any,
                table: list[Flag], auto: bool = True, exclude: tuple[str, ...] = (),
                rename: dict[str, str] | None = None) -> None:
    """Add the flags of options object `base` (a dataclass instance) under `key` (the namespace
    prefix `options_from_args` reads back): the table's, then, with `auto`, one per other scalar
    top-level field not in `exclude`. `rename` maps field -> flag name (for a verb that runs
    several stages with a field of the same name). An automatic flag whose name is taken gets
    `--KEY-` in front."""
    cls = type(base)
    rename = rename or {}
    taken = parser._option_string_actions  # noqa: SLF001 - argparse has no public view (groups share it)
    listed = {f.field for f in table}
    flags = list(table)
    if auto:
        for f in dataclasses.fields(cls):
            if f.name in listed or f.name in exclude or _scalar_type(typing.get_type_hints(cls)[f.name]) is None:
                continue
            name = _flag_name(f.name)
            if name in taken and f.name not in rename:
                name = f"--{key}-{name[2:]}"
            flags.append(Flag(f.name, name, help=f.metadata.get("help", f"{cls.__name__}.{f.name}"),
                              choices=f.metadata.get("choices")))
    for fl in flags:
        if fl.field in exclude or fl.name == "":
            continue
        tp, _ = _leaf(cls, fl.field)
        default = _get(base, fl.field)
        dest = f"{key}:{fl.field}"
        name = rename.get(fl.field, fl.name or _flag_name(fl.field))
        help_ = f"{fl.help} (default: {_show(default)})".lstrip().replace("%", "%%")  # argparse %-formats help
        st = _scalar_type(tp)
        if st is bool and fl.type is None:
            parser.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_)
            for alias in fl.aliases:  # COLMAP's spelling takes a value: --SiftMatching.cross_check 0
                parser.add_argument(alias, dest=dest, type=parse_bool, default=argparse.SUPPRESS, metavar="0|1",
                                    help=f"same as {name} / --no-{name[2:]}")
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_,
                                  "metavar": fl.metavar or fl.field.rsplit(".", 1)[-1].upper()}
        if fl.choices is not None:
            upper = all(c == c.upper() for c in fl.choices)
            kwargs.update(type=choice(tuple(fl.choices), upper), metavar=fl.metavar or "{" + ",".join(fl.choices) + "}")
        elif fl.type is not None:
            kwargs.update(type=fl.type)
        elif st is not None:
            kwargs.update(type=st)
        elif typing.get_origin(tp) is tuple:  # tuple[float, ...]
            kwargs.update(type=typing.get_args(tp)[0], nargs="+")
        else:
            raise TypeError(f"{cls.__name__}.{fl.field} ({tp}) needs a Flag.type to be a command-line flag")
        parser.add_argument(name, *fl.aliases, **kwargs)


def given(args: argparse.Namespace, key: str) -> dict[str, Any]:
    """{dotted field: value} of the flags of `key` that were given."""
    prefix = f"{key}:"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def options_from_args(args: argparse.Namespace, key: str, base: Any, **fixed: Any) -> Any:
    """A copy of `base` with the given flags of `key` and then `fixed` (top-level field values
    the verb sets itself) applied; an invalid combination is a CLIError."""
    over: dict[str, Any] = {}
    for path, v in given(args, key).items():
        *heads, last = path.split(".")
        d = over
        for h in heads:
            d = d.setdefault(h, {})
        d[last] = list(v) if isinstance(v, tuple) else v
    over.update(fixed)
    try:
        return merge(base, to_dict(over))
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from e
