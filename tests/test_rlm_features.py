"""RLM features of issue 12 driven by the scripted model over real sandboxes: events, tools,
error threshold, retries, typed answers, sessions, compaction (the loopback-server side is in
tests/test_rlm_features_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from rlm import RLM, ScriptedBackend, run
from rlm.errors import ConfigurationError, ModelError, ProviderUnavailable, RateLimited
from rlm.result import RLMResult
from rlm.trajectory import result_path_for
from tests.conftest import policy_with
from tests.test_rlm_loop import go, repl


@pytest.fixture
def fork_server_on_main_thread() -> None:
    """Start the shared fork server from the main thread before a test runs RLMs in asyncio.run.

    Today the fork server dies with the thread that started it (PR_SET_PDEATHSIG; issue 9), and
    acompletion opens its sandbox in a to_thread worker that asyncio.run ends. Remove once fixed.
    """
    from sandbox import Sandbox

    Sandbox("default", audit_log=None).close()


# ------------------------------------------------------------------ events


def test_events_arrive_in_order_with_run_id_depth_and_time():
    events: list[dict[str, Any]] = []
    backend = ScriptedBackend(
        {"root": [repl("print(llm_query('hi'))", "Looking."), repl("FINAL('done')")], "sub": ["pong"]}
    )
    r = run("q?", "ctx", model="root", sub_model="sub", backend=backend, on_event=events.append)
    assert r.answer == "done"
    kinds = [e["type"] for e in events]
    assert kinds == [
        "run_start",
        "iteration_start", "model_reply", "sub_call", "code_result", "iteration_end",
        "iteration_start", "model_reply", "code_result", "final", "iteration_end",
        "run_end",
    ]  # fmt: skip
    assert {e["run_id"] for e in events} == {r.run_id} and {e["depth"] for e in events} == {0}
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    assert events[0]["query"] == "q?" and "str of 3 characters" in events[0]["context"]
    assert events[2]["response"].startswith("Looking.") and events[2]["input_tokens"] > 0
    assert events[3]["kind"] == "llm" and events[3]["response"] == "pong"
    assert events[4]["output"] == "pong" and events[4]["ok"] and events[4]["sub_calls"] == 1
    assert events[-1]["stop_reason"] == "final" and events[-1]["answer"] == "done"


def test_child_rlm_events_carry_their_own_run_id_and_depth():
    events: list[dict[str, Any]] = []

    def respond(model, messages):
        if "Question: outer" in messages[1]["content"]:
            return repl("FINAL(rlm_query('inner', context='abc'))")
        return repl("FINAL(len(context))")

    r = run("outer", "x", model="root", max_depth=2, backend=ScriptedBackend(respond), on_event=events.append)
    assert r.answer == "3"
    child = [e for e in events if e["depth"] == 1]
    assert child[0]["type"] == "run_start" and child[0]["parent_run_id"] == r.run_id
    assert child[-1]["type"] == "run_end" and child[-1]["run_id"] != r.run_id
    sub = next(e for e in events if e["type"] == "sub_call")
    assert sub["kind"] == "rlm" and sub["depth"] == 0 and sub["response"] == "3"


def test_a_failing_callback_is_logged_once_and_never_stops_the_run(caplog):
    seen: list[str] = []

    def broken(event: dict[str, Any]) -> None:
        seen.append(event["type"])
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.WARNING, logger="rlm"):
        r = go([repl("x = 1"), repl("FINAL('ok')")], on_event=broken)
    assert r.answer == "ok" and seen[0] == "run_start" and seen[-1] == "run_end"
    warnings = [rec for rec in caplog.records if "callback bug" in rec.getMessage()]
    assert len(warnings) == 1


@pytest.mark.usefixtures("fork_server_on_main_thread")
def test_a_coroutine_callback_is_awaited_on_the_callers_loop():
    async def main() -> tuple[list[str], set[Any], Any]:
        seen: list[str] = []
        loops: set[Any] = set()

        async def on_event(event: dict[str, Any]) -> None:
            await asyncio.sleep(0)
            loops.add((asyncio.get_running_loop(), threading.get_ident()))
            seen.append(event["type"])

        r = RLM("root", backend=ScriptedBackend([repl("FINAL('a')")]), on_event=on_event)
        result = await r.acompletion("ctx", "q")
        assert result.answer == "a"
        return seen, loops, (asyncio.get_running_loop(), threading.get_ident())

    for _ in range(2):  # asyncio.run twice: nothing is bound to the first loop
        seen, loops, caller = asyncio.run(main())
        assert seen[0] == "run_start" and seen[-1] == "run_end" and loops == {caller}
    # under the synchronous API a coroutine callback runs to completion too
    seen2: list[str] = []

    async def cb(event: dict[str, Any]) -> None:
        seen2.append(event["type"])

    assert go([repl("FINAL(1)")], on_event=cb).answer == "1" and seen2[-1] == "run_end"


def test_run_end_is_emitted_when_the_run_raises():
    from rlm.errors import AuthenticationError

    events: list[dict[str, Any]] = []
    try:
        go([AuthenticationError("no key", model="root")], on_event=events.append)
    except AuthenticationError:
        pass
    assert events[-1]["type"] == "run_end" and events[-1]["stop_reason"] == "error"


# ------------------------------------------------------------------- tools


def lookup(key: str, default: str = "?") -> str:
    """Look a key up in the host's table.

    This second paragraph is not shown to the model.
    """
    return {"alice": "engineering"}.get(key, default) + f"@{os.getpid()}"


def test_tools_run_in_this_process_are_listed_counted_and_logged(tmp_path: Path):
    def broken(x: int) -> int:
        """Always fails."""
        raise KeyError("no such row")

    def quits() -> None:
        raise SystemExit(3)

    events: list[dict[str, Any]] = []
    backend = ScriptedBackend(
        [
            repl("print(lookup('alice'))\nprint(lookup(key='bob', default='none'))"),
            repl("broken(1)"),
            repl("quits()"),
            repl("FINAL(lookup('alice'))"),
        ]
    )
    r = go(None, backend=backend, tools=[lookup, broken, quits], log_dir=tmp_path, on_event=events.append)
    pid = os.getpid()
    assert r.answer == f"engineering@{pid}" and r.tool_calls == 5 and r.sub_calls == 0
    system = backend.calls[0][1][0]["content"]
    assert "`lookup(key: str, default: str = '?') -> str`: Look a key up in the host's table." in system
    assert "second paragraph" not in system and "`broken(x: int) -> int`: Always fails." in system
    assert f"none@{pid}" in backend.calls[1][1][-1]["content"]
    failed = backend.calls[2][1][-1]["content"]
    assert "tool broken() failed: KeyError: 'no such row'" in failed
    assert "tool quits() failed: SystemExit: 3" in backend.calls[3][1][-1]["content"]
    lines = [json.loads(x) for x in Path(r.log_path).read_text().splitlines()]
    calls = lines[1]["code_blocks"][0]["result"]["rlm_calls"]
    assert [(c["type"], c["name"], c["args"], c["kwargs"]) for c in calls] == [
        ("tool", "lookup", ["alice"], {}),
        ("tool", "lookup", [], {"key": "bob", "default": "none"}),
    ]
    assert [c["prompt"] for c in calls] == ['lookup("alice")', 'lookup(key="bob", default="none")']
    assert lines[2]["code_blocks"][0]["result"]["rlm_calls"][0]["error"] == "KeyError: 'no such row'"
    tool_events = [e for e in events if e["type"] == "tool_call"]
    assert len(tool_events) == 5 and tool_events[2]["error"].startswith("KeyError")
    assert [e["tool_calls"] for e in events if e["type"] == "code_result"] == [2, 1, 1, 1]


def test_a_context_that_cannot_be_loaded_is_a_context_error_and_leaves_the_session_usable():
    """A context that is not plain data for the sandbox (a dict with tuple keys, a lone surrogate,
    nesting past 100) raised SandboxFailure ("the sandbox could not be started or used"), and in a
    ``persistent=True`` session it stayed in the session's contexts: every later completion
    loaded it again and failed the same way, for the rest of the session. It is now a
    ContextError (a ConfigurationError), raised before any model call, and the session goes on
    without it."""
    from rlm.errors import ConfigurationError, ContextError

    deep: Any = []
    for _ in range(150):
        deep = [deep]
    for bad in ({(1, 2): "x"}, "a\udc80b", deep):
        backend = ScriptedBackend([repl("FINAL('no')")])
        with pytest.raises(ContextError, match="the context cannot be loaded into the sandbox"):
            RLM("root", backend=backend).completion(bad, "q")
        assert backend.calls == []
    assert issubclass(ContextError, ConfigurationError)
    backend = ScriptedBackend([repl("FINAL(str(len(history)) + ' ' + context)")] * 3)
    with RLM("root", backend=backend, persistent=True) as r:
        assert r.completion("first", "q").answer == "0 first"
        with pytest.raises(ContextError):
            r.completion({(1, 2): "x"}, "q")
        assert len(backend.calls) == 1
        second = r.completion("second", "q")
        assert second.answer.endswith(" second") and second.stop_reason == "final", second


_SIGTERM_DURING = """
import signal, sys, time
from rlm import RLM, ScriptedBackend

signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(7))  # an embedder's handler


def slow() -> str:
    \"\"\"Takes a while.\"\"\"
    print("BUSY", flush=True)
    time.sleep(60)
    return "done"


def on_event(event):
    if event["type"] == "iteration_start" and {where!r} == "on_event":
        slow()


fence = "```repl\\n{{}}\\n```".format
backend = ScriptedBackend([fence("print(slow())" if {where!r} == "tool" else "x = 1"), fence("FINAL('finished')")])
print("ANSWER", RLM("m", backend=backend, tools=[slow], on_event=on_event).completion("c", "q").answer, flush=True)
"""


@pytest.mark.parametrize("where", ["tool", "on_event"])
def test_an_embedders_sigterm_handler_calling_sys_exit_during_a_tool_or_callback_ends_the_process(where: str):
    """A tool's or a callback's own SystemExit is reported (the test above), but one raised by the
    embedder's SIGTERM handler while a tool or an ``on_event`` callback ran was swallowed with
    it: the run went on to its end and the process exited 0 ("ANSWER finished"). It now
    propagates: the process exits with the handler's status, its sandbox closed."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGTERM_DURING.format(where=where)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "BUSY\n"
        proc.send_signal(15)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 7, (proc.returncode, out, err)
    assert "ANSWER" not in out and "Traceback" not in err, (out, err)


