"""The wire format: framing round trips, caps, garbage, message shapes (property tests)."""

from __future__ import annotations

import os
import socket
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox import protocol
from sandbox.protocol import FrameReader, WireError

plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
plain = st.recursive(
    plain_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def _decode_all(reader: FrameReader) -> list[object]:
    return list(reader)


@given(st.lists(st.dictionaries(st.text(max_size=5), plain, max_size=4), min_size=1, max_size=5), st.data())
@settings(max_examples=150, deadline=None)
def test_frames_round_trip_whatever_the_chunking(messages, data):
    wire = b"".join(protocol.encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    reader = FrameReader()
    out: list[object] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[prev:cut])
        prev = cut
        out.extend(_decode_all(reader))
    assert out == messages
    assert reader.pending == 0


@given(st.dictionaries(st.text(max_size=5), plain, min_size=1, max_size=4), st.data())
@settings(max_examples=100, deadline=None)
def test_a_truncated_frame_yields_nothing_until_complete(message, data):
    wire = protocol.encode(message)
    cut = data.draw(st.integers(0, len(wire) - 1))
    reader = FrameReader()
    reader.feed(wire[:cut])
    assert _decode_all(reader) == []
    reader.feed(wire[cut:])
    assert _decode_all(reader) == [message]


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_crash_the_reader(blob):
    reader = FrameReader(max_frame=1024)
    reader.feed(blob)
    try:
        for msg in reader:
            try:
                protocol.check(msg, "child")
            except WireError:
                pass
    except WireError:
        pass  # a clean refusal is the only acceptable failure


def test_oversized_length_prefix_is_refused_before_the_body():
    reader = FrameReader(max_frame=1000)
    reader.feed(protocol.HEADER.pack(10**9))
    with pytest.raises(WireError, match="exceeds the cap"):
        next(reader)


def test_empty_frame_is_refused():
    reader = FrameReader()
    reader.feed(protocol.HEADER.pack(0))
    with pytest.raises(WireError):
        next(reader)


def test_extension_types_are_not_plain_data():
    body = msgpack.packb({"t": "ack", "ok": msgpack.ExtType(5, b"x")})
    reader = FrameReader()
    reader.feed(protocol.HEADER.pack(len(body)) + body)
    with pytest.raises(WireError, match="extension type"):
        next(reader)
    stamp = msgpack.packb({"t": "ack", "ok": msgpack.Timestamp(1, 0)}, datetime=False)
    reader.feed(protocol.HEADER.pack(len(stamp)) + stamp)
    with pytest.raises(WireError):
        protocol.check(next(reader), "child")


@pytest.mark.parametrize(
    ("msg", "sender", "why"),
    [
        ({"t": "done"}, "child", "lacks key"),
        ({"t": "exec", "id": 1, "code": "x"}, "child", "may not be sent by the child"),
        ({"t": "ack", "ok": "yes"}, "child", "must be bool"),
        ({"t": "ack", "ok": True, "extra": 1}, "child", "unexpected key"),
        ({"t": "nope"}, "child", "unknown message type"),
        ({"x": 1}, "child", "no type"),
        ([1, 2], "child", "not a map"),
        ({"t": "call", "id": 1, "fn": "f", "args": [], "kwargs": {}, "x": 2}, "child", "unexpected key"),
    ],
)
def test_message_shapes_are_checked(msg, sender, why):
    with pytest.raises(WireError, match=why):
        protocol.check(msg, sender)


@given(plain)
@settings(max_examples=100, deadline=None)
def test_pack_value_round_trips_plain_data(value):
    assert protocol.unpack_value(protocol.pack_value(value), 1 << 30) == value


@pytest.mark.parametrize("value", [{1, 2}, object(), {"k": object()}, {(1, 2): 3}, 1 + 2j])
def test_non_plain_values_are_refused(value):
    with pytest.raises(WireError):
        protocol.pack_value(value)


def test_large_values_travel_in_a_memfd_and_a_short_one_is_refused():
    data = protocol.pack_value("x" * 100_000)
    fd = protocol.write_shm(data)
    assert protocol.read_shm(fd, len(data), 1 << 30, mapped=False) == "x" * 100_000
    fd = protocol.write_shm(data)
    with pytest.raises(WireError):  # announced larger than it is
        protocol.read_shm(fd, len(data) + 10, 1 << 30, mapped=True)
    with pytest.raises(OSError):
        os.fstat(fd)  # read_shm closed it even on failure


def _streamed(value, size=None, kind=None, max_len=1 << 30, timeout=5.0):
    """*value* written into a stream pipe by a thread, read back with read_stream."""
    r, w = protocol.open_stream()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            protocol.write_stream(w, value, 5.0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(w)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        size = len(value) if size is None else size
        kind = protocol.stream_kind(value) if kind is None else kind
        return protocol.read_stream(r, size, kind, max_len, timeout)
    finally:
        writer.join()


def test_streams_carry_bytes_and_ascii_text():
    text = "".join(chr(i) for i in range(128)) * 30_000  # every ASCII byte, NUL included; 3.8 MB
    blob = bytes(range(256)) * 15_000
    got = _streamed(text)
    assert type(got) is str and got == text and got.isascii() and hash(got) == hash(text)
    got = _streamed(blob)
    assert type(got) is bytes and got == blob
    assert _streamed(b"x") == b"x"
    for big in (b"z" * (40 << 20), "q" * (33 << 20)):  # over _HUGE_FROM: filled in huge pages
        assert _streamed(big) == big
    assert protocol.stream_kind("caf\xe9") is None  # other text travels as UTF-8 in a memfd
    assert protocol.stream_kind(bytearray(b"x")) is None and protocol.stream_kind([1]) is None


def test_a_stream_is_checked_before_the_value_exists():
    with pytest.raises(WireError, match="not ASCII"):  # a str stream must be ASCII
        _streamed(b"abc" * 400_000 + b"\xff", kind="str")
    with pytest.raises(WireError, match="ended after 10 of 11"):
        _streamed(b"x" * 10, size=11)
    with pytest.raises(WireError, match="outside the allowed range"):
        _streamed(b"x" * 10, max_len=9)
    with pytest.raises(WireError, match="kind"):
        _streamed(b"x" * 10, kind="list")
    fd = protocol.write_shm(b"x" * 10)  # a memory file is not a pipe
    with pytest.raises(WireError, match="pipe"):
        protocol.read_stream(fd, 10, "bytes", 100)
    with pytest.raises(OSError):
        os.fstat(fd)  # read_stream closed it even on failure


def test_a_stream_that_stalls_times_out():
    r, w = protocol.open_stream()
    os.write(w, b"x" * 100)
    with pytest.raises(TimeoutError):
        protocol.read_stream(r, 200, "bytes", 1000, timeout=0.2)
    os.close(w)
    r, w = protocol.open_stream()  # nobody reads: the writer gives up at its deadline
    with pytest.raises(TimeoutError):
        protocol.write_stream(w, b"x" * (8 << 20), 0.2)
    os.close(r)
    with pytest.raises(BrokenPipeError):  # the reader closed its end
        protocol.write_stream(w, b"x" * 10, 0.2)
    os.close(w)


def test_a_descriptor_rides_with_its_frame():
    a, b = socket.socketpair()
    with a, b:
        fd = protocol.write_shm(b"payload")
        protocol.send_message(a, {"t": "ack", "ok": True}, fd)
        os.close(fd)
        reader, fds = FrameReader(), []
        assert protocol.recv_frames(b, reader, fds)
        assert next(reader) == {"t": "ack", "ok": True}
        assert len(fds) == 1
        assert os.pread(fds[0], 100, 0) == b"payload"
        os.close(fds[0])


def test_encode_with_value_equals_plain_encode():
    for n_keys in (1, 14, 15, 16, 20):
        head = {"t": "set", **{f"k{i}": i for i in range(n_keys - 1)}}
        packed = protocol.pack_value([1, "two", {"three": 3}])
        reader = FrameReader()
        reader.feed(protocol.encode_with_value(head, packed))
        assert next(reader) == {**head, "value": [1, "two", {"three": 3}]}
