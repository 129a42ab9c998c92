"""Issue 12 features through litellm's real HTTP path: retries against the OpenAI-compatible
loopback server (tests/llm_server.py), prompt caching against an Anthropic Messages API one
(tests/anthropic_server.py)."""

from __future__ import annotations

from typing import Any

import pytest

from rlm import run
from rlm.errors import ModelError
from tests.anthropic_server import AnthropicServer, MessagesRequest
from tests.llm_server import LLMServer, Reply


def test_429_and_503_are_retried_honouring_retry_after_then_the_answer_comes():
    events: list[dict[str, Any]] = []
    replies = [
        Reply("slow down", status=429, error_type="rate_limit_error", headers=(("Retry-After", "1"),)),
        Reply("overloaded", status=503, error_type="server_error"),
        Reply("```repl\nFINAL('after retries')\n```"),
    ]
    with LLMServer(replies) as srv:
        r = run("q", "ctx", model="openai/gpt-4o-mini", api_base=srv.base_url, api_key="k",
                retry_backoff_s=0.05, on_event=events.append)  # fmt: skip
        requests = srv.requests
    assert r.answer == "after retries" and r.stop_reason == "final"
    assert len(requests) == 3  # no retry hidden in the client: every attempt is one of ours
    usage = r.usage["openai/gpt-4o-mini"]
    assert (usage.calls, usage.retries) == (1, 2)
    assert requests[1].received_at - requests[0].received_at >= 0.95  # Retry-After: 1
    assert next(e["delay_s"] for e in events if e["type"] == "retry") == 1.0


def test_a_client_error_is_not_retried():
    with LLMServer(Reply("bad request", status=400)) as srv:
        with pytest.raises(ModelError):
            run("q", "ctx", model="openai/gpt-4o-mini", api_base=srv.base_url, api_key="k")
        assert len(srv.requests) == 1


# ------------------------------------------------------------ prompt caching

CLAUDE = "anthropic/claude-sonnet-4-5"
CLAUDE_TURNS = [
    "Looking first.\n```repl\nprint(len(context))\n```",
    "```repl\nhalf = llm_query('summarise: ' + context[:20])\nprint(half)\n```",
    "```repl\nFINAL(half)\n```",
]


def claude(request: MessagesRequest) -> str:
    if request.body.get("system") is None:  # a sub-call: one user message
        return "a summary"
    return CLAUDE_TURNS[min(request.turns, len(CLAUDE_TURNS) - 1)]


def test_anthropic_cache_markers_cover_the_stable_prefix_and_cached_tokens_are_priced():
    with AnthropicServer(claude) as srv:
        r = run("q", "some context " * 50, model=CLAUDE, api_base=srv.base_url, api_key="sk-ant-test")
        requests = srv.requests
    assert r.answer == "a summary" and r.iterations == 3
    root = [q for q in requests if q.body.get("system") is not None]
    subs = [q for q in requests if q.body.get("system") is None]
    assert len(root) == 3 and len(subs) == 1
    # the system prompt and the message before the newest one are marked; the newest one never is
    assert root[0].breakpoints == ["system[0]"]
    for q in root[1:]:
        last = len(q.body["messages"]) - 1
        assert q.breakpoints == ["system[0]", f"messages[{last - 1}].assistant[0]"]
    assert subs[0].breakpoints == []  # a one-off sub-call is not worth a cache write
    # turn 2 reads the system prompt from the cache, turn 3 also turn 1
    assert [q.usage["cache_read_input_tokens"] > 0 for q in root] == [False, True, True]
    assert root[2].usage["cache_read_input_tokens"] > root[1].usage["cache_read_input_tokens"]
    usage = r.usage[CLAUDE]
    assert usage.cache_read_tokens == sum(q.usage["cache_read_input_tokens"] for q in requests)
    assert usage.cache_write_tokens == sum(q.usage["cache_creation_input_tokens"] for q in requests)
    assert usage.input_tokens == sum(
        q.usage["input_tokens"] + q.usage["cache_read_input_tokens"] + q.usage["cache_creation_input_tokens"]
        for q in requests
    )
    import litellm  # after the run: rlm.llm has pointed it at its bundled price map

    price = litellm.model_cost["claude-sonnet-4-5"]
    expected = sum(
        q.usage["input_tokens"] * price["input_cost_per_token"]
        + q.usage["cache_creation_input_tokens"] * price["cache_creation_input_token_cost"]
        + q.usage["cache_read_input_tokens"] * price["cache_read_input_token_cost"]
        + q.usage["output_tokens"] * price["output_cost_per_token"]
        for q in requests
    )
    assert r.cost_usd == pytest.approx(expected, rel=1e-6)
    uncached = sum(
        (
            q.usage["input_tokens"]
            + q.usage["cache_read_input_tokens"]
            + q.usage["cache_creation_input_tokens"]
        )
        * price["input_cost_per_token"]
        + q.usage["output_tokens"] * price["output_cost_per_token"]
        for q in requests
    )
    assert r.cost_usd != pytest.approx(uncached, rel=1e-6)


def test_no_cache_markers_for_providers_without_them_or_when_turned_off():
    with LLMServer("```repl\nFINAL('x')\n```") as srv:
        run("q", "ctx", model="openai/gpt-4o-mini", api_base=srv.base_url, api_key="k")
        assert isinstance(srv.requests[0].messages[0]["content"], str)
    with AnthropicServer("```repl\nx = 1\n```") as srv:
        run(
            "q",
            "ctx",
            model=CLAUDE,
            api_base=srv.base_url,
            api_key="k",
            prompt_caching=False,
            max_iterations=2,
        )
        assert all(q.breakpoints == [] for q in srv.requests) and len(srv.requests) == 3
