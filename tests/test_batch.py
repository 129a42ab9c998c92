"""``rlm batch`` and ``rlm.batch``: resumable, bounded, shown; against the loopback model server.

Every run here is a real RLM: a real sandbox per item, litellm's HTTP path to
tests/llm_server.py. The model's reply squares the number in the item's
context, so each id has one right answer and a wrong context would show.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rlm
from rlm.batching.outfile import RECORD_FIELDS, ResultsFile
from rlm.errors import ConfigurationError, ModelUnreachable
from tests import warm_cli
from tests.llm_server import ChatRequest, LLMServer

ROOT_DIR = Path(__file__).resolve().parent.parent
KEY = "sk-test-BATCHLEAK-5e6f7a8b9c0d"
MODEL = "openai/gpt-4o-mini"  # in litellm's price map: every run has a cost
SQUARE = "```repl\nn = int(context.split()[-1])\nFINAL(str(n * n))\n```"


def square_reply(request: ChatRequest) -> str:
    return SQUARE


def write_items(path: Path, n: int) -> list[dict[str, str]]:
    items = [{"id": f"q{i:02d}", "query": "What is the square of the number?", "context": f"number {i:02d}"}
             for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return items


def expected(item_id: str) -> str:
    return str(int(item_id[1:]) ** 2)


def read_out(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the output ends with a cut line"
    return [json.loads(line) for line in text.splitlines()]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(OPENAI_API_KEY=KEY, PYTHONPATH=str(ROOT_DIR))
    return env


def batch_argv(inp: Path, out: Path, srv: LLMServer, *extra: str) -> list[str]:
    """``rlm batch`` against *srv* (run warm, tests/warm_cli.py: litellm is imported once per worker)."""
    return ["batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base", srv.base_url, *extra]


def wait_for_lines(out: Path, n: int, proc: warm_cli.Process, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} lines in {out} after {timeout} s")


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``rlm ARGS`` through the CLI's main() in this process (litellm is imported once for the module)."""
    from rlm.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.endswith("_API_KEY")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.fixture
