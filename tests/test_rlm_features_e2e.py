"""Issue 12 features through litellm's real HTTP path: retries against the OpenAI-compatible
loopback server (tests/llm_server.py), prompt caching against an Anthropic Messages API one
(tests/anthropic_server.py)."""

from __future__ import annotations

from typing import Any

import pytest

from rlm import run
from rlm.errors import ModelError
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
