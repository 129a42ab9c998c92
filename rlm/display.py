"""The ``verbose=True`` live view of a run, written with rich to stderr.

:class:`VerboseView` is an ``on_event`` consumer (see :mod:`rlm.events`): it
turns the events of a run tree into :class:`LiveView` panels, one view per run.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LiveView", "VerboseView"]


class LiveView:
    """Prints each turn of a run: the reply, each block's code and output, usage so far."""

    def __init__(self, depth: int = 0, run_id: str = "") -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=False)
        self.depth = depth
        self.tag = f"[dim]{'  ' * depth}{'child ' if depth else ''}{run_id}[/dim]"

    @staticmethod
    def _short(text: str, limit: int = 1500) -> str:
        if len(text) <= limit:
            return text
        return (
            text[: limit // 2]
            + f"\n... [{len(text) - limit} characters not shown] ...\n"
            + text[-limit // 2 :]
        )

    def start(self, model: str, query: str | None, description: str) -> None:
        from rich.panel import Panel
        from rich.text import Text

        body = Text(f"query: {query or '(in the context)'}\n{description}")
        self.console.print(
            Panel(body, title=f"RLM run, model {model}, depth {self.depth}", border_style="cyan")
        )

    def turn(self, number: int, limit: int, response: str) -> None:
        from rich.panel import Panel
        from rich.text import Text

        self.console.print(
            Panel(
                Text(self._short(response)), title=f"turn {number}/{limit}: model reply", border_style="blue"
            )
        )

    def block(self, index: int, code: str, output: str, sub_calls: int, ok: bool) -> None:
        from rich.panel import Panel
        from rich.syntax import Syntax
        from rich.text import Text

        self.console.print(
            Panel(
                Syntax(self._short(code), "python", theme="ansi_dark"),
                title=f"block {index}",
                border_style="magenta",
            )
        )
        title = f"output ({sub_calls} sub-call{'s' if sub_calls != 1 else ''})"
        self.console.print(
            Panel(Text(self._short(output)), title=title, border_style="green" if ok else "red")
        )

    def usage(
        self, input_tokens: int, output_tokens: int, cost: float | None, sub_calls: int, elapsed: float
    ) -> None:
        cost_text = "unknown" if cost is None else f"${cost:.4f}"
        self.console.print(
            f"{self.tag} tokens in/out {input_tokens}/{output_tokens}, cost {cost_text}, "
            f"sub-calls {sub_calls}, {elapsed:.1f} s"
        )

    def note(self, message: str) -> None:
        from rich.text import Text

        line = Text.from_markup(self.tag)  # the tag is ours; the message may hold model text: never markup
        line.append(" ")
        line.append(message, style="yellow")
        self.console.print(line)

    def finish(self, answer: str | None, stop_reason: str, **extra: Any) -> None:
        from rich.panel import Panel
        from rich.text import Text

        self.console.print(
            Panel(
                Text(self._short(answer if answer is not None else "(no answer)")),
                title=f"answer ({stop_reason})",
                border_style="cyan",
            )
        )


class VerboseView:
    """Renders the events of a run tree (``RLM(verbose=True)`` registers its :meth:`handle`)."""

    def __init__(self) -> None:
        self._runs: dict[str, tuple[LiveView, int]] = {}

    def handle(self, event: dict[str, Any]) -> None:
        kind, run_id = event["type"], event["run_id"]
        if kind == "run_start":
            view = LiveView(event["depth"], run_id)
            self._runs[run_id] = (view, event["max_iterations"])
            view.start(event["model"], event["query"], event["context"])
            return
        if run_id not in self._runs:
            return
        view, limit = self._runs[run_id]
        if kind == "model_reply":
            view.turn(event["iteration"], limit, event["response"])
        elif kind == "code_result":
            view.block(event["index"], event["code"], event["output"], event["sub_calls"], event["ok"])
        elif kind == "iteration_end":
            view.usage(
                event["input_tokens"],
                event["output_tokens"],
                event["cost_usd"],
                event["sub_calls"],
                event["elapsed_s"],
            )
        elif kind in _NOTES:
            view.note(_NOTES[kind](event))
        elif kind == "run_end":
            del self._runs[run_id]
            view.finish(event["answer"], event["stop_reason"])


_NOTES: dict[str, Any] = {
    "closing_call": lambda e: "no FINAL: asking for the best answer",
    "retry": lambda e: (
        f"retry {e['attempt']} of a call to {e['model']} in {e['delay_s']:.1f} s ({e['error']})"
    ),
    "compaction": lambda e: (
        f"conversation compacted: {e['turns_summarized']} turn(s) summarized, "
        f"{e['tokens_before']} -> {e['tokens_after']} tokens"
    ),
    "final_rejected": lambda e: f"answer rejected: {e['error']}",
    "tool_call": lambda e: f"tool {e['name']}: " + ("ok" if e["error"] is None else f"error {e['error']}"),
}
