"""``rlm mcp``: the sandbox, and optionally an RLM, as a Model Context Protocol server.

Built on the official ``mcp`` SDK (the optional extra ``rlm[mcp]``); this is the
only module that imports it. The server speaks MCP over stdio (a client starts
it) or over streamable HTTP (bound to 127.0.0.1 unless told otherwise, behind a
bearer token checked before anything else runs).

Tools (their names and result fields are the contract; results are structured content):

- ``python_exec(code, session_id=None)``: runs code in a fresh sandbox, closed
  afterwards, or in an open session's REPL. A failure of the code (an
  exception, a limit, a crash) is a result with ``ok = false``, not a tool error.
- ``session_open()``, ``session_close(session_id)``, ``session_list()``.
- ``rlm_query(query, context=None, context_path=None, max_iterations=None)``,
  listed only when the server was given ``--model``; each query is bounded by
  ``--max-time`` (:attr:`ServerConfig.max_time_s`, default 600 s) and, when
  given, ``--max-cost`` (:attr:`ServerConfig.max_cost_usd`, USD, default none).

The policy is the server's: tool arguments cannot name a policy or a limit, and
an argument the schema does not list is refused. Bad input (a missing or
mistyped argument, code over the policy's message cap, text that is not valid
Unicode, an unknown session) is a tool error with a message, and the server
keeps serving; so is an exception no tool expected (one line, no traceback). Sessions belong to the client connection that opened them: over
HTTP that is the MCP transport session, and another client presenting the id
gets "no such session"; they close with ``session_close``, after
``--idle-timeout`` seconds unused, when their client ends its connection
(over stdio by closing the server's stdin, over HTTP by a ``DELETE`` of its
transport session), and when the server stops. Every tool call appends a
line to the hash-chained audit log, next to the sandbox's own lines for each
execute.

Sandbox calls block, so they run in worker threads; calls on one session are
serialised by that session's lock. A call that its client cancels, or whose
client disconnects (over stdio by closing the server's stdin, over HTTP by
dropping the request's connection, which no reconnect can resume: the server
keeps no event store), is cancelled and its child is killed. Over HTTP the
session of a client that just vanished stays until ``--idle-timeout``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from rlm.errors import ConfigurationError
from sandbox import Policy, Sandbox, SandboxPool
from sandbox.audit import AuditLog, default_audit_path
from sandbox.errors import SandboxClosedError, SandboxError

__all__ = ["MCPApp", "ServerConfig", "ToolError", "run_server", "serve"]

T = TypeVar("T")

#: The python_exec result fields, in order (the tool's contract).
EXEC_FIELDS = (
    "ok",
    "stdout",
    "stderr",
    "error_type",
    "error_message",
    "traceback",
    "limit",
    "state_lost",
    "output_truncated",
    "duration_s",
    "cpu_s",
    "session_id",
)
#: The rlm_query result fields, in order.
RLM_FIELDS = ("answer", "stop_reason", "iterations", "sub_calls", "cost_usd", "log_path")


@dataclass(frozen=True)
class ServerConfig:
    """What ``rlm mcp`` was started with; nothing a client sends changes it."""

    policy: Policy
    max_sessions: int = 8  # open sessions, over all clients
    idle_timeout: float = 600.0  # seconds a session may stay unused before it is closed
    allow_read: tuple[Path, ...] = ()  # resolved directories rlm_query's context_path may read from
    audit_log: Path | None = None  # None: the policy's audit.path, else the default path
    model: str | None = None  # rlm_query's root model; None: the tool is not offered
    sub_model: str | None = None
    api_base: str | None = None
    log_dir: Path | None = None  # where rlm_query writes its trajectories (None: none written)
    max_iterations: int = 20  # rlm_query's ceiling on root turns
    max_time_s: float = 600.0  # seconds of wall clock one rlm_query may take (its max_time_s)
    #: USD one rlm_query may spend, its priced model calls counted (its max_cost_usd: past it the
    #: run stops with stop_reason "max_cost_usd"); None: no cost budget.
    max_cost_usd: float | None = None
    pool_size: int = 2  # ready sandbox children kept for new sandboxes (0: fork each on demand)

    @property
    def max_message_bytes(self) -> int:
        return self.policy.limits.max_message_mb * 1024 * 1024

    @property
    def audit_path(self) -> Path:
        return self.audit_log or (
            Path(self.policy.audit.path) if self.policy.audit.path else default_audit_path()
        )


class ToolError(Exception):
    """Bad input for a tool: reported to the client as a tool error, the server keeps serving."""


# ------------------------------------------------------------------ threads
class _NoThread(ToolError):
    """:func:`_in_thread` could not start its thread: its function never ran."""


async def _in_thread(
    fn: Callable[[], T],
    on_cancel: Callable[[], None] | None = None,
    discard: Callable[[T], None] | None = None,
    *,
    linger: float = 0.0,
) -> T:
    """Run blocking *fn* in a daemon thread; if this call is cancelled, run *on_cancel* (kill its child).

    A value that arrives after the cancellation is handed to *discard* (in a
    thread of its own: it may block). Daemon threads: a call the server gave
    up on never holds the process open at exit.

    *linger*: a cancelled call waits for the thread to return before it re-raises (at most this
    many seconds, shielded from further cancellation), calling *on_cancel* again every
    :data:`_RECHECK` seconds meanwhile (a child started after the first kill is killed too).
    What the caller holds (a session's lock) is therefore held until the cancelled work stopped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    finished = threading.Event()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            if error is None and discard is not None:
                threading.Thread(target=discard, args=(value,), daemon=True).start()
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def work() -> None:
        try:
            value, error = fn(), None
        except BaseException as exc:
            value, error = None, exc
        finished.set()
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle, value, error)

    try:
        threading.Thread(target=work, name="rlm-mcp-call", daemon=True).start()
    except RuntimeError as exc:  # no thread to be had (a pids limit, a thread limit): fn never runs
        raise _NoThread(f"the server cannot start a thread now ({exc}); try again later") from None
    try:
        return await future
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        if linger > 0:
            with anyio.CancelScope(shield=True), anyio.move_on_after(linger):
                while not finished.is_set():
                    await anyio.sleep(_RECHECK)
                    if on_cancel is not None and not finished.is_set():
                        on_cancel()
        raise


#: How long a cancelled sandbox call may take to stop (its child killed, its thread returned)
#: before the lock it holds is let go anyway; in practice milliseconds, or one child's start.
_STOP_LINGER = 15.0
#: How often a cancelled call's kill is repeated while its thread has not returned.
_RECHECK = 0.05