def server() -> Iterator[LLMServer]:
    with LLMServer(square_reply, latency_s=0.1) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_then_ctrl_c_then_rerun_gives_each_id_once_with_its_answer(
    tmp_path: Path, server: LLMServer, capsys: pytest.CaptureFixture[str], key_env: None
):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 50)
    env = cli_env()
    # 1. killed with SIGKILL partway
    proc = warm_cli.Process(batch_argv(inp, out, server, "--workers", "4"), env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_lines(out, 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    after_kill = read_out(out)
    assert 8 <= len(after_kill) < 50
    # 2. a rerun, interrupted with SIGINT (Ctrl-C) once it has added lines; a second writer meanwhile is refused
    proc = warm_cli.Process(batch_argv(inp, out, server, "--workers", "2"), env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_lines(out, len(after_kill) + 3, proc)
    second = warm_cli.run(batch_argv(inp, out, server), env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert second.returncode == 2 and "another rlm batch is writing" in second.stderr, second.stderr
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    after_int = read_out(out)
    assert after_int[: len(after_kill)] == after_kill  # lines are only ever appended
    assert len(after_kill) + 3 <= len(after_int) < 50
    # 3. the rerun finishes the rest (in this process: a third interpreter would import litellm again)
    root_calls_before = len(server.requests)
    code, stderr = in_process(capsys, *batch_argv(inp, out, server, "--workers", "4"))
    assert code == 0, stderr
    assert f"{len(after_int)} already in" in stderr
    records = read_out(out)
    ids = [r["id"] for r in records]
    assert len(records) == 50 and len(set(ids)) == 50
    assert all(tuple(r) == RECORD_FIELDS for r in records)
    assert all(r["answer"] == expected(r["id"]) and r["stop_reason"] == "final" for r in records)
    assert all(r["cost_usd"] > 0 and r["input_tokens"] > 0 and r["error"] is None for r in records)
    # one model call per item: the last run called only for what was missing
    assert len(server.requests) - root_calls_before == 50 - len(after_int)
    assert not (tmp_path / "out.jsonl.lock").exists()
    assert KEY not in out.read_text()


@pytest.mark.timeout(600)
def test_budget_stops_starting_items_and_a_rerun_with_more_budget_finishes(
    tmp_path: Path, server: LLMServer, capsys: pytest.CaptureFixture[str], key_env: None
):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 8)
    [probe] = rlm.batch(
        [{"id": "probe", "query": "What is the square of the number?", "context": "number 99"}],
        model=MODEL, api_base=server.base_url, api_key=KEY, workers=1,
    )  # fmt: skip
    cost = probe.cost_usd
    assert probe.answer == "9801" and cost is not None and cost > 0
    code, stderr = in_process(capsys, "batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base",
                              server.base_url, "--workers", "1", "--budget-usd", repr(cost * 2.5))  # fmt: skip
    assert code == 1, stderr
    records = read_out(out)
    ran = [r for r in records if r["stop_reason"] == "final"]
    skipped = [r for r in records if r["stop_reason"] == "skipped"]
    assert len(ran) == 3 and len(skipped) == 5 and len(records) == 8
    assert all(r["error"] == "skipped: budget" and r["answer"] is None for r in skipped)
    assert sum(r["cost_usd"] for r in ran) == pytest.approx(3 * cost, rel=0.01)
    assert "5 skipped (budget)" in stderr
    # the skipped items were not started: one model call per item that ran (and one for the probe)
    assert len(server.requests) == 1 + 3
    code, stderr = in_process(capsys, "batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base",
                              server.base_url, "--workers", "2")  # fmt: skip
    assert code == 0, stderr
    records = read_out(out)
    assert sorted(r["id"] for r in records) == [f"q{i:02d}" for i in range(8)]
    assert all(r["answer"] == expected(r["id"]) for r in records)
    assert records[:3] == ran  # the runs that were paid for are kept


@pytest.mark.timeout(600)
def test_bad_input_lines_are_named_and_skip_bad_records_them(
    tmp_path: Path, server: LLMServer, capsys: pytest.CaptureFixture[str], key_env: None
):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "seven.txt").write_text("number 07")
    lines = [
        '{"id": "q03", "query": "q", "context": "number 03"}',
        '{"id": "broken", "query": ',
        '{"id": "noquery", "context": "x"}',
        '{"id": "q07", "query": "q", "context_path": "docs/seven.txt"}',
        '{"id": "q03", "query": "again", "context": "number 03"}',
        '{"id": "gone", "query": "q", "context_path": "docs/missing.txt"}',
        '["not", "an", "object"]',
        '{"id": "both", "query": "q", "context": "a", "context_path": "docs/seven.txt"}',
        '{"id": "blank", "query": " ", "context": "a"}',
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n\n")
    args = ("batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base", server.base_url)
    code, stderr = in_process(capsys, *args)
    assert code == 2 and not out.exists()
    for number, words in ((2, "invalid JSON"), (3, "missing field 'query'"), (5, "duplicate id 'q03'"),
                          (6, "missing.txt"), (7, "JSON object"), (8, "exactly one"),
                          (9, "field 'query' is empty")):  # fmt: skip
        assert f"line {number}: " in stderr and words in stderr, (number, stderr)
    assert "line 1:" not in stderr and "line 4:" not in stderr
    assert not server.requests  # nothing ran

    code, stderr = in_process(capsys, *args, "--skip-bad")
    assert code == 1, stderr
    records = {r["id"]: r for r in read_out(out)}
    assert (
        records["q03"]["answer"] == "9" and records["q07"]["answer"] == "49"
    )  # context_path: relative to the input
    bad = {k: v for k, v in records.items() if v["stop_reason"] == "bad_input"}
    assert set(bad) == {"line:2", "noquery", "line:5", "gone", "line:7", "both", "blank"}
    assert bad["line:5"]["error"].startswith("line 5: duplicate id")
    assert len(server.requests) == 2

    # the input fixed: a rerun tries the bad lines again and keeps the answered ones
    inp.write_text(
        "\n".join([lines[0], lines[3], '{"id": "noquery", "query": "q", "context": "number 05"}']) + "\n"
    )
    code, stderr = in_process(capsys, *args)
    assert code == 0, stderr
    records = read_out(out)
    assert sorted(r["id"] for r in records[:2]) == ["q03", "q07"] and records[2]["id"] == "noquery"
    assert records[2]["answer"] == "25" and len(records) == 3


def test_results_file_repairs_a_cut_line_and_refuses_a_second_writer(tmp_path: Path):
    out = tmp_path / "out.jsonl"
    good = {f: None for f in RECORD_FIELDS} | {"id": "a", "answer": "1", "stop_reason": "final"}
    skipped = good | {"id": "b", "answer": None, "stop_reason": "skipped", "error": "skipped: budget"}
    out.write_text(json.dumps(good) + "\n" + json.dumps(skipped) + "\n" + '{"id": "c", "answ')
    with ResultsFile(out) as results:
        assert results.done == {"a"} and results.dropped == 2
        assert out.read_text() == json.dumps(good) + "\n"
        with pytest.raises(ConfigurationError, match="another rlm batch"):
            ResultsFile(out).open()
        with pytest.raises(ConfigurationError, match="already recorded"):
            results.append(good)
        results.append(good | {"id": "c", "answer": "x\ud800y"})  # a lone surrogate stays valid JSON
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "c"]
    with ResultsFile(out) as results:  # the lock was released (and removed)
        assert results.done == {"a", "c"} and results.dropped == 0
    out.write_text("not json\n")
    with pytest.raises(ConfigurationError, match="line 1 is not a batch result"):
        ResultsFile(out).open()


def test_a_fifo_as_out_or_its_lock_is_bad_input_not_a_hang(tmp_path: Path):
    """``rlm batch --out ff`` read ff by name, then opened it for writing: with ff a FIFO both
    wait for the other end, forever. A FIFO as ``OUT.lock`` made the lock's ftruncate raise a
    raw OSError (a traceback). Each is now "not a regular file": bad input, exit 2."""
    from tests.conftest import run_cli, within

    (tmp_path / "in.jsonl").write_text('{"id": "a", "query": "q", "context": "c"}\n')
    out = tmp_path / "ff"
    flags = ["-m", "openai/x", "--api-base", "http://127.0.0.1:9/v1"]
    for fifo in (out, tmp_path / "ff.lock"):
        os.mkfifo(fifo)
        done = run_cli("batch", str(tmp_path / "in.jsonl"), "--out", str(out), *flags, timeout=30)
        assert done.returncode == 2, done
        assert done.stderr.endswith(f"{fifo}: not a regular file\n") and "Traceback" not in done.stderr
        with pytest.raises(ConfigurationError, match="not a regular file"):
            within(10, ResultsFile(out).open)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.jsonl", fifo.name])
        fifo.unlink()


@pytest.mark.parametrize("out", ["", ".", "/"])
def test_a_directory_without_a_name_as_out_is_bad_input_not_a_traceback(tmp_path: Path, out: str):
    """``rlm batch IN --out .`` (or ``/``, or ``""``, which is ``.``) raised pathlib's ValueError
    "has an empty name" out of the lock's path: a traceback, exit 1. Like any directory at OUT it
    is "not a regular file": bad input, exit 2, nothing written."""
    from tests.conftest import run_cli

    (tmp_path / "in.jsonl").write_text('{"id": "a", "query": "q", "context": "c"}\n')
    flags = ["-m", "openai/x", "--api-base", "http://127.0.0.1:9/v1"]
    done = run_cli("batch", "in.jsonl", "--out", out, *flags, cwd=tmp_path, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr == f"rlm batch: {out or '.'}: not a regular file\n", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    with pytest.raises(ConfigurationError, match="not a regular file"):
        ResultsFile(out)


def test_library_batch_runs_items_concurrently_and_yields_as_they_finish(server: LLMServer):
    items = [rlm.BatchItem(f"q{i:02d}", "square?", context=f"number {i:02d}") for i in range(12)]
    seen = []
    for result in rlm.batch(items, model=MODEL, api_base=server.base_url, api_key=KEY, workers=4):
        seen.append(result)
    assert sorted(r.id for r in seen) == [item.id for item in items]
    assert all(r.answer == expected(r.id) and r.ok for r in seen)
    starts = sorted(q.received_at for q in server.requests)
    assert max(sum(1 for s in starts if t <= s < t + 0.1) for t in starts) >= 2  # runs overlapped
    with pytest.raises(ConfigurationError, match="duplicate id"):
        list(rlm.batch([items[0], items[0]], model=MODEL, api_base=server.base_url, workers=1))
    with pytest.raises(ConfigurationError, match="engine"):
        rlm.batch(items, model=MODEL, engine="spark")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(600)
def test_an_endpoint_that_refuses_connections_is_a_setup_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_env: None
):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    (tmp_path / "context.txt").write_text("text")
    code, stderr = in_process(capsys, "run", "-m", MODEL, "--api-base", url, "--context",
                              str(tmp_path / "context.txt"), "--query", "q")  # fmt: skip
    assert code == 2, stderr
    assert url in stderr and "connection refused" in stderr
    assert "InternalServerError" not in stderr and "Traceback" not in stderr
    # a batch stops at the first item instead of recording one error per item
    items = [{"id": str(i), "query": "q", "context": "c"} for i in range(20)]
    started = time.monotonic()
    with pytest.raises(ModelUnreachable, match="connection refused"):
        for _ in rlm.batch(items, model=MODEL, api_base=url, api_key=KEY, workers=2):
            raise AssertionError("no result expected")
    assert time.monotonic() - started < 60
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 20)
    code, stderr = in_process(capsys, "batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base", url)
    assert code == 2 and "stopped:" in stderr and "connection refused" in stderr and url in stderr, stderr
    assert not out.exists()  # no error line per item (no file): rerunning once the server is up runs them all


def test_only_the_ray_engine_imports_ray_and_batch_help_imports_neither_ray_nor_litellm():
    importers = [
        p.relative_to(ROOT_DIR).as_posix()
        for p in (ROOT_DIR / "rlm").rglob("*.py")
        if "import ray" in p.read_text() or "from ray" in p.read_text()
    ]
    assert importers == ["rlm/batching/ray_engine.py"]
    code = (
        "import sys, contextlib, io\n"
        "import rlm, rlm.cli, rlm.batching\n"
        "rlm.batch, rlm.BatchItem, rlm.BatchResult\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    rlm.cli.main(['batch', '--help'])\n"
        "print(sorted(m for m in ('ray', 'litellm', 'openai') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT_DIR, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_progress_line_and_summary(monkeypatch: pytest.MonkeyPatch):
    import io

    monkeypatch.setenv("COLUMNS", "200")  # the line is cut to the terminal's width: make room for all of it

    from rlm.batching.progress import Progress

    stream = io.StringIO()
    progress = Progress(4, stream, live=True)
    ok = rlm.BatchResult("a", "1", "final", 1, 0, 100, 20, 0.5, 1.0, None)
    progress.add(ok)
    progress.add(rlm.BatchResult("b", None, "error", 0, 0, 0, 0, None, 0.1, "boom \x1b[2J"))
    progress.draw(force=True)
    line = stream.getvalue().rsplit("\r", 1)[-1]
    assert "2/4 done, 1 failed, 120 tokens, $0.5000" in line and "ETA " in line
    summary = progress.summary("out.jsonl", already=3)
    assert "2 of 4 item(s)" in summary and "1 answered, 1 failed, 0 skipped (budget)" in summary
    assert "3 already in out.jsonl" in summary and "\x1b" not in stream.getvalue() + summary
    # "b" never ran (priced_usd None: its context could not be read, say): it made no call of
    # unknown price, which the summary claimed it had; a run without a price for a call did.
    assert "unknown price" not in summary
    progress.add(rlm.BatchResult("c", "2", "final", 1, 0, 10, 2, None, 0.1, None, 0.0))
    assert "$0.5000 (+ calls of unknown price in 1 run(s))" in progress.summary("out.jsonl")
    quiet = io.StringIO()
    Progress(4, quiet).add(ok)  # a StringIO is not a terminal: nothing drawn while running
    assert quiet.getvalue() == ""


def test_batch_request_timeout_gives_up_a_call_that_gets_no_answer(tmp_path: Path):
    """``rlm batch --request-timeout`` reaches every run: the first call gets no answer (the handler
    sleeps past the timeout) and is retried; without the flag it would wait out the 600 s default."""
    from tests.llm_server import Reply

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 1)
    with LLMServer([Reply("never sent", latency_s=30), SQUARE]) as srv:
        # (2 s: the retried call's answer must come within it on a loaded machine too; the
        # subprocess timeout only catches a hang: litellm's import alone took 20-45 s at load 9.)
        done = warm_cli.run(
            batch_argv(inp, out, srv, "--request-timeout", "2", "--workers", "1"),
            capture_output=True, text=True, cwd=ROOT_DIR, env=cli_env(), timeout=240,
        )  # fmt: skip
        asked = len(srv.requests)
        bad = warm_cli.run(batch_argv(inp, tmp_path / "x.jsonl", srv, "--request-timeout", "-1"),
                             capture_output=True, text=True, cwd=ROOT_DIR, env=cli_env(), timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [(r["id"], r["answer"]) for r in read_out(out)] == [("q00", "0")]
    assert asked == 2, asked
    assert bad.returncode == 2 and "--request-timeout must be" in bad.stderr, bad.stderr
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("planted", ["fifo", "symlink"])
def test_the_repair_of_out_writes_no_file_planted_at_its_temporary_name(tmp_path: Path, planted: str):
    """Repairing OUT (a line cut by a crash dropped) wrote ``.OUT.<pid>.tmp``, opened by name,
    and renamed it over OUT: a FIFO planted at that name hung the batch before it ran anything,
    a symbolic link made the results land in the file it points to and became OUT. The temporary
    file is now created (``O_EXCL``, a random name): what was planted is left alone."""
    inp, out, victim = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "victim.txt"
    write_items(inp, 1)
    done = json.dumps({"id": "q00", "answer": "0", "stop_reason": "final"}) + "\n"
    out.write_text(done + '{"id": "q01", "ans')  # the last line cut by a crash
    victim.write_text("untouched")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "tmp = Path(sys.argv[1]).with_name(f'.out.jsonl.{os.getpid()}.tmp')\n"
        "os.mkfifo(tmp) if sys.argv[2] == 'fifo' else tmp.symlink_to(sys.argv[3])\n"
        "print(tmp, flush=True)\n"
        "from rlm.cli import main\n"
        "sys.exit(main(['batch', sys.argv[4], '--out', sys.argv[1], '-m', 'openai/x',\n"
        "               '--api-base', 'http://127.0.0.1:9/v1']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")} | {"OPENAI_API_KEY": KEY}
    run = subprocess.run(
        [sys.executable, "-c", script, str(out), planted, str(victim), str(inp)],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT_DIR), env=env,
    )  # fmt: skip
    assert run.returncode == 0, run
    assert stat.S_ISREG(out.lstat().st_mode) and out.read_text() == done  # repaired, nothing to run
    assert victim.read_text() == "untouched"
    left = Path(run.stdout.splitlines()[0])
    assert (stat.S_ISFIFO if planted == "fifo" else stat.S_ISLNK)(left.lstat().st_mode)
    names = ["in.jsonl", "out.jsonl", "victim.txt", left.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_closing_the_batch_early_stops_the_runs_in_flight():
    """An embedder who stops iterating ``rlm.batch`` (``break``, an exception, ``close()``) got
    the generator closed, but the runs in flight went on in their daemon threads: calling the
    model turn after turn (18 paid calls in the 3 s after close) up to max_iterations, their
    results dropped. The engine now cancels them through a CancelToken, and close waits for them."""
    import threading

    from tests.llm_server import Reply

    def reply(request: ChatRequest) -> Reply:
        if "FAST" in request.prompt_text:
            return Reply("```repl\nFINAL('done')\n```", latency_s=0.05)
        return Reply("```repl\nimport time\ntime.sleep(0.1)\nprint(1)\n```", latency_s=0.2)  # never final

    items = [{"id": "fast", "query": "FAST", "context": "x"}]
    items += [{"id": f"slow{i}", "query": "SLOW", "context": "x"} for i in range(2)]
    with LLMServer(reply) as srv:
        runs = rlm.batch(items, model=MODEL, api_base=srv.base_url, api_key=KEY, workers=3)
        first = next(runs)
        assert (first.id, first.answer) == ("fast", "done")
        deadline = time.monotonic() + 30
        while sum("SLOW" in q.prompt_text for q in srv.requests) < 4:  # both slow runs are turning
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        runs.close()
        assert time.monotonic() - started < 5
        time.sleep(0.3)  # a request already on its way when close() returned is counted
        asked = len(srv.requests)
        time.sleep(1.5)  # a run going on would ask again every ~0.35 s
        assert len(srv.requests) == asked, len(srv.requests) - asked
    assert not [t.name for t in threading.enumerate() if t.name.startswith("rlm-batch-")]


def test_a_rerun_exits_1_while_a_failed_line_of_an_earlier_run_is_in_out(
    tmp_path: Path, server: LLMServer, capsys: pytest.CaptureFixture[str], key_env: None
):
    """The exit status is 0 only when every item of the input has an answer in OUT. A rerun
    counted only what it ran itself: with a failed item's line from the first run still in OUT
    (it is not run again), the second run ran nothing and exited 0, telling a script that
    loops until success that the batch was complete."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 2)
    good = inp.read_text().splitlines()
    failing = json.dumps({"id": "q01", "query": "square?", "context": "\udfff number 01"})  # fails in its run
    inp.write_text(good[0] + "\n" + failing + "\n")
    args = ("batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base", server.base_url,
            "--workers", "1")  # fmt: skip
    code, stderr = in_process(capsys, *args)
    assert code == 1, stderr
    records = {r["id"]: r for r in read_out(out)}
    assert records["q00"]["answer"] == "0" and records["q01"]["stop_reason"] == "error"
    code, stderr = in_process(capsys, *args)  # nothing left to run, one item without an answer
    assert code == 1, stderr
    assert "2 already in" in stderr and "1 of them without an answer" in stderr
    new = json.dumps({"id": "q02", "query": "q", "context": "number 02"})
    inp.write_text(good[0] + "\n" + failing + "\n" + new + "\n")
    code, stderr = in_process(capsys, *args)  # the new item is answered; q01 still is not
    assert code == 1, stderr
    assert read_out(out)[-1]["answer"] == "4"
    # the failed line deleted and the input fixed: the item runs again and the batch is complete
    out.write_text("".join(json.dumps(r) + "\n" for r in read_out(out) if r["id"] != "q01"))
    inp.write_text("\n".join(good) + "\n")
    code, stderr = in_process(capsys, *args)
    assert code == 0, stderr
    answers = sorted((r["id"], r["answer"]) for r in read_out(out))
    assert answers == [("q00", "0"), ("q01", "1"), ("q02", "4")]


def test_out_through_a_symbolic_link_is_one_file_with_one_lock_and_its_lock_is_never_a_link(tmp_path: Path):
    """OUT.lock was opened following links, then truncated and given the pid: a link planted
    there (a directory others may write) emptied the file it led to. OUT given as a link took its
    lock beside the link, so a batch writing the same file under its own name ran at the same
    time (ids twice), and a repair renamed the new file over the link: the link became a copy,
    the real file kept its cut line. The lock is now never opened through a link, and OUT's
    links are followed once: one lock beside the real file, the repair renames over it."""
    from tests.conftest import run_cli

    inp, real, link = tmp_path / "in.jsonl", tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    write_items(inp, 1)
    done = json.dumps({f: None for f in RECORD_FIELDS} | {"id": "q00", "answer": "0", "stop_reason": "final"})
    real.write_text(done + "\n" + '{"id": "q01", "ans')  # the last line cut by a crash
    link.symlink_to(real.name)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "real.jsonl.lock").symlink_to(victim.name)
    with pytest.raises(ConfigurationError, match="real.jsonl.lock: a symbolic link, refused"):
        ResultsFile(link).open()
    assert victim.read_text() == "precious" and real.read_text().endswith('"ans')
    (tmp_path / "real.jsonl.lock").unlink()
    with ResultsFile(link) as results:
        assert results.done == {"q00"} and link.is_symlink()
        assert real.read_text() == done + "\n"  # the real file repaired, the link left a link
        # a batch writing the same file by its own name, from another process, is refused
        other = run_cli("batch", str(inp), "--out", str(real), "-m", MODEL, "--api-base",
                        "http://127.0.0.1:9/v1", timeout=60)  # fmt: skip
        assert other.returncode == 2 and "another rlm batch is writing" in other.stderr, other.stderr
        results.append(json.loads(done) | {"id": "q01", "answer": "1"})
    assert [r["id"] for r in read_out(real)] == ["q00", "q01"] and link.is_symlink()
    names = ["in.jsonl", "link.jsonl", "real.jsonl", "victim.txt"]  # no lock left, no copy
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_the_repair_of_out_keeps_its_permissions(tmp_path: Path):
    """Repairing OUT (a cut last line dropped) renamed a new file made with mode 0666 less the
    umask over it: answers kept private in a 0600 file became readable by every user (0644).
    The new file now gets OUT's own mode (less the umask: never looser)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 1)
    done = json.dumps({"id": "q00", "answer": "0", "stop_reason": "final"}) + "\n"
    out.write_text(done + '{"id": "q01", "ans')  # the last line cut by a crash
    out.chmod(0o600)
    # nothing is left to run: no model server is needed
    argv = [sys.executable, "-m", "rlm", "batch", str(inp), "--out", str(out), "-m", MODEL,
            "--api-base", "http://127.0.0.1:9/v1"]  # fmt: skip
    run = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=ROOT_DIR, env=cli_env(), umask=0o022
    )
    assert run.returncode == 0, run.stderr
    assert out.read_text() == done  # repaired
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


