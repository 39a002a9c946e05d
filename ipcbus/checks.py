"""Argument checks shared by the constructors and methods of the public API.

A wrong argument is refused where it is given, with its name and what it
takes, rather than accepted and failing later inside a running node (a
background task, a read callback), where it would close a link or the
node itself.  ``TypeError`` for a value of the wrong type, ``ValueError``
for one out of range, as Python's own functions do.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["check_count", "check_env", "check_path", "check_seconds", "split_target"]


def check_count(
    name: str, value: Any, minimum: int = 1, unit: str = "", maximum: int | None = None
) -> int:
    """``value`` if it is an int from ``minimum`` to ``maximum`` (``None``: no
    limit); else ``TypeError``/``ValueError`` naming ``name``.  ``unit``
    (``"bytes"``) is said in the message."""
    unit = f" ({unit})" if unit else ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e6: a whole number written as a float
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{unit}, not {value!r}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}{unit}, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}{unit}, not {value!r}")
    return value


def check_seconds(name: str, value: Any, *, infinite: bool = False) -> float:
    """``value`` as a float if it is a number of seconds, 0 or more, and finite
    unless ``infinite`` (no limit) is allowed; else ``TypeError``/``ValueError``
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if math.isnan(value) or value < 0 or (math.isinf(value) and not infinite):
        what = "0 or more" if infinite else "finite, 0 or more"
        raise ValueError(f"{name} must be a number of seconds, {what}, not {value!r}")
    return float(value)


def check_env(env: Any) -> dict[str, str] | None:
    """``env`` as a dict if it is ``None`` or a mapping of str to str (a child's
    environment: a dict, ``os.environ``); else ``TypeError`` naming the first
    wrong entry."""
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str (or None), not {type(env).__name__}")
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"env must map str to str; its entry {k!r}: {v!r} is not (convert values with str())"
            )
    return dict(env)


MAX_NAME = 256
"""Longest process, pool or client name, in characters: names travel in every
hello frame and in a client's knock (at most ``PIPE_BUF`` bytes in all)."""


def check_name(name: str, value: Any, maximum: int = MAX_NAME) -> str:
    """``value`` if it is a str of at most ``maximum`` characters (a name shown
    by ``ipcbus ls`` and in logs); else ``TypeError``/``ValueError`` naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {value!r}")
    if len(value) > maximum:
        raise ValueError(f"{name} must be at most {maximum} characters, not {len(value)}: {value[:40]!r}...")
    return value


def check_path(name: str, value: Any) -> str | None:
    """``value`` as a str if it is ``None``, a str or a path object; else ``TypeError``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if isinstance(path, str):
            return path
    raise TypeError(f"{name} must be a path (a str or Path), not {value!r}")


def split_target(target: Any) -> tuple[str, str]:
    """``(module, function)`` from ``"module:function"``; ``TypeError`` or
    ``ValueError`` naming what is wrong with it."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a str 'module:function', not {target!r}")
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"target must be 'module:function' (e.g. 'myapp.workers:setup'), not {target!r}")
    return module_name, func_name
