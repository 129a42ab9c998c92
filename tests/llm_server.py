"""A loopback OpenAI-compatible chat server for tests and benchmarks.

It serves ``POST /v1/chat/completions`` (and ``/chat/completions``) on
127.0.0.1 with an ephemeral port, from a thread, using only the standard
library. Point litellm at it with model ``openai/<name>`` and
``api_base=srv.base_url``::

    from tests.llm_server import LLMServer

    with LLMServer(lambda req: f"you said {req.last_user!r}", latency_s=0.05) as srv:
        litellm.completion(model="openai/anything", api_base=srv.base_url, api_key="k",
                           messages=[{"role": "user", "content": "hi"}])
        srv.requests[0].model        # 'anything'
        srv.usage_totals()           # (prompt_tokens, completion_tokens) over all replies

The reply may be:

- a ``str`` or one :class:`Reply`: every request gets it;
- a list of ``str`` / :class:`Reply`: consumed in order, one per request (the
  last one repeats once the list is used up);
- a callable taking the :class:`ChatRequest` and returning ``str`` or
  :class:`Reply`. It is called from the server's handler threads, possibly
  concurrently: make it thread-safe.

A :class:`Reply` with ``status != 200`` sends an OpenAI-style error body with
that status (401 for a bad key, 400 with ``code="context_length_exceeded"``
for a too-long prompt, ...). A :class:`Reply` may also send a server that
misbehaves: ``usage=`` replaces the reply's ``usage`` object (malformed counts
included), ``body=`` the whole JSON body (a response of the wrong shape), and
``trickle_s=`` sends the response one byte at a time, that many seconds apart
(a server that never trips a per-read timeout; stopping the server ends it,
setting the event given as ``release=`` sends the rest at once).
``ChatRequest.sent_at`` says when the whole response was written. ``endless_s=`` sends a 200
whose chunked body never ends (a 64 KiB chunk of spaces every that many seconds; 0: as fast as
the client reads) until the client goes or the server stops (``ChatRequest.streamed`` counts
its bytes, ``ChatRequest.gone_at`` says when the client went), ``flood_1xx=True`` sends
``102 Processing`` lines without end and never an answer (the same two fields), and ``raw=``
sends these bytes as the body, whatever they are (a gzip bomb, with ``headers=``).

Token counts are deterministic and documented: ``prompt_tokens`` is the number
of whitespace-separated words over every message's text content, plus 1 per
message; ``completion_tokens`` is the number of words of the reply (at least 1).
Every request is recorded (body and headers) in :attr:`LLMServer.requests`,
so tests can check what reached the server, e.g. that an API key appears only
in the ``Authorization`` header.

The server stops when the ``with`` block ends (or on :meth:`LLMServer.stop`;
:meth:`LLMServer.kill` also closes the connections kept alive, as a killed server would);
its threads are daemons, so a forgotten server never blocks interpreter exit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["ChatRequest", "LLMServer", "Reply", "count_words"]


def count_words(text: str) -> int:
    """The server's token count for a piece of text: whitespace-separated words."""
    return len(text.split())


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


@dataclass(frozen=True)
class Reply:
    """One scripted answer: text, or an error when ``status`` is not 200."""

    text: str = ""
    status: int = 200
    error_code: str | None = None
    error_type: str = "invalid_request_error"
    latency_s: float | None = None  # overrides the server's latency for this reply
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers, e.g. (("Retry-After", "1"),)
    usage: Any = None  # sent as the body's "usage" instead of the counted one (malformed ones included)
    body: Any = None  # sent as the whole JSON body instead of a chat completion (a bad response shape)
    trickle_s: float = 0.0  # > 0: the response (status line, headers, body) goes out a byte at a time, this far apart
    release: threading.Event | None = None  # once set, the rest of a trickled response goes out at once
    endless_s: float | None = None  # not None: a chunked 200 body without end, a 64 KiB chunk this often
    raw: bytes | None = None  # sent as the body as it is (with the reply's headers)
    flood_1xx: bool = False  # 102 Processing lines without end, never an answer


