"""Configuration errors of ``rlm run``, ``rlm batch`` and ``rlm mcp``: exit 2, one line naming the flag.

Every case is a real ``python -m rlm`` process. None of them may print a
traceback, run anything, call a model or write an output file.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.llm_server import LLMServer

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "RLM_MCP_TOKEN"}
    env.update(OPENAI_API_KEY="k-test", HOME=str(tmp_path / "home"), PYTHONDONTWRITEBYTECODE="1")
    env.pop("RLM_MODEL", None)
    return env


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _run(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    context = tmp_path / "context.txt"
    context.write_text("some records\n")
    return run_cli(
        "run", "-m", "openai/x", "--context", str(context), "--query", "q", *flags,
        cwd=ROOT, env=_env(tmp_path), timeout=60,
    )  # fmt: skip


# An endpoint that refuses connections: were a flag not refused, the run would reach it and fail on
# its own (exit 2, "cannot connect"), which names no flag.
REFUSED = ["--api-base", "http://127.0.0.1:9/v1"]


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--budget-usd", "nan", *REFUSED], "rlm: --budget-usd must be a finite number, got nan"),
        (["--budget-usd", "inf", *REFUSED], "rlm: --budget-usd must be a finite number, got inf"),
        (["--max-time", "nan", *REFUSED], "rlm: --max-time must be a finite number, got nan"),
        (["--budget-usd", "-1", *REFUSED], "rlm: --budget-usd must be >= 0, got -1.0"),
        (["--max-time", "-1", *REFUSED], "rlm: --max-time must be >= 0, got -1.0"),
        (["--max-sub-calls", "-1", *REFUSED], "rlm: --max-sub-calls must be at least 0, got -1"),
        (["--api-base", "not a url"], "rlm: --api-base 'not a url' is not an http:// or https:// URL"),
        (["--api-base", "ftp://x"], "rlm: --api-base 'ftp://x' is not an http:// or https:// URL"),
    ],
)
def test_run_refuses_bad_flags_naming_the_flag(tmp_path: Path, flags: list[str], expect: str):
    t0 = time.monotonic()
    done = _run(tmp_path, *flags)
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr).startswith(expect), done.stderr
    assert time.monotonic() - t0 < 30  # refused up front: no model call retried for seconds
    with_json = _run(tmp_path, *flags, "--json")
    assert with_json.returncode == 2
    payload = json.loads(with_json.stdout)
    assert payload["stop_reason"] == "error" and expect.removeprefix("rlm: ") in payload["error"]


@pytest.mark.parametrize("where", ["proc", "file"])
def test_run_with_a_log_dir_that_cannot_be_written_exits_2_with_one_line_and_a_json_error(
    tmp_path: Path, where: str
):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    log_dir = "/proc/rlm-no-such-dir" if where == "proc" else str(a_file)
    done = _run(tmp_path, *REFUSED, "--log-dir", log_dir, "--json")
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert line.startswith(f"rlm: --log-dir {log_dir}: "), line
    payload = json.loads(done.stdout)
    assert payload["answer"] is None and payload["stop_reason"] == "error"
    assert payload["error"] == line.removeprefix("rlm: ") and payload["root_model"] == "openai/x"


@pytest.mark.parametrize("what", ["missing", "directory", "not UTF-8"])
def test_run_and_exec_name_the_flag_of_a_file_they_cannot_read(tmp_path: Path, what: str):
    """``--context``/``--set NAME=@FILE`` naming a file that cannot be read: the error line
    named the path alone (``rlm: ctx: No such file or directory``), not the flag it came from."""
    path = {"missing": tmp_path / "nope.txt", "directory": tmp_path, "not UTF-8": tmp_path / "b.bin"}[what]
    if what == "not UTF-8":
        path.write_bytes(b"\xff\xfe")
    reason = {"missing": "No such file or directory", "directory": "Is a directory"}.get(
        what, "not UTF-8 text (byte 0)"
    )
    done = run_cli(
        "run", "-m", "openai/x", *REFUSED, "--context", str(path), "--query", "q",
        cwd=ROOT, env=_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert _one_line(done.stderr) == f"rlm: --context {path}: {reason}"
    if what != "not UTF-8":  # --set binds bytes that are not UTF-8
        done = run_cli("exec", "--set", f"x=@{path}", "-", stdin="print(1)", cwd=ROOT, env=_env(tmp_path))
        assert done.returncode == 2 and done.stdout == ""
        assert _one_line(done.stderr) == f"rlm: --set x=@{path}: {reason}"


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--budget-usd", "-1"], "rlm batch: --budget-usd must be >= 0, got -1.0"),
        (["--budget-usd", "nan"], "rlm batch: --budget-usd must be a finite number, got nan"),
        (["--item-budget-usd", "inf"], "rlm batch: --item-budget-usd must be a finite number, got inf"),
        (["--max-time", "nan"], "rlm batch: --max-time must be a finite number, got nan"),
        (["--max-time", "-1"], "rlm batch: --max-time must be >= 0, got -1.0"),
        (["--api-base", "not a url"], "rlm batch: --api-base 'not a url' is not an http:// or https:// URL"),
        (["--log-dir", "/proc/rlm-no-such-dir"], "rlm batch: --log-dir /proc/rlm-no-such-dir: "),
        (["--ray-address", "auto"], "rlm batch: --ray-address needs --engine ray"),
    ],
)
def test_batch_refuses_bad_flags_before_writing_anything(tmp_path: Path, flags: list[str], expect: str):
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"id": "a", "query": "q", "context": "c"}\n{"id": "b", "query": "q", "context": "c"}\n'
    )
    out = tmp_path / "out.jsonl"
    done = run_cli(
        "batch", str(source), "--out", str(out), "-m", "openai/x", *flags,
        cwd=ROOT, env=_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr).startswith(expect), done.stderr  # no "0 of 2 items" summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no OUT, no OUT.lock


def test_batch_with_the_ray_engine_and_no_ray_says_so_before_anything_runs(tmp_path: Path):
    hide = tmp_path / "no-ray"  # a Python where `import ray` fails, as in an install without the extra
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "query": "q", "context": "c"}\n')
    done = run_cli(
        "batch", str(source), "--out", str(tmp_path / "out.jsonl"), "-m", "openai/x", "--engine", "ray",
        cwd=ROOT, env={**_env(tmp_path), "PYTHONPATH": str(hide)}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr).startswith("rlm batch: the ray engine needs Ray: pip install"), done.stderr
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.lock").exists()


def test_run_takes_its_api_base_from_rlm_api_base_when_the_flag_is_not_given(tmp_path: Path):
    with LLMServer("FINAL('from the variable')") as srv:
        context = tmp_path / "context.txt"
        context.write_text("some records\n")
        done = run_cli(
            "run", "-m", "openai/x", "--context", str(context), "--query", "q", "--json",
            cwd=ROOT, env={**_env(tmp_path), "RLM_API_BASE": srv.base_url}, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["answer"] == "from the variable" and srv.requests
    # a bad value is named as the variable it came from; the flag wins over it
    env = {**_env(tmp_path), "RLM_API_BASE": "not a url"}
    done = run_cli(
        "run", "-m", "openai/x", "--context", str(context), "--query", "q", cwd=ROOT, env=env, timeout=60
    )
    assert done.returncode == 2 and _one_line(done.stderr).startswith(
        "rlm: $RLM_API_BASE 'not a url' is not"
    ), done
    done = run_cli(*["run", "-m", "openai/x", "--context", str(context), "--query", "q", *REFUSED], cwd=ROOT,
                   env=env, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "cannot connect to http://127.0.0.1:9/v1" in _one_line(done.stderr), done
    assert "RLM_API_BASE" not in done.stderr  # the flag's URL, not the variable's
    env["RLM_API_BASE"] = REFUSED[1]  # a setup error with the variable's URL says where it came from
    done = run_cli(
        "run", "-m", "openai/x", "--context", str(context), "--query", "q", cwd=ROOT, env=env, timeout=60
    )
    line = _one_line(done.stderr)
    assert done.returncode == 2 and "cannot connect to http://127.0.0.1:9/v1" in line, done
    assert line.endswith(" (the URL is $RLM_API_BASE's)"), line


def test_run_refuses_an_empty_query_and_an_empty_context_path_and_warns_of_an_empty_context(tmp_path: Path):
    for flags, expect in (
        (["--query", " \n"], "rlm: --query is empty"),
        (
            ["--context", "", "--query", "q"],
            "rlm: --context '': an empty path (a file, or - for standard input)",
        ),
    ):
        done = run_cli("run", "-m", "openai/x", "--context", str(ROOT / "README.md"), *flags, *REFUSED, cwd=ROOT,
                       env=_env(tmp_path), timeout=60)  # fmt: skip
        assert done.returncode == 2 and _one_line(done.stderr) == expect, done.stderr
    empty = tmp_path / "empty\x1b]0;PWNED\x07.txt"  # (its name shown escaped, as every path we print)
    empty.write_text("")
    done = run_cli("run", "-m", "openai/x", "--context", str(empty), "--query", "q", *REFUSED, cwd=ROOT,
                   env=_env(tmp_path), timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr  # the run went on (to the refused endpoint), warned
    shown = f"{tmp_path}/empty\\x1b]0;PWNED\\x07.txt"
    assert done.stderr.splitlines()[0] == f"rlm: warning: the context ({shown}) is empty", done.stderr


def test_exec_set_names_a_bad_variable_name(tmp_path: Path):
    done = run_cli("exec", "--set", "1x=3", "-", stdin="print(1)", cwd=ROOT, env=_env(tmp_path), timeout=60)
    assert done.returncode == 2
    assert _one_line(done.stderr) == "rlm: --set '1x=3': '1x' is not a Python variable name", done.stderr


_NEEDS_MODEL = "needs --model (rlm_query is offered only with a model)"
_NEEDS_HTTP = "needs --transport http (the stdio transport listens on nothing)"


@pytest.mark.parametrize(
    ("flags", "needs"),
    [
        (["--max-iterations", "5"], _NEEDS_MODEL),
        (["--log-dir", "{tmp}/logs"], _NEEDS_MODEL),
        (["--sub-model", "m"], _NEEDS_MODEL),
        (["--port", "9000"], _NEEDS_HTTP),
        (["--host", "0.0.0.0"], _NEEDS_HTTP),
    ],
)
def test_mcp_flags_that_mean_nothing_alone_are_refused(tmp_path: Path, flags: list[str], needs: str):
    pytest.importorskip("mcp", reason="needs the mcp extra: pip install -e '.[mcp]'")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    done = run_cli("mcp", "--audit-log", str(tmp_path / "a.jsonl"), *flags, stdin="", cwd=ROOT,
                   env=_env(tmp_path), timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == f"rlm: {flags[0]} {needs}"
    assert not (tmp_path / "logs").exists()


def test_mcp_without_a_model_leaves_rlm_api_base_alone(tmp_path: Path):
    # $RLM_API_BASE is rlm_query's: without a model it is not a flag given without one
    pytest.importorskip("mcp", reason="needs the mcp extra: pip install -e '.[mcp]'")
    done = run_cli("mcp", "--audit-log", str(tmp_path / "a.jsonl"), stdin="", cwd=ROOT,
                   env={**_env(tmp_path), "RLM_API_BASE": "http://127.0.0.1:9/v1"}, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_mcp_http_on_a_taken_port_exits_2_with_one_line_and_prints_no_token(tmp_path: Path):
    pytest.importorskip("mcp", reason="needs the mcp extra: pip install -e '.[mcp]'")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run_cli(
            "mcp", "--transport", "http", "--port", str(port), "--audit-log", str(tmp_path / "a.jsonl"),
            stdin="", cwd=ROOT, env=_env(tmp_path), timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)  # the bearer token was not printed for a server that never started
    assert line == f"rlm: cannot listen on 127.0.0.1:{port}: Address already in use", line


def test_mcp_http_on_an_address_that_is_not_ours_exits_2_with_one_line(tmp_path: Path):
    pytest.importorskip("mcp", reason="needs the mcp extra: pip install -e '.[mcp]'")
    host = "192.0.2.1"  # TEST-NET-1 (RFC 5737): assigned to no machine
    done = subprocess.run(
        [sys.executable, "-m", "rlm", "mcp", "--transport", "http", "--host", host, "--port", "8765",
         "--audit-log", str(tmp_path / "a.jsonl")],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == f"rlm: cannot listen on {host}:8765: Cannot assign requested address"


def test_usage_errors_quote_arguments_with_control_characters_escaped():
    """argparse quotes what it did not recognize as given: on a terminal a window title, a screen
    clear or a link would act. Its one line shows them as escapes."""
    hostile = "\x1b]0;pwned\x07\x1b[2J\u202e"
    done = run_cli("doctor", hostile)
    assert done.returncode == 2
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr and "\u202e" not in done.stderr, (
        done.stderr
    )
    assert done.stderr.splitlines()[-1] == (
        "rlm doctor: error: unrecognized arguments: \\x1b]0;pwned\\x07\\x1b[2J\\u202e"
    ), done.stderr


@pytest.mark.parametrize("args", [[], ["policy"], ["audit"]])
def test_a_command_without_its_sub_command_prints_its_help(args: list[str]):
    """``rlm`` alone said "the following arguments are required: command" under a bare usage line,
    and ``rlm policy`` named argparse's internal ``policy_cmd``: the help, which lists the
    sub-commands and what each does, is what a newcomer needs there."""
    done = run_cli(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and "_cmd" not in done.stderr, done.stderr
    expect = {(): "answer a question about a long context", ("policy",): "validate a policy file",
              ("audit",): "check an audit log's hash chain"}[tuple(args)]  # fmt: skip
    assert expect in " ".join(done.stderr.split()), done.stderr


def test_output_into_a_closed_pipe_ends_quietly():
    """``rlm policy show default | head -1``: the reader gone, the write failed with a
    BrokenPipeError traceback. It ends quietly now, as ``cat`` does, with the status a shell
    reports for a program SIGPIPE ended."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "rlm", "policy", "show", "default"],
            stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode == 128 + 13, done.stderr


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    done = run_cli("--version", cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout == f"rlm {version('rlm')}\n", done


def test_policy_check_warns_of_an_allowed_import_this_python_does_not_have(tmp_path: Path):
    policy = tmp_path / "typo.toml"
    policy.write_text(
        (ROOT / "policies" / "default.toml").read_text().replace('"re", "json"', '"re", "jsonn", "json"')
    )
    done = run_cli("policy", "check", str(policy), cwd=ROOT, env=_env(tmp_path), timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(f"{policy}: ok"), done
    assert _one_line(done.stderr) == (
        "rlm policy check: warning: python.allowed_imports: no module 'jsonn' here (a typo?)"
    )
    for shipped in ("default", "strict", "portable"):  # every shipped entry exists
        done = run_cli("policy", "check", shipped, cwd=ROOT, env=_env(tmp_path), timeout=60)
        assert done.returncode == 0 and done.stderr == "", done


@pytest.mark.parametrize(
    "command",
    [
        ["exec"],
        ["run"],
        ["batch"],
        ["view"],
        ["doctor"],
        ["policy", "show"],
        ["policy", "check"],
        ["audit", "verify"],
    ],
)
def test_every_command_says_its_exit_statuses_in_its_help(command: list[str]):
    done = run_cli(*command, "--help", cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "Exit status:" in " ".join(done.stdout.split()), done.stdout


def test_doctor_judges_the_policy_it_is_given(tmp_path: Path):
    done = run_cli("doctor", "--policy", "portable", cwd=ROOT, env=_env(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    verdict = [line for line in done.stdout.splitlines() if line.startswith("verdict")]
    assert len(verdict) == 1 and "policy 'portable' starts here" in verdict[0], done.stdout
    done = run_cli(
        "doctor", "--policy", str(tmp_path / "none.toml"), cwd=ROOT, env=_env(tmp_path), timeout=60
    )
    assert done.returncode == 2 and "none.toml: cannot read policy file" in _one_line(done.stderr), done


def test_mcp_started_by_hand_on_a_terminal_says_what_it_waits_for(tmp_path: Path):
    pytest.importorskip("mcp", reason="needs the mcp extra: pip install -e '.[mcp]'")
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlm", "mcp", "--audit-log", str(tmp_path / "a.jsonl")],
        stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=_env(tmp_path),
    )  # fmt: skip
    os.close(slave)
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 30)  # (a server that says nothing waits for ever)
        first = proc.stderr.readline().decode() if ready else ""
        assert first.startswith(
            "rlm mcp: serving MCP over stdin/stdout; an MCP client starts this command"
        ), first
    finally:
        os.close(master)  # the terminal hangs up: the server ends
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # on a pipe (as a client starts it) it says nothing: stderr is the client's log
    done = run_cli(
        "mcp", "--audit-log", str(tmp_path / "a.jsonl"), stdin="", cwd=ROOT, env=_env(tmp_path), timeout=60
    )
    assert done.returncode == 0 and done.stderr == "", done


def test_view_of_a_chain_of_runs_too_deep_to_draw_exits_2_in_one_line(tmp_path: Path):
    """A log directory whose runs form a chain of 400 child runs (a hostile or broken log: the
    page nests each child inside its parent) ended in a RecursionError traceback."""
    logs = tmp_path / "logs"
    logs.mkdir()
    n = 400
    for i in range(n):
        meta = {
            "type": "metadata",
            "run_id": f"r{i:05d}",
            "parent_run_id": f"r{i - 1:05d}" if i else None,
            "depth": i,
        }
        calls = (
            [{"type": "rlm", "run_id": f"r{i + 1:05d}", "prompt": "go", "response": "ok"}]
            if i < n - 1
            else []
        )
        step = {
            "type": "iteration",
            "iteration": 1,
            "code_blocks": [{"code": "go()", "result": {"rlm_calls": calls}}],
        }
        (logs / f"r{i:05d}.jsonl").write_text(json.dumps(meta) + "\n" + json.dumps(step) + "\n")
    done = run_cli(
        "view", str(logs), "-o", str(tmp_path / "page.html"), cwd=ROOT, env=_env(tmp_path), timeout=120
    )
    assert done.returncode == 2 and "nest too deeply to draw" in _one_line(done.stderr), done.stderr[-500:]
    assert not (tmp_path / "page.html").exists()


def test_an_unknown_flag_is_refused_with_its_commands_usage():
    """It was refused with the top-level usage ("rlm [-h] [--version] {exec,...}"), not the
    command's, which lists the flags there are."""
    done = run_cli(
        "run", "-m", "openai/x", "--context", "-", "--query", "q", "--bogus", stdin="", cwd=ROOT, timeout=60
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith("usage: rlm run ") and done.stderr.splitlines()[-1] == (
        "rlm run: error: unrecognized arguments: --bogus"
    ), done.stderr