class _InFlight:
    """The threads of one rlm_query still running: the run's own, and each model call it started
    (:data:`rlm.core.MODEL_CALLS`), also one it gave up on. *done* runs on the loop, once, when
    the last has ended."""

    def __init__(self, done: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = done
        self._lock = threading.Lock()
        self._count = 1  # the run's thread (see watching)

    def enter(self) -> None:
        with self._lock:
            self._count += 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._done)

    @contextlib.contextmanager
    def watching(self) -> Any:
        """Around the run, in its thread: its model calls are counted, and the run leaves at the end."""
        from rlm.core import MODEL_CALLS

        try:
            MODEL_CALLS.set(self)
            yield
        finally:
            self.leave()


# ----------------------------------------------------------------- sessions
@dataclass
class _Session:
    id: str
    owner: str
    sandbox: Sandbox
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    executions: int = 0
    busy: int = 0
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "created": _iso(self.created),
            "last_used": _iso(self.last_used),
            "executions": self.executions,
        }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class _Sessions:
    """The open sessions of every client; touched only from the event loop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._open: dict[str, _Session] = {}
        self._opening = 0

    def __len__(self) -> int:
        return len(self._open)

    def get(self, session_id: str, owner: str) -> _Session:
        s = self._open.get(session_id)
        # Someone else's session answers exactly like one that does not exist.
        if s is None or not hmac.compare_digest(s.owner, owner):
            raise ToolError(f"no such session: {_quote(session_id)} (closed, expired or never opened here)")
        return s

    def of(self, owner: str) -> list[_Session]:
        return [s for s in self._open.values() if s.owner == owner]

    async def open(self, owner: str, make: Callable[[], Sandbox]) -> _Session:
        if len(self._open) + self._opening >= self.config.max_sessions:
            raise ToolError(
                f"too many open sessions: the server allows {self.config.max_sessions} "
                "(close one with session_close, or let idle ones expire)"
            )
        self._opening += 1
        abandoned = threading.Event()

        def make_unless_abandoned() -> Sandbox:
            sb = make()
            if abandoned.is_set():  # the client gave up while the child started: nobody will close it
                sb.close()
            return sb

        try:
            sb = await _in_thread(make_unless_abandoned, abandoned.set, Sandbox.close)
        finally:
            self._opening -= 1
        s = _Session(secrets.token_urlsafe(24), owner, sb)  # 192 random bits
        self._open[s.id] = s
        return s

    async def close(self, s: _Session) -> None:
        if self._open.pop(s.id, None) is None:
            return
        s.sandbox.kill()  # a call still running on it ends now
        await _in_thread(s.sandbox.close)

    async def close_owner(self, owner: str) -> None:
        for s in self.of(owner):
            await self.close(s)

    async def close_all(self) -> None:
        for s in list(self._open.values()):
            s.sandbox.kill()
        for s in list(self._open.values()):
            await self.close(s)

    async def reap_idle(self) -> None:
        """Close sessions unused for longer than the idle timeout, forever."""
        period = max(0.05, min(5.0, self.config.idle_timeout / 4))
        while True:
            await anyio.sleep(period)
            limit = time.time() - self.config.idle_timeout
            for s in [s for s in self._open.values() if s.busy == 0 and s.last_used < limit]:
                await self.close(s)


# ------------------------------------------------------------ argument checks
def _text(value: Any, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ToolError(f"argument {name!r} must be a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ToolError(f"argument {name!r} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def _type_name(value: Any) -> str:
    return (
        "null"
        if value is None
        else {bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}.get(
            type(value), type(value).__name__
        )
    )


def _quote(text: str, limit: int = 60) -> str:
    """A client's string quoted in an error message: its first *limit* characters."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _cut(text: str | None, limit: int = 200) -> str | None:
    """A client's string as the audit log keeps it: at most *limit* characters, and a marker."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _unexpected(exc: BaseException) -> str:
    """An unexpected exception as one short line: its type and the first line of its text (no
    traceback, cut at 200 characters)."""
    lines = str(exc).strip().splitlines()
    text = _cut(lines[0], 200) if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_args(tool: str, args: dict[str, Any], required: Sequence[str], optional: Sequence[str]) -> None:
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        raise ToolError(
            f"{tool}: unknown argument(s) {', '.join(map(_quote, unknown[:10]))}"
            f"{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}; "
            f"it takes {', '.join([*required, *optional]) or 'none'} (limits and layers are the server's policy)"
        )
    for name in required:
        if name not in args:
            raise ToolError(f"{tool}: missing required argument {name!r}")


#: Largest JSON of a tool result (bytes): clients cap a message (the official SDK's HTTP client
#: refuses a server-sent event over 1 MiB), and control characters grow sixfold in JSON.
RESULT_JSON_MAX = 1_000_000
#: Results whose JSON is larger are not repeated in the text block (which MCP asks for, for
#: older clients): the block says where the result is instead.
MIRROR_MAX = 256 * 1024
_CUT_NOTE = "\n[... cut to fit one MCP message]"


def _fit_result(payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """*payload* cut to fit :data:`RESULT_JSON_MAX` (its longest texts first, marked, with
    ``output_truncated`` set where the result has it), and the text block that goes with it."""
    # A text longer than the whole message cannot fit: cut to that first, so that the JSON made
    # below stays near RESULT_JSON_MAX (a 20 MB answer of control characters made 120 MB of
    # JSON, then as much again encoded: 240 MB of the server's memory).
    for key, value in list(payload.items()):
        if isinstance(value, str) and len(value) > RESULT_JSON_MAX:
            payload = {**payload, key: value[:RESULT_JSON_MAX] + _CUT_NOTE}
            if "output_truncated" in payload:
                payload["output_truncated"] = True
    text = json.dumps(payload, ensure_ascii=False)
    size = len(text.encode())
    while size > RESULT_JSON_MAX:
        longest = max(
            (k for k, v in payload.items() if isinstance(v, str)), key=lambda k: len(payload[k]), default=None
        )
        if longest is None or len(payload[longest]) <= len(_CUT_NOTE):
            break  # nothing left to cut (never with the fields of these tools)
        value = payload[longest]
        # Keep the share of the text that fits, as the JSON of this field grew it (escapes).
        keep = max(0, int(len(value) * (1 - (size - RESULT_JSON_MAX) / size)) - len(_CUT_NOTE) - 64)
        payload = {**payload, longest: value[:keep] + _CUT_NOTE}
        if "output_truncated" in payload:
            payload["output_truncated"] = True
        text = json.dumps(payload, ensure_ascii=False)
        size = len(text.encode())
    if size > MIRROR_MAX:
        text = f"(the result, {size} bytes of JSON, is in structuredContent: too large to repeat here)"
    return payload, text


def _exec_payload(r: Any, session_id: str | None) -> dict[str, Any]:
    data = {name: getattr(r, name) for name in EXEC_FIELDS if name != "session_id"}
    data["session_id"] = session_id
    return data


# -------------------------------------------------------------- tool schemas
def _schema(props: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}
_SESSION = {"type": "string", "description": "An id returned by session_open."}


def _tools(config: ServerConfig) -> list[types.Tool]:
    lim = config.policy.limits
    tools = [
        types.Tool(
            name="python_exec",
            description=(
                "Run Python code in a locked-down sandbox (no network, no host files, bounded CPU, memory "
                f"and output: {lim.cpu_seconds:g} s CPU, {lim.wall_seconds:g} s wall, {lim.memory_mb} MiB). "
                "Without session_id it runs in a fresh sandbox; with one, in that session's REPL, where "
                "variables persist. A trailing expression is displayed. An exception or a limit is "
                "reported in the result (ok=false), with limit naming the limit."
            ),
            input_schema=_schema(
                {
                    "code": {"type": "string", "description": "The Python source to run."},
                    "session_id": {**_OPT_STR, "description": "Run in this session (see session_open)."},
                },
                ["code"],
            ),
            output_schema=_schema(
                {
                    "ok": {"type": "boolean"},
                    "stdout": _STR,
                    "stderr": _STR,
                    "error_type": _OPT_STR,
                    "error_message": _OPT_STR,
                    "traceback": _OPT_STR,
                    "limit": _OPT_STR,
                    "state_lost": {"type": "boolean"},
                    "output_truncated": {"type": "boolean"},
                    "duration_s": {"type": "number"},
                    "cpu_s": {"type": "number"},
                    "session_id": _OPT_STR,
                },
                EXEC_FIELDS,
            ),
        ),
        types.Tool(
            name="session_open",
            description=(
                "Open a persistent Python session (its own sandboxed REPL) and return its id. "
                f"At most {config.max_sessions} sessions are open at once; one unused for "
                f"{config.idle_timeout:g} s is closed."
            ),
            input_schema=_schema({}),
            output_schema=_schema({"session_id": _STR}, ["session_id"]),
        ),
        types.Tool(
            name="session_close",
            description="Close a session: its process and variables are gone.",
            input_schema=_schema({"session_id": _SESSION}, ["session_id"]),
            output_schema=_schema(
                {"session_id": _STR, "closed": {"type": "boolean"}}, ["session_id", "closed"]
            ),
        ),
        types.Tool(
            name="session_list",
            description="List this client's open sessions.",
            input_schema=_schema({}),
            output_schema=_schema(
                {
                    "sessions": {
                        "type": "array",
                        "items": _schema(
                            {
                                "session_id": _STR,
                                "created": _STR,
                                "last_used": _STR,
                                "executions": {"type": "integer"},
                            },
                            ["session_id", "created", "last_used", "executions"],
                        ),
                    }
                },
                ["sessions"],
            ),
        ),
    ]
    if config.model:
        where = (
            "a file under " + ", ".join(str(d) for d in config.allow_read)
            if config.allow_read
            else "nothing: the server allows no files"
        )
        tools.append(
            types.Tool(
                name="rlm_query",
                description=(
                    "Answer a question about a long context with a Recursive Language Model: the context "
                    "stays in a sandboxed REPL and the model explores it with code and sub-model calls. "
                    f"Give the context as text, or as context_path ({where})."
                ),
                input_schema=_schema(
                    {
                        "query": {"type": "string"},
                        "context": _OPT_STR,
                        "context_path": _OPT_STR,
                        "max_iterations": {"type": ["integer", "null"], "minimum": 1},
                    },
                    ["query"],
                ),
                output_schema=_schema(
                    {
                        "answer": _OPT_STR,
                        "stop_reason": _STR,
                        "iterations": {"type": "integer"},
                        "sub_calls": {"type": "integer"},
                        "cost_usd": {"type": ["number", "null"]},
                        "log_path": _OPT_STR,
                    },
                    RLM_FIELDS,
                ),
            )
        )
    return tools


# ----------------------------------------------------------------- the app
class MCPApp:
    """The tools over a session table, an audit log and the server's policy."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.sessions = _Sessions(config)
        self.pool = SandboxPool(config.pool_size) if config.pool_size else None
        self.audit = AuditLog(config.audit_path)
        self._audit_waiting: set[asyncio.Future[None]] = set()  # lines waiting for the log's lock
        self._fresh_slots = anyio.Semaphore(config.max_sessions)
        self._fresh: set[Sandbox] = set()
        self.tools = _tools(config)
        self._names = {t.name for t in self.tools}
        self.server: Server[Any] = Server(
            "rlm",
            version=_version(),
            instructions=(
                "Runs Python in a hardened sandbox. Use python_exec; open a session with session_open "
                "when variables must persist between calls."
            ),
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )

    def _sandbox(self) -> Sandbox:
        return Sandbox(self.config.policy, audit_log=self.config.audit_path, pool=self.pool)

    # ------------------------------------------------------------ handlers
    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tools)

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        """One tool call; over HTTP it is stopped if its client goes away (see :class:`_DropWatch`)."""
        request = getattr(ctx, "request", None)
        watch = getattr(request, "scope", {}).get(_DROP_KEY) if request is not None else None
        if not isinstance(watch, _DropWatch):
            return await self._call_tool_inner(ctx, params, None)
        with anyio.CancelScope() as scope:
            watch.callbacks.append(scope.cancel)
            try:
                return await self._call_tool_inner(ctx, params, watch)
            finally:
                watch.callbacks.remove(scope.cancel)
        # Cancelled for a client that is gone (audited as "disconnected"): nobody reads this answer.
        return types.CallToolResult(
            content=[types.TextContent(type="text", text="the client disconnected")], is_error=True
        )

    async def _call_tool_inner(
        self, ctx: Any, params: types.CallToolRequestParams, watch: _DropWatch | None
    ) -> types.CallToolResult:
        t0 = time.perf_counter()
        # What the client chose goes into the log cut (a 20 MB tool name wrote 40 MB of log).
        record: dict[str, Any] = {"tool": _cut(params.name), "session_id": None}
        try:
            owner = self._owner(ctx)
            record["client"] = hashlib.sha256(owner.encode()).hexdigest()[:16]
            args = params.arguments or {}
            if _BAD_TEXT in args:  # flagged by _flag_bad_text: the SDK would have dropped the call
                flagged = args[_BAD_TEXT] if isinstance(args[_BAD_TEXT], dict) else {}
                keys = [k for k in flagged.get("keys", []) if isinstance(k, str)][:20]
                names = ", ".join(repr(k[:60]) for k in keys) or "the arguments"
                if flagged.get("why") == "nested too deep":
                    raise ToolError(f"{names}: nested deeper than {_MAX_ARG_DEPTH} levels")
                raise ToolError(
                    f"{names} (or the tool name): not valid Unicode text (it holds a lone surrogate)"
                )
            if params.name not in self._names:
                raise ToolError(
                    f"unknown tool {_quote(params.name)}; this server offers {', '.join(sorted(self._names))}"
                )
            handler = getattr(self, "_tool_" + params.name)
            payload: dict[str, Any] = await handler(owner, args, record)
        except ToolError as exc:
            self._audit(record, f"tool_error: {exc}", t0)
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=str(exc))], is_error=True
            )
        except SandboxClosedError:  # another request closed the session while this call waited
            self._audit(record, "tool_error: the session was closed", t0)
            return types.CallToolResult(
                content=[types.TextContent(type="text", text="no such session: it was closed")], is_error=True
            )
        except SandboxError as exc:  # the sandbox could not start: a server-side fault, reported
            self._audit(record, f"sandbox_error: {exc}", t0)
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=f"sandbox error: {exc}")], is_error=True
            )
        except asyncio.CancelledError:
            self._audit(record, "disconnected" if watch is not None and watch.fired else "cancelled", t0)
            raise
        except Exception as exc:  # a bug, or input nothing above expected: a tool error, audited
            why = f"{_cut(params.name, 60)} failed: {_unexpected(exc)}"
            self._audit(record, f"internal_error: {why}", t0)
            return types.CallToolResult(content=[types.TextContent(type="text", text=why)], is_error=True)
        self._audit(record, record.pop("outcome", "ok"), t0)
        payload, text = _fit_result(payload)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], structured_content=payload
        )

    def _audit(self, record: dict[str, Any], outcome: str, t0: float) -> None:
        line = {
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "event": "mcp_tool_call",
            **record,
            "outcome": outcome,
            "duration_s": round(time.perf_counter() - t0, 6),
        }
        with contextlib.suppress(SandboxError):  # a full disk must not take the server down
            if self.audit.append(line, wait=False) is None:  # another writer holds the log's lock:
                # wait for it in a thread, not on the loop every client's requests run on
                waiting = asyncio.get_running_loop().run_in_executor(None, self._append_waiting, line)
                self._audit_waiting.add(waiting)
                waiting.add_done_callback(self._audit_waiting.discard)

    def _append_waiting(self, line: dict[str, Any]) -> None:
        with contextlib.suppress(SandboxError):
            self.audit.append(line)

    def _owner(self, ctx: Any) -> str:
        """Who is calling: the MCP transport session over HTTP, the one client over stdio."""
        conn = getattr(getattr(ctx, "session", None), "_connection", None)
        sid = getattr(conn, "session_id", None)
        request = getattr(ctx, "request", None)
        if sid is None and request is not None:
            sid = request.headers.get("mcp-session-id")
        if request is None:
            return "stdio"
        if not sid:
            raise ToolError("this server needs a stateful MCP session (no Mcp-Session-Id on the request)")
        owner = f"http:{sid}"
        stack = getattr(conn, "exit_stack", None)
        state = getattr(conn, "state", None)
        if stack is not None and isinstance(state, dict) and not state.get("rlm_cleanup"):
            state["rlm_cleanup"] = True  # the sessions of a connection close with it
            stack.push_async_callback(self.sessions.close_owner, owner)
        return owner

    # --------------------------------------------------------------- tools
    async def _tool_python_exec(
        self, owner: str, args: dict[str, Any], record: dict[str, Any]
    ) -> dict[str, Any]:
        _check_args("python_exec", args, ["code"], ["session_id"])
        code = _text(args["code"], "code")
        session_id = _text(args.get("session_id"), "session_id", optional=True)
        assert code is not None
        record["session_id"] = _cut(session_id)
        record["code_sha256"] = hashlib.sha256(code.encode()).hexdigest()
        size = len(code.encode())
        if size > self.config.max_message_bytes:
            raise ToolError(
                f"code is {size} bytes, over the policy's message cap of {self.config.policy.limits.max_message_mb} MiB"
            )
        try:
            if session_id is not None:
                s = self.sessions.get(session_id, owner)
                s.busy += 1
                try:
                    async with s.lock:
                        record["sandbox_id"] = s.sandbox.id
                        r = await self._run_in_session(s, code)
                        s.executions += 1
                finally:
                    s.busy -= 1
                    s.last_used = time.time()
            else:
                async with self._fresh_slots:
                    r = await self._run_fresh(code, record)
        except ValueError as exc:  # code over the frame cap (64 MiB) under a larger max_message_mb
            raise ToolError(str(exc)) from None
        record["outcome"] = "ok" if r.ok else f"limit:{r.limit}" if r.limit else f"error:{r.error_type}"
        return _exec_payload(r, session_id)

    @staticmethod
    async def _run_in_session(s: _Session, code: str) -> Any:
        """*code* run in session *s*, whose lock the caller holds.

        A cancelled call neither starts afterwards nor leaves its child running, and keeps
        the lock until its thread has returned: with the lock let go at once, a call queued
        behind it took the lock, its cancel killed the first call's (dead) child, and its
        thread then started a fresh child and ran its code in full, to the wall limit.
        """
        cancelled = threading.Event()

        def work() -> Any:
            if cancelled.is_set():  # cancelled before its thread ran: nothing starts
                return None
            return s.sandbox.execute(code)

        def stop() -> None:
            cancelled.set()
            s.sandbox.kill()  # repeated until work() returns: a child it started since is killed too

        return await _in_thread(work, stop, linger=_STOP_LINGER)

    async def _run_fresh(self, code: str, record: dict[str, Any]) -> Any:
        box: list[Sandbox] = []
        abandoned = threading.Event()

        def work() -> Any:
            sb = self._sandbox()
            box.append(sb)
            self._fresh.add(sb)
            try:
                record["sandbox_id"] = sb.id
                if abandoned.is_set():  # cancelled while the child started: run nothing
                    return None
                return sb.execute(code)
            finally:
                self._fresh.discard(sb)
                sb.close()

        def kill() -> None:
            abandoned.set()
            for sb in box:
                sb.kill()

        # Its slot is held until the child is gone (kill repeated: see _run_in_session).
        return await _in_thread(work, kill, linger=_STOP_LINGER)

    async def _tool_session_open(
        self, owner: str, args: dict[str, Any], record: dict[str, Any]
    ) -> dict[str, Any]:
        _check_args("session_open", args, [], [])
        s = await self.sessions.open(owner, self._sandbox)
        record["session_id"], record["sandbox_id"] = s.id, s.sandbox.id
        return {"session_id": s.id}

    async def _tool_session_close(
        self, owner: str, args: dict[str, Any], record: dict[str, Any]
    ) -> dict[str, Any]:
        _check_args("session_close", args, ["session_id"], [])
        session_id = _text(args["session_id"], "session_id")
        assert session_id is not None
        record["session_id"] = _cut(session_id)
        await self.sessions.close(self.sessions.get(session_id, owner))
        return {"session_id": session_id, "closed": True}

    async def _tool_session_list(
        self, owner: str, args: dict[str, Any], record: dict[str, Any]
    ) -> dict[str, Any]:
        _check_args("session_list", args, [], [])
        return {"sessions": [s.describe() for s in self.sessions.of(owner)]}

    async def _tool_rlm_query(
        self, owner: str, args: dict[str, Any], record: dict[str, Any]
    ) -> dict[str, Any]:
        _check_args("rlm_query", args, ["query"], ["context", "context_path", "max_iterations"])
        query = _text(args["query"], "query")
        context = _text(args.get("context"), "context", optional=True)
        path = _text(args.get("context_path"), "context_path", optional=True)
        n = args.get("max_iterations")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
            raise ToolError(f"argument 'max_iterations' must be an integer, got {_type_name(n)}")
        ceiling = self.config.max_iterations
        if n is not None and not 1 <= n <= ceiling:
            raise ToolError(f"max_iterations must be between 1 and {ceiling} (the server's limit), got {n}")
        if context is not None and path is not None:
            raise ToolError("give context or context_path, not both")
        if path is not None:
            record["context_path"] = _cut(path, 4096)
            context = await _in_thread(lambda: self._read_allowed(path))
        from rlm.budget import CancelToken
        from rlm.core import run
        from rlm.errors import RLMError

        cfg = self.config
        token = CancelToken()  # a client that gives up (cancels, disconnects) stops the run and its code
        # Each run has its own sandbox: it counts like a fresh python_exec. Its slot is given back
        # once the run's thread and every model call it started have ended: a cancelled run gives
        # up its call in flight (by design), which still runs, and a slot freed at the cancel let
        # one client keep more provider requests in flight than --max-sessions.
        await self._fresh_slots.acquire()
        calls = _InFlight(self._fresh_slots.release)

        def work() -> Any:
            with calls.watching():
                return run(
                    query,
                    context or "",
                    model=cfg.model or "",
                    sub_model=cfg.sub_model,
                    api_base=cfg.api_base,
                    policy=cfg.policy,
                    log_dir=cfg.log_dir,
                    max_iterations=n or ceiling,
                    max_time_s=cfg.max_time_s,
                    max_cost_usd=cfg.max_cost_usd,
                    cancel=token,
                )

        try:
            result = await _in_thread(work, token.cancel)
        except _NoThread:  # the run never started, so it cannot give its slot back itself
            calls.leave()
            raise
        except RLMError as exc:
            raise ToolError(f"rlm_query failed: {exc}") from None
        record["outcome"] = f"stop:{result.stop_reason}"
        record["log_path"] = result.log_path
        return {name: getattr(result, name) for name in RLM_FIELDS}

    def _read_allowed(self, path: str) -> str:
        """The text of *path*, if it lies inside an --allow-read directory once symlinks are followed."""
        if not self.config.allow_read:
            raise ToolError("context_path is refused: this server was started without --allow-read")
        try:
            real = Path(path).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the path
            raise ToolError(f"context_path {_quote(path, 300)}: no such file") from None
        if not self._allowed(real):
            raise ToolError(
                f"context_path {_quote(path, 300)} is outside the directories this server may read"
            )
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise ToolError(f"context_path {_quote(path, 300)}: {exc.strerror}") from None
        try:  # a directory opens too, and fdopen refuses it: checked first, the descriptor closed
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        if not regular:
            os.close(fd)
            raise ToolError(f"context_path {_quote(path, 300)} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            # What was opened, not what was named: a path swapped since resolve() is caught here.
            opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not self._allowed(opened):
                raise ToolError(
                    f"context_path {_quote(path, 300)} is outside the directories this server may read"
                )
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ToolError(f"context_path {_quote(path, 300)} is not a regular file")
            data = f.read(self.config.max_message_bytes + 1)
        if len(data) > self.config.max_message_bytes:
            raise ToolError(f"context_path {_quote(path, 300)} is over the policy's message cap")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"context_path {_quote(path, 300)} is not UTF-8 text") from None

    def _allowed(self, real: Path) -> bool:
        return any(real == d or real.is_relative_to(d) for d in self.config.allow_read)

    # ------------------------------------------------------------ lifecycle
    async def shutdown(self) -> None:
        for sb in list(self._fresh):
            sb.kill()
        with anyio.CancelScope(shield=True):
            await self.sessions.close_all()
            if self._audit_waiting:  # lines still waiting for the log's lock go in first
                await asyncio.wait(set(self._audit_waiting), timeout=self.audit.lock_timeout + 1)
        self.audit.close()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlm")
    except PackageNotFoundError:
        return "0"