@dataclass
class ChatRequest:
    """One request as the server received it."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float
    reply: Reply | None = None
    usage: tuple[int, int] = (0, 0)
    sent_at: float | None = None  # time.time() when the whole response was written (None: it was not)
    streamed: int = 0  # bytes of an endless body sent so far
    gone_at: float | None = None  # time.time() when the client of an endless body went away
    peer: tuple[str, int] = ("", 0)  # the client's address and port: one connection, one peer

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])

    @property
    def last_user(self) -> str:
        """The text of the last user message ("" if there is none)."""
        for msg in reversed(self.messages):
            if msg.get("role") == "user":
                return _content_text(msg.get("content"))
        return ""

    @property
    def prompt_text(self) -> str:
        """Every message's text, joined by newlines."""
        return "\n".join(_content_text(m.get("content")) for m in self.messages)


ReplySpec = str | Reply | Sequence[str | Reply] | Callable[[ChatRequest], "str | Reply"]


@dataclass
class _State:
    reply: ReplySpec
    latency_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[ChatRequest] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    stopped: threading.Event = field(default_factory=threading.Event)  # ends a trickle when the server stops

    def answer(self, request: ChatRequest) -> Reply:
        spec = self.reply
        if isinstance(spec, str):
            return Reply(spec)
        if isinstance(spec, Reply):
            return spec
        if callable(spec):
            out = spec(request)
            return out if isinstance(out, Reply) else Reply(str(out))
        items = list(spec)
        if not items:
            return Reply("")
        with self.lock:
            i = next(self.counter)
        item = items[min(i, len(items) - 1)]
        return item if isinstance(item, Reply) else Reply(str(item))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    disable_nagle_algorithm = True  # headers and body go out separately: no 40 ms delayed-ACK stall
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence per-request logging
        pass

    def _send_json(
        self, status: int, payload: Any, reply: Reply | None = None, request: ChatRequest | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        headers = () if reply is None else reply.headers
        if reply is not None and reply.trickle_s > 0:
            if not self._trickle(status, data, reply):
                return
        else:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        if request is not None:
            request.sent_at = time.time()

    def _trickle(self, status: int, data: bytes, reply: Reply) -> bool:
        """A valid response, sent one byte every ``reply.trickle_s`` seconds (the rest at once when
        ``reply.release`` is set): each read of the client gets something well within any per-read
        timeout. Stops (closing the connection, returning False) when the server is stopped or
        the client has gone."""
        head = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
        head += [f"{name}: {value}" for name, value in reply.headers]
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}", "", ""]
        raw = "\r\n".join(head).encode() + data
        self.close_connection = True
        stopped, start = self.server.state.stopped, time.monotonic()
        try:
            for i in range(len(raw)):  # byte i goes at start + i * trickle_s: the total does not drift
                if reply.release is not None and reply.release.is_set():
                    self.wfile.write(raw[i:])
                    return True
                if stopped.wait(max(0.0, start + i * reply.trickle_s - time.monotonic())):
                    return False
                self.wfile.write(raw[i : i + 1])
                self.wfile.flush()
        except OSError:  # the client gave up and closed the connection
            return False
        return True

    def _endless(self, reply: Reply, request: ChatRequest) -> None:
        """A 200 whose chunked body never ends: until the client goes, or the server stops."""
        assert reply.endless_s is not None
        self.close_connection = True
        stopped = self.server.state.stopped
        chunk = b" " * 65536
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        try:
            self.send_response(200)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            head = b'{"choices": [{"message": {"role": "assistant", "content": "'
            self.wfile.write(b"%x\r\n" % len(head) + head + b"\r\n")
            self.wfile.flush()
            pause = reply.endless_s
            while not (stopped.wait(pause) if pause > 0 else stopped.is_set()):
                self.wfile.write(frame)
                self.wfile.flush()
                request.streamed += len(chunk)
        except OSError:  # the client has gone
            request.gone_at = time.time()

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": []})
        else:
            self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})

    def do_POST(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.split("?")[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send_json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        request = ChatRequest(self.path, body, {k.lower(): v for k, v in self.headers.items()}, time.time())
        request.peer = tuple(self.client_address[:2])  # type: ignore[assignment]
        with state.lock:
            state.requests.append(request)
        try:
            reply = state.answer(request)
        except Exception as exc:  # a broken reply function is a 500, visible to the client
            reply = Reply(f"reply function failed: {exc}", status=500, error_type="server_error")
        request.reply = reply
        delay = state.latency_s if reply.latency_s is None else reply.latency_s
        if delay > 0:
            time.sleep(delay)
        if reply.endless_s is not None:
            self._endless(reply, request)
            return
        if reply.flood_1xx:
            self.close_connection = True
            line = b"HTTP/1.1 102 Processing\r\n\r\n" * 64
            try:
                while not self.server.state.stopped.wait(0.005):
                    self.wfile.write(line)
                    self.wfile.flush()
                    request.streamed += len(line)
            except OSError:  # the client has gone
                request.gone_at = time.time()
            return
        if reply.raw is not None:
            self.send_response(200)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.raw)))
            self.end_headers()
            self.wfile.write(reply.raw)
            request.sent_at = time.time()
            return
        if reply.status != 200:
            error = {"message": reply.text or "error", "type": reply.error_type, "code": reply.error_code}
            self._send_json(reply.status, {"error": error}, reply, request)
            return
        if reply.body is not None:
            self._send_json(200, reply.body, reply, request)
            return
        prompt_tokens = sum(count_words(_content_text(m.get("content"))) + 1 for m in request.messages)
        completion_tokens = max(1, count_words(reply.text))
        request.usage = (prompt_tokens, completion_tokens)
        with state.lock:
            n = next(state.ids)
        self._send_json(
            200,
            {
                "id": f"chatcmpl-loopback-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                if reply.usage is None
                else reply.usage,
            },
            reply,
            request,
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # many concurrent clients connect at once in the batch tests
    state: _State

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()  # open ones, for kill()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went before its reply was written (it gave the call up: a timeout, a
        cancel) is what many tests do on purpose: nothing to print. The default prints a traceback
        to ``sys.stderr``, and a handler thread outlives its test (a reply's latency is slept after
        the server stops), so it printed into whichever test ran next and failed one that checks
        its own stderr for tracebacks. Any other error is printed as before."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class LLMServer:
    """An OpenAI-compatible chat server on 127.0.0.1, running in a thread.

    ``LLMServer(reply, latency_s=0.0)``: *reply* as described in the module
    docstring; *latency_s* is slept in each request's handler thread before
    it answers (requests are served concurrently).
    """

    def __init__(self, reply: ReplySpec = "ok", *, latency_s: float = 0.0) -> None:
        self._state = _State(reply=reply, latency_s=latency_s)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> LLMServer:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.state = self._state
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._state.stopped.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def kill(self) -> None:
        """Stop as a killed server process would: also every open connection is closed (:meth:`stop`
        leaves a kept-alive connection served; a client reusing it would not notice)."""
        server = self._server
        self.stop()
        if server is not None:
            with server.connections_lock:
                connections = list(server.connections)
            for connection in connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what tests look at ------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """The ``api_base`` to give litellm: ``http://127.0.0.1:<port>/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[ChatRequest]:
        """Every request received so far, in arrival order (a copy)."""
        with self._state.lock:
            return list(self._state.requests)

    def usage_totals(self, model: str | None = None) -> tuple[int, int]:
        """(prompt_tokens, completion_tokens) summed over successful replies, optionally for one model."""
        reqs = [r for r in self.requests if model is None or r.model == model]
        return sum(r.usage[0] for r in reqs), sum(r.usage[1] for r in reqs)

    def set_reply(self, reply: ReplySpec) -> None:
        """Replace the reply spec (and restart a list's position)."""
        with self._state.lock:
            self._state.reply = reply
            self._state.counter = itertools.count()

    def set_latency(self, latency_s: float) -> None:
        self._state.latency_s = latency_s


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.llm_server --latency 0.05 --reply ok``: serve until killed (prints the base URL)."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--reply", default="ok")
    args = parser.parse_args(argv)
    with LLMServer(args.reply, latency_s=args.latency) as srv:
        print(srv.base_url, flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT}) if hasattr(signal, "sigwait") else sys.stdin.read()


if __name__ == "__main__":
    _main()