@pytest.mark.timeout(600)
def test_an_endpoint_that_goes_away_mid_run_stops_the_batch_and_records_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_env: None
):
    """A server that refuses connections stops the batch without an error line per item, so the
    items run again once it is back. But a run that lost it after its first turn ended with
    ``stop_reason="model_error"``, written to OUT as the item's failure and never run again: a
    server restarted during a batch failed every run in flight for good. Such a run (its
    ``error_type`` is ModelUnreachable) now stops the batch as the first turn's failure does."""
    import threading

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 1)
    turning = "```repl\nimport time\ntime.sleep(0.5)\nprint('thinking')\n```"  # never final
    args = ("batch", str(inp), "--out", str(out), "-m", MODEL, "--workers", "1")
    with LLMServer(turning, latency_s=0.05) as srv:

        def stop_after_the_first_turn() -> None:
            while not any(q.sent_at for q in srv.requests):
                time.sleep(0.01)
            srv.kill()  # the run's second call finds nobody there

        stopper = threading.Thread(target=stop_after_the_first_turn, daemon=True)
        stopper.start()
        code, stderr = in_process(capsys, *args, "--api-base", srv.base_url)
        stopper.join(10)
        asked = len(srv.requests)
    assert asked == 1, asked
    assert code == 2 and "stopped:" in stderr and "connection refused" in stderr, stderr
    assert not out.exists()  # nothing recorded (no file made): the item runs again
    with LLMServer(square_reply) as srv:  # the server is back (on another port)
        code, stderr = in_process(capsys, *args, "--api-base", srv.base_url)
    assert code == 0, stderr
    assert [(r["id"], r["answer"]) for r in read_out(out)] == [("q00", "0")]


