"""The audit log's tail: finding the last line is linear in its length, and a line cut off by a
crash is recorded by the next append instead of wedging the log."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sandbox import audit
from sandbox.audit import AuditLog, verify
from tests.conftest import run_cli

BIG = 16 * 1024 * 1024


def _append(path, n=1, **extra):
    audit._heads.clear()  # what the next `rlm exec` does: a new process, nothing remembered
    log = AuditLog(path)
    try:
        return [log.append({"seq": i, "code": f"x = {i}", **extra}) for i in range(n)]
    finally:
        log.close()


def _append_one(path, record):
    """One line through a new AuditLog of this process (what it remembers of the file is kept)."""
    log = AuditLog(path)
    log.append(record)
    log.close()


def _lines(path):
    return path.read_bytes().split(b"\n")


def test_a_big_last_line_costs_its_length_not_its_square(tmp_path):
    path = tmp_path / "audit.jsonl"
    _append(path, 2)
    _append(path, code="y" * BIG)  # one huge cell as the last line

    # the linear floor, in CPU time of this process (a loaded machine slows both alike):
    # read the file once and parse its last line
    t0 = time.process_time()
    json.loads(path.read_bytes().split(b"\n")[-2])
    floor = time.process_time() - t0

    t0 = time.process_time()
    _append(path)
    spent = time.process_time() - t0
    # measured: 1.4x the floor here; before the fix 20x for 16 MiB (and 28 s for a 50 MB cell)
    assert spent < 5 * floor + 0.15, (spent, floor)
    report = verify(path)
    assert report.ok and report.lines == 4


def test_finding_the_last_line_reads_it_once(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    _append(path, 1)
    _append(path, code="z" * (BIG // 4))
    last_len = len(_lines(path)[-2]) + 1
    read = []
    real_pread = os.pread

    def counting(fd, n, offset):
        data = real_pread(fd, n, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(audit.os, "pread", counting)
    _append(path)
    monkeypatch.undo()
    assert last_len <= sum(read) <= last_len + 2 * audit.TAIL_BLOCK
    assert verify(path).ok


def _crash_mid_append(path, keep):
    """What a crash during an append leaves: the first *keep* bytes of the next line."""
    scratch = path.with_name("scratch.jsonl")
    scratch.write_bytes(path.read_bytes())
    _append(scratch, code="the cell that was running when the host died")
    line = _lines(scratch)[-2] + b"\n"
    scratch.unlink()
    with open(path, "ab") as f:
        f.write(line[:keep])
    return line


@pytest.mark.parametrize("keep", [40, -40])
def test_a_line_cut_off_by_a_crash_is_recorded_by_the_next_append(tmp_path, keep):
    path = tmp_path / "audit.jsonl"
    _append(path, 3)
    _crash_mid_append(path, keep)
    fragment = _lines(path)[-1]
    report = verify(path)
    assert not report.ok and report.bad_line == 4 and "incomplete last line" in report.reason

    records = _append(path, 2)
    assert records[0]["torn_before"] == {
        "bytes": len(fragment),
        "sha256": hashlib.sha256(fragment).hexdigest(),
    }
    assert records[0]["prev_hash"] == json.loads(_lines(path)[2])["hash"]  # chained past the fragment
    assert _lines(path)[3] == fragment  # the evidence is kept, on a line of its own
    report = verify(path)
    assert report.ok and report.lines == 6 and report.torn_lines == (4,)

    out = run_cli("audit", "verify", str(path))
    assert out.returncode == 0 and "cut off by a crash" in out.stdout


def test_a_real_crash_mid_append(tmp_path):
    """The appending process dies in the middle of its write (SIGXFSZ past RLIMIT_FSIZE)."""
    path = tmp_path / "audit.jsonl"
    _append(path, 2)
    _real_crash(path, 1000)
    assert not path.read_bytes().endswith(b"\n")
    assert "incomplete last line" in verify(path).reason
    _append(path, 1)
    report = verify(path)
    assert report.ok and report.lines == 4 and report.torn_lines == (3,)


def test_a_recorded_fragment_still_cannot_be_edited(tmp_path):
    path = tmp_path / "audit.jsonl"
    _append(path, 2)
    _crash_mid_append(path, 30)
    _append(path, 1)
    rows = _lines(path)
    rows[2] = rows[2].replace(b"{", b"[", 1)
    path.write_bytes(b"\n".join(rows))
    report = verify(path)
    assert not report.ok and report.bad_line == 3
    # and a torn_before that points at nothing is refused
    rows = _lines(path)
    del rows[2]
    path.write_bytes(b"\n".join(rows))
    assert verify(path).bad_line == 3


def test_a_complete_line_missing_only_its_newline_is_sealed_and_chained(tmp_path):
    path = tmp_path / "audit.jsonl"
    _append(path, 2)
    line = _crash_mid_append(path, -1)  # everything but the newline
    records = _append(path, 1)
    assert "torn_before" not in records[0]
    assert records[0]["prev_hash"] == json.loads(line)["hash"]
    report = verify(path)
    assert report.ok and report.lines == 4 and report.torn_lines == ()


def test_a_fragment_as_the_only_content(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"code":"x = 1","outc')
    records = _append(path, 1)
    assert records[0]["prev_hash"] == audit.GENESIS and records[0]["torn_before"]["bytes"] == 21
    assert verify(path).ok


def test_a_file_that_holds_no_record_is_not_called_a_log_with_cut_off_lines(tmp_path):
    """``rlm audit verify /bin/ls`` said "incomplete last lines 1-509 (writes cut off, e.g. by
    crashes)": a program, or any text without a final newline, read as an audit log whose every
    write a crash cut off. Every append starts its line with "{": a file with no such line holds
    no audit record, and says so; a first write cut off is still a cut-off line."""
    with open(sys.executable, "rb") as program:
        head = program.read(4096)
    for content in (head, b"hello\nworld"):
        path = tmp_path / "not-a-log"
        path.write_bytes(content)
        report = verify(path)
        assert not report.ok and report.bad_line == 1
        assert report.reason.startswith("no audit record in the file"), report.reason
    path.write_bytes(b'{"code":"x = 1","outc')  # a first append cut off
    assert "incomplete last line" in verify(path).reason


def _real_crash(path, room):
    """An append by another process, killed (SIGXFSZ) once the file has grown by *room* bytes."""
    size = path.stat().st_size
    script = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the kernel's default kills\n"
        "from sandbox.audit import AuditLog\n"
        f"log = AuditLog({str(path)!r})\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size + room}, resource.RLIM_INFINITY))\n"
        "log.append({'code': 'x' * 100000})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    assert path.stat().st_size == size + room


@pytest.mark.parametrize("rooms", [(1000, 500), (1000, 1), (300, 1, 200, 1)])
def test_appends_cut_off_in_a_row_do_not_wedge_the_log(tmp_path, rooms):
    """The append that was to record a fragment is cut off too (within its line, or just
    after the newline it ends the fragment with): what follows the last record is one torn
    region, which the next append records; the log goes on and verifies."""
    path = tmp_path / "audit.jsonl"
    _append(path, 2)
    head = len(path.read_bytes())
    for room in rooms:
        _real_crash(path, room)
    region = path.read_bytes()[head:]
    assert region.count(b"\n") >= 1
    report = verify(path)
    assert not report.ok and report.bad_line == 3
    records = _append(path, 2)
    region = region.removesuffix(b"\n")
    assert records[0]["torn_before"] == {"bytes": len(region), "sha256": hashlib.sha256(region).hexdigest()}
    assert records[0]["prev_hash"] == json.loads(_lines(path)[1])["hash"]
    assert path.read_bytes()[head : head + len(region)] == region  # the evidence is kept as it was
    report = verify(path)
    n = region.count(b"\n") + 1
    assert report.ok and report.lines == 4 + n and report.torn_lines == tuple(range(3, 3 + n)), report
    # a byte of the recorded region changed, or one of its lines dropped, is still an edit
    data = path.read_bytes()
    edited = data[: head + 5] + bytes([data[head + 5] ^ 1]) + data[head + 6 :]
    path.write_bytes(edited)
    assert verify(path).bad_line == 3
    rows = data.split(b"\n")
    del rows[3]
    path.write_bytes(b"\n".join(rows))
    assert not verify(path).ok


def test_a_complete_last_line_that_is_no_record_is_recorded_as_torn(tmp_path):
    """A fragment followed by the newline of the append that was to record it (cut off just
    after it) looks like any complete line that is no record: it is recorded, not a wedge;
    verify names it until then."""
    path = tmp_path / "audit.jsonl"
    _append(path, 2)
    with open(path, "ab") as f:
        f.write(b'{"code":"x = 1","outc\n')
    report = verify(path)
    assert not report.ok and report.bad_line == 3 and "not valid JSON" in report.reason
    records = _append(path, 1)
    assert records[0]["torn_before"]["bytes"] == 21
    report = verify(path)
    assert report.ok and report.lines == 4 and report.torn_lines == (3,)


def _counting_preads(monkeypatch):
    read = []
    real_pread = os.pread

    def counting(fd, n, offset):
        read.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(audit.os, "pread", counting)
    return read


def test_the_next_log_object_in_this_process_reads_nothing_back(tmp_path, monkeypatch):
    """The next sandbox on the same file starts from the hash the last one closed with."""
    path = tmp_path / "audit.jsonl"
    _append(path, 2)
    _append_one(path, {"seq": 0, "code": "a"})
    read = _counting_preads(monkeypatch)
    _append_one(path, {"seq": 1, "code": "b"})
    assert read == []
    assert verify(path).ok and verify(path).lines == 4


def test_sandboxes_of_one_process_sharing_a_log_do_not_read_each_others_lines(tmp_path, monkeypatch):
    """Two log objects of this process on one file (two sandboxes on the default log), taking
    turns: each chains onto the other's last line without reading it back, and the chain holds;
    a line from another process in between is read back once."""
    path = tmp_path / "audit.jsonl"
    _append(path, 1)
    read = _counting_preads(monkeypatch)
    first, second = AuditLog(path), AuditLog(path)
    try:
        for i in range(20):
            (first if i % 2 else second).append({"seq": i, "code": f"x = {i}"})
        assert read == []
        subprocess.run(
            [sys.executable, "-c",
             f"from sandbox.audit import AuditLog; AuditLog({str(path)!r}).append({{'code': 'theirs'}})"],
            check=True,
        )  # fmt: skip
        first.append({"code": "after theirs"})
        assert read, "the other process's line was not read back"
        read.clear()
        second.append({"code": "and again"})
        assert read == []
    finally:
        first.close()
        second.close()
    report = verify(path)
    assert report.ok and report.lines == 24, report


def test_a_write_by_anyone_else_since_makes_the_next_log_read_the_tail(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    _append(path, 1)
    _append_one(path, {"seq": 0, "code": "mine"})
    # another process appends (its own log object, nothing remembered there)
    subprocess.run(
        [sys.executable, "-c",
         f"from sandbox.audit import AuditLog; log = AuditLog({str(path)!r}); log.append({{'code': 'theirs'}})"],
        check=True,
    )  # fmt: skip
    read = _counting_preads(monkeypatch)
    _append_one(path, {"seq": 1, "code": "mine again"})
    assert read, "the other process's line was not read back"
    report = verify(path)
    assert report.ok and report.lines == 4, report
    # a file replaced by another of the same name is another file: nothing carries over
    path.rename(tmp_path / "old.jsonl")
    _append(tmp_path / "seed.jsonl", 1)
    (tmp_path / "seed.jsonl").rename(path)
    _append_one(path, {"code": "after the swap"})
    assert verify(path).ok and verify(path).lines == 2


APPEND_ONE = (
    "import sys; from sandbox.audit import AuditLog\n"
    "log = AuditLog(sys.argv[1]); log.append({'event': sys.argv[2]}); log.close()\n"
)


def test_a_log_truncated_and_refilled_to_the_same_size_is_read_again(tmp_path):
    """logrotate's copytruncate, then another process's line of the same length: the size is
    what this process remembered, the file is not. The next append reads the tail instead of
    chaining onto the remembered hash (which broke the chain)."""
    path = tmp_path / "audit.jsonl"
    audit._heads.clear()
    _append_one(path, {"event": "a"})
    _append_one(path, {"event": "b"})  # remembered: this size, this hash
    size = path.stat().st_size
    with open(path, "r+") as f:
        f.truncate(0)
    subprocess.run([sys.executable, "-c", APPEND_ONE, str(path), "c"], check=True)
    subprocess.run([sys.executable, "-c", APPEND_ONE, str(path), "d"], check=True)
    assert path.stat().st_size == size  # the same length as before: two lines of the same shape
    _append_one(path, {"event": "e"})
    report = verify(path)
    assert report.ok and report.lines == 3, report


def test_a_log_renamed_away_gets_no_line_from_writers_that_have_it_open(tmp_path):
    """A rotation by rename (logrotate's create) while another process has the log open: every
    writer's next line goes to the new file at the path, chained onto its lines, and the
    renamed file keeps the chain it had. Writers appended to the renamed file for as long as
    they lived (and a line written while it was compressed was lost); before that, an append
    here read the new file by name, with the old one's size, and wrote a torn line."""
    path = tmp_path / "audit.jsonl"
    other = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom sandbox.audit import AuditLog\n"
         "log = AuditLog(sys.argv[1]); log.append({'event': 'q0'}); print('ready', flush=True)\n"
         "sys.stdin.readline(); log.append({'event': 'q1'}); log.close()\n",
         str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        mine = AuditLog(path)
        mine.append({"event": "p0"})
        path.rename(tmp_path / "audit.jsonl.1")
        fresh = AuditLog(path)
        fresh.append({"event": "new0"})
        assert other.stdin is not None
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.wait(60) == 0
        mine.append({"event": "p1"})  # the other process wrote since: the tail is read, through our file
        mine.close()
        fresh.close()
    finally:
        other.kill()
    rotated = verify(tmp_path / "audit.jsonl.1")
    assert rotated.ok and rotated.lines == 2, rotated
    events = [json.loads(raw)["event"] for raw in (tmp_path / "audit.jsonl.1").read_bytes().splitlines()]
    assert events == ["q0", "p0"]
    current = verify(path)
    assert current.ok and current.lines == 3, current
    assert [json.loads(raw)["event"] for raw in path.read_bytes().splitlines()] == ["new0", "q1", "p1"]


def test_a_log_deleted_while_in_use_is_created_again_not_written_into_the_void(tmp_path):
    """`rm` of the log (or of its directory) while sandboxes use it: their next lines go to a
    new file at the path, chained from the start, instead of into the deleted inode."""
    from sandbox import Sandbox

    path = tmp_path / "logs" / "audit.jsonl"
    with Sandbox("default", audit_log=path, pool=None) as sb:
        sb.execute("x = 1")
        import shutil

        shutil.rmtree(path.parent)
        assert sb.execute("x += 1").ok
        assert sb.execute("x += 1").ok
        assert sb.get_variable("x") == 3
    lines = [json.loads(raw) for raw in path.read_bytes().splitlines()]
    assert [line["seq"] for line in lines] == [2, 3]
    assert lines[0]["prev_hash"] == audit.GENESIS and verify(path).ok


def _next_line(path):
    """The line (newline included, and the newline sealing a cut-off line before it) the next
    append to *path* writes, found on a copy."""
    scratch = path.with_name("scratch.jsonl")
    scratch.write_bytes(path.read_bytes())
    _append(scratch, code="the cell after: 'é \u2028 😀'")
    line = scratch.read_bytes()[len(path.read_bytes()) :]
    scratch.unlink()
    return line


def test_a_line_cut_off_at_any_byte_is_still_taken_for_a_crash(tmp_path):
    """A crash may cut an append anywhere, also after its prev_hash (which verify now reads in
    a cut-off line) and in the middle of a character or an escape: each cut of a sandbox's
    real line, at every byte, is recorded by the next append and verifies. So are two appends
    cut off in a row (the one that was to record the first), at a sample of cuts."""
    from sandbox import Sandbox
    from tests.conftest import policy_with

    path = tmp_path / "audit.jsonl"
    with Sandbox(policy_with({"python.guard": "none"}), audit_log=path) as box:
        box.execute("x = 1")
        box.execute("y = 2")
        box.execute("s = 'é \u2028 \u202e 😀 \\\\ \"q\"'\nraise type('E\u2028rr', (Exception,), {})()")
    full = path.read_bytes()
    head = len(b"".join(full.split(b"\n")[:2])) + 2
    line = full[head:-1]
    assert 0 < line.index(b'"prev_hash":') < len(line) - 100 and "😀".encode() in line
    assert line.count(b"\\u2028") == 3 and line.count(b"\\u202e") == 1  # the escapes cut too
    for keep in range(1, len(line)):
        path.write_bytes(full[: head + keep])
        (record,) = _append(path)
        assert record["torn_before"]["bytes"] == keep, keep
        report = verify(path)
        assert report.ok and report.lines == 4 and report.torn_lines == (3,), (keep, report)
    # cut off twice in a row: the second append (sealing the first fragment, chained onto line 2,
    # recording it) cut off too, anywhere in its line
    for keep in range(1, len(line), 41):
        path.write_bytes(full[: head + keep])
        second = _next_line(path)
        assert second.startswith(b"\n{") and b'"prev_hash":' in second
        for cut in [*range(1, len(second) - 1, 29), len(second) - 2]:
            path.write_bytes(full[: head + keep] + second[:cut])
            _append(path)
            report = verify(path)
            assert report.ok and report.torn_lines == ((3,) if cut == 1 else (3, 4)), (keep, cut, report)


def _four_lines(path):
    for seq, outcome in [(1, "ok"), (2, "ok"), (3, "error:PermissionError"), (4, "ok")]:
        _append_one(path, {"seq": seq, "code": f"step{seq}()", "outcome": outcome})
    return path.read_bytes().split(b"\n")[:4]


@pytest.mark.parametrize("cut_before", [b'"outcome"', b'"seq"'])
def test_a_log_cut_into_a_line_then_appended_to_is_caught_by_the_kept_hash(tmp_path, cut_before):
    """Cut into line 3 (its outcome and line 4 gone), then a normal append: the cut line
    passes for a crash's, recorded, and the chain verifies. Cut after its prev_hash too: that
    is the hash of line 2, the last complete line, as a crash's would be. The last hash kept
    elsewhere, passed as ``expect`` (``rlm audit verify --expect``), is in no line: caught."""
    path = tmp_path / "audit.jsonl"
    lines = _four_lines(path)
    kept = verify(path).last_hash
    earlier = json.loads(lines[1])["hash"]
    assert verify(path, expect=[kept, earlier]).ok
    cut = len(lines[0]) + len(lines[1]) + 2 + lines[2].index(cut_before)
    assert (b'"prev_hash"' in path.read_bytes()[:cut].split(b"\n")[-1]) == (cut_before == b'"seq"')
    os.truncate(path, cut)
    _append_one(path, {"seq": 5, "code": "step5()", "outcome": "ok"})
    assert verify(path).ok and verify(path).torn_lines == (3,)  # the chain alone cannot tell

    report = verify(path, expect=kept)
    assert not report.ok and report.bad_line is None and report.missing == (kept,), report
    assert f"kept hash {kept} not in the log" in report.reason and "cut off" in report.reason
    assert verify(path, expect=[earlier]).ok  # a line that is still there
    report = verify(path, expect=(earlier, kept, kept))
    assert not report.ok and report.missing == (kept,)

    ok = run_cli("audit", "verify", str(path), "--expect", earlier, timeout=60)
    assert ok.returncode == 0 and "1 kept hash(es) found" in ok.stdout, ok
    out = run_cli("audit", "verify", str(path), "--expect", earlier, "--expect", kept, timeout=60)
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.startswith(f"{path}: kept hash {kept} not in the log: lines were cut off"), out.stderr
    assert earlier not in out.stderr


def test_a_kept_hash_that_is_no_hash_is_a_usage_error(tmp_path):
    path = tmp_path / "audit.jsonl"
    _four_lines(path)
    kept = verify(path).last_hash
    for bad in (kept.upper(), kept[:-1], kept + "0", "", "x" * 64):
        with pytest.raises(ValueError, match="not a hash"):
            verify(path, expect=bad)
        out = run_cli("audit", "verify", str(path), "--expect", kept, "--expect", bad, timeout=60)
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out
        assert out.stderr.startswith(f"rlm: --expect: {bad!r} is not a hash (64 lowercase hex digits"), out


STRAY = "a cut-off line whose prev_hash is not the hash of the last complete line before it"


def test_a_cut_off_line_chained_onto_another_line_than_the_last_is_an_edit(tmp_path):
    """An append chains onto the last complete line: a cut-off line holding another prev_hash
    was not cut off there. Lines dropped before a line cut off, or several complete lines made
    into one torn region (their last byte cut off), then an append, were taken for crashes."""
    path = tmp_path / "audit.jsonl"
    lines = _four_lines(path)
    after_prev = lines[3].index(b'"seq"')  # line 4 cut off after its prev_hash (the hash of line 3)
    damaged = {
        "lines dropped before a cut-off line": (b"\n".join([lines[0], lines[1], lines[3][:after_prev]]), 3),
        "two last lines made a region": (b"\n".join([lines[0], lines[1], lines[2][:-1], lines[3][:-1]]), 4),
        "first line dropped": (lines[1][:-2], 1),
    }
    for name, (data, bad_line) in damaged.items():
        path.write_bytes(data)
        report = verify(path)  # not recorded yet: named as an edit, not "incomplete last line"
        assert not report.ok and report.bad_line == bad_line, (name, report)
        assert report.reason.startswith(STRAY), (name, report)
        _append_one(path, {"seq": 5, "code": "step5()", "outcome": "ok"})
        report = verify(path)
        assert not report.ok and report.bad_line == bad_line, (name, report)
        assert report.reason.startswith(STRAY), (name, report)
        out = run_cli("audit", "verify", str(path), timeout=60)
        assert out.returncode == 1 and f"line {bad_line}: a cut-off line whose prev_hash" in out.stderr, out
    # the same lines cut off before their prev_hash: nothing tells them from crashes' (but a kept hash)
    path.write_bytes(b"\n".join([lines[0], lines[1], lines[2][:20], lines[3][:20]]))
    _append_one(path, {"seq": 5, "code": "step5()", "outcome": "ok"})
    assert verify(path).ok