@pytest.mark.usefixtures("fork_server_on_main_thread")
def test_coroutine_tools_are_awaited_on_the_callers_loop():
    async def fetch(n: int) -> int:
        """Double n, asynchronously."""
        await asyncio.sleep(0.01)
        fetch.loops.append(asyncio.get_running_loop())  # type: ignore[attr-defined]
        return 2 * n

    fetch.loops = []  # type: ignore[attr-defined]

    async def main() -> tuple[str | None, Any]:
        r = RLM("root", backend=ScriptedBackend([repl("FINAL(fetch(21))")]), tools={"fetch": fetch})
        return (await r.acompletion("ctx", "q")).answer, asyncio.get_running_loop()

    answer, loop = asyncio.run(main())
    assert answer == "42" and fetch.loops == [loop]  # type: ignore[attr-defined]
    assert go([repl("FINAL(fetch(1))")], tools={"fetch": fetch}).answer == "2"  # sync API: a private loop


def test_tool_names_are_checked():
    for bad in (
        {"llm_query": lookup},
        {"FINAL": lookup},
        {"context": lookup},
        {"context_3": lookup},
        {"_hidden": lookup},
        {"ok": 42},
        [lambda x: x],
        "lookup",
    ):
        with pytest.raises(ConfigurationError):
            RLM("m", tools=bad)
    assert list(RLM("m", tools={"find": lookup}).tools) == ["find"]
    with pytest.raises(ConfigurationError, match=r"^tool int 5 is not callable$"):  # not "tool None"
        RLM("m", tools=[5])


def test_switches_must_be_booleans():
    # "no" was taken for True
    for name in ("verbose", "persistent", "prompt_caching"):
        with pytest.raises(ConfigurationError, match=f"^{name} must be True or False, not str 'no'$"):
            RLM("m", **{name: "no"})
    assert RLM("m", verbose=True, persistent=False, prompt_caching=False).verbose is True


# --------------------------------------------------------- error threshold


