"""Trajectories load in the reference RLM viewer, stay bounded, and keep the run's outcome beside them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlm import run
from rlm.backend import ScriptedBackend
from rlm.errors import ModelError
from rlm.trajectory import LOG_TEXT_CHARS, REPEATED_MESSAGES, TrajectoryLogger
from tests.viewer_schema import problems, problems_in_file


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"


def _lines(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _all_problems(directory: Path) -> list[str]:
    files = sorted(directory.glob("*.jsonl"))
    assert files, "no trajectory written"
    return [p for f in files for p in problems_in_file(f)]


def test_representative_runs_load_in_the_viewer(tmp_path: Path):
    """Root + child RLMs, a batch, an error, a limit: every line of every file passes the viewer's reads."""

    def respond(model: str, messages: list[dict]) -> str:
        first = messages[1]["content"] if len(messages) > 1 else messages[0]["content"]
        if model == "sub":
            return "sub says " + messages[0]["content"][:10]
        if "Question: outer" in first:
            turn = sum(1 for m in messages if m["role"] == "assistant")
            return [
                repl("print(llm_query_batched(['a', 'b', 'c']))\nprint(1 / 0)"),
                repl("a = rlm_query('inner', context='abc')\nprint(a)"),
                repl("FINAL(a)"),
            ][turn]
        return repl("FINAL(llm_query('leaf'))")

    r = run("outer", "ctx", model="root", sub_model="sub", max_depth=2, backend=ScriptedBackend(respond),
            log_dir=tmp_path)  # fmt: skip
    assert r.answer == "sub says leaf"
    # a run stopped by a limit, and one whose model fails mid-run
    limited = run("q", "c", model="root", backend=ScriptedBackend([repl("print(1)")] * 3), max_iterations=2,
                  log_dir=tmp_path)  # fmt: skip
    assert limited.stop_reason == "max_iterations"
    failed = run("q", "c", model="root", backend=ScriptedBackend([repl("x = 1"), ModelError("boom", model="root")]),
                 log_dir=tmp_path)  # fmt: skip
    assert failed.stop_reason == "model_error"
    assert _all_problems(tmp_path) == []
    # only the two line types the viewer understands; the outcome is in <run id>.result.json
    for path in tmp_path.glob("*.jsonl"):
        lines = _lines(path)
        assert lines[0]["type"] == "metadata" and {x["type"] for x in lines[1:]} == {"iteration"}
        outcome = json.loads(path.with_name(path.name.replace(".jsonl", ".result.json")).read_text())
        assert outcome["run_id"] == lines[0]["run_id"] and outcome["stop_reason"]
        assert path.with_name(path.name.replace(".jsonl", ".audit.log")).exists()
    assert not list(tmp_path.glob("*.audit.jsonl"))
    root = _lines(r.log_path)
    batch = root[1]["code_blocks"][0]["result"]
    assert [c["prompt"] for c in batch["rlm_calls"]] == ["a", "b", "c"]
    assert all(c["prompt_tokens"] == 2 and c["completion_tokens"] == 3 for c in batch["rlm_calls"])
    assert "ZeroDivisionError" in batch["stderr"]
    child_call = root[2]["code_blocks"][0]["result"]["rlm_calls"][0]
    child = _lines(child_call["trajectory"])
    assert child_call["type"] == "rlm" and child[0]["parent_run_id"] == r.run_id
    # the child's tokens: its own turn and its llm_query, as the scripted backend counted them
    child_tokens = [
        sum(c[k] for c in child[1]["code_blocks"][0]["result"]["rlm_calls"])
        for k in ("prompt_tokens", "completion_tokens")
    ]
    assert child_call["prompt_tokens"] > child_tokens[0] and child_call["completion_tokens"] > child_tokens[1]
    assert json.loads(Path(failed.log_path).with_name(f"{failed.run_id}.result.json").read_text())["error"]


def test_batch_sub_calls_are_logged_in_prompt_order(tmp_path: Path):
    # the first prompts answer last
    def respond(model: str, messages: list[dict]) -> str:
        if model == "root":
            return repl("r = llm_query_batched([str(i) for i in range(8)])\nFINAL('ok')")
        time.sleep(0.02 * (8 - int(messages[0]["content"])))
        return messages[0]["content"]

    r = run("q", "c", model="root", sub_model="sub", backend=ScriptedBackend(respond), log_dir=tmp_path)
    calls = _lines(r.log_path)[1]["code_blocks"][0]["result"]["rlm_calls"]
    assert [c["prompt"] for c in calls] == [str(i) for i in range(8)]
    assert [c["response"] for c in calls] == [str(i) for i in range(8)]


