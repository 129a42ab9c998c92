"""The ``verbose=True`` live view of a run, written with rich to stderr.

:class:`VerboseView` is an ``on_event`` consumer (see :mod:`rlm.events`): it
turns the events of a run tree into :class:`LiveView` panels, one view per run.

Everything shown that came from the model, the context or the sandbox is
untrusted: it is never parsed as rich markup (``print("[/]")`` must not crash
the view, ``[link=...]`` must not become a hyperlink) and its control
characters are shown escaped (``\\x1b``), so no escape sequence reaches the
operator's terminal (window titles, OSC 8 hyperlinks, cursor moves, colours).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

__all__ = ["LiveView", "VerboseView", "visible"]

#: Written as escapes wherever logged text is shown (the terminal here, ``rlm run --json``, the
#: ``rlm view`` page's ``UNSAFE``): C0 controls but newline and tab, DEL, C1 controls, the line
#: and paragraph separators, the bidirectional marks, embeddings, overrides and isolates that
#: reorder what is shown ("trojan source"), and the characters drawn as nothing (the soft
#: hyphen, zero-width spaces and joiners, word joiners and invisible operators, variation
#: selectors, fillers, the BOM, interlinear annotation marks, tag characters), which hide text
#: (an instruction spelt in tag characters). The audit log escapes the part that ends or reorders lines.
UNSAFE_CODES: tuple[int, ...] = (
    *(c for c in range(0x20) if c not in (0x09, 0x0A)),
    *range(0x7F, 0xA0),
    0x00AD,
    0x034F,
    0x061C,
    0x115F,
    0x1160,
    0x17B4,
    0x17B5,
    *range(0x180B, 0x1810),
    *range(0x200B, 0x2010),
    *range(0x2028, 0x202F),
    *range(0x2060, 0x2070),
    0x3164,
    *range(0xFE00, 0xFE10),
    0xFEFF,
    0xFFA0,
    *range(0xFFF9, 0xFFFC),
    *range(0x1D173, 0x1D17B),
    *range(0xE0000, 0xE1000),
)


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_ESCAPES = {code: _escape(code) for code in UNSAFE_CODES}


def visible(text: str) -> str:
    """*text* with every control character written as an escape (``\\x1b``, ``\\u202e``)."""
    return text.translate(_ESCAPES)


class LiveView:
    """Prints each turn of a run: the reply, each block's code and output, usage so far."""

    def __init__(self, depth: int = 0, run_id: str = "", console: Console | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False, soft_wrap=False)
        self.depth = depth
        self.tag = f"{'  ' * depth}{'child ' if depth else ''}{visible(run_id)}"

    @staticmethod
    def _short(text: str, limit: int = 1500) -> str:
        if len(text) <= limit:
            return text
        return (
            text[: limit // 2]
            + f"\n... [{len(text) - limit} characters not shown] ...\n"
            + text[-limit // 2 :]
        )

    @classmethod
    def _text(cls, text: str, style: str = "") -> Text:
        """Untrusted text as a rich Text: cut, controls escaped, never markup."""
        from rich.text import Text

        return Text(visible(cls._short(text)), style=style)

    def _line(self, message: str, style: str = "") -> None:
        from rich.text import Text

        self.console.print(Text.assemble((self.tag, "dim"), " ", (visible(message), style)))

    def start(self, model: str, query: str | None, description: str) -> None:
        from rich.panel import Panel
        from rich.text import Text

        body = self._text(f"query: {query or '(in the context)'}\n{description}")
        title = Text(visible(f"RLM run, model {model}, depth {self.depth}"))
        self.console.print(Panel(body, title=title, border_style="cyan"))

    def turn(self, number: int, limit: int, response: str) -> None:
        from rich.panel import Panel

        self.console.print(
            Panel(self._text(response), title=f"turn {number}/{limit}: model reply", border_style="blue")
        )

    def block(self, index: int, code: str, output: str, sub_calls: int, ok: bool) -> None:
        from rich.panel import Panel
        from rich.syntax import Syntax

        self.console.print(
            Panel(
                Syntax(visible(self._short(code)), "python", theme="ansi_dark"),
                title=f"block {index}",
                border_style="magenta",
            )
        )
        title = f"output ({sub_calls} sub-call{'s' if sub_calls != 1 else ''})"
        self.console.print(Panel(self._text(output), title=title, border_style="green" if ok else "red"))

    def usage(
        self, input_tokens: int, output_tokens: int, cost: float | None, sub_calls: int, elapsed: float
    ) -> None:
        cost_text = "unknown" if cost is None else f"${cost:.4f}"
        self._line(
            f"tokens in/out {input_tokens}/{output_tokens}, cost {cost_text}, "
            f"sub-calls {sub_calls}, {elapsed:.1f} s"
        )

    def note(self, message: str) -> None:
        # cut like every other text shown: a tool's error may quote its arguments, which the code chose
        self._line(self._short(message), "yellow")

    def finish(self, answer: str | None, stop_reason: str, **extra: Any) -> None:
        from rich.panel import Panel
        from rich.text import Text

        self.console.print(
            Panel(
                self._text(answer if answer is not None else "(no answer)"),
                title=Text(visible(f"answer ({stop_reason})")),
                border_style="cyan",
            )
        )


class VerboseView:
    """Renders the events of a run tree (``RLM(verbose=True)`` registers its :meth:`handle`)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console
        self._runs: dict[str, tuple[LiveView, int]] = {}

    def handle(self, event: dict[str, Any]) -> None:
        kind, run_id = event["type"], event["run_id"]
        if kind == "run_start":
            view = LiveView(event["depth"], run_id, self.console)
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
