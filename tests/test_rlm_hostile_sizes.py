"""What the host spends on hostile input, per megabyte of it: the model's replies, sub-call
answers, what the code prints or returns, and what the loop writes about them.

Every one of these inputs is untrusted (a prompt injection or a hostile server controls it).
The host's memory and CPU must stay within a small multiple of the input's size, never grow
faster than it, and never hold the GIL for seconds on a small input (an ``rlm mcp`` server or
a batch runs other runs in the same process). Memory is measured with tracemalloc, after a
first run has imported everything; a parse that could hang runs in a process of its own,
under a generous timeout.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

from rlm import ScriptedBackend, run


def repl(code: str, text: str = "") -> str:
    return f"{text}\n```repl\n{code}\n```\n"


def _bounded(code: str, seconds: float = 30) -> str:
    """Run *code* in a Python process of its own and return its output: a regular expression
    that holds the GIL cannot be timed out from a thread of this one."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _traced_run(
    replies: list[str] | Callable[[str, list[dict[str, Any]]], str], **kwargs: Any
) -> tuple[Any, int]:
    """``run()`` on a scripted model, and the peak of memory traced while it ran (the modules
    it needs imported by a first run, before tracing)."""
    run("q", "c", model="m", backend=ScriptedBackend(["FINAL(warm)"]))
    kwargs.setdefault("max_iterations", 2)
    tracemalloc.start()
    try:
        result = run("q", "c", model="m", backend=ScriptedBackend(replies), **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


def test_a_final_of_many_quotes_is_read_in_linear_time():
    """A quoted FINAL argument was found by a pattern that backtracked into each literal it had
    read: ``FINAL(`` and 80 quotes took 8 s of CPU, each 10 more quotes six times as long (a
    reply of 106 bytes held the GIL for hours: an ``rlm mcp`` server answered no client, and
    ``max_time_s`` could not stop it). Each literal is read once now."""
    out = _bounded(
        "from rlm.final import find_final\n"
        "for reply in ['FINAL(' + \"'\" * 100, 'FINAL(' + '\"' * 101, 'FINAL(' + \"r'' \" * 100 + 'x']:\n"
        "    print(find_final(reply).quoted)\n"
    )
    assert out.split() == ["False", "False", "False"]


def test_an_unclosed_quoted_final_costs_no_more_than_its_size():
    """``FINAL("`` and text that never closes the quote: the pattern kept a backtracking entry
    per character, 147 bytes of host memory for each byte of the reply (a 4 MB reply: 587 MB).
    It reads a run of plain characters at a time now."""
    reply = 'FINAL("' + "a" * 1_000_000
    result, peak = _traced_run([reply])
    assert result.answer == reply[len("FINAL(") :]
    # 147 MB before, 1 MB now.
    assert peak < 10 * len(reply), f"{peak / 1e6:.1f} MB traced for a {len(reply) / 1e6:.1f} MB reply"


def test_an_unclosed_final_over_many_short_lines_is_not_split_into_lines():
    """``FINAL(`` and no ``)`` ending a line: the argument's end was looked for in a list of
    every line of the reply, five million of them for a 16 MB reply of short lines (332 MB of
    host memory, 3.3 s of CPU). It is found by a pattern from the end now, and the reply is
    searched in place, not copied a segment at a time."""
    reply = "FINAL(\n" + "ab\n" * 333_333
    result, peak = _traced_run([reply])
    assert result.answer == reply[len("FINAL(") :].strip()
    # 21 MB before, 2 MB now (the argument and its stripped copy, which is the answer).
    assert peak < 5 * len(reply), f"{peak / 1e6:.1f} MB traced for a {len(reply) / 1e6:.1f} MB reply"


def test_a_written_final_var_of_no_variable_name_is_not_run_as_code(tmp_path):
    """``FINAL_VAR(...)`` written in a reply was run in the sandbox as ``FINAL_VAR(<repr of its
    argument>)`` whatever the argument: 4 MB of control characters made a 16 MB literal, a
    20 MB audit line and 121 MB of host memory (241 MB resident). An argument that names no
    variable is the answer itself, as FINAL_VAR gives it, without running anything."""
    from pathlib import Path

    reply = "FINAL_VAR(" + "\x01" * 1_000_000 + ")"
    result, peak = _traced_run([reply], log_dir=tmp_path)
    assert result.answer == "\x01" * 1_000_000
    assert Path(result.audit_log_path).stat().st_size < 100_000  # the prelude and the block's description
    # 31 MB before (and a 5 MB audit line), 3 MB now.
    assert peak < 5 * len(reply), f"{peak / 1e6:.1f} MB traced for a {len(reply) / 1e6:.1f} MB reply"


def test_the_call_entries_of_one_block_are_bounded_however_many_calls_it_makes(tmp_path, monkeypatch):
    """Each sub-call and tool call a block made kept a log entry for the whole run (about 3 KB
    of host memory and 430 bytes of trajectory, however short its texts), and host time spent
    serving calls counts towards no limit of the sandbox's: a block of ten
    ``llm_query_batched([""] * 10_000)`` against a server that answers at once kept 320 MB
    (369 MB resident) and wrote a 43 MB trajectory line (118 MB and 4.3 MB now). Past
    BLOCK_CALL_ENTRIES (a full batch) the calls are counted, not kept."""
    import json

    import rlm.core

    real = getattr(rlm.core, "BLOCK_CALL_ENTRIES", None)
    monkeypatch.setattr(rlm.core, "BLOCK_CALL_ENTRIES", 50, raising=False)
    events: list[dict[str, Any]] = []

    def lookup(key: str) -> str:
        return key

    code = "for i in range(3):\n    r = llm_query_batched([''] * 40)\nfor i in range(30):\n    lookup('k')"

    def model(name: str, messages: list[dict[str, Any]]) -> str:
        if len(messages) == 1:
            return "sub"
        return repl(code) if len(messages) == 2 else "FINAL(done)"

    r = run("q", "c", model="m", backend=ScriptedBackend(model), tools=[lookup], log_dir=tmp_path,
            max_iterations=2, on_event=events.append)  # fmt: skip
    assert r.answer == "done" and r.sub_calls == 120 and r.tool_calls == 30
    result = r.history[0]["code_blocks"][0]["result"]
    assert len(result["rlm_calls"]) == 50
    assert result["rlm_calls_omitted"] == {"sub_calls": 70, "tool_calls": 30}
    (block,) = [e for e in events if e["type"] == "code_result"]
    assert (block["sub_calls"], block["tool_calls"]) == (120, 30)
    (trajectory,) = tmp_path.glob("*.jsonl")
    line = json.loads(trajectory.read_text().splitlines()[1])
    assert line["code_blocks"][0]["result"]["rlm_calls_omitted"] == {"sub_calls": 70, "tool_calls": 30}
    assert real == 10_000


def test_a_typed_answer_of_many_wrong_items_is_refused_at_its_first():
    """pydantic validated every item of a wrong list and the reason was built from all their
    errors: ``FINAL(['a'] * 1_000_000)`` against ``output_type=list[int]`` took 13 s of CPU
    holding the GIL and 2 GB of host memory. Each sequence stops at its first bad item now;
    the same values pass."""
    seen: list[str] = []

    def model(name: str, messages: list[dict[str, Any]]) -> str:
        seen.append(messages[-1]["content"])
        return repl("FINAL(['a'] * 200_000)") if len(seen) == 1 else "FINAL([1, 2])"

    result, peak = _traced_run(model, output_type=list[int], max_iterations=3)
    assert result.answer == "[1,2]" and result.parsed == [1, 2]
    assert "0: Input should be a valid integer" in seen[1] and "1: Input" not in seen[1]
    # 200,000 error records: 136 MB traced before (2.7 s of CPU), 4 MB now.
    assert peak < 20_000_000, f"{peak / 1e6:.1f} MB traced"


def test_a_typed_answer_of_many_wrong_values_is_refused_at_its_first():
    """Mappings as sequences above: a million wrong values against ``dict[str, int]`` took 4 s
    of CPU holding the GIL and 1 GB of host memory, an error kept per value. A mapping stops
    at its first bad key or value now; the same values pass, keys and values checked."""
    seen: list[str] = []
    replies = [
        "FINAL({f'k{i}': 'a' for i in range(200_000)})",
        "FINAL({i: 1 for i in range(3)})",  # keys must be str: the first refused, once
        'FINAL({"a": 1, "b": 2})',
    ]

    def model(name: str, messages: list[dict[str, Any]]) -> str:
        seen.append(messages[-1]["content"])
        return repl(replies[len(seen) - 1]) if len(seen) <= 2 else replies[2]

    result, peak = _traced_run(model, output_type=dict[str, int], max_iterations=4)
    assert result.answer == '{"a":1,"b":2}' and result.parsed == {"a": 1, "b": 2}
    assert "k0: Input should be a valid integer" in seen[1] and "k1: Input" not in seen[1]
    assert seen[2].count("Input should be a valid string") == 1, seen[2][-400:]
    # The answer itself, 200,000 entries decoded in the host, is 32 MB; its error records made
    # 167 MB traced before.
    assert peak < 60_000_000, f"{peak / 1e6:.1f} MB traced"


def test_fitting_the_conversation_to_the_window_counts_each_message_once():
    """Over the model's window, the oldest outputs are elided one at a time, and the whole
    conversation was counted again after each: the square of its length per turn. A hostile
    server's replies are never elided (they are the model's own turns), so each turn counted
    them all again for every earlier turn (at 0.5 MB a reply, ten turns of ``openai/gpt-4o``
    cost 52 counts). Each elided message is counted once now, and the total updated."""
    counted = [0]
    sent = [0]

    class Counting(ScriptedBackend):
        def count_tokens(self, model: str, messages: list[dict[str, Any]]) -> int:
            counted[0] += sum(len(str(m.get("content") or "")) for m in messages)
            return super().count_tokens(model, messages)

        def complete(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
            sent[0] += sum(len(str(m.get("content") or "")) for m in messages)
            return super().complete(model, messages, **kwargs)

    wordy = "w " * 3_000
    turns = 16
    backend = Counting([repl("print('o ' * 500)", wordy)] * turns, context_window=1200)
    r = run("q", "c", model="m", backend=backend, compaction_threshold=None, max_iterations=turns)
    assert r.iterations == turns
    # Each turn counts the conversation it sends at most twice (once whole, its messages once
    # each as they are elided), 1.3 times over here; it counted it once per earlier turn before
    # (11.5 times over).
    assert counted[0] < 3 * sent[0], (counted[0], sent[0])


def test_a_huge_error_body_is_read_only_as_far_as_its_cut(monkeypatch):
    """A server's error response (status 400 and above) was read whole, up to the 32 MiB of any
    response, and litellm scrubs an error's text of secrets with a pattern of some twenty
    alternatives, six times over, each holding the GIL: a 2.4 MB error body cost the host 14.5 s
    of CPU (an ``rlm mcp`` server answered nobody meanwhile). At most MAX_ERROR_BYTES of it are
    read now; the call fails on its status as before."""
    from rlm import llm
    from tests.llm_server import LLMServer, Reply

    errors: list[int] = []  # the length of each error's text as litellm made it from the body
    mapped = llm._map_error

    def recording(exc: Exception, *args: Any, **kwargs: Any) -> Any:
        errors.append(len(str(exc)))
        return mapped(exc, *args, **kwargs)

    monkeypatch.setattr(llm, "_map_error", recording)
    code = "try:\n    llm_query('x')\nexcept Exception as e:\n    print(type(e).__name__, str(e)[:60])"

    def reply(request: Any) -> Reply:
        if len(request.messages) == 1:  # the sub-call
            return Reply("Traceback (most recent call last):\n" + " a\n" * 400_000, status=400)
        return Reply(repl(code) if len(request.messages) == 2 else "FINAL(done)")

    with LLMServer(reply) as srv:
        r = run(
            "q", "c", model="openai/m", api_base=srv.base_url, api_key="k", max_iterations=3, max_retries=0
        )
    assert r.answer == "done"
    assert r.history[0]["code_blocks"][0]["result"]["stdout"].startswith("HostFunctionError"), r.history[0]
    assert errors and max(errors) < 2 * 64 * 1024, errors  # 1.2 MB before
    assert getattr(llm, "MAX_ERROR_BYTES", None) == 64 * 1024


def test_the_live_view_cuts_a_tool_s_error_as_it_cuts_every_other_text():
    """``verbose=True`` showed a tool's error whole on the operator's terminal: a tool raising
    ``KeyError(key)`` on a 4 MB key the code chose printed a 4 MB line (1.1 s of CPU). Notes are
    cut like the reply, the code and the output (1,500 characters, head and tail)."""
    import io

    from rich.console import Console

    from rlm.display import VerboseView

    def lookup(key: str) -> str:
        return {}[key]  # type: ignore[no-any-return]

    shown = io.StringIO()
    code = "try:\n    lookup('k' * 1_000_000)\nexcept Exception as e:\n    print(len(str(e)))"
    view = VerboseView(Console(file=shown, width=100))
    r = run("q", "c", model="m", backend=ScriptedBackend([repl(code), "FINAL(done)"]), tools=[lookup],
            on_event=view.handle)  # fmt: skip
    assert r.answer == "done" and r.tool_calls == 1
    assert "tool lookup: error KeyError" in shown.getvalue()
    assert len(shown.getvalue()) < 20_000, len(shown.getvalue())  # 1 MB before


def test_an_mcp_result_of_a_huge_answer_is_cut_before_it_is_encoded():
    """``rlm mcp`` fits a tool result into one MCP message (RESULT_JSON_MAX bytes of JSON) by
    cutting its longest text, but encoded the whole result first: a 20 MB answer of control
    characters (an ``rlm_query`` whose model gave it) made 120 MB of JSON, then as much again
    encoded, 240 MB of the server's memory. A text longer than the whole message is cut to it
    first."""
    from rlm.mcp_server import RESULT_JSON_MAX, _fit_result

    _fit_result({"answer": "warm", "stop_reason": "final"})
    tracemalloc.start()
    try:
        payload, text = _fit_result({"answer": "\x01" * 20_000_000, "stop_reason": "final"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert payload["answer"].endswith("cut to fit one MCP message]") and payload["stop_reason"] == "final"
    assert RESULT_JSON_MAX // 7 < len(payload["answer"]) < RESULT_JSON_MAX // 5
    assert "is in structuredContent" in text
    # 260 MB before, 13 MB now (the JSON of a text cut to RESULT_JSON_MAX characters).
    assert peak < 40_000_000, f"{peak / 1e6:.0f} MB traced"
