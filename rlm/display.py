"""The ``verbose=True`` live view of a run, written with rich to stderr."""

from __future__ import annotations

from typing import Any

__all__ = ["LiveView"]


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

        self.console.print(
            Panel(
                Syntax(self._short(code), "python", theme="ansi_dark"),
                title=f"block {index}",
                border_style="magenta",
            )
        )
        title = f"output ({sub_calls} sub-call{'s' if sub_calls != 1 else ''})"
        self.console.print(Panel(self._short(output), title=title, border_style="green" if ok else "red"))

    def usage(
        self, input_tokens: int, output_tokens: int, cost: float | None, sub_calls: int, elapsed: float
    ) -> None:
        cost_text = "unknown" if cost is None else f"${cost:.4f}"
        self.console.print(
            f"{self.tag} tokens in/out {input_tokens}/{output_tokens}, cost {cost_text}, "
            f"sub-calls {sub_calls}, {elapsed:.1f} s"
        )

    def note(self, message: str) -> None:
        self.console.print(f"{self.tag} [yellow]{message}[/yellow]")

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
