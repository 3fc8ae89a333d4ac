"""Validation of single option values, shared by every typed configuration.

Each layer raises its own error class (``ConfigError``, ``FieldError``, ``RenderError``);
these helpers take it as ``error`` so the checks and their messages are written once.
"""

from __future__ import annotations

import math
from typing import Any, Optional


def check_number(name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None, *,
                 integer: bool = False, lo_open: bool = False, error: type[Exception] = ValueError) -> Any:
    """``value`` as an int (``integer``) or float if it is a finite number within the bounds,
    else ``error`` naming ``name``. Booleans are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise error(f"{name} must be finite, got {value!r}")
    if integer and not float(value).is_integer():
        raise error(f"{name} must be an integer, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise error(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise error(f"{name} must be <= {hi}, got {value!r}")
    return int(value) if integer else float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, error: type[Exception] = ValueError) -> str:
    """``value`` if it is one of ``choices``, else ``error`` listing them."""
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value
