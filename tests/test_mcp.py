"""``rlm mcp`` driven by the official MCP client, over stdio and over streamable HTTP on 127.0.0.1.

Every test starts the real server as a subprocess (``python -m rlm mcp``) and
checks what a client sees, what the audit log holds and which processes are
left: the server, its fork server and the sandbox children are found with
psutil.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

pytest.importorskip("mcp", reason="needs the mcp extra: pip install -e '.[mcp]' (make test installs it)")

import httpx2
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from rlm.mcp_server import EXEC_FIELDS, RLM_FIELDS
from sandbox.audit import verify
from tests import warm_cli
from tests.llm_server import ChatRequest, LLMServer, Reply

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ helpers
def write_policy(path: Path, **values: Any) -> Path:
    """policies/default.toml with some keys replaced (TOML values given as text)."""
    text = (ROOT / "policies" / "default.toml").read_text()
    text = text.replace('name = "default"', 'name = "mcp-test"')
    for key, value in values.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    path.write_text(text)
    return path


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(extra)
    return env


@asynccontextmanager
async def stdio_session(
    *args: str, env: dict[str, str] | None = None, warm: bool = False
) -> AsyncIterator[ClientSession]:
    """A session of the SDK's stdio client with ``rlm mcp ARGS``; *warm*: started through
    tests/warm_cli.py (litellm imported once per worker: for servers whose ``rlm_query`` calls a
    model; the process the client starts is then the launcher, not the server)."""
    command = warm_cli.command(["mcp", *args]) if warm else [sys.executable, "-m", "rlm", "mcp", *args]
    params = StdioServerParameters(command=command[0], args=command[1:], cwd=str(ROOT), env=env or server_env())
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def raw_server(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """``rlm mcp`` over stdio with pipes of our own: for what the SDK's client cannot send or
    would not do (bytes that are not UTF-8, malformed lines, a client that stops reading)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlm", "mcp", "--audit-log", str(tmp_path / "a.jsonl"), *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=server_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    return proc


