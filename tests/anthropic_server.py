"""A loopback server speaking Anthropic's Messages API, with prompt caching, for tests.

``POST /v1/messages`` on 127.0.0.1 (ephemeral port, threads, standard library
only). Point litellm at it with model ``anthropic/<name>`` and
``api_base=srv.base_url``::

    with AnthropicServer(lambda req: "hello") as srv:
        litellm.completion(model="anthropic/claude-sonnet-4-5", api_base=srv.base_url, api_key="k",
                           messages=[{"role": "user", "content": "hi"}])
        srv.requests[0].breakpoints      # where the request put cache_control markers

Caching is simulated the way Anthropic describes it, deterministically: the
prompt is the sequence of content blocks (system blocks, then each message's
blocks, in order); a block with ``cache_control`` ends a cacheable prefix. The
longest prefix, up to the last breakpoint, that an earlier request marked is
read from the cache
(``cache_read_input_tokens``), the rest up to the last breakpoint is written
(``cache_creation_input_tokens``) and what follows it is ``input_tokens``.
Tokens are whitespace-separated words of the blocks' text (the system, and
each message, count 1 more). The reply (a ``str``, a list consumed in order,
or a callable taking the :class:`MessagesRequest`) is sent as one text block;
``output_tokens`` is its word count (at least 1).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["AnthropicServer", "MessagesRequest"]


@dataclass
class MessagesRequest:
    """One request as received, with what the server made of its cache markers."""

    body: dict[str, Any]
    headers: dict[str, str]
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (where, text), in prompt order
    breakpoints: list[str] = field(default_factory=list)  # where each cache_control marker sat
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def turns(self) -> int:
        """Assistant messages in the request (the root's earlier turns)."""
        return sum(1 for m in self.body.get("messages") or [] if m.get("role") == "assistant")


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def _read(request: MessagesRequest) -> list[tuple[str, str, bool]]:
    """(where, text, marked) for every block of the prompt, in order."""
    out: list[tuple[str, str, bool]] = []
    for i, block in enumerate(_blocks(request.body.get("system"))):
        out.append((f"system[{i}]", str(block.get("text", "")), "cache_control" in block))
    for m, message in enumerate(request.body.get("messages") or []):
        for i, block in enumerate(_blocks(message.get("content"))):
            where = f"messages[{m}].{message.get('role')}[{i}]"
            out.append((where, str(block.get("text", "")), "cache_control" in block))
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        owner = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.split("?")[0].rstrip("/").endswith("/v1/messages"):
            self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
            return
        request = MessagesRequest(json.loads(raw or b"{}"), {k.lower(): v for k, v in self.headers.items()})
        text = owner._answer(request)
        self._send(
            200,
            {
                "id": f"msg_loopback_{next(owner._ids)}",
                "type": "message",
                "role": "assistant",
                "model": request.model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": request.usage,
            },
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: AnthropicServer


class AnthropicServer:
    """Anthropic's Messages API on 127.0.0.1 with simulated prompt caching."""

    def __init__(self, reply: str | Sequence[str] | Callable[[MessagesRequest], str] = "ok") -> None:
        self._reply = reply
        self._lock = threading.Lock()
        self._cache: set[str] = set()
        self._count = itertools.count()
        self._ids = itertools.count()
        self.requests: list[MessagesRequest] = []
        self._server: _Server | None = None

    def _answer(self, request: MessagesRequest) -> str:
        blocks = _read(request)
        request.blocks = [(where, text) for where, text, _ in blocks]
        request.breakpoints = [where for where, _, marked in blocks if marked]
        tokens = [len(text.split()) for _, text, _ in blocks]
        with self._lock:
            self.requests.append(request)
            prefix = hashlib.sha256()
            read_upto = write_upto = 0
            new_keys = []
            for i, (_, text, marked) in enumerate(blocks):
                prefix.update(text.encode() + b"\0")
                key = prefix.hexdigest()
                if key in self._cache:  # a hit is looked for at every block boundary before a breakpoint
                    read_upto = i + 1
                if marked:
                    new_keys.append(key)
                    write_upto = i + 1
            read_upto = min(read_upto, write_upto)
            self._cache.update(new_keys)
            spec = self._reply
            if callable(spec):
                text = spec(request)
            elif isinstance(spec, str):
                text = spec
            else:
                items = list(spec)
                text = items[min(next(self._count), len(items) - 1)]
        extra = 1 + len(request.body.get("messages") or [])
        read = sum(tokens[:read_upto])
        written = sum(tokens[read_upto:write_upto])
        request.usage = {
            "input_tokens": sum(tokens[write_upto:]) + extra,
            "output_tokens": max(1, len(text.split())),
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
        }
        return text

    def start(self) -> AnthropicServer:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> AnthropicServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the server is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"
