"""What ``rlm run`` writes, and what a run logs, stays safe whatever the model or the server sends.

- a terminal gets the answer and error lines with control characters escaped (a pipe gets the answer
  as it is, as with ``rlm exec``);
- a lone surrogate in the answer is printed, in plain and ``--json`` mode, and a result round-trips;
- a server that accepts the connection and never answers does not hang a run (request timeout);
- API keys are redacted inside JSON string values only (a short key cannot break a trajectory line),
  and keys from the environment are redacted too.

The CLI cases are real ``python -m rlm`` processes against the loopback server (tests/llm_server.py);
the terminal ones run on a pseudo-terminal.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlm.result import RLMResult
from tests import warm_cli
from tests.llm_server import ChatRequest, LLMServer, Reply

ROOT = Path(__file__).resolve().parent.parent
ENV_KEY = "sk-env-HYGIENE-5f4e3d2c1b0a"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "RLM_MODEL"}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="400",  # the --verbose view (rich) wraps at the width it is given
        **extra,
    )
    return env


def _argv(srv: LLMServer, context: Path, *flags: str) -> list[str]:
    """``rlm run`` against *srv*; run warm (tests/warm_cli.py: litellm is imported once per worker)."""
    return [
        "run", "-m", "openai/m", "--api-base", srv.base_url,
        "--context", str(context), "--query", "q", *flags,
    ]  # fmt: skip


def _context(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text("some records\n")
    return path


def _start_on_pty(argv: list[str], env: dict[str, str]) -> tuple[warm_cli.Process, int]:
    """Start ``rlm ARGV`` with stdout and stderr on a new pseudo-terminal; returns it and the master fd."""
    master, slave = pty.openpty()
    proc = warm_cli.Process(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    return proc, master


def _read_pty(proc: warm_cli.Process, master: int, timeout: float = 60) -> tuple[bytes, int]:
    """Everything written to the terminal until the process closed it, and the exit status."""
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: the last writer closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return out, code


# ------------------------------------------------------------------ 5: the operator's terminal
TTY_ANSWER = "before\x1b]0;PWNED-TITLE\x07\x1b[2J\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\\u202e\u200f\u061c\u200eafter"


def test_run_on_a_terminal_shows_the_answer_with_controls_escaped(tmp_path: Path):
    with LLMServer(f"FINAL({TTY_ANSWER!r})") as srv:
        out, code = _read_pty(*_start_on_pty(_argv(srv, _context(tmp_path)), _env(tmp_path)))
    assert code == 0, out
    assert b"\x1b" not in out and b"\x07" not in out, out
    assert not any(mark.encode() in out for mark in "\u202e\u200f\u061c\u200e"), out
    shown = out.decode()
    assert shown.startswith("before\\x1b]0;PWNED-TITLE\\x07\\x1b[2J\\x1b]8;;http://evil/\\x1b\\click"), shown
    assert "\\u202e\\u200f\\u061c\\u200eafter\r\n" in shown and "\r\nrlm: final, 1 turn(s)" in shown, shown


def test_run_json_on_a_terminal_escapes_the_controls_and_keeps_the_answer(tmp_path: Path):
    with LLMServer(f"FINAL({TTY_ANSWER!r})") as srv:
        out, code = _read_pty(*_start_on_pty(_argv(srv, _context(tmp_path), "--json"), _env(tmp_path)))
    assert code == 0, out
    assert b"\x1b" not in out and b"\x07" not in out, out
    assert not any(mark.encode() in out for mark in "\u202e\u200f\u061c\u200e"), out
    assert json.loads(out.decode())["answer"] == TTY_ANSWER  # escaped in JSON, the same answer


def test_run_on_a_terminal_shows_a_server_error_as_one_escaped_line(tmp_path: Path):
    body = "bad request \x1b]0;PWNED\x07\x1b[31mRED\x9b2J\rover"
    with LLMServer(Reply(body, status=400)) as srv:
        err, code = _read_pty(*_start_on_pty(_argv(srv, _context(tmp_path)), _env(tmp_path)))
    assert code == 1, err
    assert b"\x1b" not in err and b"\x07" not in err and "\x9b".encode() not in err, err
    assert b"Traceback" not in err, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rlm: openai/m: "), lines
    assert "bad request \\x1b]0;PWNED\\x07\\x1b[31mRED\\x9b2J\\x0dover" in lines[0], lines


def test_run_error_lines_are_escaped_even_into_a_pipe(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "rlm", "run", "-m", "openai/m", "--context", str(tmp_path / "no\x1b]0;T\x07"),
         "--query", "q"],
        capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"rlm: --context {tmp_path}/no\\x1b]0;T\\x07: No such file or directory\n"


# ----------------------------------------------------------------- 6: a lone surrogate in the answer
SURROGATE_ANSWER = "bad \ud800 and \x1b[31m red"


def _run_surrogate_answer(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
    with LLMServer(f"FINAL({SURROGATE_ANSWER!r})") as srv:
        return warm_cli.run(
            _argv(srv, _context(tmp_path), "--log-dir", str(tmp_path / "logs"), *flags),
            capture_output=True, cwd=ROOT, env=_env(tmp_path), timeout=60,
        )  # fmt: skip


def test_a_lone_surrogate_in_the_answer_is_printed_escaped(tmp_path: Path):
    done = _run_surrogate_answer(tmp_path)
    # Into a pipe the answer is written as it is (controls included, as rlm exec writes what the
    # code printed), its surrogate escaped as the sandbox escapes it.
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"bad \\ud800 and \x1b[31m red\n", done.stdout
    assert done.stderr.startswith(b"rlm: final, 1 turn(s)") and b"Traceback" not in done.stderr, done.stderr


def test_a_lone_surrogate_in_the_answer_is_printed_with_json(tmp_path: Path):
    done = _run_surrogate_answer(tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"", done.stderr
    data = json.loads(done.stdout)
    assert data["answer"] == "bad \\ud800 and \x1b[31m red" and data["stop_reason"] == "final"
    result = RLMResult.model_validate_json(done.stdout)
    assert RLMResult.model_validate_json(result.model_dump_json()) == result
    assert result.history, "the history came through too"


def test_a_result_with_lone_surrogates_anywhere_round_trips_to_json():
    result = RLMResult(
        answer="a \ud800 b",
        error="\udcff",
        parsed={"k\udc80": ["v\ud83d"]},
        history=[{"role": "assistant", "content": "x \udfff y", "n": 3}],
        usage={"openai/\ud800": {"calls": 1}},
    )
    text = result.model_dump_json()
    assert RLMResult.model_validate_json(text) == result
    assert result.answer == "a \\ud800 b" and result.error == "\\udcff"
    assert result.parsed == {"k\\udc80": ["v\\ud83d"]}
    assert result.history[0]["content"] == "x \\udfff y"
    assert list(result.usage) == ["openai/\\ud800"]
    assert RLMResult(answer="ok é 日本 \U0001f600").answer == "ok é 日本 \U0001f600"  # valid text as is


# ------------------------------------------------------------------ 7: a server that never answers
def test_run_gives_up_a_call_that_gets_no_answer_within_the_request_timeout(tmp_path: Path):
    context = _context(tmp_path)
    # The first call gets no answer (the handler sleeps past the timeout); the retry is answered.
    with LLMServer([Reply("never sent", latency_s=30), 'FINAL("late but here")']) as srv:
        done = warm_cli.run(
            _argv(srv, context, "--request-timeout", "0.5", "--verbose"),
            capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=60,
        )  # fmt: skip
        base = srv.base_url
    assert done.returncode == 0, done.stderr
    assert done.stdout == "late but here\n"
    assert f"openai/m: no answer from {base} within 0.5 s (request timeout)" in done.stderr, done.stderr


def test_run_refuses_a_request_timeout_that_is_not_positive(tmp_path: Path):
    context = _context(tmp_path)
    for value, expect in (("0", "rlm: --request-timeout must be > 0, got 0.0"),
                          ("nan", "rlm: --request-timeout must be a finite number, got nan")):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "rlm", "run", "-m", "openai/m", "--api-base", "http://127.0.0.1:9/v1",
             "--context", str(context), "--query", "q", "--request-timeout", value],
            capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and done.stderr.strip() == expect, done.stderr


@pytest.mark.parametrize("flag", ["--request-timeout", "--max-time"])
@pytest.mark.parametrize("value", ["1e10", "1e300"])
def test_run_takes_a_timeout_longer_than_python_can_wait(tmp_path: Path, flag: str, value: str):
    """A finite number is a limit like any other, however large: past ``threading.TIMEOUT_MAX``
    (about 292 years) Python's socket and lock timeouts overflow. ``--request-timeout 1e10`` made
    every call fail at its connect (retried, then exit 1: "timestamp out of range for platform
    time_t"), and ``--max-time 1e10`` printed the OverflowError traceback of the thread that
    bounds a block by the time budget."""
    context = _context(tmp_path)
    with LLMServer(["```repl\nx = 6 * 7\n```", "FINAL_VAR(x)"]) as srv:
        done = warm_cli.run(
            _argv(srv, context, flag, value),
            capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    assert "Traceback" not in done.stderr and "Overflow" not in done.stderr, done.stderr


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An endpoint that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_a_call_without_a_timeout_gets_the_default_request_timeout(
    silent_server: str, monkeypatch: pytest.MonkeyPatch
):
    from rlm import llm
    from rlm.errors import ProviderUnavailable

    assert llm.DEFAULT_REQUEST_TIMEOUT_S == 600
    monkeypatch.setattr(llm, "DEFAULT_REQUEST_TIMEOUT_S", 0.5)
    box: dict[str, BaseException] = {}

    def call() -> None:
        try:
            llm.complete("openai/m", [{"role": "user", "content": "hi"}], api_base=silent_server)
        except BaseException as exc:
            box["error"] = exc

    llm._lib()  # litellm imported before the clock starts
    started = time.monotonic()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(15)
    assert not worker.is_alive(), "a call to a server that never answers is still waiting"
    assert time.monotonic() - started < 10
    error = box.get("error")
    assert isinstance(error, ProviderUnavailable), error
    assert str(error) == f"openai/m: no answer from {silent_server} within 0.5 s (request timeout)"


# ------------------------------------------------------------------ 8: short keys and the trajectory
def test_a_short_all_digit_key_is_redacted_in_strings_and_leaves_every_log_line_valid_json(tmp_path: Path):
    import rlm

    code = '```repl\nprint(llm_query(" ".join(["w"] * 1233)))\n```'  # the server reports prompt_tokens=1234

    def reply(req: ChatRequest) -> str:
        if req.last_user.startswith("w w"):
            return "sub answer with 1234 in it"
        return code if len(req.messages) == 2 else 'FINAL("done")'

    log_dir = tmp_path / "logs"
    with LLMServer(reply) as srv:
        result = rlm.run(
            "q", "ctx", model="openai/m", api_base=srv.base_url, api_key="1234", log_dir=log_dir,
            max_iterations=3,
        )  # fmt: skip
    assert result.answer == "done"
    files = sorted(log_dir.glob("*.jsonl")) + sorted(log_dir.glob("*.result.json"))
    assert len(files) == 2
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]  # every line is JSON
    json.loads(files[1].read_text())
    calls = [
        call
        for line in lines
        for block in line.get("code_blocks", [])
        for call in block["result"]["rlm_calls"]
    ]
    assert [c["prompt_tokens"] for c in calls] == [1234], calls  # a number, not "[REDACTED]"
    assert calls[0]["response"] == "sub answer with [REDACTED] in it"


def test_the_trajectory_redacts_keys_from_the_environment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from rlm.trajectory import TrajectoryLogger

    monkeypatch.setenv("SOMEPROVIDER_API_KEY", ENV_KEY)
    monkeypatch.setenv("LOCAL_API_KEY", "EMPTY")  # a placeholder: too short to be a key, kept
    logger = TrajectoryLogger(tmp_path, "rlm_test", secrets=[None])
    logger.metadata(root_model="m")
    long_text = "x" * 60_000 + ENV_KEY + "y" * 60_000  # clipped around the key: redacted first
    logger.iteration(
        prompt=[{"role": "user", "content": f"{long_text[:300]} EMPTY {ENV_KEY}"}],
        response=f"the key is {ENV_KEY}",
        code_blocks=[
            {
                "code": long_text,
                "result": {
                    "stdout": ENV_KEY,
                    "stderr": "",
                    "locals": {ENV_KEY: 1},
                    "execution_time": 0.1,
                    "rlm_calls": [],
                },
            }
        ],
        final_answer=None,
        iteration_time=0.1,
    )
    logger.result(answer=ENV_KEY, error=None)
    text = logger.path.read_text() + logger.result_path.read_text()
    assert ENV_KEY not in text and ENV_KEY[:12] not in text
    line = json.loads(logger.path.read_text().splitlines()[1])
    assert line["response"] == "the key is [REDACTED]"
    assert line["prompt"][0]["content"].endswith(" EMPTY [REDACTED]")


# ---------------------------------------------------------- 9: keys from the environment, echoed back
def test_an_environment_key_echoed_by_the_server_reaches_no_output_log_or_prompt(tmp_path: Path):
    context = _context(tmp_path)
    log_dir = tmp_path / "logs"
    code = '```repl\nr = llm_query_batched(["sub"])\nprint(r)\n```'

    def reply(req: ChatRequest) -> str | Reply:
        if req.last_user == "sub":
            return Reply(f"Invalid key for this model: {req.headers.get('authorization')}", status=400)
        return code if len(req.messages) == 2 else 'FINAL("done")'

    with LLMServer(reply) as srv:
        done = warm_cli.run(
            _argv(srv, context, "--log-dir", str(log_dir), "--json"),
            capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path, OPENAI_API_KEY=ENV_KEY), timeout=60,
        )  # fmt: skip
        requests = srv.requests
    assert done.returncode == 0, done.stderr
    sub = [r for r in requests if r.last_user == "sub"]
    assert sub and sub[0].headers["authorization"] == f"Bearer {ENV_KEY}"  # the key was used, and echoed
    assert ENV_KEY not in done.stdout and ENV_KEY not in done.stderr
    assert "Invalid key for this model: Bearer [REDACTED]" in done.stdout  # what the code saw
    files = [p for p in log_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert ENV_KEY not in path.read_text(errors="replace"), path
    for request in requests:
        assert ENV_KEY not in request.prompt_text


# ------------------------------------------------------------------ 9: a server's malformed replies
GOOD_USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
BAD_USAGE = [
    {**GOOD_USAGE, "cache_read_input_tokens": "zz"},
    {**GOOD_USAGE, "cache_creation_input_tokens": [1]},
    {**GOOD_USAGE, "cache_read_input_tokens": -3, "cache_creation_input_tokens": float("inf")},
    {**GOOD_USAGE, "cache_read_input_tokens": {"n": 1}, "cache_creation_input_tokens": None},
]
#: Bodies litellm cannot turn into a response: its error text held a traceback with the host's paths.
BAD_BODIES = [
    {"choices": [{"message": "zz"}]},
    {"choices": [{"message": {"role": "assistant", "content": 5}}]},
    {"choices": "zz"},
    [1, 2],
]


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "site-packages" not in text and 'File "' not in text, text


@pytest.mark.parametrize("usage", BAD_USAGE, ids=["read-str", "write-list", "negative-inf", "dict-null"])
def test_a_run_reads_malformed_token_counts_as_zero(usage: dict[str, object]):
    """A count that is not a finite number of at least 0 (a string, a list, a bool, ...) is 0: it
    raised a raw TypeError / ValueError out of rlm.llm (a traceback from ``rlm run``)."""
    from rlm import run

    with LLMServer(Reply("FINAL(fine)", usage=usage)) as srv:
        result = run("q", "ctx", model="openai/m", api_base=srv.base_url, api_key="k")
    assert result.answer == "fine" and result.stop_reason == "final", result
    u = result.usage["openai/m"]
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens) == (1, 1, 0, 0), u


@pytest.mark.parametrize("body", BAD_BODIES, ids=["message-str", "content-int", "choices-str", "list"])
def test_a_response_of_the_wrong_shape_is_a_provider_error_without_a_traceback(body: object):
    """The run's first call gets a body litellm cannot read: a ProviderUnavailable (an RLMError)
    whose message names what was wrong, without litellm's embedded traceback and host paths."""
    from rlm import run
    from rlm.errors import ProviderUnavailable

    with LLMServer(Reply(body=body)) as srv:
        with pytest.raises(ProviderUnavailable) as caught:
            run("q", "ctx", model="openai/m", api_base=srv.base_url, api_key="k", max_retries=0)
    message = str(caught.value)
    _no_traceback(message)
    assert message.startswith("openai/m: provider unavailable: ") and len(message) < 800, message


def test_a_sub_call_answered_with_the_wrong_shape_shows_the_code_no_host_paths():
    """The error text of a failed llm_query is what the model's code gets (and what the model then
    reads): litellm's traceback in it showed the model the host's site-packages paths."""
    from rlm import run

    def reply(request: ChatRequest) -> Reply:
        if len(request.messages) == 1:  # the sub-call
            return Reply(body=BAD_BODIES[0])
        if not any(m.get("role") == "assistant" for m in request.messages):
            return Reply("```repl\ntry:\n    r = llm_query('x')\nexcept Exception as exc:\n    r = str(exc)\n```")
        return Reply("FINAL_VAR(r)")

    with LLMServer(reply) as srv:
        result = run("q", "ctx", model="openai/m", api_base=srv.base_url, api_key="k", max_retries=0)
    assert result.answer is not None and "Invalid response object" in result.answer, result
    _no_traceback(result.answer)
    assert "site-packages" not in json.dumps(result.history)  # nor in what the root model was shown


def test_a_token_count_is_a_finite_number_of_at_least_0_else_0():
    from rlm.llm import _count

    assert [_count(v) for v in (3, 2.9, 0, -1, True, False, "7", [1], None, float("nan"), float("inf"))] == [
        3, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]  # fmt: skip


def test_a_response_conversion_that_fails_is_a_provider_error():
    """Whatever fails while a response is read (a shape litellm let through) is a
    ProviderUnavailable with one short line, not the exception itself."""
    from rlm import llm
    from rlm.errors import ProviderUnavailable

    class Response:
        @property
        def choices(self) -> object:
            raise RuntimeError('Traceback (most recent call last):\n  File "/opt/site-packages/x.py"\nKeyError: 0')

    with pytest.raises(ProviderUnavailable) as caught:
        llm._completion_from(Response(), "openai/m", [], time.perf_counter(), "http://127.0.0.1:9/v1", None)
    assert str(caught.value) == (
        "openai/m: unreadable response from http://127.0.0.1:9/v1: RuntimeError: KeyError: 0"
    ), caught.value


@pytest.mark.parametrize("usage", BAD_USAGE[:2], ids=["read-str", "write-list"])
def test_rlm_run_with_malformed_token_counts_answers_without_a_traceback(tmp_path: Path, usage: dict[str, object]):
    with LLMServer(Reply("FINAL(fine)", usage=usage)) as srv:
        done = warm_cli.run(
            _argv(srv, _context(tmp_path)), capture_output=True, text=True, cwd=ROOT,
            env=_env(tmp_path, OPENAI_API_KEY=ENV_KEY), timeout=120,
        )  # fmt: skip
    assert done.returncode == 0 and done.stdout == "fine\n", done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_rlm_run_with_a_response_of_the_wrong_shape_fails_in_one_line(tmp_path: Path):
    with LLMServer(Reply(body=BAD_BODIES[1])) as srv:
        done = warm_cli.run(
            _argv(srv, _context(tmp_path), "--json"), capture_output=True, text=True, cwd=ROOT,
            env=_env(tmp_path, OPENAI_API_KEY=ENV_KEY), timeout=120,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    payload = json.loads(done.stdout)
    assert payload["stop_reason"] == "error" and "Invalid response object" in payload["error"], payload
    _no_traceback(done.stderr + done.stdout)
