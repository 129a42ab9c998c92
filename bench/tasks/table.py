"""The Markdown results table (the reference's columns) and the accuracy lines below it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.tasks.scoring import pairs_f1

__all__ = ["COLUMNS", "accuracy_lines", "format_report", "markdown_table"]

#: Column titles after the first one, which names the unit of the task's size.
COLUMNS: tuple[str, ...] = (
    "Context",
    "Expected",
    "RLM Answer",
    "Direct Answer",
    "RLM Cost",
    "Direct Cost",
    "RLM Time",
    "Direct Time",
    "Winner",
)
_SIZE_TITLE = {"salary": "Records", "niah": "Characters", "aggregate": "Lines", "pairs": "Lines"}
_WINNER = {"rlm": "RLM", "direct": "Direct", "none": "none", "-": "-"}
_MAX_ANSWER = 40


def _cell(text: str) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= _MAX_ANSWER else flat[: _MAX_ANSWER - 3] + "..."


def _answer(task: str, answer: str | None, expected: Any) -> str:
    if answer is None:
        return "(no answer)"
    if task == "pairs":
        return f"F1 {pairs_f1(answer, expected):.2f}"
    return _cell(answer)


def _expected(task: str, expected: Any) -> str:
    if task == "pairs":
        return f"{len(expected)} pairs"
    return _cell(str(expected))


def _cost(value: float | None, ran: bool) -> str:
    if not ran:
        return "-"
    return "n/a" if value is None else f"${value:.4f}"


def _time(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _row(rec: dict[str, Any]) -> list[str]:
    task = rec["task"]
    status = rec["direct_status"]
    if status == "ok":
        direct = _answer(task, rec["direct_answer"], rec["expected"])
    else:
        direct = "-" if status == "skipped" else status
    return [
        f"{rec['size']:,}",
        f"{rec['context_chars']:,} chars",
        _expected(task, rec["expected"]),
        _answer(task, rec["rlm_answer"], rec["expected"]),
        direct,
        _cost(rec["rlm_cost_usd"], True),
        _cost(rec["direct_cost_usd"], status == "ok"),
        _time(rec["rlm_time_s"]),
        _time(rec["direct_time_s"]) if status not in ("skipped", "does not fit") else "-",
        _WINNER.get(rec["winner"], str(rec["winner"])),
    ]


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per record, in the reference table's columns."""
    task = records[0]["task"] if records else "salary"
    header = [_SIZE_TITLE.get(task, "Size"), *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_row(rec)) + " |" for rec in records]
    return "\n".join(lines)


def _method_line(name: str, records: Sequence[dict[str, Any]], prefix: str) -> str:
    task = records[0]["task"]
    right = sum(1 for r in records if r[f"{prefix}_correct"])
    line = f"{name} accuracy: {right}/{len(records)} ({100 * right / len(records):.0f}%)"
    if task == "pairs":
        scores = [
            pairs_f1(r[f"{prefix}_answer"], r["expected"]) if r[f"{prefix}_answer"] is not None else 0.0
            for r in records
        ]
        line += f", mean F1 {sum(scores) / len(scores):.2f}"
    sizes = sorted({r["size"] for r in records})
    if len(sizes) > 1 or len(records) > 1:
        parts = []
        for size in sizes:
            group = [r for r in records if r["size"] == size]
            parts.append(f"{size:,}: {sum(1 for r in group if r[f'{prefix}_correct'])}/{len(group)}")
        line += " (by size " + ", ".join(parts) + ")"
    return line


def accuracy_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """One accuracy line per method, over every repeat (and broken down by size)."""
    if not records:
        return ["RLM accuracy: no runs", "Direct accuracy: no runs"]
    lines = [_method_line("RLM", records, "rlm")]
    direct = [r for r in records if r["direct_status"] != "skipped"]
    if not direct:
        lines.append("Direct accuracy: - (no --direct-model given)")
    else:
        line = _method_line("Direct", direct, "direct")
        unfit = sum(1 for r in direct if r["direct_status"] == "does not fit")
        errors = sum(1 for r in direct if r["direct_status"] == "error")
        notes = [f"{unfit} did not fit"] if unfit else []
        notes += [f"{errors} failed with an error"] if errors else []
        lines.append(line + ("; " + ", ".join(notes) if notes else ""))
    return lines


def format_report(records: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """The title (if any), the Markdown table, a blank line and the accuracy lines."""
    parts = [title, ""] if title else []
    parts += [markdown_table(records), "", *accuracy_lines(records)]
    return "\n".join(parts)
