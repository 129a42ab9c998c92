"""Budgets of a run whose calls run at once: a batch, child RLMs, several runs of one process.

What a run spent must be in its ``usage``, ``cost_usd`` and trajectory whatever stopped it, and
no more than that. Real sandboxes; the model is the loopback server (tests/llm_server.py), whose
token counts are known, with ``openai/gpt-4o`` (priced by litellm) as the sub-model.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from rlm import RLM
from tests.llm_server import ChatRequest, LLMServer, Reply

KEY = "sk-test-budget-concurrency"


@pytest.fixture(scope="module", autouse=True)
def litellm_imported() -> None:
    """Import litellm before any run starts: its first import takes seconds."""
    from rlm import llm

    llm._lib()


def repl(code: str) -> str:
    return f"```repl\n{code}\n```\n"


def root_then_final(code: str, slow_s: float = 0.0):  # type: ignore[no-untyped-def]
    """The root's first turn runs *code*, its second answers; a sub-call whose prompt is "slow"
    is answered after *slow_s* seconds, any other at once."""

    def reply(request: ChatRequest) -> str | Reply:
        if request.model == "root":
            turn = sum(1 for m in request.messages if m.get("role") == "assistant")
            return repl(code) if turn == 0 else "FINAL(done)"
        if request.last_user == "slow":
            return Reply("slow answer", latency_s=slow_s)
        return "fast answer"

    return reply


def test_calls_in_flight_when_the_cost_budget_runs_out_are_waited_for_and_counted():
    """The first answer of a batch uses up the cost budget while three calls are under way: they
    were let through before it ran out, the server answers (and bills) them, so they count, as
    README says ("calls already in flight when one runs out ... are still counted"). They were
    given up instead: ``usage`` showed 1 call and 3 abandoned for the 4 the server answered."""
    code = "r = llm_query_batched(['fast'] + ['slow'] * 3)\nprint(r)"
    arrived: list[str] = []
    all_four = threading.Event()
    scripted = root_then_final(code, slow_s=2.0)

    def reply(request: ChatRequest) -> str | Reply:
        if request.model != "root":  # the first answer waits until all four calls are under way
            arrived.append(request.last_user)  # (on a loaded machine the fourth could start late)
            if len(arrived) == 4:
                all_four.set()
            if request.last_user == "fast":
                all_four.wait(30)
        return scripted(request)

    with LLMServer(reply) as srv:
        r = RLM(
            "openai/root", sub_model="openai/gpt-4o", api_base=srv.base_url, api_key=KEY,
            max_cost_usd=1e-9, max_concurrency=4, max_iterations=3,
        ).completion("ctx", "q")  # fmt: skip
        served = srv.usage_totals("gpt-4o")
    sub = r.usage["openai/gpt-4o"]
    assert r.stop_reason == "max_cost_usd", r.stop_reason
    assert (sub.calls, sub.abandoned) == (4, 0), sub
    assert (sub.input_tokens, sub.output_tokens) == served
    assert sub.cost_usd is not None and r.priced_cost_usd == pytest.approx(sub.cost_usd)
    calls = r.history[0]["code_blocks"][0]["result"]["rlm_calls"]
    assert [c["response"] for c in calls] == ["fast answer"] + ["slow answer"] * 3
    assert sum(c["prompt_tokens"] for c in calls) == served[0]


# ------------------------------------------------------------------ a server's usage
def without_usage(text: str) -> dict[str, object]:
    """A chat completion body with no ``usage`` (some OpenAI-compatible servers send none)."""
    message = {"role": "assistant", "content": text}
    return {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip


@pytest.mark.parametrize("budget", [{"max_tokens": 1000}, {"max_cost_usd": 1e-9}], ids=["tokens", "cost"])
def test_a_server_that_reports_no_usage_cannot_make_calls_free(budget: dict[str, float]):
    """Without ``usage`` litellm reports 0 tokens and a cost of $0: every call was free, and neither
    budget ever stopped the run (8 turns and the closing call, 0 tokens). The counts are litellm's
    estimate now, and the cost their price: the budget stops the run."""
    code = repl("print(llm_query('how many words are in this prompt'))")

    def reply(request: ChatRequest) -> Reply:
        return Reply(body=without_usage(code if request.model == "root" else "seven"))

    with LLMServer(reply) as srv:
        r = RLM(
            "openai/root", sub_model="openai/gpt-4o", api_base=srv.base_url, api_key=KEY,
            max_iterations=8, **budget,
        ).completion("ctx", "q")  # fmt: skip
    assert r.stop_reason == next(iter(budget)) and r.iterations < 8, (r.stop_reason, r.iterations)
    root, sub = r.usage["openai/root"], r.usage["openai/gpt-4o"]
    assert root.input_tokens > 600 and root.output_tokens > 0, root  # the system prompt alone is more
    assert sub.input_tokens > 0 and sub.output_tokens > 0, sub
    import litellm

    prices = litellm.cost_per_token(
        model="openai/gpt-4o", prompt_tokens=sub.input_tokens, completion_tokens=sub.output_tokens
    )
    assert sub.cost_usd == pytest.approx(sum(prices)) and sub.cost_usd > 0


# ------------------------------------------------------------------ counters
def test_sub_calls_counts_the_calls_made_not_those_refused_while_they_waited_for_a_slot():
    """Two child RLMs each batch two slow sub-calls: four calls for two slots (max_concurrency=2).
    The first answer uses up the cost budget; the two calls still waiting for a slot are refused
    there, never sent. ``sub_calls`` counted them anyway (6 for the 4 calls the server got)."""
    top = repl("print(rlm_query_batched(['child 0', 'child 1']))")
    child = repl("print(llm_query_batched(['slow', 'slow']))")

    def reply(request: ChatRequest) -> str | Reply:
        if request.model == "gpt-4o":
            return Reply("slow answer", latency_s=1.0)
        turn = sum(1 for m in request.messages if m.get("role") == "assistant")
        code = child if "Question: child" in str(request.messages[1].get("content")) else top
        return code if turn == 0 else "FINAL(done)"

    with LLMServer(reply) as srv:
        r = RLM(
            "openai/root", sub_model="openai/gpt-4o", api_base=srv.base_url, api_key=KEY,
            max_depth=2, max_cost_usd=1e-9, max_concurrency=2, max_iterations=3,
        ).completion("ctx", "top")  # fmt: skip
        requests = srv.requests
    made = [q for q in requests if "Question: top" not in json.dumps(q.messages)]  # the top run's: no sub-call
    assert r.stop_reason == "max_cost_usd", r.stop_reason
    assert r.sub_calls == len(made), (r.sub_calls, [q.model for q in made])
    assert r.usage["openai/gpt-4o"].calls == sum(1 for q in made if q.model == "gpt-4o")


def asked(request: ChatRequest) -> str | None:
    """The question of the run that made *request* (None for a sub-call)."""
    first = str(request.messages[1].get("content")) if len(request.messages) > 1 else ""
    return first.split("\n", 1)[0].removeprefix("Question: ") if first.startswith("Question: ") else None


def test_a_child_rlm_reports_its_own_usage_not_the_trees(tmp_path: Path):
    """Two child RLMs run at once, each with one sub-call. A child's ``.result.json`` and
    ``run_end`` event gave the whole tree's totals as they stood when it ended: its parent's
    calls and its sibling's were charged to it (a child of 1,385 input tokens reported 2,749 and
    3,450). Each counts its own calls now, and the root's the whole tree's, which the children's
    add up to with the root's own calls."""
    top = repl("print(rlm_query_batched(['child 0', 'child 1']))")
    child = repl("print(llm_query('leaf of ' + context))")

    def reply(request: ChatRequest) -> str:
        if request.model == "gpt-4o":
            return "leaf answer"
        turn = sum(1 for m in request.messages if m.get("role") == "assistant")
        code = child if asked(request) != "top" else top
        return code if turn == 0 else "FINAL(done)"

    ends: dict[str, dict[str, Any]] = {}
    with LLMServer(reply) as srv:
        r = RLM(
            "openai/root", sub_model="openai/gpt-4o", api_base=srv.base_url, api_key=KEY, max_depth=2,
            max_iterations=3, log_dir=tmp_path,
            on_event=lambda e: ends.update({e["run_id"]: e}) if e["type"] == "run_end" else None,
        ).completion("ctx", "top")  # fmt: skip
        requests = srv.requests
    assert r.answer == "done" and r.sub_calls == 6, r  # 2 turns and 1 sub-call per child
    children = [json.loads(p.read_text()) for p in tmp_path.glob("*.result.json") if p.stem[:-7] != r.run_id]
    assert len(children) == 2
    own_in = own_out = 0
    for result in children:
        name = json.loads(Path(result["log_path"]).read_text().split("\n")[0])["query"]  # its metadata
        mine = [q for q in requests if asked(q) == name or q.last_user == f"leaf of {name}"]
        assert len(mine) == 3, [q.model for q in mine]  # its two turns and its sub-call
        served = (sum(q.usage[0] for q in mine), sum(q.usage[1] for q in mine))
        assert (result["total_input_tokens"], result["total_output_tokens"]) == served, (name, result)
        assert result["sub_calls"] == 1 and result["usage"]["openai/gpt-4o"]["calls"] == 1, result
        assert result["usage"]["openai/root"]["calls"] == 2, result
        end = ends[result["run_id"]]
        assert (end["input_tokens"], end["output_tokens"], end["sub_calls"]) == (*served, 1), end
        own_in, own_out = own_in + served[0], own_out + served[1]
    roots = [q for q in requests if asked(q) == "top"]
    own_in, own_out = own_in + sum(q.usage[0] for q in roots), own_out + sum(q.usage[1] for q in roots)
    assert (r.total_input_tokens, r.total_output_tokens) == (own_in, own_out) == srv.usage_totals()


@pytest.mark.parametrize("header, priced", [("0", False), ("-5", True), ("nan", True), ("0.5", False)])
def test_a_response_cost_header_prices_the_call_as_readme_says(header: str, priced: bool):
    """litellm takes a response's ``x-litellm-response-cost`` (a LiteLLM proxy's) as the call's
    cost when it is a finite number of at least 0, else prices the reported tokens: README says
    so, since a server can move a run under (``0``) or over its cost budget with it."""
    import litellm

    from rlm import llm

    with LLMServer(Reply("two words", headers=(("x-litellm-response-cost", header),))) as srv:
        c = llm.complete("openai/gpt-4o", [{"role": "user", "content": "a b c"}], api_base=srv.base_url, api_key=KEY)
        served = srv.usage_totals()
    prices = litellm.cost_per_token(model="openai/gpt-4o", prompt_tokens=served[0], completion_tokens=served[1])
    assert (c.input_tokens, c.output_tokens) == served
    assert c.cost_usd == pytest.approx(sum(prices) if priced else float(header)), c
