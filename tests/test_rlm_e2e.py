"""End to end through litellm's real HTTP path, against the loopback server (tests/llm_server.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlm import RLM, run
from rlm.cli import main as cli_main
from rlm.errors import AuthenticationError, UnknownModelError
from tests.conftest import policy_with, run_cli
from tests.llm_server import ChatRequest, LLMServer, Reply

ROOT_DIR = Path(__file__).resolve().parent.parent
KEY = "sk-test-LEAKCHECK-9f8e7d6c5b4a"

SALARIES = "\n".join(f"{name}: {dept}, ${pay:,}" for name, dept, pay in [
    ("Alice", "Engineering", 75000), ("Bob", "Marketing", 65000), ("Charlie", "Engineering", 85000),
    ("Dana", "Engineering", 90000), ("Eve", "Sales", 50000),
])  # fmt: skip

ROOT_TURNS = [
    "Let me look at the records.\n```repl\nlines = context.splitlines()\nprint(len(lines), lines[0])\n```",
    "```repl\nimport re\neng = [l for l in lines if 'Engineering' in l]\n"
    "checks = llm_query_batched(['Is this an engineer? ' + l for l in eng])\n"
    "total = sum(int(re.search(r'\\$([\\d,]+)', l).group(1).replace(',', '')) for l in eng)\n"
    "print(total, checks)\n```",
    "The sum is verified.\nFINAL_VAR(total)",
]


def root_and_sub(request: ChatRequest) -> str:
    if request.model == "gpt-4o-mini":  # the root model: one scripted reply per turn
        turn = sum(1 for m in request.messages if m.get("role") == "assistant")
        return ROOT_TURNS[min(turn, len(ROOT_TURNS) - 1)]
    return "yes"


def _written_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_end_to_end_answer_tokens_cost_log_and_no_key_leak(tmp_path: Path):
    log_dir = tmp_path / "logs"
    with LLMServer(root_and_sub) as srv:
        r = run(
            "What is the total salary of all Engineering employees?",
            SALARIES,
            model="openai/gpt-4o-mini",
            sub_model="openai/gpt-4o",
            api_base=srv.base_url,
            api_key=KEY,
            log_dir=log_dir,
        )
        requests = srv.requests
        root_tokens = srv.usage_totals("gpt-4o-mini")
        sub_tokens = srv.usage_totals("gpt-4o")
    assert r.answer == "250000" and r.stop_reason == "final"
    assert (r.iterations, r.code_executions, r.sub_calls) == (3, 2, 3)
    assert r.usage["openai/gpt-4o-mini"].calls == 3 and r.usage["openai/gpt-4o"].calls == 3
    assert (
        r.usage["openai/gpt-4o-mini"].input_tokens,
        r.usage["openai/gpt-4o-mini"].output_tokens,
    ) == root_tokens
    assert (r.usage["openai/gpt-4o"].input_tokens, r.usage["openai/gpt-4o"].output_tokens) == sub_tokens
    assert r.total_input_tokens == root_tokens[0] + sub_tokens[0]
    assert r.total_output_tokens == root_tokens[1] + sub_tokens[1]

    import litellm

    expected = 0.0
    for model, (tin, tout) in (("gpt-4o-mini", root_tokens), ("gpt-4o", sub_tokens)):
        cin, cout = litellm.cost_per_token(model=model, prompt_tokens=tin, completion_tokens=tout)
        expected += cin + cout
    assert r.cost_usd == pytest.approx(expected, rel=1e-6) and r.cost_usd > 0

    # the context never reached the root model beyond its 300-character preview
    root_prompts = [json.dumps(q.messages) for q in requests if q.model == "gpt-4o-mini"]
    assert all("Eve: Sales" not in p for p in root_prompts[:1]) or len(SALARIES) <= 300

    # the JSONL log: metadata, one line per turn, the sub-calls of the batch block
    lines = [json.loads(line) for line in Path(r.log_path).read_text().splitlines()]
    assert [x["type"] for x in lines] == ["metadata", "iteration", "iteration", "iteration"]
    batch_block = lines[2]["code_blocks"][0]["result"]
    assert len(batch_block["rlm_calls"]) == 3 and batch_block["rlm_calls"][0]["response"] == "yes"
    # each sub-call carries the server's token counts for it
    assert sum(c["prompt_tokens"] for c in batch_block["rlm_calls"]) == sub_tokens[0]
    assert sum(c["completion_tokens"] for c in batch_block["rlm_calls"]) == sub_tokens[1]
    assert Path(r.audit_log_path).exists()

    # the key reached the server only as the Authorization header, and was written nowhere
    assert all(q.headers.get("authorization") == f"Bearer {KEY}" for q in requests)
    assert all(KEY not in json.dumps(q.body) for q in requests)
    for path in _written_files(tmp_path):
        assert KEY not in path.read_text(errors="replace"), path
    assert KEY not in r.model_dump_json()


def test_the_key_never_reaches_the_sandbox(tmp_path: Path):
    probe = (
        "```repl\nimport os\nenv = dict(os.environ)\nprint(sorted(env))\nprint(env)\n"
        "print(open('/proc/self/environ').read())\n```\nFINAL(probed)"
    )
    with LLMServer(probe) as srv:
        r = RLM(
            "openai/local",
            api_base=srv.base_url,
            api_key=KEY,
            log_dir=tmp_path,
            policy=policy_with({"python.guard": "none"}),
        ).completion("ctx", "q")
    stdout = r.history[0]["code_blocks"][0]["result"]["stdout"]
    assert "OPENAI" not in stdout and KEY not in stdout
    assert r.answer == "probed" and r.cost_usd is None  # a model missing from the price map: cost unknown
    for path in _written_files(tmp_path):
        assert KEY not in path.read_text(errors="replace"), path


def test_batch_is_really_concurrent(tmp_path: Path):
    code = "```repl\nr = llm_query_batched([f'item {i}' for i in range(100)])\nprint(len(r), r[0], r[99])\nFINAL(len(r))\n```"

    def reply(request: ChatRequest) -> str:
        return code if request.model == "root" else request.last_user.upper()

    latency = 0.2  # long enough that a client slowed by a busy machine still overlaps its calls
    with LLMServer(reply, latency_s=latency) as srv:
        r = run(
            "q", "c", model="openai/root", sub_model="openai/sub", api_base=srv.base_url, log_dir=tmp_path
        )
        subs = [q for q in srv.requests if q.model == "sub"]
    assert r.answer == "100" and r.sub_calls == 100 and len(subs) == 100
    lines = [json.loads(line) for line in Path(r.log_path).read_text().splitlines()]
    block = lines[1]["code_blocks"][0]["result"]
    assert block["stdout"].startswith("100 ITEM 0 ITEM 99")
    # logged in prompt order, although they finished in another order
    assert [c["prompt"] for c in block["rlm_calls"]] == [f"item {i}" for i in range(100)]
    # proof without a clock: many requests were in flight at the same time (each is held `latency` s;
    # one after another, no two would overlap)
    starts = sorted(q.received_at for q in subs)
    in_flight = max(sum(1 for s in starts if t <= s < t + latency) for t in starts)
    assert in_flight >= 8


def test_missing_key_unknown_model_and_rejected_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="OPENAI_API_KEY"):
        run("q", "c", model="gpt-4o-mini")
    with pytest.raises(UnknownModelError):
        run("q", "c", model="no-such-provider-model-zz")
    with LLMServer(Reply("Incorrect API key provided", status=401, error_code="invalid_api_key")) as srv:
        with pytest.raises(AuthenticationError) as info:
            run("q", "c", model="openai/gpt-4o-mini", api_base=srv.base_url, api_key=KEY)
    assert KEY not in str(info.value)


def test_a_404_from_a_given_api_base_names_the_url_and_the_likely_path_mistake():
    with LLMServer(Reply("no route", status=404, error_code="not_found")) as srv:
        wrong = srv.base_url.removesuffix("/v1") + "/wrong/v1"
        with pytest.raises(UnknownModelError) as info:
            run("q", "c", model="openai/m", api_base=wrong, api_key=KEY)
    message = str(info.value)
    assert message.startswith(f"openai/m: {wrong} answered 404 (not found): check the API base URL"), message
    assert "ends in /v1" in message and KEY not in message


def test_llm_module_surface():
    from rlm import llm

    with LLMServer("four words in reply") as srv:
        c = llm.complete(
            "openai/gpt-4o-mini",
            [{"role": "user", "content": "hi there"}],
            api_base=srv.base_url,
            api_key=KEY,
        )
    assert (c.text, c.input_tokens, c.output_tokens) == ("four words in reply", 3, 4)
    assert c.cost_usd is not None and c.cost_usd > 0
    assert llm.max_input_tokens("openai/gpt-4o-mini") == 128000
    assert llm.max_input_tokens("openai/not-a-real-model-zz") is None
    assert llm.count_tokens("openai/gpt-4o-mini", [{"role": "user", "content": "hello world"}]) > 0


def test_acomplete():
    import asyncio

    from rlm import llm

    async def go(url: str) -> llm.Completion:
        return await llm.acomplete("openai/x", [{"role": "user", "content": "a"}], api_base=url, api_key=KEY)

    with LLMServer("async reply") as srv:
        assert asyncio.run(go(srv.base_url)).text == "async reply"


def test_cli_run_json_exit_codes_and_no_key_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(OPENAI_API_KEY=KEY, PYTHONPATH=str(ROOT_DIR))
    context = tmp_path / "salaries.txt"
    context.write_text(SALARIES)
    with LLMServer(root_and_sub) as srv:
        t0 = time.monotonic()
        done = run_cli(
            "run", "-m", "openai/gpt-4o-mini", "--sub-model", "openai/gpt-4o", "--api-base", srv.base_url,
            "--context", str(context), "--query", "Total Engineering salary?", "--json", "--log-dir", str(tmp_path / "logs"),
            cwd=ROOT_DIR, env=env,
        )  # fmt: skip
        assert time.monotonic() - t0 < 120
        assert done.returncode == 0, done.stderr
        payload = json.loads(done.stdout)
        assert payload["answer"] == "250000" and payload["sub_calls"] == 3 and payload["cost_usd"] > 0

        # exit code 1 without an answer, through main() in this process (a second interpreter
        # would import litellm again: about 10 s on this machine)
        srv.set_reply(["```repl\nx = 1\n```", ""])  # one turn, then an empty closing reply: no answer
        for name in [k for k in os.environ if k.endswith("_API_KEY")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("RLM_MODEL", "openai/gpt-4o-mini")
        monkeypatch.setattr(sys, "stdin", io.StringIO("some text"))
        capsys.readouterr()
        code = cli_main(["run", "--context", "-", "--query", "q", "--max-iterations", "1", "--json",
                         "--api-base", srv.base_url, "--log-dir", str(tmp_path / "logs")])  # fmt: skip
        assert code == 1
        assert json.loads(capsys.readouterr().out)["stop_reason"] == "max_iterations"
    for path in _written_files(tmp_path):
        assert KEY not in path.read_text(errors="replace"), path
    done = run_cli(
        "run",
        "--context",
        "-",
        "--query",
        "q",
        cwd=ROOT_DIR,
        env={k: v for k, v in env.items() if k != "RLM_MODEL"},
    )
    assert done.returncode == 2 and "RLM_MODEL" in done.stderr and "Traceback" not in done.stderr


def test_import_and_help_do_not_import_litellm():
    code = (
        "import sys, contextlib, io\n"
        "import rlm, rlm.cli, rlm.core\n"
        "rlm.RLM, rlm.run, rlm.RLMResult\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    rlm.cli.main(['run', '--help'])\n"
        "print('litellm' in sys.modules, 'openai' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT_DIR, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "False False", out.stderr


def test_a_model_server_that_drips_cannot_outlive_the_time_budget(monkeypatch):
    """A server that sends a valid answer a byte every 0.3 s never trips the HTTP client's
    timeout (it is per read): the run went on for minutes past max_time_s, and a cancel waited
    for the call. Now the run stops at the budget, with stop_reason max_time_s."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    stop = threading.Event()
    answer = json.dumps(
        {"id": "x", "object": "chat.completion", "created": 1, "model": "root",
         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "FINAL(ok)"}}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    ).encode()  # fmt: skip

    class Drip(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            try:
                for i in range(len(answer)):  # about a minute in all
                    if stop.is_set():
                        return
                    self.wfile.write(answer[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:
                pass

    from rlm.llm import _lib

    _lib()  # litellm imported first (about 10 s here): the budget is for the call
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        r = run("q", "c", model="openai/root", api_base=f"http://127.0.0.1:{httpd.server_port}/v1",
                max_time_s=3, max_retries=0)  # fmt: skip
        assert r.stop_reason == "max_time_s" and r.answer is None, r
        assert time.monotonic() - t0 < 15  # the answer takes about a minute to arrive
        assert r.usage["openai/root"].abandoned == 1 and r.usage["openai/root"].calls == 0
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


# A pre-fork host: one run before the fork leaves a keep-alive connection in litellm's HTTP
# client; then two forked workers and the parent run at once, each asking its own question.
FORKED_WORKERS = """
import os, sys
import rlm

base = sys.argv[1]

def ask(tag):
    r = rlm.run(f"QQ{tag}QQ", "c", model="openai/m", api_base=base, api_key="sk-fork-test", max_time_s=20)
    return r.answer == f"answer-{tag}", r.answer, r.stop_reason

# litellm's import first, outside any run: it takes seconds, and on a loaded machine it used up
# the first run's max_time_s before that run asked anything.
from rlm import llm
llm.warm()
print("warm", *ask("parent-warm"), flush=True)
workers = []
for w in range(2):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for i in range(2):
                ok, answer, why = ask(f"w{w}-{i}")
                print(f"w{w}-{i}", ok, answer, why, flush=True)
                code |= not ok
        finally:
            os._exit(code)
    workers.append(pid)
for i in range(2):
    print(f"parent-{i}", *ask(f"parent-{i}"), flush=True)
print("workers", [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in workers], flush=True)
"""


def test_forked_workers_do_not_share_the_parents_model_connection():
    """litellm's HTTP client keeps connections alive, and a forked process inherited them: each
    pre-fork worker sent its first request on the socket the parent had last used, so two
    workers' requests went down one connection and each could read the other's answer (two of
    four runs of each worker answered the other worker's question, one hung until its
    max_time_s). A forked process makes its own connections now."""
    import re

    def reply(request: ChatRequest) -> str:
        found = re.search(r"QQ([\w-]+)QQ", request.prompt_text)
        time.sleep(0.05)  # the three processes' requests overlap
        return f"FINAL(answer-{found.group(1) if found else 'none'})"

    with LLMServer(reply) as srv:
        out = subprocess.run(
            [sys.executable, "-c", FORKED_WORKERS, srv.base_url],
            cwd=ROOT_DIR, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        requests = list(srv.requests)
    assert "workers [0, 0]" in out.stdout, out.stdout + out.stderr[-3000:]
    assert out.stdout.count(" True ") == 7, out.stdout
    # Every connection (client port) carried the questions of one process only.
    owners: dict[tuple[str, int], set[str]] = {}
    for request in requests:
        found = re.search(r"QQ(w\d|parent)", request.prompt_text)
        owners.setdefault(request.peer, set()).add(found.group(1) if found else "?")
    assert all(len(tags) == 1 for tags in owners.values()), owners
