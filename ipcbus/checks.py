"""Argument checks shared by the constructors and methods of the public API.

A wrong argument is refused where it is given, with its name and what it
takes, rather than accepted and failing later inside a running node (a
background task, a read callback), where it would close a link or the
node itself.  ``TypeError`` for a value of the wrong type, ``ValueError``
for one out of range, as Python's own functions do.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_count", "check_env", "check_seconds"]


def check_count(
    name: str, value: Any, minimum: int = 1, unit: str = "", maximum: int | None = None
) -> int:
    """``value`` if it is an int from ``minimum`` to ``maximum`` (``None``: no
    limit); else ``TypeError``/``ValueError`` naming ``name``.  ``unit``
    (``"bytes"``) is said in the message."""
    unit = f" ({unit})" if unit else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{unit}, not {value!r}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}{unit}, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}{unit}, not {value!r}")
    return value


def check_seconds(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number of seconds, 0 or more;
    else ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds, 0 or more, not {value!r}")
    return float(value)


def check_env(env: Any) -> dict[str, str] | None:
    """``env`` if it is ``None`` or a dict of str to str (a child's environment);
    else ``TypeError`` naming the first wrong entry."""
    if env is None:
        return None
    if not isinstance(env, dict):
        raise TypeError(f"env must be a dict of str to str (or None), not {type(env).__name__}")
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"env must map str to str; its entry {k!r}: {v!r} is not (convert values with str())"
            )
    return env
