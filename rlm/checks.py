"""Checks of the arguments that ``RLM``, :func:`rlm.batch`, ``rlm mcp`` and the command line share.

Each raises :class:`~rlm.errors.ConfigurationError` (a ``ValueError``) with a
message naming the argument as the caller spelled it: ``max_cost_usd`` for
the API, ``--budget-usd`` for the command line. A ``bool`` is not a number
here, and a limit is never NaN or infinite (``None`` is "no limit").
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rlm.errors import ConfigurationError

__all__ = [
    "check_api_base",
    "check_int",
    "check_log_dir",
    "check_number",
    "check_text",
    "module_found",
    "shown",
]


def shown(value: Any) -> str:
    """*value*'s repr for a message, cut at 60 characters (``"(no repr)"`` when its repr fails)."""
    try:
        text = repr(value)
    except Exception:
        return "(no repr)"
    return text if len(text) <= 60 else text[:57] + "..."


def module_found(name: str) -> bool:
    """Whether this Python has the top-level module of *name* (``"ray"``, ``"html"`` for
    ``"html.parser"``), found without importing anything (a dotted name's parent would be
    imported, running its code); an install that breaks the lookup counts as none."""
    import importlib.util
    import sys

    top = name.split(".", 1)[0]
    if top in sys.builtin_module_names:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def check_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    """*value* must be an int (not a bool) of at least *minimum*; ``None`` too when *optional*."""
    if value is None and optional:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        kind = "an int or None" if optional else "an int"
        raise ConfigurationError(f"{name} must be {kind}, not {type(value).__name__} ({shown(value)})")
    if value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}, got {value!r}")


def check_number(name: str, value: Any, *, minimum: float = 0.0, optional: bool = True) -> None:
    """*value* must be a finite real number (not a bool) of at least *minimum*; ``None`` too when
    *optional*. NaN and infinity are refused: neither is a limit."""
    if value is None and optional:
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        kind = "a number or None" if optional else "a number"
        raise ConfigurationError(f"{name} must be {kind}, not {type(value).__name__} ({shown(value)})")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigurationError(f"{name} must be a finite number, got {number!r}")
    if number < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum:g}, got {value!r}")


def check_text(name: str, value: str) -> None:
    """*value* must be text UTF-8 can carry: a lone surrogate (``"\\ud800"`` in JSON, bytes that are
    not UTF-8 decoded with ``surrogateescape``, as in ``sys.argv``) can never be sent to a model,
    and every attempt to would fail the same way."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"{name} is not valid Unicode text (a lone surrogate at character {exc.start}): "
            "it cannot be sent to a model"
        ) from None


def check_api_base(value: Any, name: str = "api_base") -> None:
    """*value* must be ``None`` or an ``http://`` or ``https://`` URL with a host (``""`` counts as
    ``None``, as it always has: no ``api_base``)."""
    if value is None or value == "":
        return
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a URL string, not {type(value).__name__}")
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigurationError(f"{name} {value!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ConfigurationError(
            f"{name} {value!r} is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:8000/v1)"
        )


def check_log_dir(value: Any, name: str = "log_dir") -> Path:
    """Create the log directory *value* if needed and check that files can be written in it.

    Returns it as a :class:`~pathlib.Path`; raises ConfigurationError naming it otherwise.
    """
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigurationError(f"{name} must be a path, not {type(value).__name__}")
    if not os.fspath(value):  # Path("") is the current directory: an unset variable, not a choice
        raise ConfigurationError(f"{name} is an empty path (write '.' for the current directory)")
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigurationError(f"{name} {path}: not a directory") from None
    except OSError as exc:
        raise ConfigurationError(f"{name} {path}: cannot create it: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigurationError(f"{name} {path}: not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{name} {path}: not writable")
    return path
