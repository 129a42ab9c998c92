"""The audit log of a long-running service: verifying a log of gigabytes in bounded memory, while
processes append to it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import audit
from sandbox.audit import AuditLog, verify


def _write(path, records):
    audit._heads.clear()
    log = AuditLog(path)
    try:
        for record in records:
            log.append(record)
    finally:
        log.close()


def _peak(call):
    """What *call* returns, and the peak of the memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_verify_holds_a_line_at_a_time_not_the_file(tmp_path):
    """It read the whole file and split it: a 2 GB log took over 4 GB (54 MB of allocations for
    this 27 MB log, 981 MB of RSS for 500 MB). A block and a line now: 2 MB here."""
    path = tmp_path / "audit.jsonl"
    _write(path, ({"seq": i, "code": f"print({i})\n" * (i % 700)} for i in range(6000)))
    assert path.stat().st_size > 25_000_000
    report, peak = _peak(lambda: verify(path))
    assert report.ok and report.lines == 6000, report
    assert peak < 6_000_000, peak


def test_a_50_mb_cell_verifies_in_memory_bounded_by_its_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    huge = "print('é')\n" * 4_600_000  # 60 MB as the writer spells it, over 50 blocks
    _write(path, [{"code": "a = 1"}, {"code": huge}, {"code": "b = 2"}])
    size = path.stat().st_size
    assert size > 50_000_000
    report, peak = _peak(lambda: verify(path))
    assert report.ok and report.lines == 3, report
    assert peak < 6 * size, (peak, size)  # a few copies of the line (parsed, spelled again), no more


def _log_with_everything(path):
    """A log with lines of many lengths, a torn region the next line records, and a cut-off last line."""
    _write(path, ({"seq": i, "code": "x" * (i * 37 % 300)} for i in range(40)))
    with open(path, "ab") as f:
        f.write(b'{"code":"cut off\n\n{"co')
    _write(path, ({"seq": i, "code": "y" * i} for i in range(5)))
    with open(path, "ab") as f:
        f.write(b'{"code":"cut off at the end')


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 4096])
def test_lines_are_the_same_at_any_block_size(tmp_path, monkeypatch, block):
    """A line split across blocks, ending at a block's end, an empty line, a last line with no
    newline: read in blocks of any size, the lines are those of the whole file split."""
    path = tmp_path / "audit.jsonl"
    _log_with_everything(path)
    data = path.read_bytes()
    whole = verify(path)
    assert not whole.ok and "incomplete last line" in str(whole.reason) and whole.torn_lines, whole
    monkeypatch.setattr(audit, "READ_BLOCK", block)
    fd = os.open(path, os.O_RDONLY)
    try:
        cut = [False]
        assert list(audit._lines(fd, len(data), cut)) == data.split(b"\n") and cut == [True]
        cut = [False]
        assert list(audit._lines(fd, len(data) - 5, cut)) == data[:-5].split(b"\n")
        end = data.rindex(b"\n") + 1
        cut = [False]
        assert list(audit._lines(fd, end, cut)) == data[:end].split(b"\n")[:-1] and cut == [False]
    finally:
        os.close(fd)
    assert verify(path) == whole


#: Writes *line* (argv[2], hex) to the log argv[1] as an append does, under its flock, in two
#: parts with a pause between them (a long line: the kernel copies it a page at a time), and
#: says when the first part is written; with argv[3] "hold", stops before the second.
WRITE_SLOWLY = """
import fcntl, os, sys, time
line = bytes.fromhex(sys.argv[2])
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, line[: len(line) // 2])
print("half", flush=True)
if sys.argv[3] == "hold":
    time.sleep(600)
time.sleep(1.0)
os.write(fd, line[len(line) // 2 :])
"""


def _next_line(path):
    """The line the next append to *path* writes, found on a copy."""
    scratch = path.with_name("scratch.jsonl")
    scratch.write_bytes(path.read_bytes())
    _write(scratch, [{"seq": 99, "code": "z" * 10_000}])
    line = scratch.read_bytes()[path.stat().st_size :]
    scratch.unlink()
    return line