def test_max_errors_stops_after_n_failing_blocks_in_a_row(tmp_path: Path):
    failing = repl("1/0")
    # a failure, a success, then two failures: the streak restarts after the success
    two = "```repl\nundefined_name\n```\n```repl\nprint('not run')\n```"
    script = [failing, repl("x = 1"), failing, two]
    r = go([*script, repl("FINAL('never')")], max_errors=2, log_dir=tmp_path)
    assert (r.stop_reason, r.answer, r.iterations, r.code_executions) == ("max_errors", None, 4, 4)
    lines = [json.loads(x) for x in Path(r.log_path).read_text().splitlines()]
    outcome = json.loads(result_path_for(r.log_path).read_text())  # the trajectory holds iterations only
    assert outcome["stop_reason"] == "max_errors" and len(lines[-1]["code_blocks"]) == 1
    # without the threshold the same run goes on to the answer
    assert go([*script, repl("FINAL('reached')")]).answer == "reached"
    with pytest.raises(ConfigurationError):
        RLM("m", max_errors=0)


# ------------------------------------------------------------------ retries


def test_rate_limits_and_outages_are_retried_and_counted():
    events: list[dict[str, Any]] = []
    backend = ScriptedBackend(
        {
            "root": [
                RateLimited("slow down", model="root", retry_after=0.0),
                ProviderUnavailable("503", model="root"),
                repl("FINAL(llm_query('x'))"),
            ],
            "sub": [ProviderUnavailable("timeout", model="sub"), "pong"],
        }
    )
    r = go(None, backend=backend, retry_backoff_s=0.01, on_event=events.append)
    assert r.answer == "pong" and r.stop_reason == "final" and r.iterations == 1 and r.sub_calls == 1
    assert (r.usage["root"].retries, r.usage["root"].calls) == (2, 1)
    assert (r.usage["sub"].retries, r.usage["sub"].calls) == (1, 1)
    retries = [(e["model"], e["attempt"]) for e in events if e["type"] == "retry"]
    assert retries == [("root", 1), ("root", 2), ("sub", 1)]
    assert next(e for e in events if e["type"] == "retry")["delay_s"] == 0.0  # Retry-After honoured


def test_retries_stop_at_max_retries_and_other_errors_are_not_retried():
    down = [ProviderUnavailable("503", model="root")] * 3
    with pytest.raises(ProviderUnavailable):  # the first turn's failure is the caller's
        go(down, max_retries=2, retry_backoff_s=0.001)
    backend = ScriptedBackend([repl("x = 1"), ModelError("bad request", model="root"), repl("FINAL(1)")])
    r = go(None, backend=backend)
    assert r.stop_reason == "model_error" and backend.remaining == 1 and r.usage["root"].retries == 0
    with pytest.raises(ConfigurationError):
        RLM("m", max_retries=-1)


def test_a_retry_never_waits_past_the_time_budget():
    started = time.monotonic()
    script = [repl("x = 1"), RateLimited("slow down", model="root", retry_after=30.0), repl("FINAL(1)")]
    r = go(script, max_time_s=20)
    assert r.stop_reason == "max_time_s" and r.answer is None and time.monotonic() - started < 15
    # a wait longer than any retry accepts fails the call at once
    r = go([repl("x = 1"), RateLimited("quota", model="root", retry_after=3600.0)])
    assert r.stop_reason == "model_error" and "quota" in (r.error or "")


# ------------------------------------------------------------ typed answers


class Person(BaseModel):
    name: str
    age: int


def test_typed_answer_is_validated_and_a_failure_costs_one_more_turn(tmp_path: Path):
    events: list[dict[str, Any]] = []
    backend = ScriptedBackend(
        [
            repl("FINAL({'name': 'Ada'})"),  # age missing: rejected, the model is told why
            repl("p = {'name': 'Ada', 'age': '36'}\nFINAL_VAR('p')"),
        ]
    )
    r = go(None, backend=backend, output_type=Person, log_dir=tmp_path, on_event=events.append)
    assert r.parsed == Person(name="Ada", age=36) and json.loads(r.answer) == {"name": "Ada", "age": 36}
    assert r.iterations == 2 and r.stop_reason == "final"
    assert (
        '"age"' in backend.calls[0][1][0]["content"] and "Answer format" in backend.calls[0][1][0]["content"]
    )
    told = backend.calls[1][1][-1]["content"]
    assert "rejected" in told and "age: Field required" in told
    assert [e["error"] for e in events if e["type"] == "final_rejected"] == ["age: Field required"]
    lines = [json.loads(x) for x in Path(r.log_path).read_text().splitlines()]
    assert lines[1]["final_rejected"] == "age: Field required" and lines[1]["final_answer"] is None
    again = RLMResult.model_validate_json(r.model_dump_json())
    assert again.parsed == {"name": "Ada", "age": 36}  # JSON keeps the value, not its class