@pytest.mark.timeout(600)
def test_out_deleted_while_the_batch_runs_stops_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_env: None
):
    """OUT deleted during a batch (an ``rm``, a cleanup job): the batch went on appending to the
    unlinked file, every later result lost, and ended with exit 0 and "results in OUT", a file
    that did not exist. The next append now sees the file gone and stops the batch (exit 2)."""
    import threading

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 4)
    args = ("batch", str(inp), "--out", str(out), "-m", MODEL, "--workers", "1")
    with LLMServer(square_reply, latency_s=0.3) as srv:

        def delete_after_the_first_line() -> None:
            while not (out.exists() and out.read_text().count("\n") >= 1):
                time.sleep(0.01)
            out.unlink()

        deleter = threading.Thread(target=delete_after_the_first_line, daemon=True)
        deleter.start()
        code, stderr = in_process(capsys, *args, "--api-base", srv.base_url)
        deleter.join(10)
        asked = len(srv.requests)
        assert code == 2 and "deleted or replaced while the batch ran" in stderr, stderr
        assert asked < 4  # stopped: not every item was run into the void
        srv.set_latency(0.05)
        code, stderr = in_process(capsys, *args, "--api-base", srv.base_url)
    assert code == 0, stderr
    assert sorted(r["id"] for r in read_out(out)) == [f"q{i:02d}" for i in range(4)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a link another owner")
def test_a_link_at_out_planted_by_another_user_is_not_followed(tmp_path: Path):
    """OUT was opened following any symbolic link, with O_CREAT: a link planted at OUT's name by
    another user who may write its directory (not sticky, so fs.protected_symlinks does not
    help) made the batch append its results to any file it may write, or create one (a dangling
    link), as its own user. A link at OUT, and each one after it, is now followed only when it is
    owned by this process's user or by root, as for an audit log."""
    from tests.conftest import run_cli

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # anyone may write here, no sticky bit
    (tmp_path / "in.jsonl").write_text('{"id": "a", "query": "q", "context": "c"}\n')
    victim, created = tmp_path / "victim.jsonl", tmp_path / "created.jsonl"
    victim.write_text("")  # an empty file the batch's user may write
    out, hop = shared / "out.jsonl", shared / "hop.jsonl"
    for first, leads_to in ((victim, None), (created, None), (victim, hop)):
        if leads_to is None:
            out.symlink_to(first)
            os.lchown(out, 65534, 65534)  # planted by nobody
        else:  # a link of root's leading to one of nobody's
            leads_to.symlink_to(first)
            os.lchown(leads_to, 65534, 65534)
            out.symlink_to(leads_to)
        with pytest.raises(ConfigurationError, match="owned by uid 65534.*not followed"):
            ResultsFile(out).open()
        done = run_cli("batch", str(tmp_path / "in.jsonl"), "--out", str(out), "-m", MODEL, "--api-base",
                       "http://127.0.0.1:9/v1", timeout=60)  # fmt: skip
        assert done.returncode == 2 and "not followed" in done.stderr, done.stderr
        assert victim.read_text() == "" and not created.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "shared", "victim.jsonl"]
        assert not list(shared.glob("*.lock"))
        for link in (out, hop):
            link.unlink(missing_ok=True)
    out.symlink_to(victim)  # root's own link is followed
    with ResultsFile(out) as results:
        results.append({f: None for f in RECORD_FIELDS} | {"id": "a", "answer": "1", "stop_reason": "final"})
    assert json.loads(victim.read_text())["id"] == "a" and out.is_symlink()


