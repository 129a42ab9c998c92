"""A child that breaks the protocol is killed with a clear ProtocolError; the host carries on."""

from __future__ import annotations

import pytest

from sandbox import Sandbox
from tests.conftest import policy_with

# The child has no /proc (its filesystem view): probe the descriptors with fstat.
FIND_CHANNEL = """
import os, stat
def _is_socket(fd):
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
chan = next(fd for fd in range(3, 64) if _is_socket(fd))
"""


@pytest.fixture
def raw_box(audit_path):
    with Sandbox(policy_with({"python.guard": "none"}), audit_log=audit_path) as box:
        yield box


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ("os.write(chan, b'\\xff\\xff\\xff\\xff' + b'x' * 64)", "exceeds the cap"),
        ("os.write(chan, b'\\x00\\x00\\x00\\x05' + b'\\xc1\\xc1\\xc1\\xc1\\xc1')", "undecodable"),
        ("os.write(chan, b'\\x00\\x00\\x00\\x03' + b'\\x92\\x01\\x02')", "not a map"),
        (
            "import msgpack\nb = msgpack.packb({'t': 'exec', 'id': 1, 'code': 'x'})\nos.write(chan, len(b).to_bytes(4, 'big') + b)",
            "may not be sent by the child",
        ),
        (
            "import msgpack\nb = msgpack.packb({'t': 'ack', 'ok': True})\nos.write(chan, len(b).to_bytes(4, 'big') + b)",
            "unexpected 'ack'",
        ),
    ],
)
def test_garbage_on_the_channel_is_a_protocol_error(raw_box, payload, why):
    raw_box.execute("v = 1")
    r = raw_box.execute(FIND_CHANNEL + payload + "\nimport time\ntime.sleep(5)")
    assert not r.ok and r.error_type == "ProtocolError", r
    assert why in r.error_message
    assert not raw_box.alive
    r = raw_box.execute("print('next')")
    assert r.ok and r.state_lost and r.stdout == "next\n"


def test_closing_the_channel_ends_the_child_cleanly(raw_box):
    r = raw_box.execute(FIND_CHANNEL + "os.close(chan)\nimport time\ntime.sleep(5)")
    assert not r.ok and r.error_type in ("ChildExited", "ChildCrashed", "ProtocolError")
    assert r.duration_s < 4
    assert raw_box.execute("print(1)").state_lost


def test_a_half_frame_then_silence_hits_the_wall_limit_not_a_hang(audit_path):
    with Sandbox(
        policy_with({"python.guard": "none", "limits.wall_seconds": 1}), audit_log=audit_path
    ) as box:
        r = box.execute(
            FIND_CHANNEL + "os.write(chan, b'\\x00\\x00\\x10\\x00abc')\nimport time\ntime.sleep(60)"
        )
        assert r.limit == "wall"


@pytest.mark.parametrize("count", [1, 3, 8])
def test_descriptors_pushed_at_the_host_are_refused_at_once(raw_box, count):
    code = FIND_CHANNEL + (
        "import socket, array\n"
        "s = socket.socket(fileno=os.dup(chan))\n"
        f"fds = [os.open('.', os.O_RDONLY) for _ in range({count})]\n"
        "s.sendmsg([b'\\x00'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))])\n"
        "import time\ntime.sleep(30)"
    )
    r = raw_box.execute(code)
    assert r.error_type == "ProtocolError" and "descriptors" in r.error_message
    assert r.duration_s < 10  # refused when they arrive, not when the child next speaks
