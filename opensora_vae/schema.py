"""The declared types of config values: ranges (`Annotated[int, Range(1)]`, `PositiveInt`, ...), how a type reads
in errors and docs (`type_name`) and whether a value has it (`fits`). A leaf: it imports nothing of the package, so
models/ and data/ declare their arguments' ranges without knowing the config loader (config.py)."""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

__all__ = ["Decay", "Fraction", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat", "PositiveInt", "Range", "fits",
           "is_union", "ranges_of", "type_name"]


# ----- ranges ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """The values a numeric key takes, declared with its type: `Annotated[int, Range(1)]`. Bounds are inclusive
    unless `*_open`; None: unbounded. Checked when the config loads; shown in errors, --help and docs/config.md."""

    min: Optional[float] = None
    max: Optional[float] = None
    min_open: bool = False
    max_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return False
        return self.max is None or (value < self.max if self.max_open else value <= self.max)

    def __str__(self) -> str:
        if self.min is not None and self.max is not None:
            return f"in {'(' if self.min_open else '['}{self.min:g}, {self.max:g}{')' if self.max_open else ']'}"
        if self.min is not None:
            return f"{'>' if self.min_open else '>='} {self.min:g}"
        return f"{'<' if self.max_open else '<='} {self.max:g}"


PositiveInt = Annotated[int, Range(1)]  # counts and sizes
NonNegativeInt = Annotated[int, Range(0)]  # counts where 0 means none / off
PositiveFloat = Annotated[float, Range(0, min_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
Decay = Annotated[float, Range(0, 1, max_open=True)]  # Adam's betas, EMA decays


# ----- checking --------------------------------------------------------------------------------------------
def is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or type(tp).__name__ == "UnionType"


_SEQUENCES = (list, tuple, List, Tuple, typing.Sequence, collections.abc.Sequence)


def ranges_of(tp: Any) -> List[Range]:
    return [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Range)]


def type_name(tp: Any) -> str:
    """`tp` in the words of the errors and docs: `int >= 1 or None`, `(int, int)`, `'hinge' or 'vanilla'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return " ".join([type_name(args[0]), *map(str, ranges_of(tp))])
    if is_union(tp):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(tp) or tp in (dict, Dict) or origin in (dict, Mapping):
        return "dict"
    if origin in _SEQUENCES or tp in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"({', '.join(type_name(a) for a in args)})"
        if not args:
            return "list/tuple"
        item = type_name(args[0])
        return f"list of {f'({item})' if ' or ' in item else item}"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def fits(value: Any, tp: Any, ranges: bool = True) -> bool:
    """`value` has type `tp` and, with `ranges`, lies in the Range of every Annotated part it matches."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return fits(value, args[0], ranges) and (not ranges or all(value in r for r in ranges_of(tp)))
    if is_union(tp):
        return any(fits(value, a, ranges) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str or tp is os.PathLike:
        return isinstance(value, (str, os.PathLike))
    if dataclasses.is_dataclass(tp) or tp in (dict, Dict) or origin in (dict, Mapping, typing.Mapping):
        return isinstance(value, Mapping)
    if origin in _SEQUENCES or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a, ranges) for v, a in zip(value, args))
        return not args or all(fits(v, args[0], ranges) for v in value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this check does not model: the constructor checks it
