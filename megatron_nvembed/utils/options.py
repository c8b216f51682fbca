"""Config fields that are also command-line flags: declared once, checked once.

A field declared with `option(default, "--flag", "help", ...)` carries its flag name, help text
and bounds in the dataclass field's metadata. The training entry point generates its parser
from these fields (`training/arguments.py`), and `check_options(section)` checks every option of a
config section against its declared type and bounds, naming the flag. Cross-field rules stay in
the section's own `validate()`.

Bottom layer: imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, dataclass


@dataclass(frozen=True)
class Option:
    """What a config field needs to be a flag (stored in the field's metadata)."""

    flag: str
    """The command-line flag (Megatron-LM's name where Megatron has the setting)."""
    help: str
    """One line for `--help`; also the field's documentation."""
    min: float | None = None
    """Smallest value allowed (inclusive); None: no bound."""
    max: float | None = None
    """Largest value allowed (inclusive); None: no bound."""
    above: float | None = None
    """Values must be strictly above this; None: no bound."""
    below: float | None = None
    """Values must be strictly below this; None: no bound."""
    choices: tuple | None = None
    """The values allowed; None: any of the type."""
    negative: str | None = None
    """Another flag that sets a boolean field to False (e.g. `--fp32` for `--bf16`)."""
    runtime: bool = False
    """A run-time setting of the model (dropout, precision, recompute, kernels, layout): a run
    from a checkpoint takes it from the flags, not from the checkpoint."""


def option(
    default=MISSING,
    flag: str = "",
    help: str = "",
    *,
    default_factory=MISSING,
    **bounds,
):
    """A dataclass field that is also the flag `flag` (see `Option` for `bounds`' keys)."""
    meta = {"option": Option(flag=flag, help=help, **bounds)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_of(f: dataclasses.Field) -> Option | None:
    """The `Option` of a dataclass field, or None for a plain field."""
    return f.metadata.get("option")


@dataclass(frozen=True)
class FieldType:
    """A field's annotation reduced to what a flag needs."""

    base: type
    """int, float, str or bool (the element type of a list)."""
    is_list: bool = False
    optional: bool = False
    """None is allowed (means "not set")."""


@functools.cache
def _hints(cls: type) -> dict:
    """A dataclass's resolved annotations (resolved once per class: checks run per config)."""
    return typing.get_type_hints(cls)


def field_type(cls: type, name: str) -> FieldType:
    """The `FieldType` of field `name` of dataclass `cls` (annotations resolved).

    Raises:
        TypeError: an annotation a flag cannot take (a nested dataclass, a dict, ...).
    """
    hint = _hints(cls)[name]
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    if typing.get_origin(hint) is typing.Literal:
        values = typing.get_args(hint)
        return FieldType(type(values[0]), optional=optional)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return FieldType(item, is_list=True, optional=optional)
    if hint in (int, float, str, bool):
        return FieldType(hint, optional=optional)
    raise TypeError(f"{cls.__name__}.{name}: annotation {hint!r} cannot be a flag")


def walk_options(obj_or_cls, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field]]:
    """(dotted path, owning dataclass, field) of every option in a config tree, depth first.

    Nested dataclass fields are descended into; their plain fields are skipped.
    """
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if option_of(f) is not None:
            yield prefix + f.name, cls, f
        elif dataclasses.is_dataclass(hints[f.name]):
            yield from walk_options(hints[f.name], prefix + f.name + ".")


def check_options(section) -> None:
    """Checks every option field of `section` (not nested ones) against its declared type and
    bounds.

    Raises:
        ValueError: naming the flag, the rule and the value.
    """
    for f in dataclasses.fields(section):
        opt = option_of(f)
        if opt is None:
            continue
        kind = field_type(type(section), f.name)
        value = getattr(section, f.name)
        if value is None and kind.optional:
            continue
        values = value if kind.is_list else [value]
        if kind.is_list and not isinstance(value, list | tuple):
            raise ValueError(f"{opt.flag} must be a list, got {value!r}")
        for v in values:
            _check_value(opt, kind.base, v)


def _check_value(opt: Option, base: type, v) -> None:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    ok = (
        isinstance(v, bool)
        if base is bool
        else isinstance(v, int | float) and not isinstance(v, bool)
        if base is float
        else isinstance(v, base) and not isinstance(v, bool)
    )
    if not ok:
        raise ValueError(f"{opt.flag} must be {names[base]}, got {v!r}")
    if opt.choices is not None and v not in opt.choices:
        raise ValueError(f"{opt.flag} must be one of {', '.join(map(str, opt.choices))}, got {v!r}")
    if base is float and not math.isfinite(v):
        raise ValueError(f"{opt.flag} must be a finite number, got {v}")
    rules = (
        (opt.min, lambda b: v >= b, ">="),
        (opt.max, lambda b: v <= b, "<="),
        (opt.above, lambda b: v > b, ">"),
        (opt.below, lambda b: v < b, "<"),
    )
    for bound, holds, sign in rules:
        if bound is not None and not holds(bound):
            raise ValueError(f"{opt.flag} must be {sign} {bound:g}, got {v!r}")