def write_line(proc: subprocess.Popen[bytes], raw: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(raw + b"\n")
    proc.stdin.flush()


def read_until(proc: subprocess.Popen[bytes], pending: bytearray, rid: int) -> list[dict[str, Any]]:
    """The messages *proc* wrote up to its answer to *rid*, within 20 s (*pending*: bytes read
    and not yet split into lines, kept between calls)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            got.append(json.loads(line))
            if got[-1].get("id") == rid:
                return got
        if select.select([proc.stdout], [], [], 0.2)[0]:
            pending.extend(os.read(proc.stdout.fileno(), 1 << 20))  # type: ignore[union-attr]
    raise AssertionError(f"no answer to {rid}: {got}")


async def call(session: ClientSession, tool: str, **args: Any) -> dict[str, Any]:
    res = await session.call_tool(tool, args)
    assert not res.is_error, res.content
    assert json.loads(res.content[0].text) == res.structured_content  # the text mirrors the structure
    return dict(res.structured_content)


async def refused(session: ClientSession, tool: str, args: dict[str, Any]) -> str:
    res = await session.call_tool(tool, args)
    assert res.is_error, res
    return str(res.content[0].text)


def mcp_servers() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children()
        if "mcp" in (cmd := " ".join(p.cmdline())) and "rlm" in cmd and p.status() != psutil.STATUS_ZOMBIE
    ]


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return [c for c in p.children() if "sandbox.forkserver" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:  # it ended while we looked
        return []


def tree(server: psutil.Process) -> dict[str, list[psutil.Process]]:
    """The server's fork servers and their sandbox children (forks of a fork server: the same cmdline)."""
    forks = _children(server)
    return {"forks": forks, "children": [c for f in forks for c in _children(f)]}


def wait_for(what: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _wchan(pid: int) -> str:
    """Where in the kernel *pid* waits (``hrtimer_nanosleep`` for time.sleep)."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def all_gone(procs: list[psutil.Process], timeout: float = 30.0) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


# -------------------------------------------------------------------- stdio
def test_stdio_tools_sessions_isolation_limits_and_audit(tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path / "p.toml", cpu_seconds=1, wall_seconds=60, memory_mb=200, max_output_bytes=2000
    )  # the wall limit is checked in the next test: a loaded machine needs many wall seconds per CPU second
    audit = tmp_path / "audit.jsonl"
    made: list[tuple[str, str | None]] = []

    async def exec_(s: ClientSession, code: str, sid: str | None = None) -> dict[str, Any]:
        made.append(("python_exec", sid))
        return await call(s, "python_exec", code=code, **({"session_id": sid} if sid else {}))

    async def go() -> None:
        async with stdio_session("--policy", str(policy), "--audit-log", str(audit)) as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert set(tools) == {
                "python_exec",
                "session_open",
                "session_close",
                "session_list",
            }  # no --model
            assert tools["python_exec"].output_schema["required"] == list(EXEC_FIELDS)
            assert tools["python_exec"].input_schema["additionalProperties"] is False

            r = await exec_(s, "print(6 * 7)\n'shown'")
            assert list(r) == list(EXEC_FIELDS)
            assert r["ok"] and r["stdout"] == "42\n'shown'\n" and r["session_id"] is None

            a = (await call(s, "session_open"))["session_id"]
            b = (await call(s, "session_open"))["session_id"]
            made.extend([("session_open", a), ("session_open", b)])
            assert a != b and len(a) >= 22 and len(b) >= 22  # >= 128 random bits
            await exec_(s, "secret = 'alpha'", a)
            assert (await exec_(s, "secret", a))["stdout"] == "'alpha'\n"
            for other in (b, None):  # another session and a fresh sandbox see nothing of it
                r = await exec_(s, "secret", other)
                assert not r["ok"] and r["error_type"] == "NameError"

            # calls on one session run one at a time, in the order they arrive
            spans: list[tuple[float, float]] = []

            async def timed() -> None:
                r = await exec_(
                    s, "import time\nt0 = time.time(); time.sleep(0.3); print(t0, time.time())", b
                )
                spans.append(tuple(map(float, r["stdout"].split())))  # type: ignore[arg-type]

            async with anyio.create_task_group() as tg:
                tg.start_soon(timed)
                tg.start_soon(timed)
            first, second = sorted(spans)
            assert first[1] <= second[0]

            for code, limit in [
                ("while True: pass", "cpu"),
                ("chunks = []\nwhile True:\n    chunks.append(bytearray(10 * 2**20))", "memory"),
                ("print('x' * 100000)", "output"),
            ]:
                r = await exec_(s, code, a)
                assert not r["ok"] and r["limit"] == limit, (limit, r)
            assert r["output_truncated"]
            r = await exec_(s, "secret", a)  # the killed child took the session's variables with it
            assert r["error_type"] == "NameError" and r["session_id"] == a
            r = await exec_(s, "2 + 2", a)
            assert r["ok"] and r["stdout"] == "4\n" and not r["state_lost"]

            listing = (await call(s, "session_list"))["sessions"]
            made.append(("session_list", None))
            assert {x["session_id"] for x in listing} == {a, b}
            assert {x["session_id"]: x["executions"] for x in listing}[b] == 3
            assert set(listing[0]) == {"session_id", "created", "last_used", "executions"}
            assert await call(s, "session_close", session_id=b) == {"session_id": b, "closed": True}
            made.append(("session_close", b))
            assert "no such session" in await refused(s, "python_exec", {"code": "1", "session_id": b})
            made.append(("python_exec", b))

    anyio.run(go)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    calls = [x for x in lines if x.get("event") == "mcp_tool_call"]
    assert [(x["tool"], x["session_id"]) for x in calls] == made
    assert calls[-1]["outcome"].startswith("tool_error: no such session")
    executes = [x for x in lines if "code" in x]  # the sandbox's own line for every execute
    assert len(executes) == sum(
        1 for x in calls if x["tool"] == "python_exec" and x["outcome"] != calls[-1]["outcome"]
    )
    assert verify(audit).ok


def test_bad_input_is_a_tool_error_and_the_server_keeps_serving(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p.toml", max_message_mb=1, wall_seconds=2)

    async def go() -> None:
        args = ("--policy", str(policy), "--audit-log", str(tmp_path / "a.jsonl"), "--max-sessions", "2")
        async with stdio_session(*args, "--idle-timeout", "1") as s:
            big = "x = 1  # " + "a" * (1024 * 1024)
            cases: list[tuple[str, dict[str, Any], str]] = [
                ("python_exec", {}, "missing required argument 'code'"),
                ("python_exec", {"code": 5}, "'code' must be a string, got integer"),
                ("python_exec", {"code": "1", "session_id": 7}, "'session_id' must be a string"),
                ("python_exec", {"code": "1", "policy": "none"}, "unknown argument(s) 'policy'"),
                (
                    "python_exec",
                    {"code": "1", "limits": {"cpu_seconds": 999}},
                    "unknown argument(s) 'limits'",
                ),
                ("python_exec", {"code": big}, "over the policy's message cap of 1 MiB"),
                ("python_exec", {"code": "1", "session_id": "no-such-id"}, "no such session"),
                ("session_close", {}, "missing required argument 'session_id'"),
                ("session_close", {"session_id": "no-such-id"}, "no such session"),
                ("rlm_query", {"query": "q"}, "unknown tool 'rlm_query'"),
            ]
            for tool, arguments, message in cases:
                assert message in await refused(s, tool, arguments), (tool, arguments)
            # What the client chose is quoted cut, and logged cut: a 20 MB tool name, argument name
            # or session id once wrote 40 MB of audit log per request.
            long_cases: list[tuple[str, dict[str, Any], str]] = [
                ("t" * 100_000, {}, "unknown tool '" + "t" * 60 + "'..."),
                ("python_exec", {"code": "1", "q" * 100_000: 1}, "unknown argument(s) '" + "q" * 60 + "'..."),
                ("python_exec", {"code": "1", "session_id": "s" * 100_000}, "no such session: '" + "s" * 60 + "'..."),
            ]
            for tool, arguments, message in long_cases:
                text = await refused(s, tool, arguments)
                assert message in text and len(text) < 1000, text[:300]
            assert (await call(s, "python_exec", code="print('still here')"))["stdout"] == "still here\n"
            r = await call(s, "python_exec", code="import time\ntime.sleep(60)")
            assert not r["ok"] and r["limit"] == "wall" and r["error_type"] == "WallLimitExceeded"

            first = (await call(s, "session_open"))["session_id"]
            await call(s, "session_open")
            assert "too many open sessions: the server allows 2" in await refused(s, "session_open", {})
            # idle sessions close by themselves after --idle-timeout, freeing their slots
            deadline = time.monotonic() + 60
            while (await call(s, "session_list"))["sessions"] and time.monotonic() < deadline:
                await anyio.sleep(0.2)
            assert (await call(s, "session_list"))["sessions"] == []
            assert "no such session" in await refused(s, "python_exec", {"code": "1", "session_id": first})
            assert (await call(s, "session_open"))["session_id"]

    anyio.run(go)
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert lines and max(map(len, lines)) < 2_000, max(map(len, lines))


def test_a_line_with_an_unclosed_id_costs_the_server_no_more_than_its_size(tmp_path: Path) -> None:
    """A line that is not JSON is answered for its id when one can be read: the pattern that
    looks for it kept a backtracking entry per character of a string it could not close, so
    ``"id": "`` and 4 MB with no closing quote took 552 MB more of the server's memory (140
    bytes a character: a client's truncated 100 MB line, 14 GB). It reads the string in runs
    now (12 MB more)."""
    proc = raw_server(tmp_path)
    pending = bytearray()
    try:
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        write_line(proc, json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}).encode())
        read_until(proc, pending, 0)
        write_line(proc, b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        before = psutil.Process(proc.pid).memory_info().rss
        write_line(proc, b'{"jsonrpc":"2.0","method":"ping","id":"' + b"a" * 4_000_000)
        write_line(proc, b'{"jsonrpc":"2.0","id":1,"method":"ping"}')
        *answers, pong = read_until(proc, pending, 1)
        assert "result" in pong, pong
        assert [(a.get("id"), a["error"]["code"]) for a in answers] == [(None, -32700)], answers
        with open(f"/proc/{proc.pid}/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        assert peak - before < 100_000_000, f"{(peak - before) / 1e6:.0f} MB more at the peak"
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_text_that_is_not_utf8_is_refused_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    """A lone surrogate (valid JSON, not valid Unicode) and raw bytes that are not UTF-8 on the wire.

    The SDK's client cannot even encode such text, so this one speaks JSON-RPC to the server itself.
    """
    proc = raw_server(tmp_path)

    def send(raw: bytes) -> None:
        write_line(proc, raw)

    early: dict[Any, dict[str, Any]] = {}  # answers read while waiting for another

    def answer(rid: int) -> dict[str, Any]:
        while rid not in early:
            msg = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            early[msg.get("id")] = dict(msg)
        return early.pop(rid)

    def tool_call(rid: int, code_json: bytes) -> bytes:
        return (
            b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"python_exec","arguments":{"code":%s}}}'
            % (rid, code_json)
        )

    try:
        init = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}).encode())
        assert "result" in answer(1)
        send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        send(tool_call(2, b'"print(1)\\ud800"'))
        result = answer(2)["result"]
        assert result["isError"] and "not valid Unicode" in result["content"][0]["text"]
        send(b"\xff\xfe\x80 not json, not utf-8")
        send(tool_call(3, b"\"print('\xc3\xa9t\xc3\xa9')\""))
        result = answer(3)["result"]
        assert not result["isError"] and result["structuredContent"]["stdout"] == "\u00e9t\u00e9\n"
        # Each of these was dropped without an answer (the client waited for ever), and the
        # deep one with a surrogate in a comment killed the server (RecursionError).
        hostile = [
            b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"python_exec",'
            b'"arguments":{"code":"1","\\ud800":"x"}}}',  # a surrogate in a key
            b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"python_exec",'
            b'"arguments":{"code":["\\ud800"]}}}',  # nested in a value
            b'{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"python_exec",'
            b'"arguments":{"code":"1","x":' + b"[" * 300 + b"]" * 300 + b"}}}",  # nested too deep
            b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"python_exec",'
            b'"arguments":{"code":"# \\ud800","x":' + b"[" * 1000 + b"]" * 1000 + b"}}}",
        ]
        for rid, line in enumerate(hostile, 4):
            send(line)
            reply = answer(rid)
            assert "error" in reply or reply["result"]["isError"], reply
        send(tool_call(8, b'"print(8)"'))
        assert answer(8)["result"]["structuredContent"]["stdout"] == "8\n"  # still serving
        # Also dropped without an answer until this round's red team: code in bytes that are not
        # UTF-8 (it ran, with U+FFFD in their place), bad text or deep nesting outside a tool's
        # arguments (_meta, another method's params), and batches.
        send(tool_call(40, b"\"print('\xff\xfe')\""))
        result = answer(40)["result"]
        assert result["isError"] and "not valid Unicode" in result["content"][0]["text"], result
        refused_lines = {
            41: b'{"jsonrpc":"2.0","id":41,"method":"tools/call","params":{"name":"session_list",'
            b'"arguments":{},"_meta":{"progressToken":"\\ud800"}}}',
            42: b'{"jsonrpc":"2.0","id":42,"method":"ping","params":{"\\ud800":1}}',
            43: b'{"jsonrpc":"2.0","id":43,"method":"ping","params":{"x":' + b"[" * 3000 + b"]" * 3000 + b"}}",
        }
        for rid, line in refused_lines.items():
            send(line)
            assert answer(rid)["error"]["data"].startswith("refused: "), rid
        send(b"[" + tool_call(44, b'"1"') + b"," + tool_call(45, b'"2"') + b"]")
        for rid in (44, 45):
            assert "batches are not supported" in answer(rid)["error"]["data"]
        send(tool_call(46, b'"print(46)"'))
        assert answer(46)["result"]["structuredContent"]["stdout"] == "46\n"  # still serving
        # A review of that: a too-deep line whose id is not valid JSON (01) killed the server; a
        # lone surrogate beside params went unanswered; an "id" nested in a too-deep notification
        # was answered (possibly resolving another request of the client with that id).
        deep = b"[" * 5000 + b"]" * 5000
        send(b'{"jsonrpc":"2.0","method":"ping","params":{"x":' + deep + b'},"id":01}')
        send(b'{"jsonrpc":"2.0","id":47,"method":"tools/call","x":"\\ud800",'
             b'"params":{"name":"session_list","arguments":{}}}')  # fmt: skip
        assert answer(47)["error"]["data"].startswith("refused: ")
        send(b'{"jsonrpc":"2.0","method":"notifications/x","params":{"id":48,"x":' + deep + b"}}")
        send(tool_call(49, b'"print(49)"'))
        assert answer(49)["result"]["structuredContent"]["stdout"] == "49\n"  # alive, in order
        assert 48 not in early, early[48]  # nothing answered the notification

        def request(rid: int, name: str, arguments: dict[str, Any]) -> None:
            params = {"name": name, "arguments": arguments}
            send(json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}).encode())

        # A call queued on a session that another request closes: "no such session", not a
        # server-side sandbox error.
        request(9, "session_open", {})
        sid = answer(9)["result"]["structuredContent"]["session_id"]
        request(10, "python_exec", {"code": "import time\ntime.sleep(3)", "session_id": sid})
        request(11, "python_exec", {"code": "1", "session_id": sid})
        time.sleep(0.5)
        request(12, "session_close", {"session_id": sid})
        assert answer(12)["result"]["structuredContent"]["closed"]
        queued = answer(11)["result"]
        assert queued["isError"] and "no such session" in queued["content"][0]["text"], queued
        answer(10)
        proc.send_signal(signal.SIGTERM)  # stdin still open: the signal alone stops it, cleanly
        assert proc.wait(60) == 0
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_invalid_stdio_requests_are_answered(tmp_path: Path) -> None:
    """Lines the SDK dropped without an answer (the client waited for ever): each now gets a
    JSON-RPC error, for its id when that can be read, else for null, and the server keeps serving."""
    proc = raw_server(tmp_path)

    def send(raw: bytes) -> None:
        write_line(proc, raw)

    pending = bytearray()  # read, not yet split into lines

    def until(rid: int) -> list[dict[str, Any]]:
        return read_until(proc, pending, rid)

    cases: list[tuple[bytes, Any, int]] = [  # (line, the id of the error (a list: one error each), its code)
        (b'{"jsonrpc":"2.0","id":1.5,"method":"tools/call","params":{"name":"session_list","arguments":{}}}',
         None, -32600),
        (b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', None, -32600),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', None, -32600),
        (b'{"jsonrpc":"1.0","id":12,"method":"ping"}', 12, -32600),
        (b'{"id":13,"method":"ping"}', 13, -32600),
        (b'{"jsonrpc":"2.0","id":14,"method":"tools/call","params":["python_exec"]}', 14, -32600),
        (b'{"jsonrpc":"2.0","id":15,"method":5}', 15, -32600),
        (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":16,"method":"ping"}', 16, -32700),
        # Two requests on one line: each is answered, or the client waits for the second for ever.
        (b'{"jsonrpc":"2.0","id":17,"method":"ping"}{"jsonrpc":"2.0","id":18,"method":"ping"}', [17, 18], -32700),
        (b' {"jsonrpc":"2.0","id":"a","method":"ping"} {"jsonrpc":"2.0","method":"x"}\t{"id":19,"method":"y"}',
         ["a", 19], -32700),
        (b'{"jsonrpc":"2.0","id":20,"method":"ping"} trailing', 20, -32700),
        (b"not json", None, -32700),
        (b"42", None, -32600),
    ]  # fmt: skip
    try:
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}).encode())
        until(0)
        send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        for n, (line, rid, code) in enumerate(cases, 1000):
            send(line)
            send(json.dumps({"jsonrpc": "2.0", "id": n, "method": "ping"}).encode())
            *answers, pong = until(n)
            assert "result" in pong, pong
            expected = [(one, code) for one in (rid if isinstance(rid, list) else [rid])]
            assert [(a.get("id"), a.get("error", {}).get("code")) for a in answers] == expected, (line, answers)
        send(b'{"jsonrpc":"2.0","id":2000,"method":"tools/call","params":{"name":"python_exec",'
             b'"arguments":{"code":"print(6 * 7)"}}}')  # fmt: skip
        (answer,) = until(2000)
        assert answer["result"]["structuredContent"]["stdout"] == "42\n"  # still serving
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_attacks_through_python_exec_stay_in_their_session(tmp_path: Path) -> None:
    """Categories of the security corpus, with the Python guard off: only the kernel layers hold."""
    from tests.security.attacks import ATTACKS
    from tests.security.conftest import Env, Listener

    policy = write_policy(tmp_path / "p.toml", guard='"none"', cpu_seconds=3, wall_seconds=5)
    categories = {"imports", "secrets", "writes", "network", "signals"}
    attacks = [a for a in ATTACKS if a.category in categories]
    assert len(attacks) >= 25
    listener = Listener()
    root = tmp_path / "host"
    (root / "home").mkdir(parents=True)
    env = Env(root, f"filecanary-{uuid.uuid4().hex}", root / "secret.txt", root / "home" / "key", listener)
    env.canary_file.write_text(env.canary)
    env.key_file.write_text(f"sk-{env.canary}")
    env_canary = f"envcanary-{uuid.uuid4().hex}"
    victim_token = f"victim-{uuid.uuid4().hex}"

    async def go() -> None:
        async with stdio_session(
            "--policy", str(policy), "--audit-log", str(tmp_path / "a.jsonl"),
            env=server_env(RLM_TEST_SECRET_TOKEN=env_canary),
        ) as s:  # fmt: skip
            (server,) = mcp_servers()
            victim = (await call(s, "session_open"))["session_id"]
            attacker = (await call(s, "session_open"))["session_id"]
            await call(s, "python_exec", code=f"token = {victim_token!r}", session_id=victim)
            fork_pid = tree(server)["forks"][0].pid
            for attack in attacks:
                code = env.fill(attack.code, HOST_PID=server.pid, SERVER_PID=fork_pid)
                r = await call(s, "python_exec", code=code, session_id=attacker)
                text = json.dumps(r)
                for secret in (env.canary, env_canary, victim_token):
                    assert secret not in text, (attack.id, text[:500])
                assert not [m for m in env.markers if m.exists()], attack.id
                assert listener.events == [], (attack.id, listener.events)
                assert server.is_running(), attack.id
            r = await call(s, "python_exec", code="import ctypes\nctypes.string_at(0)", session_id=attacker)
            assert not r["ok"] and r["error_type"] == "ChildCrashed", r  # a crash is a result
            r = await call(s, "python_exec", code="token", session_id=victim)
            assert r["stdout"] == f"{victim_token!r}\n"  # the other session is untouched
            r = await call(s, "python_exec", code="6 * 7", session_id=attacker)
            assert r["stdout"] == "42\n" and r["state_lost"]

    try:
        anyio.run(go)
    finally:
        listener.close()


def test_disconnect_ends_the_call_and_exit_leaves_no_process(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p.toml", cpu_seconds=60, wall_seconds=120)
    seen: dict[str, list[psutil.Process]] = {}

    async def go() -> None:
        # no pool: every child the test sees is one a call or a session started
        async with stdio_session(
            "--policy", str(policy), "--audit-log", str(tmp_path / "a.jsonl"), "--pool-size", "0"
        ) as s:
            (server,) = mcp_servers()
            sid = (await call(s, "session_open"))["session_id"]
            idle = {p.pid for p in tree(server)["children"]}

            def running() -> list[psutil.Process]:
                return [p for p in tree(server)["children"] if p.pid not in idle]

            # a call the client gives up on: its child is killed, the session lives on
            async with anyio.create_task_group() as tg:
                tg.start_soon(s.call_tool, "python_exec", {"code": "import time\ntime.sleep(100)"})
                busy = await anyio.to_thread.run_sync(wait_for, running)
                tg.cancel_scope.cancel()
            assert all_gone(busy)
            r = await call(s, "python_exec", code="1 + 1", session_id=sid)
            assert r["ok"] and r["stdout"] == "2\n"

            # now the client goes away in the middle of a call on the session
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    s.call_tool, "python_exec", {"code": "import time\ntime.sleep(100)", "session_id": sid}
                )
                await anyio.sleep(0.5)
                seen.update(tree(server), server=[server])
                tg.cancel_scope.cancel()

    anyio.run(go)
    assert seen["forks"] and seen["children"]
    assert all_gone(seen["server"] + seen["forks"] + seen["children"])


def test_calls_cancelled_together_on_a_session_never_run_afterwards(tmp_path: Path) -> None:
    """An IDE's "stop" cancels every call in flight: call A running on a session and call B queued
    behind it. Cancelling A let the session's lock go while A's thread was still in the sandbox; B
    took the lock, its cancel killed A's (dead) child, and B's thread then started a fresh child
    and ran B's code to the wall limit, holding the session: the next call waited for it."""
    policy = write_policy(tmp_path / "p.toml", cpu_seconds=60, wall_seconds=60)
    audit = tmp_path / "a.jsonl"
    sleeper = "import time\ntime.sleep(100)"

    async def go() -> None:
        async with stdio_session("--policy", str(policy), "--audit-log", str(audit), "--pool-size", "0") as s:
            (server,) = mcp_servers()
            sid = (await call(s, "session_open"))["session_id"]
            scopes: list[anyio.CancelScope] = []

            async def sleep_in_session() -> None:
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await s.call_tool("python_exec", {"code": sleeper, "session_id": sid})

            for _ in range(3):  # a few rounds: the race depends on how the two cancels interleave
                scopes.clear()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sleep_in_session)  # A
                    await anyio.to_thread.run_sync(
                        wait_for,
                        lambda: [c for c in tree(server)["children"] if "nanosleep" in _wchan(c.pid)],
                    )
                    tg.start_soon(sleep_in_session)  # B, queued on the session
                    await anyio.sleep(0.3)
                    for scope in scopes:  # A's cancel first, then B's
                        scope.cancel()
                with anyio.fail_after(10):  # it waited for B, to the wall limit (60 s)
                    r = await call(s, "python_exec", code="print('next')", session_id=sid)
                assert r["ok"] and r["stdout"] == "next\n", r
                assert not [c for c in tree(server)["children"] if "nanosleep" in _wchan(c.pid)]

    anyio.run(go)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    ran = [line for line in lines if "code" in line]
    assert not [line for line in ran if line["outcome"].startswith("limit")], ran
    calls = [line["outcome"] for line in lines if line.get("tool") == "python_exec"]
    assert calls == ["cancelled", "cancelled", "ok"] * 3, calls


@pytest.mark.parametrize("how", ["sigterm", "eof"])
def test_a_client_that_stops_reading_stdout_cannot_keep_the_server_alive(tmp_path: Path, how: str) -> None:
    """A client that reads nothing more while a large result is written (it fills the pipe).

    The SDK's writer blocked in a thread no cancellation reaches, and the server waited for it:
    neither SIGTERM nor the end of its stdin stopped it, and its sessions' children lived on.
    """
    proc = raw_server(tmp_path, "--pool-size", "0")
    server = psutil.Process(proc.pid)

    def send(rid: int | None, method: str, params: dict[str, Any]) -> None:
        msg = {"jsonrpc": "2.0", "method": method, "params": params, **({"id": rid} if rid else {})}
        write_line(proc, json.dumps(msg).encode())

    def tool(rid: int, name: str, **args: Any) -> None:
        send(rid, "tools/call", {"name": name, "arguments": args})

    try:
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        send(1, "initialize", init)
        proc.stdout.readline()
        send(None, "notifications/initialized", {})
        tool(2, "session_open")
        sid = json.loads(proc.stdout.readline())["result"]["structuredContent"]["session_id"]
        tool(3, "session_open")  # idle: only the server's shutdown ends its child
        proc.stdout.readline()
        # From here on nothing is read: this result is larger than the pipe holds.
        tool(4, "python_exec", code="print('a' * 900_000)")
        tool(5, "python_exec", code="import time\ntime.sleep(1000)", session_id=sid)
        seen = wait_for(lambda: (t := tree(server))["children"] and t, timeout=30)
        wait_for(lambda: [c for c in seen["children"] if "nanosleep" in _wchan(c.pid)], timeout=30)
        # and the server is blocked writing the large result
        wait_for(lambda: [t for t in server.threads() if "pipe_write" in _wchan(t.id)], timeout=30)
        if how == "eof":
            proc.stdin.close()
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert all_gone(seen["forks"] + seen["children"])
    finally:
        if proc.poll() is None:
            for p in [*server.children(recursive=True), server]:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait(10)


# --------------------------------------------------------------------- HTTP
class HTTPServer:
    def __init__(self, tmp_path: Path, token: str, *args: str) -> None:
        self.token = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlm", "mcp", "--transport", "http", "--port", "0",
             "--audit-log", str(tmp_path / "a.jsonl"), *args],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=server_env(RLM_MCP_TOKEN=token),
        )  # fmt: skip
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/mcp)", line)
        assert found, line
        self.url = found.group(1)
        # Read the rest as it comes (the last lines kept): a pipe nobody reads fills, and the
        # server then blocks in its next log line (about 14 tracebacks of clients that went).
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        threading.Thread(target=self.stderr_tail.extend, args=(self.proc.stderr,), daemon=True).start()

    @asynccontextmanager
    async def client(self, token: str | None = None) -> AsyncIterator[ClientSession]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            streamable_http_client(self.url, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


def test_http_needs_the_token_and_keeps_sessions_apart(tmp_path: Path) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    policy = write_policy(tmp_path / "p.toml", wall_seconds=120)
    srv = HTTPServer(tmp_path, token, "--policy", str(policy), "--pool-size", "0")  # children the test counts
    server = psutil.Process(srv.proc.pid)
    try:
        init = {
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}},
        }  # fmt: skip
        accept = {"Accept": "application/json, text/event-stream"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            r = httpx2.post(srv.url, json=init, headers={**accept, **headers})
            assert r.status_code == 401 and "mcp-session-id" not in r.headers
        assert httpx2.get(srv.url).status_code == 401

        async def go() -> None:
            async with srv.client() as a, srv.client() as b:
                sid = (await call(a, "session_open"))["session_id"]
                await call(a, "python_exec", code="mine = 'A'", session_id=sid)
                # B presents A's id: for B it does not exist
                assert "no such session" in await refused(
                    b, "python_exec", {"code": "mine", "session_id": sid}
                )
                assert "no such session" in await refused(b, "session_close", {"session_id": sid})
                assert (await call(b, "session_list"))["sessions"] == []
                assert (await call(a, "python_exec", code="mine", session_id=sid))["stdout"] == "'A'\n"
                before = {p.pid for p in tree(server)["children"]}
                await call(a, "session_open")  # idle: only closing the session can end its child
                idle = [p for p in tree(server)["children"] if p.pid not in before]
                assert idle
                async with anyio.create_task_group() as tg:  # A leaves in the middle of a call
                    tg.start_soon(
                        a.call_tool,
                        "python_exec",
                        {"code": "import time\ntime.sleep(100)", "session_id": sid},
                    )
                    await anyio.sleep(0.5)
                    tg.cancel_scope.cancel()
            # A's connection ended: both its sessions closed, their children are gone
            assert all_gone([p for p in tree(server)["children"] if p.pid in before] + idle)
            async with srv.client() as c:
                assert (await call(c, "python_exec", code="6 * 7"))["stdout"] == "42\n"

        anyio.run(go)
        helpers = tree(server)
        srv.proc.terminate()
        assert srv.proc.wait(30) == 0
        assert all_gone(helpers["forks"] + helpers["children"])
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def test_http_connections_that_send_no_request_are_capped_and_closed(tmp_path: Path) -> None:
    """Idle TCP connections, no token needed: uvicorn gave a connection that never sends a request
    no deadline, so any local process could use up the server's descriptors and lock every client
    out. Those waiting for a request are now capped (the oldest closed) and closed after 10 s."""
    import rlm.mcp_server

    cap: int = getattr(rlm.mcp_server, "MAX_WAITING_CONNECTIONS", 256)
    srv = HTTPServer(tmp_path, "t-" + uuid.uuid4().hex)
    server = psutil.Process(srv.proc.pid)
    port = int(srv.url.split(":")[2].split("/")[0])
    held: list[socket.socket] = []
    try:

        async def use() -> None:
            async with srv.client() as s:
                assert (await call(s, "python_exec", code="print(6 * 7)"))["stdout"] == "42\n"

        anyio.run(use)
        baseline = server.num_fds()
        for _ in range(cap + 200):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for(lambda: server.num_fds() <= baseline + cap + 10, timeout=20)
        anyio.run(use)  # a client with the token is served meanwhile
        survivor = held[-1]  # the newest: not closed by the cap, only by the deadline
        survivor.settimeout(30)
        t0 = time.monotonic()
        assert survivor.recv(1) == b""  # closed by the server
        assert time.monotonic() - t0 < 25
    finally:
        for c in held:
            c.close()
        srv.proc.terminate()
        srv.proc.wait(30)


def test_http_results_up_to_the_output_cap_reach_the_official_client(tmp_path: Path) -> None:
    """The official client refuses a server-sent event over 1 MiB. Output within max_output_bytes
    went out twice (structured, and as the JSON text block) and JSON-escaped twice: 600 KB of
    text, or 100 KB of control characters, never arrived. Now a result's JSON is at most
    1,000,000 bytes (its longest texts cut, marked, output_truncated set) and a large one is not
    repeated in the text block."""
    token = f"tok-{uuid.uuid4().hex}"
    srv = HTTPServer(tmp_path, token, "--pool-size", "0")
    try:

        async def go() -> None:
            async with srv.client() as c:
                for code, stdout_len, cut in (
                    ("print('a' * 600_000)", 600_001, False),
                    ("print('a' * 950_000)", 950_001, False),
                    ("print(chr(1) * 300_000)", None, True),
                ):
                    res = await c.call_tool("python_exec", {"code": code})
                    assert not res.is_error, res.content
                    out = res.structured_content
                    assert out is not None and out["ok"], out
                    if cut:
                        assert out["output_truncated"] and out["stdout"].endswith("cut to fit one MCP message]")
                    else:
                        assert len(out["stdout"]) == stdout_len and not out["output_truncated"]
                    assert "is in structuredContent" in res.content[0].text
                small = await call(c, "python_exec", code="print('small')")  # mirrored as before
                assert small["stdout"] == "small\n"

        anyio.run(go)
    finally:
        srv.proc.terminate()
        srv.proc.wait(30)


_DROPPING_CLIENT = """
import sys, anyio, httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

async def main(url, token):
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        print("calling", flush=True)
        await session.call_tool("python_exec", {"code": "import time\\ntime.sleep(100)"})

anyio.run(main, sys.argv[1], sys.argv[2])
"""


def test_http_client_that_vanishes_mid_call_has_its_call_stopped(tmp_path: Path) -> None:
    """An HTTP client killed in the middle of a call (no cancel, no DELETE: its connection just
    drops) can never get the answer (the server keeps no event store to resume from): the call
    is stopped and its child killed, audited as "disconnected", and the server serves on."""
    token = f"tok-{uuid.uuid4().hex}"
    policy = write_policy(tmp_path / "p.toml", cpu_seconds=60, wall_seconds=120)
    srv = HTTPServer(tmp_path, token, "--policy", str(policy), "--pool-size", "0")
    server = psutil.Process(srv.proc.pid)
    client = subprocess.Popen(
        [sys.executable, "-c", _DROPPING_CLIENT, srv.url, token], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == "calling\n"
        busy = wait_for(lambda: tree(server)["children"])
        client.kill()  # SIGKILL: the TCP connection is closed by the kernel, nothing is sent
        client.wait()
        assert all_gone(busy, timeout=10)

        async def go() -> None:
            async with srv.client() as c:
                assert (await call(c, "python_exec", code="6 * 7"))["stdout"] == "42\n"

        anyio.run(go)
        srv.proc.terminate()
        assert srv.proc.wait(30) == 0
        outcomes = [
            line["outcome"]
            for line in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())
            if line.get("event") == "mcp_tool_call"
        ]
        assert outcomes == ["disconnected", "ok"]
    finally:
        for proc in (client, srv.proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- rlm_query
def _root(request: ChatRequest) -> str:
    if "SLEEPER" in request.prompt_text:  # a run whose code sleeps until its client gives up
        return "```repl\nimport time\ntime.sleep(100)\n```"
    turns = sum(1 for m in request.messages if m.get("role") == "assistant")
    return "```repl\nword = context.split()[-1]\n```" if turns == 0 else "FINAL_VAR(word)"


@pytest.mark.slow
def test_rlm_query_reads_only_inside_allow_read(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "doc.txt").write_text("the code word is PELICAN")
    outside = tmp_path / "secret.txt"
    outside.write_text("the code word is LEAKED")
    (allowed / "link.txt").symlink_to(outside)
    (allowed / "sub").mkdir()
    env = server_env(OPENAI_API_KEY="sk-test-mcp")

    async def go(url: str) -> None:
        base = ("--model", "openai/root", "--api-base", url, "--audit-log", str(tmp_path / "a.jsonl"))
        # --pool-size 0: the cell that sleeps is this server's own child, found in its process tree
        async with stdio_session(
            *base,
            "--allow-read",
            str(allowed),
            "--log-dir",
            str(tmp_path / "logs"),
            "--pool-size",
            "0",
            env=env,
        ) as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert tools["rlm_query"].output_schema["required"] == list(RLM_FIELDS)
            r = await call(
                s, "rlm_query", query="What is the code word?", context_path=str(allowed / "doc.txt")
            )
            assert list(r) == list(RLM_FIELDS)
            assert r["answer"] == "PELICAN" and r["stop_reason"] == "final" and r["iterations"] == 2
            assert r["log_path"] and Path(r["log_path"]).exists()
            r = await call(s, "rlm_query", query="q", context="alpha beta GAMMA", max_iterations=3)
            assert r["answer"] == "GAMMA"
            for path in (outside, allowed / "link.txt", allowed / "sub" / ".." / ".." / "secret.txt"):
                message = await refused(s, "rlm_query", {"query": "q", "context_path": str(path)})
                assert "outside the directories this server may read" in message, path
            assert "no such file" in await refused(
                s, "rlm_query", {"query": "q", "context_path": str(allowed / "nope")}
            )
            # A directory (it opened, then fdopen raised a raw IsADirectoryError and leaked the
            # descriptor, once per call) and a NUL byte (a raw ValueError): tool errors, no leak.
            (server,) = mcp_servers()
            fds = server.num_fds()
            for _ in range(20):
                assert "not a regular file" in await refused(
                    s, "rlm_query", {"query": "q", "context_path": str(allowed / "sub")}
                )
            assert server.num_fds() <= fds + 2
            assert "no such file" in await refused(
                s, "rlm_query", {"query": "q", "context_path": str(allowed) + "/doc\x00.txt"}
            )
            assert "between 1 and 20" in await refused(s, "rlm_query", {"query": "q", "max_iterations": 50})
            assert "not both" in await refused(
                s, "rlm_query", {"query": "q", "context": "x", "context_path": str(allowed / "doc.txt")}
            )
            # a client that gives up: the running cell is killed now, not at the policy's 30 s wall limit

            def sleeping() -> list[psutil.Process]:
                return [p for p in tree(server)["children"] if _wchan(p.pid).endswith("nanosleep")]

            async with anyio.create_task_group() as tg:
                tg.start_soon(s.call_tool, "rlm_query", {"query": "SLEEPER", "context": "x"})
                busy = await anyio.to_thread.run_sync(wait_for, sleeping)
                tg.cancel_scope.cancel()
            assert all_gone(busy, timeout=10)
            r = await call(s, "rlm_query", query="q", context="alpha beta GAMMA", max_iterations=3)
            assert r["answer"] == "GAMMA"  # and the server serves on
        async with stdio_session(*base, env=env) as s:  # no --allow-read: no file at all
            message = await refused(s, "rlm_query", {"query": "q", "context_path": str(allowed / "doc.txt")})
            assert "without --allow-read" in message

    with LLMServer(_root) as llm:
        anyio.run(go, llm.base_url)
        assert all("LEAKED" not in json.dumps(q.messages) for q in llm.requests)


@asynccontextmanager
async def session_with_stderr(
    stderr: Path, *args: str, env: dict[str, str], script: str | None = None, warm: bool = False
) -> AsyncIterator[ClientSession]:
    """A stdio session whose server writes its stderr to *stderr*; with *script*, the server is
    ``python -c SCRIPT mcp ARGS`` (a script that ends by calling ``rlm.cli.main``)."""
    if script is not None:
        argv = [sys.executable, "-c", script, "mcp", *args]
    else:
        argv = warm_cli.command(["mcp", *args]) if warm else [sys.executable, "-m", "rlm", "mcp", *args]
    params = StdioServerParameters(command=argv[0], args=argv[1:], cwd=str(ROOT), env=env)
    with stderr.open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


def _rlm_query_lines(audit: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    return [x for x in lines if x.get("event") == "mcp_tool_call" and x.get("tool") == "rlm_query"]


@pytest.mark.slow
def test_rlm_query_against_a_server_with_malformed_replies(tmp_path: Path) -> None:
    """Token counts that are not numbers (they raised a raw TypeError: a JSON-RPC error with code 0,
    a traceback on the server's stderr, no audit line) are read as 0, and the run answers; a
    response of the wrong shape is a tool error without litellm's traceback. Each call is audited."""
    audit, stderr = tmp_path / "a.jsonl", tmp_path / "stderr.txt"
    good = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}

    async def go(url: str, srv: LLMServer) -> None:
        args = ("--model", "openai/root", "--api-base", url, "--audit-log", str(audit))
        async with session_with_stderr(stderr, *args, env=server_env(OPENAI_API_KEY="sk-test-mcp"), warm=True) as s:
            for usage in ({**good, "cache_read_input_tokens": "zz"}, {**good, "cache_creation_input_tokens": [1]}):
                srv.set_reply(Reply("FINAL(fine)", usage=usage))
                r = await call(s, "rlm_query", query="q", context="c", max_iterations=1)
                assert r["answer"] == "fine" and r["stop_reason"] == "final", r
            srv.set_reply(Reply(body={"choices": [{"message": "zz"}]}))
            message = await refused(s, "rlm_query", {"query": "q", "context": "c", "max_iterations": 1})
            assert message.startswith("rlm_query failed: openai/root: provider unavailable:"), message
            assert "Invalid response object" in message and "Traceback" not in message, message
            assert "site-packages" not in message, message

    with LLMServer("FINAL(fine)") as srv:
        anyio.run(go, srv.base_url, srv)
    outcomes = [x["outcome"] for x in _rlm_query_lines(audit)]
    assert outcomes[:2] == ["stop:final", "stop:final"], outcomes
    assert len(outcomes) == 3 and outcomes[2].startswith("tool_error: rlm_query failed: openai/root: provider"), outcomes
    assert verify(audit).ok
    assert "Traceback" not in stderr.read_text(), stderr.read_text()


#: A server whose rlm_query meets an exception nothing expects (a bug): rlm.core.run raises one.
BROKEN_RUN = """
import sys
import rlm.core

def run(*args, **kwargs):
    raise TypeError("int() argument must be a string, a bytes-like object or a real number, not 'list'")

rlm.core.run = run
from rlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_exception_in_a_tool_is_a_tool_error_and_audited(tmp_path: Path) -> None:
    """It was a JSON-RPC error with code 0 and the raw message, a traceback on the server's stderr,
    and no audit line: now a tool error naming the exception, an ``internal_error`` audit line, and
    the server serves on."""
    audit, stderr = tmp_path / "a.jsonl", tmp_path / "stderr.txt"

    async def go() -> None:
        args = ("--model", "openai/root", "--api-base", "http://127.0.0.1:9/v1", "--audit-log", str(audit))
        env = server_env(OPENAI_API_KEY="sk-test-mcp", PYTHONPATH=str(ROOT))
        async with session_with_stderr(stderr, *args, env=env, script=BROKEN_RUN) as s:
            message = await refused(s, "rlm_query", {"query": "q", "context": "c"})
            assert message == (
                "rlm_query failed: TypeError: int() argument must be a string, a bytes-like object or a real"
                " number, not 'list'"
            ), message
            assert (await call(s, "python_exec", code="print(1 + 1)"))["stdout"] == "2\n"

    anyio.run(go)
    (line,) = _rlm_query_lines(audit)
    assert line["outcome"] == "internal_error: rlm_query failed: TypeError: int() argument must be a string, a bytes-like object or a real number, not 'list'", line
    assert verify(audit).ok
    assert "Traceback" not in stderr.read_text(), stderr.read_text()


def test_a_locked_audit_log_does_not_stall_the_server(tmp_path: Path) -> None:
    """Another process holding the audit log's lock (a stopped `rlm exec` sharing it): tool calls
    that do not run code answer at once; their lines are written once the lock is free."""
    import threading

    audit = tmp_path / "audit.jsonl"
    hold = (
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder: list[subprocess.Popen[str]] = []

    async def go() -> float:
        async with stdio_session("--audit-log", str(audit)) as s:
            await call(s, "session_list")  # the server is up, its log open
            proc = subprocess.Popen([sys.executable, "-c", hold, str(audit)], stdout=subprocess.PIPE, text=True)
            holder.append(proc)
            assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
            threading.Timer(3.0, proc.kill).start()
            t0 = time.monotonic()
            await call(s, "session_list")
            await call(s, "session_list")
            took = time.monotonic() - t0
            await anyio.sleep(3.5)  # the holder is gone: the waiting lines go in
            return took

    try:
        took = anyio.run(go)
    finally:
        for proc in holder:
            proc.kill()
            proc.wait()
    assert took < 2.0, f"two calls took {took:.1f} s behind a locked audit log"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [x.get("tool") for x in lines].count("session_list") == 3, lines
    assert verify(audit).ok


def test_audit_lines_waiting_for_the_lock_are_written_before_shutdown(tmp_path: Path) -> None:
    """A tool call's line waits (in a thread) for a lock another process holds, and the server
    shuts down meanwhile: the line goes in before the log is closed."""
    import asyncio

    from rlm.mcp_server import MCPApp, ServerConfig
    from sandbox.policy import load_policy

    path = tmp_path / "audit.jsonl"
    app = MCPApp(ServerConfig(policy=load_policy("default"), audit_log=path, pool_size=0))
    hold = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(0.3)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        busy = [loop.run_in_executor(None, time.sleep, 0.5) for _ in range(8)]  # the executor is busy too
        app._audit({"tool": "python_exec", "n": 1}, "ok", time.perf_counter())
        await app.shutdown()
        await asyncio.gather(*busy)

    try:
        asyncio.run(main())
    finally:
        holder.kill()
        holder.wait()
    assert [json.loads(x).get("n") for x in path.read_text().splitlines()] == [1]


@pytest.mark.slow
def test_rlm_query_is_bounded_by_the_server_s_max_time(tmp_path: Path) -> None:
    """``rlm_query`` had no time budget: a client's query whose code sleeps (or a model that
    writes slow code, turn after turn) held the server for its turns times the policy's wall
    limit, hours. ``--max-time`` (default 600 s) bounds each query: its code is stopped and it
    answers with ``stop_reason="max_time_s"``; bad values are refused at start."""
    env = server_env(OPENAI_API_KEY="sk-test-mcp")

    async def go(url: str) -> None:
        args = ("--model", "openai/root", "--api-base", url, "--audit-log", str(tmp_path / "a.jsonl"))
        async with stdio_session(*args, "--max-time", "2", env=env, warm=True) as s:
            t0 = time.monotonic()
            r = await call(s, "rlm_query", query="SLEEPER", context="x", max_iterations=3)
            assert r["stop_reason"] == "max_time_s", r
            assert time.monotonic() - t0 < 20  # not the policy's 30 s wall limit per turn

    with LLMServer(_root) as llm:
        anyio.run(go, llm.base_url)
    for bad in ("0", "-1", "nan", "inf"):
        out = subprocess.run(
            [sys.executable, "-m", "rlm", "mcp", "--model", "openai/root", "--max-time", bad],
            capture_output=True, text=True, timeout=60, env=env, cwd=str(ROOT),
        )  # fmt: skip
        assert out.returncode == 2 and "--max-time must be a positive number" in out.stderr, (bad, out.stderr)
    out = subprocess.run(
        [sys.executable, "-m", "rlm", "mcp", "--max-time", "5"],
        capture_output=True, text=True, timeout=60, env=env, cwd=str(ROOT),
    )  # fmt: skip
    assert out.returncode == 2 and "--max-time needs --model" in out.stderr, out.stderr


def test_a_cancelled_rlm_query_keeps_its_slot_while_its_model_call_runs(tmp_path: Path) -> None:
    """A cancelled rlm_query gives up its model call in flight (by design), which may still run. Its
    --max-sessions slot was freed at the cancel: a client that sent and cancelled queries kept
    more provider requests in flight than the limit. The slot now waits for the call's end.
    (A call given up has its connection shut, and ends, once its response has begun, or at once
    on a new connection: the call that still runs here is the query's second, on the connection
    its first kept alive, whose response has not begun: its status line comes a byte at a time.)"""
    env = server_env(OPENAI_API_KEY="sk-test-mcp")
    release = threading.Event()  # ends the slow answer
    slow = Reply("```repl\nx = 1\n```", trickle_s=0.5, release=release)  # a byte every 0.5 s: minutes
    replies = ["```repl\nx = 0\n```", slow]  # the first turn at once, then the slow one (it repeats)

    async def go(llm: LLMServer) -> None:
        args = ("--model", "openai/root", "--api-base", llm.base_url, "--audit-log", str(tmp_path / "a.jsonl"))
        async with stdio_session(*args, "--max-sessions", "1", env=env, warm=True) as s:

            async def query(scope: anyio.CancelScope) -> None:
                with scope:
                    await s.call_tool("rlm_query", {"query": "q", "context": "c", "max_iterations": 2})

            first, second = anyio.CancelScope(), anyio.CancelScope()
            async with anyio.create_task_group() as tg:
                tg.start_soon(query, first)
                await anyio.to_thread.run_sync(wait_for, lambda: len(llm.requests) == 2)
                first.cancel()  # its model call goes on, given up
                tg.start_soon(query, second)
                await anyio.sleep(3)
                assert len(llm.requests) == 2  # the second query waits for the slot
                release.set()  # the first call ends: its slot is free
                await anyio.to_thread.run_sync(wait_for, lambda: len(llm.requests) >= 3)
                second.cancel()

    with LLMServer(replies) as llm:
        anyio.run(go, llm)


@pytest.mark.slow
def test_rlm_query_is_bounded_by_the_server_s_max_cost(tmp_path: Path) -> None:
    """``rlm_query`` had a time budget but no cost budget: a model that never finishes spent its
    whole ``--max-iterations`` of calls, whatever they cost. ``--max-cost USD`` is each query's
    ``max_cost_usd`` (the same budget as ``rlm run --budget-usd``): once its priced calls have
    cost that much the run stops and says so (``stop_reason="max_cost_usd"``); bad values, and
    the flag without ``--model``, are refused at start."""
    env = server_env(OPENAI_API_KEY="sk-test-mcp")
    audit = tmp_path / "a.jsonl"
    budget = 1e-6  # one call of gpt-4o-mini (litellm prices it) with the system prompt costs more

    async def go(url: str) -> None:
        args = ("--model", "openai/gpt-4o-mini", "--api-base", url, "--audit-log", str(audit))
        async with stdio_session(*args, "--max-cost", repr(budget), env=env, warm=True) as s:
            r = await call(s, "rlm_query", query="never done", context="x", max_iterations=8)
            assert r["stop_reason"] == "max_cost_usd" and r["answer"] is None, r
            assert r["cost_usd"] is not None and r["cost_usd"] >= budget and r["iterations"] < 8, r

    with LLMServer("```repl\nprint(len(context))\n```") as llm:  # never FINAL: only a budget stops it
        anyio.run(go, llm.base_url)
        assert 1 <= len(llm.requests) < 8  # stopped by the budget, not by running out of turns
    (line,) = _rlm_query_lines(audit)
    assert line["outcome"] == "stop:max_cost_usd", line
    for bad, why in (("-1", "must be >= 0"), ("nan", "must be a finite number"), ("inf", "must be a finite")):
        out = subprocess.run(
            [sys.executable, "-m", "rlm", "mcp", "--model", "openai/x", "--max-cost", bad],
            capture_output=True, text=True, timeout=60, env=env, cwd=str(ROOT),
        )  # fmt: skip
        assert out.returncode == 2 and f"rlm: --max-cost {why}" in out.stderr, (bad, out.stderr)
        assert "Traceback" not in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "rlm", "mcp", "--max-cost", "0.5"],
        capture_output=True, text=True, timeout=60, env=env, cwd=str(ROOT),
    )  # fmt: skip
    assert out.returncode == 2 and "--max-cost needs --model" in out.stderr, out.stderr


PIDS = Path("/sys/fs/cgroup/pids")


@pytest.mark.skipif(
    os.geteuid() != 0 or not (PIDS / "cgroup.procs").exists(), reason="needs root and the cgroup v1 pids controller"
)
def test_an_rlm_query_that_cannot_start_its_thread_gives_its_slot_back(tmp_path: Path) -> None:
    """With no thread to be had (the server's pids cgroup full), an rlm_query failed after it took
    its --max-sessions slot and before the thread that was to give it back existed: the slot was
    gone for good, and every later rlm_query waited for it. Now the query is a tool error that
    says why, and the next one runs once threads can be made again."""
    env = server_env(OPENAI_API_KEY="sk-test-mcp")
    cg = PIDS / f"rlm-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()

    async def go(url: str) -> None:
        args = ("--model", "openai/root", "--api-base", url, "--audit-log", str(tmp_path / "a.jsonl"))
        before = {p.pid for p in mcp_servers()}
        async with stdio_session(*args, "--max-sessions", "1", "--pool-size", "0", env=env) as s:
            (server,) = [p for p in mcp_servers() if p.pid not in before]
            (cg / "cgroup.procs").write_text(str(server.pid))  # its threads follow it
            (cg / "pids.max").write_text("1")  # not one more thread (those running go on)
            with anyio.fail_after(30):
                res = await s.call_tool("rlm_query", {"query": "q", "context": "a b c", "max_iterations": 2})
            assert res.is_error and "start" in res.content[0].text and "thread" in res.content[0].text, res.content
            (cg / "pids.max").write_text("max")
            with anyio.fail_after(30):  # before: waited for the slot for ever
                r = await call(s, "rlm_query", query="q", context="a b c", max_iterations=2)
            assert r["answer"] == "c", r

    try:
        with LLMServer(_root) as llm:
            anyio.run(go, llm.base_url)
    finally:
        for pid in (cg / "cgroup.procs").read_text().split():  # a server left behind
            with contextlib.suppress(OSError):
                (PIDS / "cgroup.procs").write_text(pid)
        cg.rmdir()


def test_a_request_that_fails_after_its_answer_is_no_error_of_the_server() -> None:
    """A client that ends its session while one of its calls is answered: the SDK logged
    "Error handling POST request" with the ``ClosedResourceError`` of the closed session, then
    sent a 500 after the answer was complete, which uvicorn logged as "Exception in ASGI
    application": some 5 KB of tracebacks per such client, for nobody (about 1 client in 16
    that cancel and leave, here). The gate ends such a request quietly, and the SDK's record of
    a closed session is dropped; a request that fails before its answer still raises, and
    every other record passes."""
    import logging

    from rlm.mcp_server import _BearerGate, _ClientGone

    sent: list[dict[str, Any]] = []

    async def fails_after_its_answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        raise RuntimeError("Unexpected ASGI message 'http.response.start' sent, after response already completed.")

    async def fails_before_it(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("a bug of the server")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def scope() -> dict[str, Any]:
        return {"type": "http", "method": "POST", "headers": [(b"authorization", b"Bearer tok")]}

    anyio.run(_BearerGate(fails_after_its_answer, "tok"), scope(), receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    with pytest.raises(RuntimeError, match="a bug of the server"):
        anyio.run(_BearerGate(fails_before_it, "tok"), scope(), receive, send)

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "mcp.server.streamable_http", logging.ERROR, __file__, 1, "Error handling POST request", None,
            (type(exc), exc, None),
        )  # fmt: skip

    gone = _ClientGone()
    assert not gone.filter(record(anyio.ClosedResourceError()))
    assert not gone.filter(record(anyio.BrokenResourceError()))
    assert gone.filter(record(ValueError("a real failure")))