def test_the_summary_shows_escapes_in_out_s_name_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_env: None
):
    """The closing summary printed OUT's name as it was: a file name holding terminal escapes
    (``rlm batch "$f" --out "out/$f"`` over files someone else named) set the terminal's title
    or cleared it. Every other line of the command shows control characters escaped; so does
    the summary now."""
    inp = tmp_path / "in.jsonl"
    write_items(inp, 1)
    out = tmp_path / "out\x1b]0;pwned\x07\x1b[2J.jsonl"
    out.write_text(json.dumps({"id": "q00", "answer": "0", "stop_reason": "final"}) + "\n")
    code, stderr = in_process(capsys, "batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base",
                              "http://127.0.0.1:9/v1")  # fmt: skip
    assert code == 0, stderr
    assert "1 already in" in stderr and "results in" in stderr
    assert "\x1b" not in stderr and "\x07" not in stderr and "\\x1b]0;pwned\\x07" in stderr


def test_a_bad_setting_with_skip_bad_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_env: None
):
    """``rlm batch`` checks its settings before it writes anything. With ``--skip-bad``, the bad
    lines' records were written first and the batch's settings (a policy that does not exist)
    checked after: exit 2 with OUT holding records and a summary of a batch that never ran. The
    runs are now set up (and their settings checked) before any record is written."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 1)
    with inp.open("a") as f:
        f.write('{"id": "broken", "query": \n')
    code, stderr = in_process(capsys, "batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base",
                              "http://127.0.0.1:9/v1", "--skip-bad", "--policy", "nosuchpolicy")  # fmt: skip
    assert code == 2, stderr
    assert "nosuchpolicy" in stderr and "results in" not in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()


def test_two_hard_links_of_one_out_are_one_file_with_one_lock(tmp_path: Path):
    """Two names of one OUT (hard links, here in two directories) took two lock files, each
    beside its name: two batches wrote the same file at once, their lines interleaved and ids
    twice. OUT itself is now locked too (an flock on its descriptor follows the file, not the
    name), also the new file a repair renames over OUT; OUT.lock stays as it was."""
    from tests.conftest import run_cli

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    inp, first, second = tmp_path / "in.jsonl", tmp_path / "a" / "out.jsonl", tmp_path / "b" / "other.jsonl"
    write_items(inp, 1)
    done = json.dumps({f: None for f in RECORD_FIELDS} | {"id": "q00", "answer": "0", "stop_reason": "final"})
    first.write_text(done + "\n")
    os.link(first, second)
    with ResultsFile(first) as results:
        assert (tmp_path / "a" / "out.jsonl.lock").exists()
        with pytest.raises(ConfigurationError, match="another rlm batch is writing this file"):
            ResultsFile(second).open()
        other = run_cli("batch", str(inp), "--out", str(second), "-m", MODEL, "--api-base",
                        "http://127.0.0.1:9/v1", timeout=60)  # fmt: skip
        assert other.returncode == 2 and "another rlm batch is writing" in other.stderr, other.stderr
        results.append(json.loads(done) | {"id": "q01", "answer": "1"})
    assert not list(tmp_path.glob("*/*.lock"))  # the refused batch left no lock behind either
    with ResultsFile(second) as results:  # released
        assert results.done == {"q00", "q01"}
    # a repair renames a new file over OUT: that file is the one locked
    first.write_text(done + "\n" + '{"id": "q01", "ans')  # the last line cut by a crash
    with ResultsFile(first) as results:
        assert results.dropped == 1 and first.read_text() == done + "\n"
        os.link(first, tmp_path / "b" / "third.jsonl")
        with pytest.raises(ConfigurationError, match="another rlm batch is writing this file"):
            ResultsFile(tmp_path / "b" / "third.jsonl").open()


def test_a_query_with_a_lone_surrogate_is_refused_before_any_request(
    tmp_path: Path, server: LLMServer, capsys: pytest.CaptureFixture[str], key_env: None
):
    """A query holding a lone surrogate (``"\\ud800"`` in the JSON, ``rlm.batch`` from Python,
    bytes that are not UTF-8 in ``rlm run --query``) can never be sent: the provider's client
    cannot encode it. Each item tried and retried its first call for about 12 s, then failed
    (``rlm run`` exited 1 after as long). It is now refused at once, before any request: bad
    input naming the line (exit 2, or a ``bad_input`` line with --skip-bad), a ConfigurationError
    naming the item from ``rlm.batch`` and ``RLM.completion``, exit 2 from ``rlm run``."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 1)
    with inp.open("a") as f:
        f.write('{"id": "lone", "query": "square\\ud800?", "context": "number 03"}\n')
    args = ("batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base", server.base_url)
    from rlm.llm import warm

    warm()  # litellm's first import in this worker (seconds; 18 s under load) is not what is timed
    started = time.monotonic()
    code, stderr = in_process(capsys, *args)
    assert code == 2 and "line 2: field 'query' is not valid Unicode text" in stderr, stderr
    assert not server.requests and not out.exists()
    code, stderr = in_process(capsys, *args, "--skip-bad", "--workers", "1")
    assert code == 1, stderr
    records = {r["id"]: r for r in read_out(out)}
    assert records["q00"]["answer"] == "0" and records["lone"]["stop_reason"] == "bad_input"
    assert len(server.requests) == 1
    for item in (
        {"id": "lone", "query": "q\ud800", "context": "c"},
        rlm.BatchItem("lone", "q\ud800", context="c"),
    ):
        with pytest.raises(ConfigurationError, match="item 0: field 'query' is not valid Unicode"):
            list(rlm.batch([item], model=MODEL, api_base=server.base_url, api_key=KEY, workers=1))
    with pytest.raises(ConfigurationError, match="root_prompt is not valid Unicode"):
        rlm.RLM(MODEL, api_base=server.base_url, api_key=KEY).completion("c", root_prompt="q\udcff")
    (tmp_path / "context.txt").write_text("number 03")
    code, stderr = in_process(capsys, "run", "-m", MODEL, "--api-base", server.base_url, "--context",
                              str(tmp_path / "context.txt"), "--query", "square\udcff?")  # fmt: skip
    assert code == 2 and "--query is not valid UTF-8 (byte 0xff at character 6)" in stderr, stderr
    code, stderr = in_process(capsys, "run", "-m", MODEL, "--api-base", server.base_url, "--context",
                              str(tmp_path / "context.txt"), "--query", "square\ud800?")  # fmt: skip
    assert code == 2 and "--query is not valid Unicode text" in stderr, stderr  # not from argv's bytes
    assert len(server.requests) == 1  # none of them sent a request
    assert time.monotonic() - started < 10