def test_typed_answers_from_text_json_and_python_values():
    assert go(["FINAL(42)"], output_type=int).parsed == 42
    assert go([repl("FINAL(['a', 'b'])")], output_type=list[str]).parsed == ["a", "b"]
    r = go(['FINAL({"name": "Bo", "age": 5})'], output_type=Person)
    assert r.parsed == Person(name="Bo", age=5)
    fenced = repl('FINAL(\'```json\\n{"name": "Cy", "age": 9}\\n```\')')
    assert go([fenced], output_type=Person).parsed == Person(name="Cy", age=9)
    r = go(["FINAL(hello)"], output_type=str)
    assert (r.parsed, r.answer) == ("hello", '"hello"')
    # out of turns: the closing reply is validated too
    r = go([repl("FINAL('not a number')"), "7"], output_type=int, max_iterations=1)
    assert (r.stop_reason, r.parsed, r.answer) == ("max_iterations", 7, "7")
    r = go([repl("x = 1"), "no idea"], output_type=int, max_iterations=1)
    assert (r.parsed, r.answer) == (None, None)
    assert go([repl("FINAL('x')")]).parsed is None  # untyped runs keep text answers
    with pytest.raises(ConfigurationError):
        RLM("m", output_type=object())


# ----------------------------------------------------------------- sessions


def test_a_session_shares_one_sandbox_across_completions(tmp_path: Path):
    backend = ScriptedBackend(
        [
            repl("seen = [len(context), len(context_0)]\nFINAL(seen)"),
            repl("seen.append(len(context))\nFINAL(f'{seen} {len(context_0)} {len(context_1)} {history}')"),
            repl("FINAL('seen' in dir())"),
        ]
    )
    with RLM("root", backend=backend, persistent=True, log_dir=tmp_path) as r:
        first = r.completion("abc", "q1")
        second = r.completion("defgh", "q2")
        sandbox = r._session.sandbox  # type: ignore[union-attr]
    assert first.answer == "[3, 3]"
    assert second.answer == "[3, 3, 5] 3 5 [{'query': 'q1', 'answer': '[3, 3]'}]"
    prompt = backend.calls[1][1][1]["content"]
    assert "question 2 of a session" in prompt and "`context_0` is a str of 3 characters" in prompt
    assert "Question: q1 Answer: [3, 3]" in prompt and "`history`" in prompt
    assert sandbox.closed and second.audit_log_path == first.audit_log_path
    meta = json.loads(Path(second.log_path).read_text().splitlines()[0])
    assert meta["session_turn"] == 2
    # after close() a completion starts a new session with a fresh sandbox
    assert r.completion("x", "q3").answer == "False"
    r.close()


def test_a_session_dropped_unclosed_closes_its_sandbox_as_it_is_dropped():
    """A persistent RLM dropped without ``close()``: its session's sandbox held the host functions
    of its last run, the run its RLM, the RLM its session, a cycle that kept the sandbox (its
    child, scratch directory and uid) until the garbage collector's next pass. With the
    collector off, each sandbox is closed as its RLM is dropped, and the next completion of a
    kept one still reaches its own run's functions."""
    import gc
    import weakref

    def session(answer: str) -> RLM:
        backend = ScriptedBackend([repl("x = llm_query('a')\nFINAL(x)"), answer] * 2)
        return RLM("root", backend=backend, persistent=True, log_dir=None)

    gc.collect()
    gc.disable()
    try:
        boxes = []
        for i in range(4):
            r = session(f"answer {i}")
            assert r.completion("abc", "q").answer == f"answer {i}"
            boxes.append(weakref.ref(r._session.sandbox))  # type: ignore[union-attr]
            del r  # dropped, never closed

        def still_open() -> list[int]:
            return [i for i, ref in enumerate(boxes) if (sb := ref()) is not None and not sb.closed]

        # (the last of a run's helper timers, cancelled, may still hold one for a moment)
        deadline = time.monotonic() + 10
        while still_open() and time.monotonic() < deadline:
            time.sleep(0.01)
        open_ = still_open()
    finally:
        gc.enable()
    assert open_ == []
    with session("kept") as r:
        assert [r.completion("abc", "q").answer for _ in range(2)] == ["kept", "kept"]


