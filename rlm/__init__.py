"""Recursive Language Models on a hardened sandbox.

Public names are loaded lazily: ``import rlm`` (and ``rlm --help``) does not
import litellm or start anything.
"""

from __future__ import annotations

__all__: list[str] = []
