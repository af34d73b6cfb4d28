"""Number formatters shared by the HTML pages, the model card and the console tables."""

from __future__ import annotations

import math
from typing import Any

NA = "n/a"


def finite(value: Any) -> float | None:
    """A real number as float; None for None, NaN, infinities, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt_num(value: Any, digits: int = 3) -> str:
    """``0.123``; "n/a" for None, NaN, infinities and non-numbers."""
    x = finite(value)
    return NA if x is None else f"{x:.{digits}f}"


def fmt_pct(value: Any) -> str:
    """``12.3%``; "n/a" where undefined."""
    x = finite(value)
    return NA if x is None else f"{x:.1%}"


def fmt_signed(value: Any, digits: int = 3) -> str:
    """``+0.012``; "n/a" where undefined."""
    x = finite(value)
    return NA if x is None else f"{x:+.{digits}f}"


def fmt_count(value: Any) -> str:
    """``1,234``; "n/a" where undefined."""
    x = finite(value)
    return NA if x is None else f"{int(x):,}"


def fmt_interval(low: Any, high: Any, digits: int = 3) -> str:
    """``-0.010 to +0.030``; "n/a" when neither bound is defined."""
    if finite(low) is None and finite(high) is None:
        return NA
    return f"{fmt_signed(low, digits)} to {fmt_signed(high, digits)}"


def fmt_param(value: Any) -> str:
    """A config value as written (``0.0001``, ``True``, ``None``), for hyperparameters."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# Registered once, on both environments: the card and the pages format numbers alike.
FILTERS = {
    "num": fmt_num,
    "pct": fmt_pct,
    "signed": fmt_signed,
    "count": fmt_count,
    "interval": fmt_interval,
    "param": fmt_param,
}