# --------------------------------------------------------------- transports
#: Stands in for tool arguments whose text is not valid Unicode (see _CheckedLines).
_BAD_TEXT = "__rlm_not_unicode__"


def _unicode_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_METHOD = re.compile(r'"method"\s*:\s*"([^"\\]*)"')
#: The request's id in a line that is not JSON. Its string is read a run of plain characters at a
#: time and never given back: a character at a time, a string left open (a client's truncated
#: line) kept a backtracking entry per character, 140 bytes each (4 MB of id: 560 MB).
_ID = re.compile(r'"id"\s*+:\s*+(-?\d++|"(?:[^"\\]++|\\.)*+")')

#: Deepest nesting of tool arguments passed on to the SDK (its JSON parser drops deeper lines
#: without an answer; the sandbox takes plain data at most 100 deep anyway).
_MAX_ARG_DEPTH = 100


def _bad_parts(value: Any, depth: int = 0) -> tuple[bool, bool]:
    """(holds text that is not valid Unicode, in a key or a value at any depth; nests deeper
    than _MAX_ARG_DEPTH)."""
    if depth > _MAX_ARG_DEPTH:
        return False, True
    if isinstance(value, str):
        return not _unicode_ok(value), False
    items: Any = ()
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    bad = deep = False
    for item in items:
        b, d = _bad_parts(item, depth + 1)
        bad, deep = bad or b, deep or d
        if deep:
            break
    return bad, deep


