"""``rlm view``: one self-contained HTML page for a run, a log directory or an audit log.

:func:`build_page` reads PATH (a ``<run id>.jsonl`` trajectory, a directory of
them, or an audit log) with :mod:`rlm.view.load`, adds per-run totals and
start times, and returns the page: the shipped ``page.css`` and ``page.js``
inline, the data as a JSON ``<script type="application/json">`` block, no
network access at all (a Content-Security-Policy allows only the page's own
script, by hash, and inline styles), so it opens from ``file://`` offline.

The data is JSON with ``<``, ``>`` and ``&`` escaped, so no logged text can
close the script element, and the script puts every logged string into the
page as text (``textContent``), never as markup.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from rlm.files import write_regular
from rlm.trajectory import json_safe
from rlm.view.load import TOO_DEEP, load_path

__all__ = ["build_page", "default_output", "write_page"]

_HERE = Path(__file__).resolve().parent


def _epoch(stamp: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def _add(
    totals: dict[str, dict[str, Any]], model: Any, n_in: Any, n_out: Any, cost: Any, calls: int = 1
) -> None:
    u = totals.setdefault(str(model), {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
    u["calls"] += calls
    u["input_tokens"] += n_in if isinstance(n_in, int) else 0
    u["output_tokens"] += n_out if isinstance(n_out, int) else 0
    if u["cost_usd"] is not None:
        u["cost_usd"] = u["cost_usd"] + cost if isinstance(cost, (int, float)) else None


def _number(value: Any) -> float:
    """*value* when it is a number (a count from a file, maybe damaged), else 0."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _prepare(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Start times (``_t``, epoch seconds) and the run's totals; returns its per-model usage, children included."""
    totals: dict[str, dict[str, Any]] = {}
    # *not_listed: the calls past a block's cap, counted there, not listed
    blocks = sub_calls = not_listed = tool_calls = tools_not_listed = 0
    for it in run["iterations"]:
        end = _epoch(it.get("timestamp"))
        took = it.get("iteration_time")
        if end is not None:
            it["_t"] = end - (took if isinstance(took, (int, float)) else 0.0)
        usage = it.get("usage")
        if isinstance(usage, dict):
            _add(
                totals,
                usage.get("model"),
                usage.get("prompt_tokens"),
                usage.get("completion_tokens"),
                usage.get("cost_usd"),
            )
        for block in it.get("code_blocks") or []:
            if not isinstance(block, dict):
                continue
            blocks += 1
            omitted = (block.get("result") or {}).get("rlm_calls_omitted") or {}
            not_listed += omitted.get("sub_calls", 0)
            tools_not_listed += omitted.get("tool_calls", 0)
            for call in (block.get("result") or {}).get("rlm_calls") or []:
                if not isinstance(call, dict):
                    continue
                if call.get("type") == "tool":  # counted apart, as RLMResult.tool_calls is
                    tool_calls += 1
                else:
                    sub_calls += 1
                start = _epoch(call.get("timestamp"))
                if start is not None:
                    call["_t"] = start
                if call.get("type") == "rlm":
                    continue  # counted from the child's own file below
                summary = ((call.get("usage_summary") or {}).get("model_usage_summaries") or {}).values()
                cost = next((s.get("cost_usd") for s in summary if isinstance(s, dict)), None)
                _add(totals, call.get("root_model"), call.get("prompt_tokens"), call.get("completion_tokens"),
                     cost if not call.get("error") else 0.0)  # fmt: skip
    for child in run["children"].values():
        for model, u in _prepare(child).items():
            _add(totals, model, u["input_tokens"], u["output_tokens"], u["cost_usd"], calls=u["calls"])
    result = run.get("result") or {}
    depth = run["metadata"].get("depth")
    if isinstance(result.get("usage"), dict) and result["usage"] and not depth:
        # The root's result covers the whole tree and the closing call: it is the reference.
        run["totals"] = {str(k): v for k, v in result["usage"].items() if isinstance(v, dict)}
    else:
        run["totals"] = totals
    t = run["totals"].values()
    costs = [u.get("cost_usd") for u in t]
    times = [it.get("iteration_time") for it in run["iterations"]]
    run["summary"] = {
        "iterations": len(run["iterations"]),
        "code_blocks": blocks,
        "sub_calls": sub_calls + not_listed,
        "sub_calls_not_listed": not_listed,
        "tool_calls": tool_calls + tools_not_listed,
        "tool_calls_not_listed": tools_not_listed,
        "input_tokens": sum(_number(u.get("input_tokens")) for u in t),
        "output_tokens": sum(_number(u.get("output_tokens")) for u in t),
        "cost_usd": None if any(not isinstance(c, (int, float)) for c in costs) else sum(costs),
        "time_s": result.get("execution_time")
        if isinstance(result.get("execution_time"), (int, float))
        else sum(x for x in times if isinstance(x, (int, float))),
    }
    return totals


def _embed(data: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' survives unescaped, and
    no NaN or Infinity (which the browser's JSON.parse refuses, losing the whole page)."""
    text = json.dumps(json_safe(data), ensure_ascii=True, default=str, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_page(path: str | Path) -> str:
    """The HTML page for PATH (trajectory, log directory or audit log)."""
    data = load_path(Path(path))
    data["too_deep"] = TOO_DEEP  # what stands in for a value nested too deeply (the page names it)
    for run in data["runs"]:
        _prepare(run)
    css = (_HERE / "page.css").read_text(encoding="utf-8")
    script = (_HERE / "page.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    csp = f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>rlm view</title>\n<style>{css}</style></head>\n<body>\n"
        '<header><h1 id="title">rlm view</h1>'
        '<input id="search" type="search" placeholder="search code, output, prompts (Enter)" autocomplete="off">'
        '</header>\n<main id="app"></main>\n'
        f'<script type="application/json" id="rlm-data">{_embed(data)}</script>\n'
        f"<script>{script}</script>\n</body></html>\n"
    )


def default_output(path: str | Path) -> Path:
    """Where ``rlm view PATH`` writes without ``-o``: beside PATH (inside it for a directory)."""
    p = Path(path)
    if p.is_dir():
        return p / "index.html"
    return p.with_name(p.name.removesuffix(".jsonl").removesuffix(".log") + ".html")


def write_page(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the page for PATH to *out* (default: :func:`default_output`); return where it went.
    What is at *out* must be a regular file, or nothing: a FIFO or a device there is refused
    (OSError ``"not a regular file"``, see :func:`rlm.files.write_regular`), not waited on."""
    target = Path(out) if out is not None else default_output(path)
    write_regular(target, build_page(path).encode("utf-8"))
    return target
