"""Custom tools: host functions of the caller's, offered to the model in the REPL.

``RLM(tools={"name": callable, ...})`` or ``RLM(tools=[callable, ...])`` (named
by ``__name__``). A tool runs in this process, never in the child: the
sandboxed code calls it like a local function and its arguments and result
cross as plain data. The system prompt lists each tool's signature and the
first paragraph of its docstring (:func:`describe_tools`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rlm.checks import shown
from rlm.errors import ConfigurationError

__all__ = ["RESERVED_NAMES", "Tool", "describe_tools", "tool_table"]

#: Names the REPL already gives a meaning to; a tool may not shadow them.
RESERVED_NAMES = frozenset(
    {
        "context",
        "history",
        "llm_query",
        "llm_query_batched",
        "rlm_query",
        "rlm_query_batched",
        "rlm_submit_final",
        "rlm_describe_vars",
        "FINAL",
        "FINAL_VAR",
    }
)
_CONTEXT_N = re.compile(r"context_\d+")


@dataclass(frozen=True)
class Tool:
    """One tool: its REPL name, the callable, and what the prompt says about it."""

    name: str
    fn: Callable[..., Any]
    signature: str
    summary: str


def _summary(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    first = doc.strip().split("\n\n", 1)[0]
    return " ".join(first.split())


def _signature(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn, eval_str=True))  # "x: int", not "x: 'int'"
    except Exception:
        pass
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def tool_table(
    tools: Mapping[str, Callable[..., Any]] | Iterable[Callable[..., Any]] | None,
) -> dict[str, Tool]:
    """Check and name the tools given to ``RLM(tools=...)``; raises :class:`ConfigurationError`."""
    if tools is None:
        return {}
    if isinstance(tools, Mapping):
        pairs = list(tools.items())
    elif isinstance(tools, (str, bytes)) or not isinstance(tools, Iterable):
        raise ConfigurationError("tools must be a dict {name: callable} or a list of callables")
    else:
        pairs = [(getattr(fn, "__name__", None), fn) for fn in tools]
    table: dict[str, Tool] = {}
    for name, fn in pairs:
        if not callable(fn):
            which = repr(name) if name is not None else f"{type(fn).__name__} {shown(fn)}"
            raise ConfigurationError(f"tool {which} is not callable")
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ConfigurationError(
                f"tool name {name!r} must be an identifier not starting with '_' "
                "(pass a dict to name a lambda or a partial)"
            )
        if name in RESERVED_NAMES or _CONTEXT_N.fullmatch(name):
            raise ConfigurationError(f"tool name {name!r} would shadow the REPL's own {name!r}")
        if name in table:
            raise ConfigurationError(f"two tools are named {name!r}")
        table[name] = Tool(name, fn, _signature(fn), _summary(fn))
    return table


def describe_tools(tools: Mapping[str, Tool]) -> str:
    """The system prompt's section about the tools ("" when there are none)."""
    if not tools:
        return ""
    lines = [
        "## Tools",
        "",
        "These functions are also available in the REPL. They run outside the sandbox; call them like "
        "local functions with plain data (str, int, float, bool, None, list, dict). A tool that fails "
        "raises an error in your code.",
        "",
    ]
    for tool in tools.values():
        lines.append(f"- `{tool.name}{tool.signature}`" + (f": {tool.summary}" if tool.summary else ""))
    return "\n".join(lines)
