"""The loopback model server the tests use (tests/llm_server.py): what it must not do to the tests
around it."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from tests.llm_server import LLMServer


def test_a_client_gone_before_its_late_reply_prints_nothing_into_the_next_test(
    capfd: pytest.CaptureFixture[str],
):
    """A client that gives a slow reply up (a timeout, a cancel) is what many tests do; the
    reply's handler thread sleeps its latency after the server stops and its test has ended, then
    writes to a closed connection. That error printed a traceback on stderr, captured by whichever
    test ran next in the worker, which failed if it checked its own stderr for tracebacks (CI,
    stop 28). The server prints nothing for a client that went."""
    before = set(threading.enumerate())
    with LLMServer("late", latency_s=0.3) as srv:
        client = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        deadline = time.monotonic() + 5
        while not srv.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.requests, "the request never reached the server"
        # gone at once, with a reset: the reply's first write fails
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    handlers = [t for t in threading.enumerate() if t not in before]
    for thread in handlers:  # the handler outlives the server: its latency, then the write
        thread.join(5)
    assert not any(t.is_alive() for t in handlers), handlers
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Exception occurred" not in captured.err, captured.err