@contextlib.contextmanager
def _writers(script: str, *argv: list[str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One writer process running *script* per argument list; on leaving the block each must
    have exited 0 (waited for at most 120 s), and all are killed whatever happened."""
    writers = [subprocess.Popen([sys.executable, "-c", script, *args]) for args in argv]
    try:
        yield writers
        for w in writers:
            assert w.wait(120) == 0
    finally:
        for w in writers:
            w.kill()
            w.wait(60)


@contextlib.contextmanager
def _half_written(path: Path, then: str) -> Iterator[tuple[subprocess.Popen[str], bytes]]:
    """A log of three lines, and a writer process that has written half of the fourth under the
    append lock; *then* "finish": it writes the rest, "hold": it keeps the lock. Yields the
    writer and the line; the writer is killed after."""
    _write(path, ({"seq": i} for i in range(3)))
    line = _next_line(path)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE_SLOWLY, str(path), line.hex(), then], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "half"
        yield writer, line
    finally:
        writer.kill()
        writer.wait(60)


def test_a_line_being_written_is_not_read_in_part(tmp_path):
    """verify read up to the end of the file as it was: a line an append was writing, read in
    part, was reported as an incomplete last line (exit 1), a false alarm. It now reads up to
    the size the log had when no append was in progress (taking the append lock shared for an
    instant): the append in flight ends first, and its line verifies."""
    path = tmp_path / "audit.jsonl"
    with _half_written(path, "finish") as (writer, line):
        report = verify(path)  # the append in flight holds the lock: its whole line is read
        assert writer.wait(60) == 0
    assert report.ok and report.lines == 4, report
    assert json.loads(line)["hash"] == report.last_hash


def test_a_writer_stopped_mid_line_is_named_not_waited_for(tmp_path):
    """A writer stopped with the lock held and half its line written: verify waits at most
    lock_timeout, reads the log as it is, and says who held the lock."""
    path = tmp_path / "audit.jsonl"
    with _half_written(path, "hold") as (writer, _):
        report = verify(path, lock_timeout=0.5)
    assert not report.ok and report.bad_line == 4, report
    assert "incomplete last line" in str(report.reason) and f"(pid {writer.pid})" in str(report.reason), report
    assert verify(path, lock_timeout=0.5) == report.__class__(
        False, 4, 4, str(report.reason).split("; another process")[0], ()
    )  # the writer is gone: the same line, without the note


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_verify_lock_timeout_must_be_finite(tmp_path, bad):
    path = tmp_path / "audit.jsonl"
    _write(path, [{"seq": 1}])
    with pytest.raises(ValueError, match="lock_timeout"):
        verify(path, lock_timeout=bad)


#: 4 threads of one process append argv[2] lines each to argv[1], every third one of 1-2 MB.
APPEND_MANY = """
import sys, threading
from sandbox.audit import AuditLog
log = AuditLog(sys.argv[1])
n, me = int(sys.argv[2]), sys.argv[3]
def run(t):
    for i in range(n):
        log.append({"w": me, "t": t, "i": i, "code": "x" * (1_000_000 * (i % 3 == 2) + 200 * i)})
threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
log.close()
"""


def test_verify_during_appends_by_8_processes_never_reports_a_false_break(tmp_path):
    """8 processes of 4 threads append (some lines of megabytes, written a page at a time) while
    this one verifies again and again: every verification passes. Before, 1 in 150-250 read a
    line in part and reported an incomplete last line."""
    path = tmp_path / "audit.jsonl"
    path.touch()
    reports = []
    with _writers(APPEND_MANY, *([str(path), "6", str(k)] for k in range(8))) as writers:
        while any(w.poll() is None for w in writers) or not reports:
            reports.append(verify(path))
    bad = [r for r in reports if not r.ok]
    assert not bad, (len(bad), len(reports), bad[0])
    final = verify(path)
    assert final.ok and final.lines == 8 * 4 * 6, final


#: Appends argv[2] lines to argv[1], one every 2 ms, through one AuditLog, and prints how many.
APPEND_PACED = """
import sys, time
from sandbox.audit import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[2])):
    log.append({"w": sys.argv[3], "i": i, "code": "x = %d" % i})
    time.sleep(0.002)