def test_a_rerun_refuses_ids_whose_question_changed(
    tmp_path: Path, server: LLMServer, capsys: pytest.CaptureFixture[str], key_env: None
):
    """A rerun skipped every id already in OUT, also when the input now asks that id another
    question (its query edited, its context file rewritten): the old answer stood for the new
    question, exit 0. Each line now records ``question_sha256`` (the query and the context's
    bytes as the run read them), and a rerun whose item hashes otherwise is refused, naming the
    ids, before anything runs (exit 2). Lines without the field (older ones) count as answers."""
    from rlm.batching.items import BatchItem

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("number 01")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "q00", "query": "square?", "context": "number 00"},
             {"id": "q01", "query": "square?", "context_path": "docs/one.txt"},
             {"id": "q02", "query": "square?", "context": "number 02"}]  # fmt: skip
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = (
        "batch",
        str(inp),
        "--out",
        str(out),
        "-m",
        MODEL,
        "--api-base",
        server.base_url,
        "--workers",
        "2",
    )
    code, stderr = in_process(capsys, *args)
    assert code == 0, stderr
    records = {r["id"]: r for r in read_out(out)}
    assert {i: r["answer"] for i, r in records.items()} == {"q00": "0", "q01": "1", "q02": "4"}
    assert (
        records["q00"]["question_sha256"]
        == BatchItem("q00", "square?", context="number 00").question_sha256()
    )
    one = BatchItem("q01", "square?", context_path=tmp_path / "docs" / "one.txt")
    assert records["q01"]["question_sha256"] == one.question_sha256()
    assert len({r["question_sha256"] for r in records.values()}) == 3
    # the input moved elsewhere, its context file too: the same questions, nothing to run
    moved = tmp_path / "moved"
    (moved / "docs").mkdir(parents=True)
    (moved / "docs" / "one.txt").write_text("number 01")
    (moved / "in.jsonl").write_text(inp.read_text())
    code, stderr = in_process(capsys, "batch", str(moved / "in.jsonl"), *args[2:])
    assert code == 0 and "3 already in" in stderr, stderr
    # a line written before the field existed is an answer to whatever its id asks now
    legacy = {k: v for k, v in records["q02"].items() if k != "question_sha256"}
    out.write_text("".join(json.dumps(records[i]) + "\n" for i in ("q00", "q01")) + json.dumps(legacy) + "\n")
    before = out.read_text()
    lines[0]["query"] = "cube?"  # another question under the same id
    lines[2]["context"] = "number 03"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "docs" / "one.txt").write_text("number 11")
    asked = len(server.requests)
    code, stderr = in_process(capsys, *args)
    assert code == 2, stderr
    assert "2 id(s) of the input have a line there that answered another question" in stderr, stderr
    assert "'q00', 'q01'" in stderr and "q02" not in stderr
    assert len(server.requests) == asked and out.read_text() == before  # nothing ran or was written
    # their lines deleted, they run again
    out.write_text(json.dumps(legacy) + "\n")
    code, stderr = in_process(capsys, *args)
    assert code == 0, stderr
    assert {r["id"]: r["answer"] for r in read_out(out)} == {"q00": "0", "q01": "121", "q02": "4"}
    assert len(server.requests) == asked + 2
    # many: a few are named, then a count
    inp.write_text(
        "".join(json.dumps({"id": f"x{i}", "query": "q", "context": "c"}) + "\n" for i in range(8))
    )
    other = {f: None for f in RECORD_FIELDS} | {
        "answer": "1",
        "stop_reason": "final",
        "question_sha256": "0" * 64,
    }
    out.write_text("".join(json.dumps(other | {"id": f"x{i}"}) + "\n" for i in range(8)))
    code, stderr = in_process(capsys, *args)
    assert code == 2 and "8 id(s)" in stderr and "'x4' and 3 more." in stderr and "'x5'" not in stderr, stderr