def _might_be_bad(line: str) -> bool:
    """Cheap test before parsing: an escaped surrogate, bytes that were not UTF-8 (decoded to
    surrogates), enough brackets to nest too deep, or a batch (a JSON array)."""
    return (
        "\\ud" in line.lower()
        or line.count("[") + line.count("{") > _MAX_ARG_DEPTH
        or line.lstrip().startswith("[")
        or (not line.isascii() and not _unicode_ok(line))
    )


def _refusal(rid: Any, why: str) -> str:
    """A line the SDK answers with an error for request *rid*: a method nobody serves, named
    after the reason (the SDK drops a line it cannot take without answering it)."""
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": f"refused: {why}"}) + "\n"


def _why(deep: bool) -> str:
    """The reason _refusal gives for a request that _bad_parts flagged."""
    return "nested too deep" if deep else "the request holds text that is not valid Unicode"


def _answerable(rid: Any) -> bool:
    return (isinstance(rid, int) and not isinstance(rid, bool)) or (isinstance(rid, str) and _unicode_ok(rid))


def _top_level(line: str, match: re.Match[str] | None) -> re.Match[str] | None:
    """*match* if it lies in the line's outermost object (nothing but one ``{`` opened before it;
    a brace inside a string before it makes this say no: no answer rather than a wrong one)."""
    if match is None:
        return None
    before = line[: match.start()]
    return match if before.count("{") == 1 and "[" not in before else None