log.close()
"""


def _records(data):
    return [json.loads(raw) for raw in data.splitlines()]


def test_logrotate_create_against_live_writers_loses_no_line(tmp_path):
    """logrotate's create: the log renamed to audit.jsonl.1 and a new one made at the path,
    while 4 processes append; then the rotated file compressed (read, and unlinked a moment
    later, as gzip does). Writers went on appending to the renamed file: the lines written
    while it was compressed were lost (464 of 600 here), and the rest went to the
    rotated file, not the new one. Now each writer's next append goes to the new file: once
    verify has checked the rotated file (waiting for the append in flight), nothing more is
    written to it, and every line is in the compressed copy or in the new log."""
    path = tmp_path / "audit.jsonl"
    rotated = tmp_path / "audit.jsonl.1"
    path.touch()
    with _writers(APPEND_PACED, *([str(path), "150", str(k)] for k in range(4))):
        deadline = time.monotonic() + 60
        while path.read_bytes().count(b"\n") < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.rename(path, rotated)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # logrotate's create
        before = verify(rotated)  # in logrotate's postrotate, say
        assert before.ok and before.lines >= 40, before
        kept = before.last_hash
        compressed = rotated.read_bytes()
        time.sleep(0.3)  # gzip compressing
        rotated.unlink()
    old, new = _records(compressed), _records(path.read_bytes())
    assert old[-1]["hash"] == kept  # nothing was written to it after it was verified
    assert len(old) + len(new) == 600, (len(old), len(new))
    assert sorted((r["w"], r["i"]) for r in old + new) == sorted((str(k), i) for k in range(4) for i in range(150))
    current = verify(path)
    assert current.ok and current.lines == len(new), current
    assert new[0]["prev_hash"] == audit.GENESIS  # each file is a chain of its own
    # A hash kept before the rotation is checked against the file it was kept from.
    copy = tmp_path / "audit.jsonl.1.copy"
    copy.write_bytes(compressed)
    assert verify(copy, expect=kept).ok
    elsewhere = verify(path, expect=kept)
    assert not elsewhere.ok and elsewhere.missing == (kept,), elsewhere


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_copytruncate_landing_inside_an_append_leaves_a_valid_chain(tmp_path, monkeypatch, when):
    """logrotate's copytruncate ignores the lock: it truncates the log whenever it is done
    copying, inside an append as likely as not on a busy log. Landing between the append's
    look at the file and its write, it left the line first in the file and chained onto a line
    that is no longer there (verify: line 1, "a line was dropped"); landing just after the
    write, the next append chained onto the truncated line from memory. The line is now
    written again as the first of a new chain, and a file changed outside the lock is read
    again by the next append."""
    path = tmp_path / "audit.jsonl"
    audit._heads.clear()
    log = AuditLog(path)
    log.append({"event": "a"})
    log.append({"event": "b"})
    real = audit._write_all

    def truncated_around(fd, data):
        if when == "before":
            os.truncate(path, 0)
        real(fd, data)
        if when == "after":
            os.truncate(path, 0)

    monkeypatch.setattr(audit, "_write_all", truncated_around)
    log.append({"event": "c"})
    monkeypatch.setattr(audit, "_write_all", real)
    log.append({"event": "d"})
    log.close()
    report = verify(path)
    events = [r["event"] for r in _records(path.read_bytes())]
    assert report.ok and events == (["c", "d"] if when == "before" else ["d"]), (report, events)
    assert _records(path.read_bytes())[0]["prev_hash"] == audit.GENESIS


#: Appends lines of 2 kB to argv[1] as fast as it can until the file argv[2] exists (60 s at most).
APPEND_BUSY = """
import os, sys, time
from sandbox.audit import AuditLog
log = AuditLog(sys.argv[1])
end = time.monotonic() + 60
i = 0
while time.monotonic() < end and not os.path.exists(sys.argv[2]):
    log.append({"i": i, "code": "x" * 2000})
    i += 1
log.close()
"""


def test_copytruncate_against_busy_writers_leaves_each_new_log_verifying(tmp_path):
    """3 processes append without a pause while the log is copied and truncated 10 times: each
    time, the truncated log verifies a moment later (before, most did not, 81 of 104 in a
    longer run: its first line chained onto one cut off), and no append fails. Lines appended
    between the copy and the truncation are lost: copytruncate cannot be made safe, only
    survivable."""
    path = tmp_path / "audit.jsonl"
    path.touch()
    stop = tmp_path / "stop"
    broken = []
    rotations = 0
    with _writers(APPEND_BUSY, *([str(path), str(stop)] for _ in range(3))) as writers:
        deadline = time.monotonic() + 60
        while path.stat().st_size < 100_000 and time.monotonic() < deadline:  # the writers started
            time.sleep(0.01)
        while all(w.poll() is None for w in writers) and rotations < 10:
            copy = path.read_bytes()
            with open(path, "r+b") as f:
                f.truncate(0)
            rotations += 1
            time.sleep(0.05)
            report = verify(path)
            if not report.ok:
                broken.append(report)
            (tmp_path / "copy").write_bytes(copy)  # read while an append wrote: its last line may be cut
            kept = verify(tmp_path / "copy")
            if not (kept.ok or "incomplete last line" in str(kept.reason)):
                broken.append(kept)
        stop.touch()
    assert rotations == 10 and not broken, (rotations, broken[:1])
    assert verify(path).ok


def test_a_log_truncated_while_an_append_reads_its_tail_is_read_again(tmp_path, monkeypatch):
    """The append read the last line of a log emptied meanwhile: AuditError "the audit log
    shrank while it was read" (the cell had run; its line was not written). It reads again."""
    path = tmp_path / "audit.jsonl"
    _write(path, [{"event": "a"}, {"event": "b"}])
    real = audit._read_tail
    calls = []

    def truncated_first(fd, size):
        if not calls:
            os.truncate(path, 0)
        calls.append(size)
        return real(fd, size)

    monkeypatch.setattr(audit, "_read_tail", truncated_first)
    _write(path, [{"event": "c"}])  # a new process's log object: it reads the tail
    assert calls[0] > 0 and calls[-1] == 0, calls
    report = verify(path)
    assert report.ok and [r["event"] for r in _records(path.read_bytes())] == ["c"], report