def test_a_huge_context_is_never_copied_into_the_log(tmp_path: Path):
    context = "x" * 20_000_000  # 20 MB; the same holds for 100 MB, it is just slower to build
    turns = [repl("print(len(context))")] * 5 + [repl("print(context)")] + [repl("FINAL(llm_query(context))")]
    r = run("q", context, model="root", backend=ScriptedBackend([*turns, "ok"]), log_dir=tmp_path,
            max_output_chars=10_000_000)  # fmt: skip
    assert r.answer == "ok"
    size = Path(r.log_path).stat().st_size
    # 7 iterations; every string is bounded, and each message is written in full only once
    assert size < 12 * LOG_TEXT_CHARS, size
    assert _all_problems(tmp_path) == []


def test_long_runs_repeat_old_messages_only_briefly():
    log = TrajectoryLogger.__new__(TrajectoryLogger)
    log._seen, log._iterations, log._lock = {}, 0, threading.Lock()
    messages = [{"role": "system", "content": "S" * 5000}, {"role": "user", "content": "question"}]
    sizes = []
    for turn in range(1, 101):
        log._iterations = turn
        sent = log._prompt(messages)
        sizes.append(len(json.dumps(sent)))
        messages += [
            {"role": "assistant", "content": f"reply {turn} " * 100},
            {"role": "user", "content": "o" * 900},
        ]
    assert sum(1 for m in sent if m["role"] == "note") == 1 and len(sent) <= REPEATED_MESSAGES + 3
    assert max(sizes[50:]) < 3 * min(sizes[50:])  # no longer grows with the number of turns
    assert sent[0]["content"].endswith("logged in full in iteration 1]")


def test_a_run_cut_off_mid_way_leaves_a_loadable_file(tmp_path: Path):
    log = TrajectoryLogger(tmp_path, "rlm_cut", secrets=["sk-secret-123"])
    log.metadata(
        run_id="rlm_cut", root_model="m", max_depth=1, max_iterations=3, backend="x", other_backends=None
    )
    log.iteration(prompt=[{"role": "user", "content": "key sk-secret-123"}], response="r", code_blocks=[],
                  final_answer=None, iteration_time=0.1)  # fmt: skip
    assert problems_in_file(log.path) == [] and not log.result_path.exists()
    assert "sk-secret-123" not in log.path.read_text()
    log.result(answer="a", stop_reason="final")
    assert json.loads(log.result_path.read_text())["answer"] == "a" and problems_in_file(log.path) == []


def test_the_schema_check_can_fail():
    assert problems('{"type": "result", "answer": "x"}')  # our old closing line
    assert problems('{"type": "metadata", "root_model": {"a": 1}}')
    good = {"iteration": 1, "timestamp": "2026-01-01T00:00:00", "prompt": [], "response": "", "final_answer": None,
            "iteration_time": None, "code_blocks": [{"code": "", "result": {"stdout": "", "stderr": "", "locals": {},
            "execution_time": 0.1, "rlm_calls": [{"prompt": "p", "response": "r", "prompt_tokens": 1,
            "completion_tokens": 1, "execution_time": 0.1}]}}]}  # fmt: skip
    assert problems(json.dumps(good)) == []
    del good["code_blocks"][0]["result"]["rlm_calls"][0]["prompt_tokens"]
    assert problems(json.dumps(good)) == ["code_blocks[0].result.rlm_calls[0].prompt_tokens: not a number"]


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinity_from_model_code_stay_valid_json(tmp_path: Path):
    """Model code hands a tool NaN and infinities: the trajectory held bare NaN/-Infinity, which
    strict readers (the reference viewer, the browser's JSON.parse in `rlm view`) refuse."""
    from rlm.view import _embed, build_page
    from rlm.view.load import load_path

    def echo(value: object) -> object:
        return value

    code = "echo(float('nan')); echo([float('-inf'), {'x': float('inf')}])\nFINAL('done')"
    r = run(
        "q", "c", model="root", backend=ScriptedBackend([repl(code)]), tools={"echo": echo}, log_dir=tmp_path
    )
    assert r.answer == "done"
    text = (tmp_path / f"{r.run_id}.jsonl").read_text()
    assert "nan" in text
    for line in text.splitlines():
        _strict(line)
    assert build_page(tmp_path).startswith("<!DOCTYPE")  # the page builds
    data = load_path(tmp_path)
    data["runs"][0]["extra"] = [float("nan"), {"older log": float("-inf")}]  # as an older log may hold
    _strict(_embed(data))  # what the page's JSON.parse reads