def _flag_bad_text(line: str) -> str:
    """A request line the SDK would drop without an answer, rewritten so that it is answered:

    - a tools/call whose arguments or tool name hold lone surrogates (anywhere) or whose
      arguments nest too deep: the tool refuses it by name (a tool error);
    - any other request holding such text or nesting, or too deep for Python's parser, and each
      request of a batch: an error for its id (:func:`_refusal`).

    Any other line (a notification, a response; what Python cannot parse was answered before, by
    :func:`_invalid_request`) is passed on as it is."""
    try:
        msg = json.loads(line)
    except RecursionError:  # too deep for Python's parser as well: answer by the request's id
        method, rid = _top_level(line, _METHOD.search(line)), _top_level(line, _ID.search(line))
        try:
            request_id = json.loads(rid.group(1)) if rid is not None else None
        except ValueError:  # 01, a bad escape: no id to answer
            return line
        if method is None or not _answerable(request_id):
            return line
        if method.group(1) != "tools/call":
            return _refusal(request_id, f"nested deeper than {_MAX_ARG_DEPTH} levels")
        params = {"name": "?", "arguments": {_BAD_TEXT: {"keys": [], "why": "nested too deep"}}}
        return (
            json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}) + "\n"
        )
    except (ValueError, MemoryError):
        return line
    if isinstance(msg, list):  # a batch (not part of MCP since 2025-06-18): each request refused
        ids = [m["id"] for m in msg if isinstance(m, dict) and "method" in m and _answerable(m.get("id"))]
        return (
            "".join(_refusal(rid, "batches are not supported: one message per line") for rid in ids) or line
        )
    if not isinstance(msg, dict) or "method" not in msg or not _answerable(msg.get("id")):
        return line  # a response or a notification: nothing to answer
    try:
        if msg["method"] != "tools/call":
            bad, deep = _bad_parts(msg)
            if bad or deep:
                return _refusal(msg["id"], _why(deep))
            return line
        params = msg["params"]
        args = params.get("arguments") or {}
        bad, deep = _bad_parts(args)
        name_bad = not isinstance(params.get("name"), str) or not _unicode_ok(params["name"])
        # Everything else of the request (_meta, members beside params): no tool gets it.
        rest = [
            {k: v for k, v in msg.items() if k != "params"},
            {k: v for k, v in params.items() if k not in ("arguments", "name")},
        ]
        rest_bad, rest_deep = _bad_parts(rest)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, MemoryError):
        return line
    if rest_bad or rest_deep:
        return _refusal(msg["id"], _why(rest_deep))
    if not (bad or deep or name_bad):
        return line
    if isinstance(args, dict):
        keys = sorted(k if _unicode_ok(k) else "?" for k in args if isinstance(k, str))
    else:
        keys = []
    why = "nested too deep" if deep else "not valid Unicode"
    params["arguments"] = {_BAD_TEXT: {"keys": keys, "why": why}}
    if name_bad:
        params["name"] = "?"
    return json.dumps(msg) + "\n"


