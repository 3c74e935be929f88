"""Value checks for config keys: each returns what is wrong (a phrase without the key) or None.

    integer(1)(0)          -> "must be >= 1, got 0"
    number(0, 1)("x")      -> "must be a finite number, got 'x'"

`config_utils.schema` checks every config key with them, and the tables that own a group of keys
(`data.augment_table`) build their rows' checks from the same functions, so every message reads
alike. Imports nothing of the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], "str | None"]


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """An integer in [lo, hi] (either bound may be None)."""

    def check(v: Any) -> str | None:
        if not is_int(v):
            return f"must be an integer, got {v!r}"
        if lo is not None and v < lo:
            return f"must be >= {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
        return None

    return check


def number(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
    hi_open: bool = False,
) -> Check:
    """A finite number between lo and hi (inclusive unless *_open; either bound may be None)."""

    def check(v: Any) -> str | None:
        if not is_number(v):
            return f"must be a finite number, got {v!r}"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}, got {v}"
        return None

    return check


def probability(v: Any) -> str | None:
    """A probability in [0, 1]."""
    problem = number(0.0, 1.0)(v)
    return f"(a probability) {problem}" if problem else None


def choice(options: tuple[str, ...]) -> Check:
    """One of `options`."""

    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}; got {v!r}"

    return check


def boolean(v: Any) -> str | None:
    """True or False."""
    return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def nonempty_string(v: Any) -> str | None:
    """A non-empty str."""
    return None if isinstance(v, str) and v else f"must be a non-empty string, got {v!r}"


def pair(lo: float, hi: float | None) -> Check:
    """A (low, high) pair of numbers with lo < low <= high (<= hi)."""

    def check(v: Any) -> str | None:
        if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(is_number(x) for x in v):
            return f"must be a pair of numbers (low, high), got {v!r}"
        a, b = v
        if not (lo < a <= b) or (hi is not None and b > hi):
            bound = f"{lo} < low <= high" + (f" <= {hi}" if hi is not None else "")
            return f"must satisfy {bound}, got {tuple(v)}"
        return None

    return check
