"""Checks of option values: one ``ValueError`` wording for every layer, model and hook option.

Every check names the option (with its cfg key where it has one, e.g. ``"BGN: alpha (D2NORM.BGN.ALPHA)"``),
says what is allowed and shows the bad value, and returns the value converted (``int`` / ``float``). ``bool`` is
never accepted as a number (``True`` is an ``int`` in Python, never a meaningful size or rate here).
"""
import math
import numbers
from typing import Optional, Sequence

__all__ = ["check_int", "check_number", "check_choice", "check_bool"]


def _fail(name: str, allowed: str, value, note: str) -> None:
    raise ValueError(f"{name} must be {allowed}{note}, got {value!r}")


def check_int(name: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None, note: str = "") -> int:
    """``value`` as an ``int``: an integer (not a bool) within ``[minimum, maximum]`` (either bound optional)."""
    allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    allowed += (" and" if minimum is not None and maximum is not None else "") + (
        f" <= {maximum}" if maximum is not None else ""
    )
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(name, allowed, value, note)
    return int(value)


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_number(
    name: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    note: str = "",
) -> Optional[float]:
    """``value`` as a ``float``: a finite real number (not a bool) within the interval given by ``low``/``high``
    (closed unless ``low_open``/``high_open``); ``None`` passes through when ``allow_none``."""
    if allow_none and value is None:
        return None
    allowed = "a finite number" if low is None and high is None else "a number"
    allowed += _interval(low, high, low_open, high_open)
    if allow_none:
        allowed += " or None"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(name, allowed, value, note)
    v = float(value)
    if low is not None and (v <= low if low_open else v < low):
        _fail(name, allowed, value, note)
    if high is not None and (v >= high if high_open else v > high):
        _fail(name, allowed, value, note)
    return v


def check_choice(name: str, value, choices: Sequence, note: str = ""):
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        _fail(name, f"one of {tuple(choices)}", value, note)
    return value


def check_bool(name: str, value, note: str = "") -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        _fail(name, "True or False", value, note)
    return value