#: JSON-RPC's error codes for what :func:`_invalid_request` finds.
_PARSE_ERROR, _INVALID_REQUEST = -32700, -32600


def _invalid_request(line: str) -> str | None:
    """The JSON-RPC error answering *line* when it is not a valid message (which the SDK drops
    without an answer: the client would wait for ever), else None.

    Invalid JSON (a byte order mark, two messages on one line) is a -32700 Parse error (for each
    request of such a line, by its id: :func:`_ids_of_values`); a message
    whose ``jsonrpc`` is not ``"2.0"``, whose method is not a string, whose params are not an
    object or whose id is neither an integer nor a string is a -32600 Invalid Request. The error
    carries the request's id when it can be read, else null. A response, a blank line, a batch and
    what is too deep for Python's parser are left to the SDK and :func:`_flag_bad_text`."""
    if not line.strip():
        return None
    try:
        msg = json.loads(line)
    except (RecursionError, MemoryError):
        return None
    except ValueError:
        parse_error = "Parse error: not one JSON-RPC message (one JSON object a line)"
        ids = _ids_of_values(line.lstrip("\ufeff"))
        if ids:  # several messages on one line: each request is told, or its client waits for ever
            return "".join(_error_line(rid, _PARSE_ERROR, parse_error) for rid in ids)
        rid = None
        match = _top_level(line.lstrip("\ufeff"), _ID.search(line.lstrip("\ufeff")))
        if match is not None:
            with contextlib.suppress(ValueError):
                rid = json.loads(match.group(1))
        return _error_line(rid, _PARSE_ERROR, parse_error)
    if isinstance(msg, list):
        return None
    if not isinstance(msg, dict):
        return _error_line(None, _INVALID_REQUEST, "Invalid Request: not a JSON object")
    if "method" not in msg and ("result" in msg or "error" in msg):
        return None  # a response: never answered
    rid = msg.get("id")
    why = None
    if msg.get("jsonrpc") != "2.0":
        why = 'jsonrpc must be "2.0"'
    elif not isinstance(msg.get("method"), str):
        why = "method must be a string"
    elif "params" in msg and not isinstance(msg["params"], dict):
        why = "params must be an object"
    elif "id" in msg and not _answerable(rid):
        why = "id must be an integer or a string"
    if why is None:
        return None
    return _error_line(rid, _INVALID_REQUEST, f"Invalid Request: {why}")


#: Most JSON values on one line whose requests are each answered (see :func:`_ids_of_values`).
MAX_VALUES_A_LINE = 64
_DECODER = json.JSONDecoder()


