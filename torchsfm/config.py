"""Options as dataclasses: one per stage, composed into one root config.

`to_dict`/`from_dict` convert nested dataclasses to and from plain JSON-able dicts, so the
resolved config can be written next to every output and read back (`--config FILE`).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_dict(cls: type[T], data: dict | None, *, strict: bool = True) -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields. Unknown keys
    are an error when `strict` (a typo in a config file must not be silently ignored)."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown and strict:
        raise ValueError(f"unknown option(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v, tp = data[f.name], hints.get(f.name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = from_dict(tp, v, strict=strict)
        elif typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def merge(base: T, overrides: dict) -> T:
    """A copy of dataclass `base` with nested `overrides` applied."""
    d = to_dict(base)

    def rec(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                rec(dst[k], v)
            else:
                dst[k] = v

    rec(d, overrides)
    return from_dict(type(base), d)


def load(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


def dumps(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2, sort_keys=False)
