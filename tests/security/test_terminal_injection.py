"""Terminal injection: the verbose view never interprets model or sandbox text.

Rich markup in a model reply or in the sandbox's output is shown as written
(``print("[/]")`` once crashed ``rlm.run(verbose=True)`` with a MarkupError;
``[link=...]`` became a clickable OSC 8 hyperlink), and control characters are
shown escaped, so no escape sequence (window title, hyperlink, cursor move)
reaches the operator's terminal.
"""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from rlm import ScriptedBackend, run
from rlm.display import LiveView
from tests.conftest import policy_with

HOSTILE = [
    "[/]",
    "[link=file:///etc/passwd]click me[/link]",
    "[bold red]not bold[/bold red]",
    "\x1b]0;pwned window title\x07",
    "\x1b]8;;file:///etc/passwd\x1b\\osc8 link\x1b]8;;\x1b\\",
    "\x1b[2J\x1b[H cleared",
    "\x9b31m C1 CSI",
    "abc\u202edcba",
    "back\rspace\b",
]


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, color_system="truecolor", width=200), out


def assert_inert(shown: str) -> None:
    # rich's own colours are CSI "m" sequences; nothing else may reach the terminal
    for seq in ("\x1b]", "\x9b", "\x07", "\x1b[2J", "\x1b[H", "\u202e", "\r", "\b"):
        assert seq not in shown, f"{seq!r} reached the terminal"
    shown = re.sub(r"\x1b\[[0-9;]*m", "", shown)  # rich's colours (syntax highlighting splits tokens)
    for markup in ("[/]", "[link=file:///etc/passwd]click me[/link]", "[bold red]not bold[/bold red]"):
        assert markup in shown, f"{markup!r} was interpreted, not shown"
    assert "\\x1b]0;pwned window title\\x07" in shown
    assert "abc\\u202edcba" in shown


@pytest.mark.parametrize("where", ["reply", "code", "output", "answer", "start", "note"])
def test_live_view_shows_hostile_text_inert(where: str) -> None:
    console, out = terminal()
    view = LiveView(0, "run")
    view.console = console
    text = "\n".join(HOSTILE)
    if where == "reply":
        view.turn(1, 5, text)
    elif where == "code":
        view.block(1, text, "", 0, True)
    elif where == "output":
        view.block(1, "x = 1", text, 0, False)
    elif where == "answer":
        view.finish(text, "final")
    elif where == "start":
        view.start("model", text, text)
    else:
        view.note(text)
    assert_inert(out.getvalue())


def test_visible_keeps_newlines_tabs_and_text() -> None:
    from rlm.display import visible

    assert visible("a\tb\nc é 日本") == "a\tb\nc é 日本"
    assert visible("\x00\x1b\x7f\x85") == "\\x00\\x1b\\x7f\\x85"


def test_verbose_run_with_hostile_output_does_not_crash(capsys: pytest.CaptureFixture[str]) -> None:
    code = "\n".join(f"print({line!r})" for line in HOSTILE) + "\nFINAL('done [/]')"
    backend = ScriptedBackend([f"Reply with [/] and \x1b]0;title\x07\n```repl\n{code}\n```\n"])
    policy = policy_with({"audit.enabled": False})
    result = run("q?", "ctx", model="root", sub_model="sub", backend=backend, verbose=True, policy=policy)
    assert result.answer == "done [/]"
    _, err = capsys.readouterr()
    assert_inert(err)


EXEC_HOSTILE = (
    "print('OUT' + '\\x1b]0;pwned title\\x07' + '\\x1b[2K\\r')\n"
    "raise type('Boom\\x1b[2K\\rrlm exec: ok (no error)', (Exception,), {})('msg\\x1b]0;t\\x07')\n"
)


def test_rlm_exec_on_a_terminal_shows_the_code_output_inert(tmp_path) -> None:
    """`rlm exec` writing to a real terminal (a pty): what the code printed, its traceback and
    the error type in the status line come out with control characters escaped (the error type
    once rewrote the status line to read "rlm exec: ok"); piped, the output stays as printed."""
    import os
    import pty
    import subprocess
    import sys

    from tests.conftest import run_cli

    script = tmp_path / "hostile.py"
    script.write_text(EXEC_HOSTILE)
    audit = str(tmp_path / "audit.jsonl")
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlm", "exec", "--audit-log", audit, str(script)],
            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
        )  # fmt: skip
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(120) == 1
    finally:
        os.close(leader)
    shown = b"".join(chunks).decode()
    for seq in ("\x1b]", "\x1b[2K", "\x07"):
        assert seq not in shown, f"{seq!r} reached the terminal"
    assert "OUT\\x1b]0;pwned title\\x07" in shown and "msg\\x1b]0;t\\x07" in shown
    assert "rlm exec: error (Boom\\x1b[2K\\x0drlm exec: ok (no error))" in shown
    piped = run_cli("exec", "--audit-log", audit, str(script))
    assert piped.returncode == 1
    assert "OUT\x1b]0;pwned title\x07" in piped.stdout  # a pipe gets what the code printed
    assert "rlm exec: error (Boom\\x1b[2K\\x0drlm exec: ok (no error))" in piped.stderr