_FULL_DISK = """
import resource, signal, sys
from rlm import run
from rlm.backend import ScriptedBackend
from rlm.errors import RLMError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
backend = ScriptedBackend(["```repl\\nx = 1\\n```"] * 3 + ["FINAL('done')"])
# files of this process may not grow past 6 KB from now on: the trajectory's lines outgrow it
resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.RLIM_INFINITY))
try:
    run("q", "ctx", model="m", backend=backend, log_dir=sys.argv[1], max_iterations=4)
except RLMError as exc:
    print(type(exc).__name__, exc)
"""


def test_a_log_that_cannot_be_written_mid_run_is_our_error(tmp_path: Path):
    """A trajectory line that cannot be written once the run is under way (a full disk; here a
    file-size limit) ends the run with an RLMError naming the log directory, not a raw OSError."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.startswith("ConfigurationError") and str(tmp_path) in out.stdout, out.stdout
    assert "File too large" in out.stdout


# ----------------------------------------------------- files that are not regular files
ROOT = Path(__file__).resolve().parent.parent


def _python(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run *script* in a fresh interpreter (this checkout's rlm): a write that hangs on a FIFO
    fails the test at *timeout* instead of hanging the suite."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["OPENAI_API_KEY"] = "sk-test-fifo"
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env,
    )  # fmt: skip


def test_a_fifo_as_the_trajectory_is_a_clear_error_not_a_hang(tmp_path: Path):
    """The trajectory was opened by name for appending, blocking: a FIFO at ``<run id>.jsonl``
    waited for a reader, forever (``rlm run --log-dir`` hung before its first model call). It is
    now refused as not a regular file: ``rlm run`` exits 2 with one line naming the file."""
    logs = tmp_path / "logs"
    logs.mkdir()
    os.mkfifo(logs / "fifo-run.jsonl")  # not rlm_*: the session's viewer check reads those
    (tmp_path / "ctx.txt").write_text("some context")
    script = (
        "import sys, rlm.core\n"
        "rlm.core.new_run_id = lambda: 'fifo-run'\n"
        "from rlm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    flags = ["-m", "openai/x", "--api-base", "http://127.0.0.1:9/v1", "--log-dir", str(logs)]
    out = _python(script, "run", *flags, "--context", str(tmp_path / "ctx.txt"), "--query", "q")
    assert out.returncode == 2, out
    assert out.stderr == f"rlm: log_dir {logs}: cannot write fifo-run.jsonl: not a regular file\n"
    assert stat.S_ISFIFO((logs / "fifo-run.jsonl").lstat().st_mode)


@pytest.mark.parametrize("planted", ["fifo", "symlink"])
def test_the_result_file_is_written_through_no_file_planted_at_its_temporary_name(
    tmp_path: Path, planted: str
):
    """``<run id>.result.json`` was written to ``.<name>.<pid>.tmp``, opened by name, then renamed
    over it: a FIFO planted at that name hung the run's end for good, a symbolic link made the
    result land in the file it points to (and the link was renamed into place). The temporary
    file is now created (``O_EXCL``, a random name): what was planted is left alone."""
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from rlm.trajectory import TrajectoryLogger\n"
        "log = TrajectoryLogger(sys.argv[1], 'r')\n"
        "tmp = log.result_path.with_name(f'.{log.result_path.name}.{os.getpid()}.tmp')\n"
        "os.mkfifo(tmp) if sys.argv[2] == 'fifo' else tmp.symlink_to(sys.argv[3])\n"
        "log.result(answer='42', stop_reason='final')\n"
        "print(tmp)\n"
    )
    out = _python(script, str(tmp_path), planted, str(victim), timeout=30)
    assert out.returncode == 0, out
    result = tmp_path / "r.result.json"
    assert stat.S_ISREG(result.lstat().st_mode) and json.loads(result.read_text())["answer"] == "42"
    assert victim.read_text() == "untouched"
    left = Path(out.stdout.strip())
    assert (stat.S_ISFIFO if planted == "fifo" else stat.S_ISLNK)(left.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([left.name, "r.result.json", "victim.txt"])