@pytest.mark.timeout(300)
def test_a_batch_stopped_before_any_result_makes_no_out_and_claims_no_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key_env: None
):
    """A setup error (a policy that does not exist) or a first run that fails every item (a
    model litellm cannot route, an endpoint that refuses connections) exited 2 but left OUT
    made and empty, and the fatal first run's summary still said "results in OUT": an empty
    file that looked like a batch's results. A batch that writes no line now removes the OUT
    it made, and its summary says nothing was written; an OUT that was there stays."""
    inp = tmp_path / "in.jsonl"
    write_items(inp, 2)
    refused = ("--api-base", f"http://127.0.0.1:{closed_port()}/v1")
    for extra in [("--policy", "nosuchpolicy", *refused), refused, ("-m", "nosuchprovider/zzz")]:
        out = tmp_path / "out.jsonl"
        code, stderr = in_process(capsys, "batch", str(inp), "--out", str(out), "-m", MODEL, *extra)
        assert code == 2 and "Traceback" not in stderr, (extra, stderr)
        assert "results in" not in stderr, (extra, stderr)
        assert not out.exists() and not (tmp_path / "out.jsonl.lock").exists(), (extra, stderr)
    # An OUT that was there before (empty, or with earlier lines) is left as it was.
    out = tmp_path / "kept.jsonl"
    out.write_text("")
    code, stderr = in_process(capsys, "batch", str(inp), "--out", str(out), "-m", "nosuchprovider/zzz")
    assert code == 2 and out.exists() and out.read_text() == "", stderr
    assert f"nothing was written to {out}" in stderr and "results in" not in stderr, stderr


def test_an_items_context_that_cannot_be_loaded_fails_that_item_only(server: LLMServer, key_env: None):
    """A context the sandbox cannot take (here over the policy's max_message_mb) is a
    ContextError, a ConfigurationError: a batch stops at a ConfigurationError, which would fail
    every item the same way, but this one is the item's own. It is that item's error line; the
    rest are answered."""
    from tests.conftest import policy_with

    items = [
        rlm.BatchItem("q00", "square?", context="number 00"),
        rlm.BatchItem("big", "square?", context="number 01 " + "x" * 1_500_000),
        rlm.BatchItem("q02", "square?", context="number 02"),
    ]
    policy = policy_with({"limits.max_message_mb": 1, "limits.max_output_bytes": 100_000})
    records = {
        r.id: r
        for r in rlm.batch(items, model=MODEL, api_base=server.base_url, api_key=KEY, workers=1, policy=policy)
    }
    assert [records[i].answer for i in ("q00", "q02")] == ["0", "4"], records
    big = records["big"]
    assert big.stop_reason == "error" and big.error is not None and "cannot be loaded" in big.error, records
    assert len(server.requests) == 2
