"""The RLM loop driven by a scripted model (rlm.backend.ScriptedBackend) over real sandboxes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlm import RLM, ScriptedBackend, run
from rlm.errors import AuthenticationError, ConfigurationError, ModelError
from rlm.result import RLMResult
from tests.conftest import policy_with


def repl(code: str, text: str = "") -> str:
    return f"{text}\n```repl\n{code}\n```\n"


def go(script, context="some context", query="q?", **kw) -> RLMResult:
    backend = kw.pop("backend", None) or ScriptedBackend(script)
    kw.setdefault("sub_model", "sub")
    return run(query, context, model="root", backend=backend, **kw)


def test_answer_by_final_in_code_and_counters(tmp_path: Path):
    backend = ScriptedBackend(
        {
            "root": [repl("n = len(context)\nprint(n)"), repl("a = llm_query('hello')\nFINAL(f'{n}:{a}')")],
            "sub": ["pong"],
        }
    )
    r = run("len?", "abcdef", model="root", sub_model="sub", backend=backend, log_dir=tmp_path)
    assert r.answer == "6:pong" and r.stop_reason == "final"
    assert (r.iterations, r.code_executions, r.sub_calls) == (2, 2, 1)
    assert r.usage["root"].calls == 2 and r.usage["sub"].calls == 1
    assert r.total_input_tokens == r.usage["root"].input_tokens + r.usage["sub"].input_tokens
    assert r.cost_usd is None  # the scripted model has no price
    assert RLMResult.model_validate_json(r.model_dump_json()) == r


def test_the_root_model_never_sees_the_context_beyond_the_preview():
    secret = "NEEDLE-" + "x" * 5000 + "-HIDDEN"
    backend = ScriptedBackend([repl("FINAL('done')")])
    go(None, context=secret, backend=backend)
    sent = json.dumps(backend.calls[0][1])
    assert "NEEDLE-" in sent and "-HIDDEN" not in sent
    assert "5,014 characters" in sent


def test_list_and_dict_contexts_are_described_by_shape():
    backend = ScriptedBackend([repl("FINAL(len(context))")] * 2)
    r = go(None, context=["aa", "bbbb", "c"], backend=backend)
    assert r.answer == "3"
    assert (
        "list of 3 items" in backend.calls[0][1][1]["content"]
        and "[2, 4, 1]" in backend.calls[0][1][1]["content"]
    )
    r = go(None, context={"k1": "vvv", "k2": [1, 2]}, backend=backend)
    assert r.answer == "2" and "dict of 2 items" in backend.calls[1][1][1]["content"]
    with pytest.raises(ConfigurationError):
        go([], context=42)


def test_final_var_by_name_by_value_and_in_text():
    assert go([repl("total = 6 * 7\nFINAL_VAR('total')")]).answer == "42"
    assert go([repl("FINAL_VAR('not a variable name')")]).answer == "not a variable name"
    assert go([repl("FINAL_VAR([1, 2])")]).answer == "[1, 2]"
    # text FINAL_VAR is resolved after the reply's code ran
    assert go([repl("total = 5") + "FINAL_VAR(total)"]).answer == "5"
    assert go(["I know it.\nFINAL(The answer (final) is 3)\n"]).answer == "The answer (final) is 3"
    assert go([repl("s = {1, 2}\nFINAL_VAR('s')")]).answer == "{1, 2}"  # not plain data: its str()


def test_final_var_under_restricted_python():
    strict = policy_with({"audit.enabled": False}, base="strict")
    assert go([repl("total = 40 + 2\nFINAL_VAR('total')")], policy=strict).answer == "42"
    assert go(["```repl\nx = 'hi'\n```\nFINAL_VAR(x)"], policy=strict).answer == "hi"


def test_errors_are_shown_to_the_model_with_output_first():
    backend = ScriptedBackend([repl("print('before')\n1/0"), repl("FINAL('ok')")])
    r = go(None, backend=backend)
    assert r.answer == "ok"
    feedback = backend.calls[1][1][-1]["content"]
    assert feedback.index("before") < feedback.index("ZeroDivisionError")
    assert "Traceback" in feedback and "sandbox/" not in feedback


def test_long_output_keeps_head_and_tail():
    backend = ScriptedBackend([repl("print('HEAD' + 'x' * 50000 + 'TAIL')"), repl("FINAL(1)")])
    go(None, backend=backend, max_output_chars=1000)
    feedback = backend.calls[1][1][-1]["content"]
    assert "HEAD" in feedback and "TAIL" in feedback and "characters omitted" in feedback
    assert len(feedback) < 1500


def test_out_of_iterations_asks_for_the_best_answer():
    r = go([repl("x = 1"), repl("x = 2"), "my best guess: 7"], max_iterations=2)
    assert (r.answer, r.stop_reason, r.iterations) == ("my best guess: 7", "max_iterations", 2)
    assert r.usage["root"].calls == 3  # the closing call counts in usage, not in iterations
    r = go([repl("x = 1"), "   "], max_iterations=1)
    assert r.answer is None and r.stop_reason == "max_iterations"


def test_reply_without_code_gets_a_nudge():
    backend = ScriptedBackend(["hmm, let me think", "FINAL(done)"])
    assert go(None, backend=backend).answer == "done"
    assert "no ```repl block" in backend.calls[1][1][-1]["content"]


def test_batch_failures_are_per_prompt_strings():
    def respond(model, messages):
        if model == "root":
            return repl(
                "r = llm_query_batched(['a', 'boom', 'c'])\nFINAL(json.dumps(r))".replace(
                    "FINAL", "import json\nFINAL"
                )
            )
        if messages[-1]["content"] == "boom":
            raise ModelError("upstream exploded", model=model)
        return messages[-1]["content"].upper()

    r = go(None, backend=ScriptedBackend(respond))
    answers = json.loads(r.answer)
    assert answers[0] == "A" and answers[2] == "C" and answers[1].startswith("Error: ModelError")
    assert r.sub_calls == 3


@pytest.mark.parametrize("latency_s", [0.0, 0.2])
def test_sub_call_budget_stops_the_run(latency_s):
    """Out of sub-calls, the run ends with the root's closing call, which is not given up as the
    run is "stopped": max_sub_calls refuses new sub-calls only (a model slower than the loop's
    50 ms look at the budgets lost its answer)."""
    code = "out = []\nfor i in range(10):\n    out.append(llm_query(str(i)))"
    script = {"root": [repl(code), "best effort"], "sub": ["s"] * 5}
    r = go(None, backend=ScriptedBackend(script, latency_s=latency_s), max_sub_calls=3)
    assert r.stop_reason == "max_sub_calls" and r.sub_calls == 3
    assert r.answer == "best effort" and r.iterations == 1


def test_token_and_cost_budgets_stop_the_run():
    long_reply = repl("x = 1", "word " * 50)
    r = go([long_reply] * 10, max_tokens=500)
    assert r.stop_reason == "max_tokens" and r.answer is None and r.iterations < 10
    priced = ScriptedBackend([long_reply] * 10, price_per_token=1e-4)
    r = go(None, backend=priced, max_cost_usd=0.1)
    assert r.stop_reason == "max_cost_usd" and r.cost_usd is not None and r.iterations < 10


def test_time_budget_stops_the_run():
    r = go(None, backend=ScriptedBackend([repl("x = 1")] * 50, latency_s=0.05), max_time_s=0.3)
    assert r.stop_reason == "max_time_s" and r.iterations < 50


def test_time_budget_stops_a_block_and_a_loop_of_tool_calls():
    """A block that sleeps 20 s, and one calling a 1 s tool 15 times, under max_time_s=2: the
    run stops at the budget (the block ran 20 s, the tool loop 15 s and past the policy's wall
    limit, which does not count host functions)."""
    import time as clock

    def slow() -> int:
        clock.sleep(1)
        return 1

    for code in ("import time\ntime.sleep(20)", "total = 0\nfor _ in range(15):\n    total += slow()"):
        t0 = clock.monotonic()
        r = go([repl(code), repl("FINAL(1)")], max_time_s=2, tools={"slow": slow})
        assert r.stop_reason == "max_time_s" and r.answer is None, r
        assert clock.monotonic() - t0 < 10


def test_depth_two_recursion(tmp_path: Path):
    def respond(model, messages):
        first = messages[1]["content"] if len(messages) > 1 else messages[0]["content"]
        if model == "sub":
            return "plain:" + messages[0]["content"][:5]
        if "Question: outer" in first:
            return repl(
                "a = rlm_query('inner task', context='abc')\nb = rlm_query_batched(['inner task', 'inner task'], ['de', 'fgh'])\nFINAL(f'{a}|{b}')"
            )
        # a child RLM (depth 1): its own sandbox holds the given context; it cannot recurse further
        return repl("c = rlm_query('leaf', context='zz')\nFINAL(f'{len(context)}/{c}')")

    r = run(
        "outer",
        "root ctx",
        model="root",
        sub_model="sub",
        max_depth=2,
        backend=ScriptedBackend(respond),
        log_dir=tmp_path,
    )
    assert r.answer == "3/plain:leaf\n|['2/plain:leaf\\n', '3/plain:leaf\\n']"
    # 3 children x (1 turn + 1 plain sub-call) = 6 sub-calls; the root's own turn is not one
    assert r.sub_calls == 6 and r.iterations == 1
    trajectories = sorted(tmp_path.glob("*.jsonl"))
    assert len(trajectories) == 4
    root_lines = [json.loads(line) for line in Path(r.log_path).read_text().splitlines()]
    calls = root_lines[1]["code_blocks"][0]["result"]["rlm_calls"]
    assert {c["type"] for c in calls} == {"rlm"} and all(Path(c["trajectory"]).exists() for c in calls)


def test_depth_one_rlm_query_is_a_plain_sub_call():
    backend = ScriptedBackend({"root": [repl("FINAL(rlm_query('q', context='ctx'))")], "sub": ["plain"]})
    r = run("q", "c", model="root", sub_model="sub", backend=backend)
    assert r.answer == "plain" and backend.calls[1][1][0]["content"] == "q\n\nctx"


def test_a_sandbox_crash_mid_run_reloads_context_and_tells_the_model(tmp_path: Path):
    policy = policy_with({"limits.cpu_seconds": 1, "limits.wall_seconds": 5})
    backend = ScriptedBackend(
        [
            repl("keep = 'mine'\nwhile True:\n    pass"),
            repl("print(len(context), 'keep' in dir())"),
            repl("FINAL('survived')"),
        ]
    )
    r = run("q", "abcd", model="root", backend=backend, policy=policy, log_dir=tmp_path)
    assert r.answer == "survived" and r.code_executions == 3
    after_crash = backend.calls[1][1][-1]["content"]
    assert "CPU" in after_crash and "restarted" in after_crash and "`context` was loaded again" in after_crash
    assert "4 False" in backend.calls[2][1][-1]["content"]


def test_trajectory_shape(tmp_path: Path):
    r = go([repl("print(1)"), repl("FINAL(2)")], log_dir=tmp_path)
    lines = [json.loads(line) for line in Path(r.log_path).read_text().splitlines()]
    assert [x["type"] for x in lines] == ["metadata", "iteration", "iteration"]
    outcome = json.loads(Path(r.log_path).with_name(f"{r.run_id}.result.json").read_text())
    assert outcome["answer"] == "2" and outcome["stop_reason"] == "final" and "history" not in outcome
    meta, it = lines[0], lines[1]
    assert meta["root_model"] == "root" and meta["max_iterations"] == 20 and "backend_kwargs" in meta
    assert (
        it["iteration"] == 1
        and it["prompt"][0]["role"] == "system"
        and it["response"].startswith("\n```repl")
    )
    block = it["code_blocks"][0]
    assert block["code"] == "print(1)"
    assert set(block["result"]) == {"stdout", "stderr", "locals", "execution_time", "rlm_calls"}
    assert lines[2]["final_answer"] == "2"
    assert Path(r.audit_log_path).exists() and Path(r.audit_log_path).name == f"{r.run_id}.audit.log"


def test_model_errors():
    with pytest.raises(AuthenticationError):
        go([AuthenticationError("no key", model="root")])
    # mid-run a failing root call stops the run cleanly
    r = go([repl("x = 1"), ModelError("boom", model="root")])
    assert r.stop_reason == "model_error" and "boom" in r.error and r.answer is None
    # an auth failure of the sub-model aborts the run instead of looping on errors
    with pytest.raises(AuthenticationError):
        go(
            None,
            backend=ScriptedBackend(
                {"root": [repl("llm_query('x')")] * 3, "sub": [AuthenticationError("bad", model="sub")]}
            ),
            sub_model="sub",
        )


def test_configuration_is_checked_up_front():
    with pytest.raises(ConfigurationError):
        RLM("m", max_depth=0)
    with pytest.raises(ConfigurationError):
        RLM("m", policy="no-such-policy")
    with pytest.raises(ConfigurationError):
        RLM("m", max_sub_calls=-1)


async def _acomplete() -> RLMResult:
    return await RLM("root", backend=ScriptedBackend([repl("FINAL('async')")])).acompletion("ctx", "q")


def test_acompletion():
    import asyncio

    assert asyncio.run(_acomplete()).answer == "async"


def test_verbose_view_shows_each_turn_on_stderr_only(capsys):
    script = [
        repl("n = len(context)\nprint('chars:', n)", "Let me look first."),
        repl("FINAL_VAR('n')"),
    ]
    result = go(script, context="x" * 1234, query="How long is it?", verbose=True)
    assert result.answer == "1234"
    out, err = capsys.readouterr()
    assert out == ""  # the live view never touches stdout (rlm run --json prints there)
    for expected in (
        "How long is it?",  # the run's header: query and context description
        "turn 1/",  # each model reply
        "Let me look first.",
        "block 1",  # each block's code ...
        "print('chars:', n)",
        "chars: 1234",  # ... and its output
        "tokens in/out",  # usage so far
        "answer (final)",  # the outcome
    ):
        assert expected in err, expected


def test_a_server_reporting_negative_usage_cannot_undo_the_budgets():
    """A model server claims -1e9 prompt tokens and a negative cost: they made the token total
    negative, so max_tokens could never trigger. The counts are litellm's estimates of the
    messages and the reply instead, priced as such (a model missing from the price map: None)."""
    from types import SimpleNamespace

    from rlm.llm import _completion_from, count_tokens

    messages = [{"role": "user", "content": "q"}]
    response = SimpleNamespace(
        choices=[SimpleNamespace(message=SimpleNamespace(content="hi"))],
        usage=SimpleNamespace(prompt_tokens=-1_000_000_000, completion_tokens=-5, cache_read_input_tokens=-7),
        _hidden_params={"response_cost": -3.0},
    )
    c = _completion_from(response, "openai/x", messages, 0.0)
    reply = count_tokens("openai/x", [{"role": "assistant", "content": "hi"}])
    assert (c.input_tokens, c.output_tokens, c.cache_read_tokens) == (count_tokens("openai/x", messages), reply, 0)
    assert c.input_tokens > 0 and c.output_tokens > 0 and c.cost_usd is None
    response.usage = SimpleNamespace(prompt_tokens=3, completion_tokens=1)
    response._hidden_params = {"response_cost": float("nan")}
    assert _completion_from(response, "openai/x", messages, 0.0).cost_usd is None


def test_a_block_too_large_for_one_request_is_an_error_the_model_sees(tmp_path: Path):
    """Under a tiny max_message_mb a model's block can be over the frame cap: Sandbox.execute
    refuses it with ValueError, which ended the whole run. The model sees it like an error of its
    code instead; nothing ran, and its variables stay."""
    from sandbox import load_policy

    policy = load_policy("default").override({"limits.max_message_mb": 1})
    backend = ScriptedBackend(
        [repl("kept = 7"), repl("x = '" + "é" * 600_000 + "'"), repl("print(kept)"), "FINAL(done)"]
    )
    result = run("q?", "some context", model="m", backend=backend, policy=policy, log_dir=tmp_path)
    assert result.answer == "done" and result.stop_reason == "final", result
    told = backend.calls[2][1][-1]["content"]
    assert "ValueError: code is 1200006 bytes (UTF-8)" in told, told[:500]
    assert "7" in backend.calls[3][1][-1]["content"]
