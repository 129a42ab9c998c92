"""The audit log: one chained line per execute; edits, drops and reorders are caught."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

from sandbox import Sandbox
from sandbox.audit import verify
from tests.conftest import run_cli


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_execute_appends_one_chained_line(sb, audit_path):
    sb.execute("x = 1")
    sb.execute("1/0")
    sb.execute("print('hi')")
    lines = _lines(audit_path)
    assert len(lines) == 3
    first = lines[0]
    for key in ("time", "sandbox_id", "seq", "policy", "schema_version", "policy_sha256", "code_sha256", "code",
                "outcome", "duration_s", "cpu_s", "max_rss_bytes", "prev_hash", "hash"):  # fmt: skip
        assert key in first, key
    assert first["prev_hash"] == "0" * 64
    assert first["code"] == "x = 1" and first["code_sha256"] == hashlib.sha256(b"x = 1").hexdigest()
    assert [x["outcome"] for x in lines] == ["ok", "error:ZeroDivisionError", "ok"]
    assert [x["seq"] for x in lines] == [1, 2, 3]
    assert lines[1]["prev_hash"] == lines[0]["hash"]
    assert first["policy"] == "default" and first["policy_sha256"] == sb.policy.sha256
    assert verify(audit_path).ok


def test_limits_are_audited(audit_path):
    from tests.conftest import policy_with

    with Sandbox(policy_with({"limits.wall_seconds": 0.5}), audit_log=audit_path) as box:
        box.execute("import time\ntime.sleep(5)")
    assert _lines(audit_path)[-1]["outcome"] == "limit:wall"


def _tamper(path, fn):
    rows = path.read_text().splitlines()
    path.write_text("\n".join(fn(rows)) + "\n")


def _make_log(audit_path, n=5):
    with Sandbox("default", audit_log=audit_path) as box:
        for i in range(n):
            box.execute(f"v = {i}")


def test_an_edited_line_is_named(audit_path):
    _make_log(audit_path)

    def edit(rows):
        rec = json.loads(rows[2])
        rec["code"] = "v = 'innocent'"
        rows[2] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
        return rows

    _tamper(audit_path, edit)
    report = verify(audit_path)
    assert not report.ok and report.bad_line == 3 and "edited" in report.reason


def test_dropped_and_reordered_lines_are_named(audit_path, tmp_path):
    _make_log(audit_path)
    original = audit_path.read_text()
    _tamper(audit_path, lambda rows: rows[:1] + rows[2:])
    report = verify(audit_path)
    assert not report.ok and report.bad_line == 2
    audit_path.write_text(original)
    _tamper(audit_path, lambda rows: [rows[0], rows[2], rows[1], *rows[3:]])
    assert verify(audit_path).bad_line == 2
    audit_path.write_text(original)
    _tamper(audit_path, lambda rows: [*rows[:3], "{not json", *rows[3:]])
    assert verify(audit_path).bad_line == 4


def test_a_log_cut_short_at_its_end_is_told_by_its_last_hash(audit_path):
    """The chain alone cannot tell a log cut off at its end: the report's last hash, kept
    elsewhere, can."""
    _make_log(audit_path)
    full = verify(audit_path)
    assert full.ok and full.last_hash == _lines(audit_path)[-1]["hash"]
    _tamper(audit_path, lambda rows: rows[:3])
    cut = verify(audit_path)
    assert cut.ok and cut.lines == 3 and cut.last_hash != full.last_hash
    audit_path.write_text("")
    assert verify(audit_path).last_hash is None


def test_cli_audit_verify(audit_path):
    _make_log(audit_path, 3)
    ok = run_cli("audit", "verify", str(audit_path))
    assert ok.returncode == 0 and "3 line(s)" in ok.stdout
    assert f"last hash {_lines(audit_path)[-1]['hash']}" in ok.stdout
    _tamper(audit_path, lambda rows: [rows[0], rows[2]])
    bad = run_cli("audit", "verify", str(audit_path))
    assert bad.returncode == 1 and "line 2" in bad.stderr


def test_cli_audit_verify_shows_escapes_in_the_path_inert(tmp_path):
    """The path was printed raw: a log whose name holds terminal escape sequences (a title set,
    the screen cleared) reached the terminal with them, both for a good log and a bad one."""
    path = tmp_path / "a\x1b]0;owned\x07\x1b[2J.jsonl"
    _make_log(path, 2)
    ok = run_cli("audit", "verify", str(path))
    assert ok.returncode == 0 and "2 line(s)" in ok.stdout
    _tamper(path, lambda rows: [rows[1]])
    bad = run_cli("audit", "verify", str(path))
    assert bad.returncode == 1 and "line 1" in bad.stderr
    for text in (ok.stdout, bad.stderr):
        assert "\x1b" not in text and "\x07" not in text, text


def test_concurrent_sandboxes_share_one_chain(audit_path):
    def work():
        with Sandbox("default", audit_log=audit_path) as box:
            for i in range(20):
                box.execute(f"x = {i}")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # and another process appending to the same file
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from sandbox import Sandbox\nwith Sandbox('default', audit_log={str(audit_path)!r}) as b:\n    b.execute('y = 1')",
        ],
        check=True,
    )
    report = verify(audit_path)
    assert report.ok and report.lines == 61


def test_code_with_lone_surrogates_is_run_and_audited_escaped(sb, audit_path):
    """UTF-8 cannot carry a lone surrogate: the code runs with it escaped, and that is what the
    audit line records (its sha256 included), instead of the append failing."""
    r = sb.execute("x = '\udcff'\nprint(len(x))")
    assert r.ok and r.stdout == "1\n"  # in a string literal the escape stands for the character again
    (line,) = _lines(audit_path)
    assert line["code"] == "x = '\\udcff'\nprint(len(x))"
    assert line["code_sha256"] == hashlib.sha256(line["code"].encode()).hexdigest()
    assert verify(audit_path).ok


#: What the writer escapes that json (ensure_ascii=False) writes raw: where str.splitlines() ends
#: a line (NEL, U+2028, U+2029), the other C1 controls, and the bidirectional controls.
UNSAFE = (
    "".join(map(chr, range(0x80, 0xA0)))
    + "\u2028\u2029\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def _old_json(value):
    """What the writer wrote before it escaped UNSAFE (and json writes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _writer_json(value):
    """_old_json with each character of UNSAFE escaped: what the writer writes now."""
    return "".join(f"\\u{ord(c):04x}" if c in UNSAFE else c for c in _old_json(value))


def test_canonical_encoding_matches_the_json_encoder():
    """The fast path of the hashed encoding gives the very bytes json's sorted encoding gives,
    with the characters of UNSAFE escaped."""
    from sandbox.audit import _canonical, _unescaped

    records = [
        {"b": 'x\u2028"\\\n\x00é😀', "a": 1, "c": 1.5e300, "d": -0.0, "e": None, "f": True, "g": False},
        {"h": 2**70, "z": "", "time": "2026-12-01T00:00:00.000001+00:00", "n": float("nan")},
        {"nested": {"torn": 3, "k\u202e": ["\x85"]}, "list": [1, "2", "\u2066\u2029"]},
        {"u\u2028": "\\u2028 \\\u2028 \\\\u202e\u202e", "v": "\\" + UNSAFE + "\\u0085\\"},
        {},
    ]
    for record in records:
        assert _canonical(record) == _writer_json(record).encode(), record
        # and back to the old spelling (an escaped backslash before "u2028" is no escape)
        assert _unescaped(_canonical(record)) == _old_json(record).encode(), record


def test_line_separators_and_bidi_controls_from_a_sandbox_are_escaped(tmp_path):
    """Code in a sandbox names its exception class (the line's "outcome") and writes its code;
    json (ensure_ascii=False) wrote U+2028, U+2029, NEL and the bidi controls raw: the line had
    no newline and verified, but str.splitlines() cut it in several and a terminal showed it
    reordered by U+202E. They are written as \\uXXXX escapes: one line per record, the same
    values read back."""
    from tests.conftest import policy_with

    path = tmp_path / "audit.jsonl"
    name = "Err\u2028\u2029\x85\u202eko :emoctuo\u2066\u061c\x9b"
    codes = [
        f"raise type({name!r}, (Exception,), {{}})()",
        f"s = {UNSAFE!r}  # {UNSAFE}\nassert len(s) == {len(UNSAFE)}",
    ]
    with Sandbox(policy_with({"python.guard": "none"}), audit_log=path) as box:
        first = box.execute(codes[0])
        second = box.execute(codes[1])
    assert first.error_type == name and second.ok, (first, second)
    data = path.read_bytes()
    assert not any(c.encode() in data for c in UNSAFE), data
    text = data.decode()
    lines = text.splitlines()
    assert len(lines) == 2 and text == "".join(line + "\n" for line in lines)
    records = [json.loads(line) for line in lines]
    assert records[0]["outcome"] == f"error:{name}" and records[0]["code"] == codes[0]
    assert records[1]["code"] == codes[1] and records[1]["outcome"] == "ok"
    report = verify(path)
    assert report.ok and report.lines == 2, report


def _old_line(record, prev):
    """*record* chained onto *prev* as the writer wrote it before it escaped UNSAFE."""
    body = _old_json({**record, "prev_hash": prev}).encode()
    digest = hashlib.sha256(prev.encode() + b"\n" + body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}', digest


def test_a_line_written_with_those_characters_raw_still_verifies(tmp_path):
    """Logs written before the escapes hold the characters raw: that spelling still verifies
    (and the chain goes on from it); the hash covers the bytes, so it lets no edit through."""
    from sandbox.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    first, h1 = _old_line({"seq": 1, "outcome": "error:E\u2028\u202ex", "code": "\\u2028" + UNSAFE}, "0" * 64)
    second, h2 = _old_line({"seq": 2, "nested": {"k\u2029": ["\x85"]}, "code": "x = 1"}, h1)
    assert b"\xe2\x80\xa8" in first and b"\xc2\x85" in second  # raw U+2028, raw NEL
    path.write_bytes(first + b"\n" + second + b"\n")
    report = verify(path)
    assert report.ok and report.lines == 2 and report.last_hash == h2, report
    log = AuditLog(path)
    log.append({"seq": 3, "outcome": "error:E\u2028"})
    log.close()
    report = verify(path)
    assert report.ok and report.lines == 3, report
    assert path.read_bytes().splitlines()[2].count(b"\\u2028") == 1


def test_a_line_whose_spelling_was_swapped_without_its_hash_is_an_edit(tmp_path):
    """Either spelling verifies only with the hash of its own bytes: raw for escaped (in a new
    line), escaped for raw (in an old one), or a mix of the two, is an edit."""
    from sandbox.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append({"seq": 1, "outcome": "error:A\u2028B\u202eC"})
    log.close()
    new = path.read_bytes()
    assert verify(path).ok
    old = _old_line({"seq": 1, "outcome": "error:A\u2028B\u202eC"}, "0" * 64)[0] + b"\n"
    path.write_bytes(old)
    assert verify(path).ok
    edits = [
        new.replace(b"\\u2028", "\u2028".encode()),  # a new line, raw
        new.replace(b"\\u202e", "\u202e".encode()),  # a new line, one character raw
        old.replace("\u2028".encode(), b"\\u2028").replace("\u202e".encode(), b"\\u202e"),  # old, escaped
        old.replace("\u2028".encode(), b"\\u2028"),  # old, one escaped
    ]
    for edited in edits:
        assert dict(json.loads(edited), hash=0) == dict(json.loads(new), hash=0)  # the same values
        path.write_bytes(edited)
        report = verify(path)
        assert not report.ok and report.bad_line == 1 and "edited" in report.reason, (edited, report)


def test_a_line_nested_too_deeply_is_damage_not_a_traceback(tmp_path):
    """JSON nested past the parser's recursion limit raises RecursionError, not ValueError:
    ``verify`` (and ``rlm audit verify``) reports the line, and the next append records it
    as torn, as any other last line that is no record, not a
    RecursionError out of execute."""
    from sandbox.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append({"seq": 1})
    with open(path, "a") as f:
        f.write("[" * 100_000 + "\n")
    report = verify(path)
    assert not report.ok and report.bad_line == 2 and "not valid JSON" in report.reason
    record = AuditLog(path).append({"seq": 2})
    assert record["torn_before"]["bytes"] == 100_000
    report = verify(path)
    assert report.ok and report.torn_lines == (2,)


def test_an_escaped_lone_surrogate_is_a_bad_line_not_a_traceback(tmp_path):
    """A line may spell a lone surrogate as a JSON escape; the writer never writes one (its
    code is escaped first), and hashing it cannot encode it to UTF-8: ``rlm audit verify`` and
    ``rlm view`` report the line as edited instead of failing with UnicodeEncodeError."""
    path = tmp_path / "a.audit.log"
    path.write_text('{"prev_hash":"' + "0" * 64 + '","hash":"abc","x":"\\ud800"}\n')
    report = verify(path)
    assert not report.ok and report.bad_line == 1 and "edited" in report.reason
    out = run_cli("audit", "verify", str(path), timeout=60)
    assert out.returncode == 1 and "line 1: hash does not match" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    page = tmp_path / "a.html"
    out = run_cli("view", str(path), "-o", str(page), timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "hash does not match" in page.read_text(encoding="utf-8")


def test_every_line_the_writer_writes_verifies_byte_for_byte(tmp_path):
    """verify accepts a line only in the writer's own spelling: every kind of value the
    writer writes (unicode, escapes, surrogates escaped, floats, big ints, nested values, int
    keys, a torn line recorded in torn_before, pieces from encode_fields) still verifies."""
    from sandbox.audit import AuditLog, encode_fields

    path = tmp_path / "audit.jsonl"
    with Sandbox("default", audit_log=path) as box:
        box.execute("s = 'héllo 😀 \u2028 \\x00 \\\\ \"q\"'")
        box.execute("x = '\udcff'")  # audited escaped
        box.execute("raise ValueError('é')")
    log = AuditLog(path)
    log.append(
        {
            "f": [0.1, -0.0, 1.5e300, 1e-320, float("nan"), float("inf"), -float("inf")],
            "n": 2**70,
            "m": {2: "a", 10: "b"},  # int keys: sorted as ints, written as strings
            "t": (1, 2.5),
        },
        encode_fields({"code": "print('\u00e9\\u0041')\n\t\x7f\x1f", "nested": {"b": [1, None], "a": True}}),
    )
    with open(path, "ab") as f:  # a crash mid-append: the next append records the fragment
        f.write(b'{"code":"cut off')
    log.append({"seq": 9, "big": -(10**40), "time": "2026-12-01T00:00:00+00:00", "u": "\u0394"})
    log.close()
    report = verify(path)
    assert report.ok and report.lines == 6 and report.torn_lines == (5,), report
    assert _lines_raw(path)[-1].startswith(b'{"big":') and b'"torn_before":' in _lines_raw(path)[-1]


def _lines_raw(path):
    return path.read_bytes().splitlines()


def test_a_line_not_spelled_as_the_writer_wrote_it_is_named(tmp_path):
    """json.loads keeps the last of a key given twice, so the hash of a line with a fake
    "outcome" and "code" put first still matched, and ``rlm audit verify`` said "ok" while grep
    and parsers that keep the first key read the fake values. Any spelling of a line other than
    the writer's (keys twice, spaces, escapes) is now an edit."""
    (tmp_path / "bad.py").write_text("raise ValueError('boom')\n")
    log = tmp_path / "a.log"
    done = run_cli("exec", "--audit-log", str(log), str(tmp_path / "bad.py"), timeout=60)
    assert done.returncode != 0 and "ValueError" in done.stderr
    original = log.read_bytes()
    assert original.count(b"\n") == 1 and b'"outcome":"error:ValueError"' in original
    assert run_cli("audit", "verify", str(log), timeout=60).returncode == 0

    edits = [
        b'{"outcome":"ok","code":"print(\'harmless\')",' + original[1:],  # the fake keys first
        original.replace(b'","', b'", "', 1),  # a space
        original.replace(b'"policy":"default"', b'"policy":"\\u0064efault"'),  # an escape
        original.replace(b"\n", b"\r\n"),
    ]
    for edited in edits:
        assert edited != original
        log.write_bytes(edited)
        json.loads(edited)  # still JSON, and still the same values (the hash matches them)
        out = run_cli("audit", "verify", str(log), timeout=60)
        assert out.returncode == 1, (edited, out.stdout)
        assert "line 1: the line is not spelled as the writer writes it" in out.stderr, out.stderr
        report = verify(log)
        assert not report.ok and report.bad_line == 1 and "edited" in report.reason


def test_verify_refuses_a_fifo_instead_of_hanging(tmp_path):
    """verify read the log by name: a FIFO at the path waited for a writer, forever, and so did
    ``rlm audit verify`` and ``rlm view`` on it. It is not a regular file: an AuditError, exit 2."""
    import os

    import pytest

    from sandbox.errors import AuditError
    from tests.conftest import within

    fifo = tmp_path / "a.audit.log"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(AuditError, match="not a regular file"):
            within(10, lambda p=path: verify(p))
    out = run_cli("audit", "verify", str(fifo), timeout=30)
    assert out.returncode == 2, out
    assert out.stderr == f"rlm: cannot read audit log {fifo}: not a regular file\n", out.stderr


def test_a_record_with_a_lone_surrogate_is_written_and_verifies(tmp_path):
    """A str field holding a lone surrogate (``os.fsdecode`` of a file name that is not UTF-8,
    such as the log path ``rlm mcp`` records) made ``AuditLog.append`` and ``line_hash`` raise
    a bare ``UnicodeEncodeError``, outside the package's error tree, and the line was lost.
    The line now shows the surrogate as the text ``\\udc80``, and verifies."""
    import json
    import os

    from sandbox.audit import AuditLog, line_hash, verify

    path = tmp_path / "a.log"
    name = os.fsdecode(b"/tmp/caf\xe9.jsonl")
    log = AuditLog(path)
    try:
        record = log.append({"event": "mcp_tool_call", "log_path": name, "k\ud800": 1})
    finally:
        log.close()
    assert verify(path).ok
    (line,) = path.read_bytes().splitlines()
    assert json.loads(line)["log_path"] == "/tmp/caf\\udce9.jsonl"  # shown, escaped
    assert line_hash(json.loads(line)) == record["hash"]


def test_a_terminal_at_the_log_path_does_not_become_the_controlling_terminal():
    """A tty opened O_RDWR without O_NOCTTY becomes the controlling terminal of a process that
    has none (a daemon-like host) before the log refuses it as not a regular file."""
    import pty

    from sandbox.audit import AuditLog
    from sandbox.errors import AuditError

    master, slave = pty.openpty()
    tty = os.ttyname(slave)
    os.close(slave)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                os.setsid()  # no controlling terminal
                try:
                    AuditLog(tty)
                    code = 2
                except AuditError:
                    try:
                        os.close(os.open("/dev/tty", os.O_RDWR))
                        code = 3  # the tty became ours
                    except OSError:
                        code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(master)
