"""Argument checks shared by every public function.

Each check returns the value as a plain Python type (NumPy scalars are
accepted wherever a Python number is) or raises a `ValueError` in Keras'
style: it names the argument and shows the value received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any


def _fail(name: str, expected: str, value: Any) -> None:
    raise ValueError(f"Argument `{name}` must be {expected}. Received: {name}={value!r}")


def _is_bool(value) -> bool:
    # np.bool_ is not a numbers.Number subclass, but is a bool in all but type. Its class
    # is named "bool_" in NumPy 1 and "bool" in NumPy 2.
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy"
                                       and kind.__name__ in ("bool_", "bool"))


def boolean(name: str, value) -> bool:
    """A bool (or NumPy bool); never a string or a number."""
    if not _is_bool(value):
        _fail(name, "a bool (True or False)", value)
    return bool(value)


def integer(name: str, value, *, minimum: int | None = None, allow_none: bool = False,
            expected: str | None = None) -> int | None:
    """An int (or NumPy integer), optionally at least `minimum`."""
    if value is None and allow_none:
        return None
    what = expected or "an int" + (f" >= {minimum}" if minimum is not None else "") + (
        " or None" if allow_none else "")
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        _fail(name, what, value)
    value = int(value)
    if minimum is not None and value < minimum:
        _fail(name, what, value)
    return value


def number(name: str, value, *, positive: bool = False, minimum: float | None = None,
           maximum: float | None = None, allow_none: bool = False,
           expected: str | None = None) -> float | None:
    """A finite real number (Python or NumPy), optionally positive or within bounds."""
    if value is None and allow_none:
        return None
    parts = ["a finite number"]
    if positive:
        parts.append("> 0")
    if minimum is not None:
        parts.append(f">= {minimum:g}")
    if maximum is not None:
        parts.append(f"<= {maximum:g}")
    what = expected or " ".join(parts) + (" or None" if allow_none else "")
    if _is_bool(value) or not isinstance(value, numbers.Real):
        _fail(name, what, value)
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range, such as 10**400
        _fail(name, what, value)
    if (not math.isfinite(value) or (positive and not value > 0)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        _fail(name, what, value)
    return value


def one_of(name: str, value, choices: Collection):
    """One of `choices`; a bool never stands in for 0 or 1."""
    try:
        found = value in choices
    except (TypeError, ValueError):  # unhashable, or an array's ambiguous truth value
        found = False
    if found and _is_bool(value) and not any(_is_bool(c) for c in choices):
        found = False
    if not found:
        _fail(name, f"one of {tuple(choices)}", value)
    return value


def verbose(value) -> int:
    """Keras' `verbose`: 0 (silent), 1 or 2; True/False as 1/0."""
    if _is_bool(value):
        return int(value)
    if isinstance(value, numbers.Integral) and int(value) in (0, 1, 2):
        return int(value)
    _fail("verbose", "0, 1 or 2", value)
    return 0  # unreachable


def seed(value, *, allow_none: bool = True) -> int | None:
    """A seed: a non-negative int (or NumPy integer), or None."""
    return integer("seed", value, minimum=0, allow_none=allow_none,
                   expected="a non-negative int" + (" or None" if allow_none else ""))


def shape(name: str, value, *, min_rank: int = 0, ranks: Collection[int] | None = None,
          expected: str | None = None) -> tuple[int, ...]:
    """A shape: a tuple or list of positive ints (or NumPy integers).

    Its length must be at least `min_rank` and, if `ranks` is given, one of
    `ranks`. A float dimension such as 2.5 is rejected rather than truncated.
    """
    what = expected or ("a tuple of positive ints"
                        + (f" of length >= {min_rank}" if min_rank else "")
                        + (f" of length in {tuple(ranks)}" if ranks is not None else ""))
    try:
        dims = tuple(value) if not isinstance(value, (str, bytes, dict)) else None
    except TypeError:  # not iterable
        dims = None
    if (dims is None or len(dims) < min_rank or (ranks is not None and len(dims) not in ranks)
            or any(_is_bool(d) or not isinstance(d, numbers.Integral) or d <= 0 for d in dims)):
        _fail(name, what, value)
    return tuple(int(d) for d in dims)
