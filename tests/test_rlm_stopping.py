"""Stopping a run promptly: a cancelled ``acompletion`` task, Ctrl-C during a batch of child RLMs,
a cancel during a retry's wait, and the loop's own helpers run in a sandbox the model controls.

Real sandboxes throughout; the model is the loopback server (tests/llm_server.py) or a scripted
backend. Each test bounds its wait, so a run that does not stop fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import rlm.core as core
from rlm import RLM, CancelToken, ScriptedBackend, run
from tests.conftest import within
from tests.llm_server import LLMServer, Reply

KEY = "sk-test-stopping"
STOP_S = 2.0  # a run that is stopped ends (and its caller gets control back) well within this


def run_tree(script: Any, concurrency: int, **kwargs: Any) -> Any:
    """A run whose root's one turn starts child RLMs (max_depth 2), *concurrency* calls at once."""
    return run(
        "root", "ctx", model="m", backend=ScriptedBackend(script), max_depth=2, max_iterations=1,
        max_concurrency=concurrency, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def litellm_imported() -> None:
    """Import litellm before the clocks start: its first import takes seconds and cannot be cut short."""
    from rlm import llm

    llm._lib()


def repl(code: str, text: str = "") -> str:
    return f"{text}\n```repl\n{code}\n```\n"


# ------------------------------------------------------------------ acompletion
SLOW_SUB_CALLS = repl("for i in range(8):\n    print(llm_query('chunk %d' % i))")


def slow_server() -> LLMServer:
    """Every reply (root turns and sub-calls alike) takes 0.5 s: the root's code makes 8 sub-calls."""
    return LLMServer(Reply(SLOW_SUB_CALLS, latency_s=0.5))


def test_cancelling_the_acompletion_task_stops_the_run():
    """asyncio.timeout around acompletion: the run is cancelled (no model call after it), its
    sandbox closed, and asyncio.run returns at once instead of waiting for the run to end."""
    events: list[dict[str, Any]] = []
    with slow_server() as srv:
        r = RLM("openai/m", api_base=srv.base_url, api_key=KEY, max_iterations=3, on_event=events.append)
        seen: dict[str, float] = {}

        async def main() -> None:
            try:
                async with asyncio.timeout(1.2):
                    await r.acompletion("ctx", "q")
            except TimeoutError:
                seen["timed_out"] = time.monotonic()
                seen["requests"] = len(srv.requests)

        started = time.monotonic()
        _, elapsed = within(8, lambda: asyncio.run(main()))
        assert "timed_out" in seen
        assert elapsed < 1.2 + STOP_S + 1.0, elapsed
        # the run ended (its sandbox closed) before asyncio.run returned, stopped by the cancellation
        ends = [e for e in events if e["type"] == "run_end"]
        assert [e["stop_reason"] for e in ends] == ["cancelled"], ends
        time.sleep(0.7)  # longer than a sub-call: one more would have reached the server by now
        assert len(srv.requests) <= seen["requests"] + 1 < 8, (len(srv.requests), seen)
        assert seen["timed_out"] - started < 1.2 + 1.0


def test_task_cancel_leaves_the_callers_token_alone_and_the_token_still_cancels():
    """A caller's cancel= token combines with the task's cancellation: task.cancel() stops the run
    without cancelling the caller's token (it may be shared), and token.cancel() under acompletion
    ends the run with stop_reason="cancelled"."""
    with slow_server() as srv:
        r = RLM("openai/m", api_base=srv.base_url, api_key=KEY, max_iterations=3)
        token = CancelToken()

        async def cancel_task() -> float:
            task = asyncio.create_task(r.acompletion("ctx", "q", cancel=token))
            await asyncio.sleep(1.0)
            task.cancel()
            t = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - t

        waited, _ = within(8, lambda: asyncio.run(cancel_task()))
        assert waited < STOP_S + 0.5, waited
        assert not token.cancelled
        before = len(srv.requests)
        time.sleep(0.7)
        assert len(srv.requests) <= before + 1 < 8

        async def cancel_token() -> Any:
            threading.Timer(1.0, token.cancel).start()
            return await r.acompletion("ctx", "q", cancel=token)

        result, elapsed = within(8, lambda: asyncio.run(cancel_token()))
        assert result.stop_reason == "cancelled" and result.answer is None, result
        assert elapsed < 3.0, elapsed


# ------------------------------------------------------------------ Ctrl-C in a batch of child RLMs
@pytest.mark.parametrize(("children", "concurrency", "prompt_s"), [(4, 16, STOP_S + 0.5), (12, 4, 0.6)])
def test_ctrl_c_during_a_batch_of_child_rlms_stops_the_children(children, concurrency, prompt_s):
    """KeyboardInterrupt in the main thread while child RLMs of rlm_query_batched run (in pool
    threads) in their own sandboxes: it reaches them, their code is killed, they make no more
    model calls, and the interrupt surfaces at once instead of after every child has finished.
    With more children than workers, the queued ones are dropped and not waited for."""
    calls: list[float] = []
    children_started = threading.Semaphore(0)

    def script(model: str, messages: list[dict[str, Any]]) -> str:
        calls.append(time.monotonic())
        if "Question: root" in messages[1]["content"]:
            return repl(f"r = rlm_query_batched(['child %d' % i for i in range({children})])\nprint(r)")
        return repl("import time\nt = time.time()\nwhile time.time() - t < 12:\n    time.sleep(0.1)")

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "model_reply" and event["depth"] == 1:
            children_started.release()

    def interrupt_once_children_run() -> None:
        for _ in range(min(children, concurrency)):
            children_started.acquire()
        time.sleep(0.5)  # their blocks are running now
        box["sigint"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    box: dict[str, float] = {}
    threading.Thread(target=interrupt_once_children_run, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_tree(script, concurrency, on_event=on_event)
    surfaced = time.monotonic() - box["sigint"]
    assert surfaced < prompt_s, surfaced
    assert not [c for c in calls if c > box["sigint"]], "model calls after the interrupt"
    deadline = time.monotonic() + STOP_S
    while any(t.name.startswith("rlm-batch") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("rlm-batch") for t in threading.enumerate())


# ------------------------------------------------------------------ cancel during a retry's wait
def test_cancel_during_a_retry_wait_stops_the_run_at_once():
    """A 429 with Retry-After: 60: the loop waits to retry; token.cancel() ends that wait, and no
    further request is sent."""
    too_many = Reply("slow down", status=429, error_type="rate_limit_error", headers=(("Retry-After", "60"),))
    with LLMServer(too_many) as srv:
        token = CancelToken()
        retries = threading.Event()

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "retry":
                retries.set()

        def cancel_when_waiting() -> None:
            retries.wait(10)
            time.sleep(0.3)
            token.cancel()

        threading.Thread(target=cancel_when_waiting, daemon=True).start()
        result, elapsed = within(
            10,
            lambda: run(
                "q",
                "ctx",
                model="openai/m",
                api_base=srv.base_url,
                api_key=KEY,
                cancel=token,
                on_event=on_event,
            ),
        )
        assert result.stop_reason == "cancelled" and result.answer is None, result
        assert elapsed < 3.0, elapsed
        assert len(srv.requests) == 1


# ------------------------------------------------------------------ helpers the model may redefine
HIJACK_DESCRIBE = repl("import time\ndef rlm_describe_vars():\n    time.sleep(25)\nprint('defined')")


def test_a_redefined_rlm_describe_vars_cannot_outlive_max_time_s():
    """The host runs rlm_describe_vars() after every block; a model that redefines it to sleep does
    not keep the run past max_time_s."""
    backend = ScriptedBackend([HIJACK_DESCRIBE] * 3 + [repl("FINAL('x')")])
    result, elapsed = within(
        10, lambda: run("q", "ctx", model="m", backend=backend, max_time_s=1.5, max_iterations=4)
    )
    assert result.stop_reason == "max_time_s", result
    assert elapsed < 1.5 + 1.5, elapsed


def test_a_redefined_final_var_cannot_outlive_max_time_s():
    """FINAL_VAR(...) written in the reply's text is resolved by running FINAL_VAR in the sandbox:
    redefined to sleep, it is killed when the time budget runs out."""
    reply = repl("import time\ndef FINAL_VAR(name):\n    time.sleep(25)\nanswer = 42") + "FINAL_VAR(answer)\n"
    backend = ScriptedBackend([reply])
    result, elapsed = within(10, lambda: run("q", "ctx", model="m", backend=backend, max_time_s=1.5))
    assert elapsed < 1.5 + 1.5, elapsed
    assert result.iterations == 1


def test_a_stalling_helper_is_killed_without_a_time_budget(monkeypatch: pytest.MonkeyPatch):
    """Without max_time_s the helpers are bounded too (HELPER_TIMEOUT_S): an object whose repr
    hangs stalls the description of the variables, its child is killed, the context is loaded
    again, the model is told, and the run goes on."""
    monkeypatch.setattr(core, "HELPER_TIMEOUT_S", 1.0, raising=False)
    slow_repr = repl(
        "import time\nclass Slow:\n    def __repr__(self):\n        time.sleep(25)\n        return 'slow'\ns = Slow()"
    )
    backend = ScriptedBackend([slow_repr, repl("FINAL(len(context))")])
    result, elapsed = within(10, lambda: run("q", "abcdef", model="m", backend=backend, max_iterations=3))
    assert result.answer == "6" and result.stop_reason == "final", result
    assert elapsed < 6.0, elapsed
    told = backend.calls[1][1][-1]["content"]
    assert "the sandbox was restarted" in told, told


# ------------------------------------------------------------------ a token belongs to one run
def test_a_late_cancel_of_an_earlier_token_leaves_a_session_alone():
    """In a session, each completion's token stops that completion only: cancelling the token of a
    finished completion later does not kill the session's sandbox (its variables survive)."""
    backend = ScriptedBackend([repl("x = 41\nFINAL('set')"), repl("FINAL(x + 1)")])
    first = CancelToken()
    with RLM("m", backend=backend, persistent=True) as r:
        assert r.completion("ctx", "set x", cancel=first).answer == "set"
        first.cancel()
        second = r.completion("ctx", "read x", cancel=CancelToken())
    assert second.answer == "42" and second.stop_reason == "final", second


def test_a_completion_cancelled_before_it_runs_leaves_the_session_alone():
    """A completion whose token is cancelled before it starts (or that waited behind another
    completion of the session when its task was cancelled) runs no code and kills nothing: the
    session's variables survive."""
    backend = ScriptedBackend([repl("x = 41\nFINAL('set')"), repl("FINAL(x + 1)")])
    early = CancelToken()
    early.cancel()
    with RLM("m", backend=backend, persistent=True) as r:
        assert r.completion("ctx", "set x").answer == "set"
        assert r.completion("ctx", "never runs", cancel=early).stop_reason == "cancelled"
        after = r.completion("ctx", "read x")
    assert after.answer == "42" and after.stop_reason == "final", after


@pytest.mark.parametrize("how", ["token", "task"])
def test_a_completion_queued_behind_another_of_its_session_stops_when_cancelled(how):
    """Completions of one session run one at a time: one cancelled while it waited for the session
    (its token, or its acompletion task) went on waiting until the other completion had ended
    (here seconds; with real turns, up to its whole run), then stopped. It now ends at once with
    stop_reason="cancelled", touching nothing of the session; the running completion goes on."""

    def script(model: str, messages: list[dict[str, Any]]) -> str:
        time.sleep(0.4)
        if "Question: first" in messages[1]["content"] and len(messages) < 2 * 6:
            return repl("x = 41")
        return repl("FINAL(x + 1)")

    backend = ScriptedBackend(script)
    with RLM("m", backend=backend, persistent=True, max_iterations=8) as r:
        box: dict[str, Any] = {}
        first = threading.Thread(target=lambda: box.setdefault("first", r.completion("ctx", "first")))
        first.start()
        time.sleep(0.5)  # the first completion holds the session now
        started = time.monotonic()
        if how == "token":
            token = CancelToken()
            threading.Timer(0.3, token.cancel).start()
            second, _ = within(20, lambda: r.completion("ctx", "second", cancel=token))
            assert second.stop_reason == "cancelled" and second.answer is None and second.iterations == 0
        else:

            async def cancel_task() -> None:
                task = asyncio.create_task(r.acompletion("ctx", "second"))
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            within(20, lambda: asyncio.run(cancel_task()))
        waited = time.monotonic() - started
        # was: it returned only once the first completion had ended (about 2 s later)
        assert first.is_alive(), f"the cancelled completion returned after the first had ended ({waited:.1f} s)"
        assert waited < 0.3 + 1.0, waited
        first.join(20)
        assert box["first"].answer == "42" and box["first"].stop_reason == "final", box["first"]
        third = r.completion("ctx", "third")
    assert third.answer == "42", third  # the session's variables survived
    told = backend.calls[-1][1][1]["content"]
    assert "This is question 2 of a session" in told, told  # the cancelled one was no turn of it


def test_a_session_whose_child_was_killed_tells_the_next_completion():
    """A cancel kills the session's child mid-block: the next completion's first message says the
    REPL was restarted and the variables are gone (not that it still holds them)."""
    replies = [repl("x = 41\nFINAL('set')"), repl("import time\ntime.sleep(20)"), repl("FINAL('ok')")]
    backend = ScriptedBackend(replies)
    token = CancelToken()
    with RLM("m", backend=backend, persistent=True, max_iterations=2) as r:
        r.completion("ctx", "set x")
        threading.Timer(0.8, token.cancel).start()
        assert r.completion("ctx", "slow", cancel=token).stop_reason == "cancelled"
        r.completion("ctx", "next")
    first = backend.calls[-1][1][1]["content"]
    assert "was restarted" in first and "still holds your variables" not in first, first


@pytest.mark.parametrize("stop", ["cancel", "max_time_s"])
def test_final_var_of_a_block_cut_short_by_a_stop_is_no_answer(stop):
    """The reply's block sets the variable its text names with FINAL_VAR, and the run is stopped
    while the block runs: the child's variables are gone, and the run ends with the stop's reason,
    not with the variable's name as its answer."""
    reply = repl("import time\ntime.sleep(20)\nanswer = 42") + "FINAL_VAR(answer)\n"
    token = CancelToken()
    if stop == "cancel":
        threading.Timer(0.8, token.cancel).start()
    kwargs: dict[str, Any] = {"cancel": token} if stop == "cancel" else {"max_time_s": 1.0}
    result, _ = within(10, lambda: run("q", "ctx", model="m", backend=ScriptedBackend([reply]), **kwargs))
    expected = "cancelled" if stop == "cancel" else "max_time_s"
    assert result.stop_reason == expected and result.answer is None, result


def test_no_model_call_starts_once_the_run_is_stopped():
    """Sub-calls of child RLMs queued for one of the run tree's concurrency slots when the run is
    cancelled never start (each stopped call frees its slot for the next waiter, which must look
    at the run first)."""
    started: list[float] = []
    box: dict[str, float] = {}

    def script(model: str, messages: list[dict[str, Any]]) -> str:
        if len(messages) == 1:  # a sub-call
            started.append(time.monotonic())
            time.sleep(0.5)
            return "sub"
        if "Question: root" in messages[1]["content"]:
            return repl("print(rlm_query_batched(['child %d' % i for i in range(12)]))")
        return repl("print(llm_query_batched(['p%d' % i for i in range(10)]))")

    token = CancelToken()

    def cancel() -> None:
        box["at"] = time.monotonic()
        token.cancel()

    threading.Timer(1.2, cancel).start()
    result, _ = within(
        10,
        lambda: run_tree(script, 16, cancel=token),
    )
    assert result.stop_reason == "cancelled", result
    late = [t for t in started if t > box["at"] + 0.01]
    assert not late, f"{len(late)} model calls started after the cancel"


# ------------------------------------------------------------------ a server that answers a byte at a time
def trickled(text: str, pause_s: float = 0.05, release: threading.Event | None = None) -> Reply:
    """A valid 200 reply with *text*, sent a byte every *pause_s* seconds: each byte comes well
    within any per-read timeout, so the HTTP client's own timeout never trips (and the whole
    reply, some 400 bytes, takes seconds)."""
    return Reply(text, trickle_s=pause_s, release=release)


@pytest.mark.parametrize("how", ["model_kwargs", "default"])
def test_a_call_still_arriving_after_the_request_timeout_is_given_up(how, monkeypatch: pytest.MonkeyPatch):
    """The first root call's reply trickles in: it is given up about the request timeout after it
    started (``model_kwargs={"timeout": ...}``, else DEFAULT_REQUEST_TIMEOUT_S), counted as
    abandoned, its connection shut, and retried; the retry answers. The given-up reply is neither
    the answer nor in the usage."""
    from rlm import llm

    timeout = 1.0
    kwargs: dict[str, Any] = {}
    if how == "default":
        monkeypatch.setattr(llm, "DEFAULT_REQUEST_TIMEOUT_S", timeout)
    else:
        kwargs["model_kwargs"] = {"timeout": timeout}
    events: list[dict[str, Any]] = []
    release = threading.Event()
    replies = iter([trickled(repl("FINAL('late')"), release=release)])

    def reply(request: Any) -> Reply:
        late = next(replies, None)
        if late is not None:
            return late
        release.set()  # the given-up reply now arrives in full, during the retry's latency
        return Reply("FINAL(on time)", latency_s=0.5)

    with LLMServer(reply) as srv:
        result, _ = within(
            20,
            lambda: run(
                "q", "ctx", model="openai/m", api_base=srv.base_url, api_key=KEY, max_retries=1,
                retry_backoff_s=0.05, on_event=events.append, **kwargs,
            ),
        )  # fmt: skip
        first, second = srv.requests
    gave_up = second.received_at - first.received_at
    assert gave_up < 3 * timeout + 0.5, gave_up  # was: never, until the whole reply was in
    # The call given up had its connection shut before the retry went out: the late reply, which
    # the server tried to send in full during the retry, could not come (it once did, and was
    # dropped by the loop; it was read, on a thread left running, all the same).
    assert first.sent_at is None and second.sent_at is not None
    assert result.stop_reason == "final" and result.answer == "on time", result
    usage = result.usage["openai/m"]
    assert (usage.calls, usage.retries, usage.abandoned) == (1, 1, 1), usage
    assert (usage.input_tokens, usage.output_tokens) == second.usage
    retries = [e for e in events if e["type"] == "retry"]
    assert len(retries) == 1 and f"within {timeout:g} s (request timeout)" in retries[0]["error"], retries


def test_a_call_that_trickles_until_the_retries_run_out_is_a_provider_error():
    """Every reply trickles: after max_retries the first call's ProviderUnavailable is raised (the
    run's first call: rlm run exits 1 with its message), each attempt given up about the request
    timeout after it started."""
    from rlm.errors import ProviderUnavailable

    timeout = 0.5
    with LLMServer(trickled("FINAL(never)")) as srv:
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match=r"within 0\.5 s \(request timeout\)"):
            within(
                20,
                lambda: run(
                    "q", "ctx", model="openai/m", api_base=srv.base_url, api_key=KEY,
                    model_kwargs={"timeout": timeout}, max_retries=2, retry_backoff_s=0.05,
                ),
            )  # fmt: skip
        elapsed = time.monotonic() - started
        asked = srv.requests
    assert len(asked) == 3, asked
    spans = [b.received_at - a.received_at for a, b in itertools.pairwise(asked)]
    assert all(span < 3 * timeout + 0.5 for span in spans), spans
    assert elapsed < 20, elapsed


def test_rlm_run_request_timeout_gives_up_a_reply_that_trickles(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """``rlm run --request-timeout 1`` against a server whose first reply trickles (it held the run
    for the whole reply, minutes): that call is given up after about a second and retried."""
    from rlm.cli import main

    for name in [k for k in os.environ if k.endswith("_API_KEY")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setattr("sys.stdin", io.StringIO("ctx"))
    with LLMServer([trickled("FINAL(late)"), "FINAL(on time)"]) as srv:
        capsys.readouterr()
        code, _ = within(
            30,
            lambda: main(["run", "-m", "openai/m", "--api-base", srv.base_url, "--context", "-", "--query", "q",
                          "--request-timeout", "1", "--json"]),
        )  # fmt: skip
        first, second = srv.requests
    out = capsys.readouterr()
    assert code == 0, out.err
    payload = json.loads(out.out)
    assert payload["answer"] == "on time" and payload["usage"]["openai/m"]["abandoned"] == 1, payload
    assert second.received_at - first.received_at < 3 * 1.0 + 1.5  # the retry's backoff: at most 1.5 s
    assert "Traceback" not in out.err


# ------------------------------------------------------------------ the request timeout's start
class _SlowToLoad(ScriptedBackend):
    """A backend whose ``prepare()`` (a library's first import, for litellm) takes longer than its
    request timeout; each call then answers at once."""

    request_timeout = 0.2

    def __init__(self, script: Any) -> None:
        super().__init__(script)
        self.prepared = 0
        self.completes = 0

    def prepare(self) -> None:
        self.prepared += 1
        if self.prepared == 1:
            time.sleep(1.5)  # > request_timeout + REQUEST_GRACE_S

    def complete(self, model: str, messages: Any, **kwargs: Any) -> Any:
        self.completes += 1
        return super().complete(model, messages, **kwargs)


def test_the_request_timeout_starts_after_the_backend_is_prepared():
    """Loading the backend (litellm's import takes seconds) is not the request's time: a call whose
    backend loads for longer than the request timeout was given up, and the call then went out
    anyway beside its retry (sent twice, paid twice)."""
    backend = _SlowToLoad(["FINAL(loaded)"])
    result, _ = within(20, lambda: run("q", "ctx", model="m", backend=backend, max_retries=1, retry_backoff_s=0.05))
    assert result.answer == "loaded", result
    assert backend.prepared >= 1, "prepare() was not called"
    assert result.usage["m"].abandoned == 0 and backend.completes == 1, (result.usage, backend.completes)


def test_a_fresh_rlm_run_with_a_short_request_timeout_sends_its_first_call_once(tmp_path: Path):
    """``rlm run --request-timeout 1`` in a new process: litellm, loaded by the first call, takes
    seconds to load; the request timeout counts from the request, so the first call is sent once."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(OPENAI_API_KEY=KEY, HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"))
    with LLMServer(["FINAL(first try)", "FINAL(a second request)"]) as srv:
        done = subprocess.run(
            [sys.executable, "-m", "rlm", "run", "-m", "openai/m", "--api-base", srv.base_url, "--context", "-",
             "--query", "q", "--request-timeout", "1", "--json"],
            input="ctx", capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        sent = len(srv.requests)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["answer"] == "first try" and sent == 1, (payload["answer"], sent, done.stderr)
    assert payload["usage"]["openai/m"]["abandoned"] == 0, payload["usage"]


# ------------------------------------------------------------------ a server that streams without end
def _no_call_reads_on(srv: LLMServer, seconds: float = 5.0) -> None:
    """Within *seconds*, every model call made against *srv* has ended (the threads of calls
    reading from it are gone) and the client of every endless body has gone."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(r.gone_at is not None for r in srv.requests):
            return
        time.sleep(0.05)
    streamed = [(r.streamed, r.gone_at) for r in srv.requests]
    calls = [t for t in threading.enumerate() if t.name == "rlm-model-call"]
    raise AssertionError(f"still reading {seconds:g} s later: {calls}, {streamed}")


def test_a_body_that_never_ends_is_cut_off_and_nothing_reads_on():
    """A 200 whose chunked body never ends, sent as fast as the host reads: each attempt read it
    until the request timeout (growing the host's memory by hundreds of MB a second), and the
    attempts the loop gave up read on in their threads after the run had returned, for ever. A
    body over MAX_RESPONSE_BYTES is now cut off, and nothing reads on."""
    from rlm import llm
    from rlm.errors import ProviderUnavailable

    with LLMServer(Reply(endless_s=0)) as srv:
        with pytest.raises(ProviderUnavailable, match="over 32 MiB"):
            within(
                60,
                lambda: run(
                    "q", "ctx", model="openai/m", api_base=srv.base_url, api_key=KEY,
                    model_kwargs={"timeout": 5}, max_retries=1, retry_backoff_s=0.05,
                ),
            )  # fmt: skip
        _no_call_reads_on(srv)
        asked = srv.requests
    assert len(asked) == 2 and all(r.streamed < 2 * llm.MAX_RESPONSE_BYTES for r in asked), asked
    assert all(r.headers.get("accept-encoding") == "identity" for r in asked), asked[0].headers


@pytest.mark.parametrize("stop", ["cancel", "max_time_s", "request_timeout"])
def test_a_call_given_up_stops_reading_its_body(stop):
    """A body that never ends, a chunk every 50 ms (well under the size cap): the loop gives the
    call up (a cancel, the time budget, the request timeout counted from the call's start), and
    its thread now stops reading too, its connection shut, instead of reading on for ever."""
    from rlm.errors import ProviderUnavailable

    token = CancelToken()
    kwargs: dict[str, Any] = {"max_retries": 0}
    if stop == "cancel":
        threading.Timer(1.0, token.cancel).start()
        kwargs["cancel"] = token
    elif stop == "max_time_s":
        kwargs["max_time_s"] = 1.5
    else:
        kwargs["model_kwargs"] = {"timeout": 1.0}
    with LLMServer(Reply(endless_s=0.05)) as srv:
        go = lambda: run("q", "ctx", model="openai/m", api_base=srv.base_url, api_key=KEY, **kwargs)
        if stop == "request_timeout":
            with pytest.raises(ProviderUnavailable, match=r"within 1 s \(request timeout\)"):
                within(30, go)
        else:
            result, _ = within(30, go)
            assert result.stop_reason == ("cancelled" if stop == "cancel" else "max_time_s"), result
            assert result.usage["openai/m"].abandoned == 1, result.usage
        _no_call_reads_on(srv)


def test_a_call_given_up_before_its_answer_begins_ends_at_once():
    """A server that floods ``102 Processing`` lines and never answers: the HTTP client reads them
    at full speed, every read well within its timeout, and the call given up by the loop (its
    request timeout) went on reading them in its thread for ever, a CPU busy. Its new
    connection is shut, and the thread ends."""
    from rlm.errors import ProviderUnavailable

    with LLMServer(Reply(flood_1xx=True)) as srv:
        with pytest.raises(ProviderUnavailable, match=r"within 1 s \(request timeout\)"):
            within(
                30,
                lambda: run(
                    "q", "ctx", model="openai/m", api_base=srv.base_url, api_key=KEY,
                    model_kwargs={"timeout": 1.0}, max_retries=0,
                ),
            )  # fmt: skip
        _no_call_reads_on(srv)


def test_a_compressed_body_is_refused_unread():
    """A gzip bomb: a few hundred KB that unpack to hundreds of MB (the host's memory grew by
    gigabytes for a few MB). Calls ask for an uncompressed body, and one compressed anyway is
    refused before it is unpacked."""
    import zlib

    from rlm.errors import ProviderUnavailable

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    body = packer.compress(b'{"choices": [{"message": {"role": "assistant", "content": "FINAL(a')
    body += b"".join(packer.compress(b" " * 2**20) for _ in range(64)) + packer.compress(b')"}}]}')
    body += packer.flush()
    assert len(body) < 2**20
    with LLMServer(Reply(raw=body, headers=(("Content-Encoding", "gzip"),))) as srv:
        with pytest.raises(ProviderUnavailable, match="a compressed response"):
            within(60, lambda: run("q", "ctx", model="openai/m", api_base=srv.base_url, api_key=KEY, max_retries=0))
        assert srv.requests[0].headers.get("accept-encoding") == "identity"


def test_a_call_given_up_while_its_body_stalls_ends_at_once():
    """The body stops coming mid-response (the server waits for ever, as a stalled one does): a
    call given up then (here by a cancel) was blocked in its read until the HTTP client's own
    timeout (600 s by default). Its connection is shut, so its thread ends at once."""
    before = set(threading.enumerate())
    token = CancelToken()
    threading.Timer(1.0, token.cancel).start()
    with LLMServer(Reply(endless_s=3600)) as srv:
        result, _ = within(
            30, lambda: run("q", "ctx", model="openai/m", api_base=srv.base_url, api_key=KEY, cancel=token)
        )
        assert result.stop_reason == "cancelled" and result.usage["openai/m"].abandoned == 1, result
        deadline = time.monotonic() + 5
        calls = [t for t in set(threading.enumerate()) - before if t.name == "rlm-model-call"]
        while any(t.is_alive() for t in calls) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t.is_alive() for t in calls), "the call given up still waits for its body"


# ------------------------------------------------------------------ model calls in flight at exit
EXIT_SCRIPT = r"""
import sys, time
from rlm import CancelToken, ScriptedBackend, run
from rlm.llm import CALL_STOP

token = CancelToken()

class WindsDown(ScriptedBackend):
    def complete(self, model, messages, **kwargs):
        stop = CALL_STOP.get()
        token.cancel()  # the run gives this call up once it is under way (a time budget could
        while not stop.stopped:  # run out before it started, on a loaded machine: no call then)
            time.sleep(0.01)
        time.sleep(0.5)  # litellm maps the error of a call given up: its first imports, on a loaded machine
        with open(sys.argv[1], "w") as f:
            f.write("ended")
        raise RuntimeError("given up")

result = run("q", "ctx", model="m", backend=WindsDown([]), cancel=token)
print(result.stop_reason)
"""


def test_a_call_given_up_ends_before_the_interpreter_exits(tmp_path: Path):
    """A program that exits right after a run whose model call was given up (a time budget, a
    cancel, Ctrl-C): the call's daemon thread, still winding down (litellm maps the error of a
    call whose connection was shut, importing modules on the way), was frozen at exit, holding
    the import lock, and the interpreter's last imports (a litellm client's ``__del__``) waited
    for it for ever: ``rlm run`` hung after Ctrl-C. At exit, each call still in flight is now told
    to stop and waited for (at most STOP_WAIT_S)."""
    mark = tmp_path / "ended"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(mark)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "cancelled", done.stdout + done.stderr
    assert mark.exists(), "the process exited while the call given up was still winding down"
    assert time.monotonic() - started < 30


# A program that runs against a server, then exits. Its own exit handler, registered before rlm
# was imported, runs after rlm's: it counts the sockets still open to the server.
CLIENT_AT_EXIT = r"""
import atexit, gc, socket, sys
base, port = sys.argv[1], int(sys.argv[2])

def to_server():
    gc.collect()
    open_ = 0
    for obj in gc.get_objects():
        if isinstance(obj, socket.socket) and obj.family == socket.AF_INET and obj.fileno() >= 0:
            try:
                open_ += obj.getpeername()[1] == port
            except OSError:  # shut, not closed
                open_ += 1
    return open_

atexit.register(lambda: print("open at exit", to_server(), flush=True))
from rlm import run
print("answer", run("q", "ctx", model="openai/m", api_base=base, api_key="k", max_retries=0).answer, flush=True)
"""


def test_the_connections_kept_alive_to_the_model_are_closed_at_exit(tmp_path: Path):
    """rlm gives litellm an HTTP client of its own (its guarded calls) and never closed it: the
    connection it kept alive to the server was left to the interpreter's last collection, which
    warned "ResourceWarning: unclosed <socket.socket ...>" (``python -X dev``; with ``-W error``
    an "Exception ignored" line). At exit, once no call is in flight, the client is closed."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent), TMPDIR=str(tmp_path))
    code = repl('print(llm_query("sub"))')
    with LLMServer(lambda req: "sub" if req.last_user == "sub" else code if len(req.messages) <= 2 else "FINAL(1)") as srv:
        done = subprocess.run(
            [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", CLIENT_AT_EXIT, srv.base_url, str(srv.port)],
            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "answer 1\nopen at exit 0\n", done.stdout + done.stderr
    assert "unclosed <socket" not in done.stderr, done.stderr