def _ids_of_values(line: str) -> list[Any]:
    """The ids of the requests in *line* when it is two or more whole JSON values one after the
    other (``{..}{..}``, with spaces between or not), in order; [] when it is not (then the line's
    first id, if readable, is answered). At most :data:`MAX_VALUES_A_LINE` values are decoded.
    Notifications and responses (no method, or no answerable id) get nothing, as alone."""
    values: list[Any] = []
    at, end = 0, len(line.rstrip())
    try:
        while len(values) < MAX_VALUES_A_LINE:
            while at < end and line[at] in " \t\r":
                at += 1
            if at == end:
                break
            value, at = _DECODER.raw_decode(line, at)
            values.append(value)
    except (ValueError, RecursionError):
        return []
    if len(values) < 2:
        return []
    return [
        v["id"]
        for v in values
        if isinstance(v, dict) and "method" in v and "id" in v and _answerable(v["id"])
    ]


def _error_line(rid: Any, code: int, message: str) -> str:
    """A JSON-RPC error response line, for *rid* when a client could match it, else for null."""
    rid = rid if _answerable(rid) else None
    return json.dumps({"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}) + "\n"


class _CheckedLines:
    """The server's stdin as the SDK reads it (line by line), with bad text flagged by _flag_bad_text
    and invalid messages answered here, through *out* (see :func:`_invalid_request`).

    A daemon thread reads the lines: a blocked read must not keep a cancelled
    server (SIGTERM) from stopping, as a worker thread the loop waits for would.
    """

    def __init__(self, out: _StdoutLines) -> None:
        self._out = out
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        fd = os.dup(0)  # raw reads: no buffered object's lock held by this thread at interpreter exit

        def read() -> None:
            # Bytes that are not UTF-8 become lone surrogates, which _flag_bad_text refuses
            # (replaced by U+FFFD, code would have run with other text than the client sent).
            decode = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape").decode
            pending: list[str] = []  # the pieces of an unfinished line (joined once, when it ends)
            try:
                while chunk := os.read(fd, 1 << 16):
                    text = decode(chunk)
                    if "\n" not in text:
                        pending.append(text)
                        continue
                    first, *lines, rest = text.split("\n")
                    pending.append(first)
                    for line in ("".join(pending), *lines):
                        loop.call_soon_threadsafe(self._queue.put_nowait, line + "\n")
                    pending = [rest]
            except (OSError, RuntimeError):  # stdin broke, or the loop is already closed
                pass
            finally:
                os.close(fd)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._queue.put_nowait, None)

        threading.Thread(target=read, name="rlm-mcp-stdin", daemon=True).start()

    def __aiter__(self) -> Any:
        return self._lines()

    async def _lines(self) -> Any:
        while (line := await self._queue.get()) is not None:
            error = _invalid_request(line)
            if error is not None:
                self._out.post(error)
                continue
            if not _might_be_bad(line):
                yield line
                continue
            for one in _flag_bad_text(line).split("\n"):  # a batch: one line per request
                if one:
                    yield one + "\n"


class _StdoutLines:
    """The server's stdout as the SDK writes it (``write`` and ``flush`` of an anyio file), written
    by a daemon thread of its own.

    The SDK's own writer blocks in a worker thread that cannot be cancelled: a client that stopped
    reading while a large result was written left it blocked for good, and the task group waiting
    for it kept SIGTERM and stdin's end from ever stopping the server (nor its sessions' children).
    Here a blocked write holds only this thread; the ``write`` that waits for it is cancellable.

    Like the SDK's claim of fd 1, this takes the wire for itself and points fd 1 at stderr while
    serving, so that stray output misses the wire.
    """

    def __init__(self) -> None:
        self._fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)  # the wire; never closed (see close)
        self._saved = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
        os.dup2(2, 1)
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue[tuple[bytes, asyncio.Future[None] | None] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="rlm-mcp-stdout", daemon=True).start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            data, done = job
            error: OSError | None = None
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:  # the client closed its end (EPIPE)
                error = exc
            if done is None:  # posted: nobody waits for it
                continue
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(_settle_write, done, error)

    def post(self, text: str) -> None:
        """Write *text* after what is queued, without waiting for it."""
        self._jobs.put((text.encode("utf-8"), None))

    async def write(self, text: str) -> None:
        done = self._loop.create_future()
        self._jobs.put((text.encode("utf-8"), done))
        await done  # the lines go out in order, one at a time: a cancelled wait tears no frame

    async def flush(self) -> None:
        pass

    def close(self) -> None:
        """Stop the thread once it is done, and give fd 1 back. The wire's descriptor stays open:
        a write still blocked on it must not see it closed and reused."""
        self._jobs.put(None)
        with contextlib.suppress(OSError):
            os.dup2(self._saved, 1)
        os.close(self._saved)


def _settle_write(done: asyncio.Future[None], error: OSError | None) -> None:
    if done.done():  # its wait was cancelled
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(None)


#: Seconds the answers still being written get once the client has closed the server's stdin:
#: a client that reads no more must not keep the server (and its sessions' children) alive.
_EOF_GRACE = 5.0


async def _serve_stdio(app: MCPApp) -> None:
    from mcp.server.stdio import stdio_server

    stdout = _StdoutLines()
    try:
        with anyio.CancelScope() as scope:
            async with stdio_server(stdin=_CheckedLines(stdout), stdout=stdout) as (read, write):  # type: ignore[arg-type]
                await app.server.run(read, write, app.server.create_initialization_options())
                scope.deadline = anyio.current_time() + _EOF_GRACE
    finally:
        stdout.close()


class _BearerGate:
    """ASGI middleware: a request without the right bearer token gets 401 and reaches nothing else.

    It also refuses the 2026 stateless protocol era (answering as a server
    that does not speak it), so clients fall back to the handshake era, whose
    transport session is what a sandbox session belongs to.
    """

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
            await _respond(
                send,
                401,
                b'{"error":"unauthorized: a bearer token is required"}',
                [(b"www-authenticate", b"Bearer")],
            )
            return
        version = headers.get(b"mcp-protocol-version")
        if version is not None and version.decode("latin-1") not in HANDSHAKE_PROTOCOL_VERSIONS:
            supported = ",".join(f'"{v}"' for v in HANDSHAKE_PROTOCOL_VERSIONS)
            body = (
                '{"jsonrpc":"2.0","id":null,"error":{"code":-32022,"message":"Unsupported protocol version",'
                f'"data":{{"supported":[{supported}]}}}}}}'
            ).encode()
            await _respond(send, 400, body, [])
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        # A request's client that goes away before its response is complete: the call it made
        # is stopped (see _DropWatch). The SDK's Request keeps this very scope: the handler finds it.
        watch = scope[_DROP_KEY] = _DropWatch()

        async def watched_receive() -> Any:
            message = await receive()
            if message.get("type") == "http.disconnect":
                watch.fire()
            return message

        async def watched_send(message: Any) -> None:
            if message.get("type") == "http.response.body" and not message.get("more_body", False):
                watch.answered = True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        except Exception:
            # Its answer was complete, or its client gone, before the failure: the SDK then
            # sends a 500 that has nowhere to go (a session its client ended while one of its
            # calls was answered), and uvicorn logged a traceback of some 5 KB for each such
            # request, nobody's error. A failure of a request still being answered is raised.
            if watch.answered or watch.fired:
                return
            raise