def test_a_restart_mid_session_reloads_every_context_and_says_the_rest_was_lost():
    policy = policy_with({"limits.cpu_seconds": 1, "limits.wall_seconds": 5, "audit.enabled": False})
    backend = ScriptedBackend(
        [
            repl("mine = 1\nFINAL('one')"),
            repl("while True:\n    pass"),
            repl("print(len(context_0), len(context_1), len(context), history, 'mine' in dir())"),
            repl("FINAL('two')"),
        ]
    )
    with RLM("root", backend=backend, persistent=True, policy=policy) as r:
        assert r.completion("aa", "q1").answer == "one"
        assert r.completion("bbbb", "q2").answer == "two"
    told = backend.calls[2][1][-1]["content"]
    assert "`context`, `context_0` to `context_1` and `history` were loaded again" in told
    assert "everything else was lost" in told
    assert "2 4 4 [{'query': 'q1', 'answer': 'one'}] False" in backend.calls[3][1][-1]["content"]


def test_session_completions_from_two_threads_run_one_at_a_time():
    backend = ScriptedBackend([repl("n = len(context)\nFINAL(n)")] * 2, latency_s=0.05)
    answers: list[str | None] = []
    with RLM("root", backend=backend, persistent=True) as r:
        threads = [
            threading.Thread(target=lambda c=c: answers.append(r.completion(c, "q").answer))
            for c in ("a", "bb")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(answers) == ["1", "2"]
        assert len(r._session.contexts) == 2  # type: ignore[union-attr]


# --------------------------------------------------------------- compaction


def test_compaction_replaces_older_turns_with_the_models_summary(tmp_path: Path):
    wordy = "word " * 60

    def respond(model: str, messages: list[dict[str, Any]]) -> str:
        if "replaced by a summary that you write now" in messages[-1]["content"]:
            return "SUMMARY: total counts the turns so far."
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if "SUMMARY:" in messages[1]["content"]:
            return repl("FINAL(total)")  # the REPL kept its variables
        return repl(f"total = {'total + 1' if turn else '1'}\nprint('{wordy}')", wordy)

    events: list[dict[str, Any]] = []
    backend = ScriptedBackend(respond, context_window=2400)
    r = go(None, backend=backend, log_dir=tmp_path, on_event=events.append, compaction_threshold=0.5)
    compactions = [e for e in events if e["type"] == "compaction"]
    assert len(compactions) == 1
    c = compactions[0]
    assert r.answer == str(c["iteration"] - 1) and r.stop_reason == "final"  # one block per earlier turn
    assert c["tokens_before"] > 1200 >= c["tokens_after"] and c["turns_summarized"] >= 2
    assert c["summary"].startswith("SUMMARY:")
    summary_call = next(m for m in backend.calls if "write now" in m[1][-1]["content"])[1]
    after = backend.calls[backend.calls.index(next(x for x in backend.calls if x[1] is summary_call)) + 1][1]
    assert [m["role"] for m in after] == ["system", "user", "assistant", "user"]
    assert "Question: q?" in after[1]["content"] and "Your progress so far" in after[1]["content"]
    assert r.iterations == c["iteration"] and r.usage["root"].calls == r.iterations + 1  # the summary counts
    lines = [json.loads(x) for x in Path(r.log_path).read_text().splitlines()]
    assert {x["type"] for x in lines} == {"metadata", "iteration"}  # what trajectory viewers read
    compacted = [x for x in lines if "compaction" in x]  # recorded on the iteration that followed it
    assert len(compacted) == 1 and compacted[0]["compaction"]["turns_summarized"] >= 1
    with pytest.raises(ConfigurationError):
        RLM("m", compaction_threshold=1.5)


def test_without_compaction_old_outputs_are_elided_as_before():
    wordy = "word " * 60
    backend = ScriptedBackend(
        [repl(f"print('{wordy}')", wordy)] * 4 + [repl("FINAL('x')")], context_window=1200
    )
    r = go(None, backend=backend, compaction_threshold=None)
    assert r.answer == "x" and not any("write now" in m[1][-1]["content"] for m in backend.calls)
    assert "elided to fit" in json.dumps(backend.calls[-1][1])


def test_verbose_shows_tools_and_notes_as_text_never_markup(capsys):
    def shout(text: str) -> str:
        """Fails loudly."""
        raise ValueError(f"[bold red]{text}[/] [/nonsense]")

    r = go([repl("shout('boom')"), repl("FINAL('done')")], tools=[shout], verbose=True)
    assert r.answer == "done" and r.tool_calls == 1
    out, err = capsys.readouterr()
    assert out == "" and "tool shout: error ValueError: [bold red]boom[/]" in err and "[/nonsense]" in err
    assert "callback" not in err  # the view itself never failed


@pytest.mark.usefixtures("fork_server_on_main_thread")
def test_a_session_under_asyncio_run_twice_routes_tools_to_the_current_completion():
    seen: list[str] = []

    async def note(text: str) -> str:
        """Record a note."""
        seen.append(text)
        return text.upper()

    backend = ScriptedBackend([repl("a = note(context)\nFINAL(a)"), repl("FINAL(a + note(context))")])
    r = RLM("root", backend=backend, persistent=True, tools=[note])
    try:
        first = asyncio.run(r.acompletion("one", "q1"))
        second = asyncio.run(r.acompletion("two", "q2"))
    finally:
        r.close()
    assert (first.answer, second.answer) == ("ONE", "ONETWO") and seen == ["one", "two"]
    assert (first.tool_calls, second.tool_calls) == (1, 1)


# ---------------------------------------------------------------- cancellation
def test_cancel_token_kills_the_running_code_and_stops_the_run(tmp_path: Path):
    """A CancelToken cancelled from another thread ends the run: the sleeping cell's child is
    killed (it does not run to its end), no further model call is made, stop_reason is "cancelled"."""
    from rlm import CancelToken

    token = CancelToken()
    backend = ScriptedBackend([repl("started()\nimport time\ntime.sleep(60)"), repl("FINAL(1)")])
    policy = policy_with({"limits.wall_seconds": 120, "limits.cpu_seconds": 60})
    events: list[dict[str, Any]] = []
    started = threading.Event()  # set by the cell: it runs in its child now

    box: list[RLMResult] = []
    worker = threading.Thread(
        target=lambda: box.append(
            go(None, backend=backend, policy=policy, cancel=token, on_event=events.append, log_dir=tmp_path,
               tools={"started": started.set})
        )
    )  # fmt: skip
    worker.start()
    assert started.wait(60)
    token.cancel()
    worker.join(60)
    assert not worker.is_alive(), "the run did not stop"
    (r,) = box
    assert r.stop_reason == "cancelled" and r.answer is None, r
    code = [e for e in events if e["type"] == "code_result"]
    assert len(code) == 1 and not code[0]["ok"]  # the cell was killed, not finished
    assert len(backend.calls) == 1  # no model call after the cancellation
    assert token.cancelled
    # a token cancelled before the run: the run stops before its first model call
    r2 = go([repl("FINAL(1)")], cancel=token)
    assert r2.stop_reason == "cancelled" and r2.iterations == 0


def test_cancel_gives_up_a_model_call_in_flight():
    """A model call that takes 60 s (a slow or dripping server) no longer holds a cancelled run:
    the call is given up (it ends on its own in a daemon thread, its answer unused)."""
    from rlm import CancelToken

    token = CancelToken()
    backend = ScriptedBackend([repl("FINAL(1)")], latency_s=60)
    threading.Timer(0.5, token.cancel).start()
    t0 = time.monotonic()
    r = go(None, backend=backend, cancel=token)
    assert r.stop_reason == "cancelled" and r.answer is None, r
    assert time.monotonic() - t0 < 30
    # its tokens will never be known: the result says a call was given up instead of hiding it
    (usage,) = r.usage.values()
    assert usage.abandoned == 1 and usage.calls == 0 and r.total_input_tokens == 0