class _ClientGone(logging.Filter):
    """Drops the SDK's "Error handling POST request" record of a request whose session's streams
    were closed meanwhile (its client ended the session while a call was answered: anyio's
    ``ClosedResourceError`` or ``BrokenResourceError``), a traceback of some 5 KB per such
    client; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (anyio.ClosedResourceError, anyio.BrokenResourceError))


#: Where :class:`_BearerGate` puts a POST request's :class:`_DropWatch` in its ASGI scope.
_DROP_KEY = "rlm.drop_watch"


class _DropWatch:
    """What to stop if the client of one HTTP request goes away before its answer is complete.

    This server keeps no event store: a response whose stream was cut can
    never reach its client (a reconnect cannot resume it). So the call is
    stopped like a cancelled one instead of running, and spending CPU and
    model calls, for nobody. Callbacks run on the event loop.
    """

    __slots__ = ("answered", "callbacks", "fired")

    def __init__(self) -> None:
        self.answered = False
        self.fired = False
        self.callbacks: list[Callable[[], None]] = []

    def fire(self) -> None:
        if self.answered or self.fired:
            return
        self.fired = True
        for callback in self.callbacks:
            callback()


async def _respond(send: Any, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on *host*:*port* (0: any free port), or ConfigurationError naming the
    address and why not (the port is taken, the address is not this machine's, unknown host ...)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return socket.create_server((host, port))
    except OSError as exc:  # create_server's own strerror repeats the address: the plain reason
        reason = (exc.strerror or str(exc)).split(" (while attempting", 1)[0]
        raise ConfigurationError(f"cannot listen on {where}: {reason}") from None


#: Seconds a connection may go without a request under way (none since the last look, or its
#: headers still unfinished) before it is closed: uvicorn gives a connection that never sends a
#: request no deadline, and each one holds a descriptor of the server.
REQUEST_DEADLINE_S = 10.0
#: Most connections open that have not yet sent a request's headers (the bearer token is checked
#: only then); past it the one that has waited longest is closed. Without it, idle connections
#: from any local process used up the server's descriptors and locked every client out.
MAX_WAITING_CONNECTIONS = 256


def _guarded_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, with a deadline for each request's headers and a cap on the
    connections that have sent none yet (see :data:`REQUEST_DEADLINE_S`)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    waiting: dict[Any, None] = {}  # connections with no request yet, oldest first

    class _Guarded(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._rlm_seen: Any = None
            self._rlm_timer = self.loop.call_later(REQUEST_DEADLINE_S, self._rlm_check)
            waiting[self] = None
            while len(waiting) > MAX_WAITING_CONNECTIONS:
                oldest = next(iter(waiting))
                del waiting[oldest]
                oldest.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None:  # a request's headers are in
                waiting.pop(self, None)

        def _rlm_check(self) -> None:
            cycle = self.cycle
            if cycle is not None and (not cycle.response_complete or cycle is not self._rlm_seen):
                self._rlm_seen = cycle  # a request under way, or one since the last look
                self._rlm_timer = self.loop.call_later(REQUEST_DEADLINE_S, self._rlm_check)
                return
            waiting.pop(self, None)
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            waiting.pop(self, None)
            self._rlm_timer.cancel()
            super().connection_lost(exc)

    return _Guarded


async def _serve_http(app: MCPApp, host: str, sock: socket.socket, token: str) -> None:
    import uvicorn

    asgi = app.server.streamable_http_app(
        host=host,
        max_request_body_size=max(4 * 1024 * 1024, 2 * app.config.max_message_bytes),
    )
    logging.getLogger("mcp.server.streamable_http").addFilter(_ClientGone())
    bound = sock.getsockname()
    print(f"rlm mcp: serving streamable HTTP on http://{host}:{bound[1]}/mcp", file=sys.stderr, flush=True)

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # ours, below: uvicorn would re-raise them and skip our cleanup
            yield

    server = _Server(
        uvicorn.Config(
            _BearerGate(asgi, token),
            http=_guarded_protocol(),
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
    )

    async def stop_on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                server.should_exit = True
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_signal)
            await server.serve(sockets=[sock])
            tg.cancel_scope.cancel()
    finally:
        sock.close()


async def serve(
    config: ServerConfig,
    transport: str = "stdio",
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    sock: socket.socket | None = None,
) -> None:
    """Run the server until its client leaves (stdio) or it is told to stop (SIGINT, SIGTERM).

    Over HTTP it serves on *sock* (a listening socket from :func:`_listen`, closed at the end), else
    on one bound to *host*:*port* first: an address that cannot be had is a ConfigurationError,
    raised before anything else happens (no token is printed for a server that never starts).
    """
    if transport == "http" and sock is None:
        sock = _listen(host, port)
    try:
        await _serve(config, transport, host, sock)
    finally:
        if sock is not None:
            sock.close()


async def _serve(config: ServerConfig, transport: str, host: str, sock: socket.socket | None) -> None:
    app = MCPApp(config)
    token = ""
    if transport == "http":
        token = os.environ.get("RLM_MCP_TOKEN", "")
        if not token:
            token = secrets.token_urlsafe(32)
            print(
                f"rlm mcp: bearer token (set RLM_MCP_TOKEN to choose one): {token}",
                file=sys.stderr,
                flush=True,
            )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.sessions.reap_idle)
            if transport == "stdio":
                tg.start_soon(_stop_on_signal, tg.cancel_scope)
                await _serve_stdio(app)
            else:
                assert sock is not None
                await _serve_http(app, host, sock, token)
            tg.cancel_scope.cancel()
    finally:
        await app.shutdown()


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


def run_server(config: ServerConfig, transport: str, host: str, port: int) -> None:
    """Blocking entry point for the CLI: serve, then stop every helper process.

    Raises ConfigurationError when the HTTP address cannot be bound, SandboxError when the
    sandbox cannot start; both before anything is served or printed.
    """
    from sandbox import shutdown

    sock = _listen(host, port) if transport == "http" else None  # first: the port may be taken
    try:
        # Start the fork server from this (main, long-lived) thread, and find out now, not at the first
        # call, whether this machine has every layer the policy requires (SandboxError otherwise).
        Sandbox(config.policy, audit_log=config.audit_path).close()
        anyio.run(functools.partial(serve, config, transport, host, port, sock=sock))
    except KeyboardInterrupt:
        pass
    finally:
        if sock is not None:
            sock.close()
        shutdown()  # the fork servers, and with them any child still alive
