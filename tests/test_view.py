"""`rlm view` without a browser: what goes into the page, and what cannot get out of it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

from rlm import run
from rlm.backend import ScriptedBackend
from rlm.view import build_page, default_output
from tests.conftest import run_cli

ESCAPE = "</script><script>alert(1)</script><!-- & \u2028 \ud800"


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"


def _data(page: str) -> dict:
    blob = re.search(r'<script type="application/json" id="rlm-data">(.*?)</script>', page, re.S)
    assert blob is not None
    return json.loads(blob.group(1))


def _hostile_run(tmp_path: Path):
    backend = ScriptedBackend(
        {
            "root": [repl(f"print({ESCAPE!r})\nx = llm_query('hi')"), "FINAL(" + ESCAPE[:9] + ")"],
            "sub": [ESCAPE],
        }
    )
    return run(ESCAPE, "ctx", model="root", sub_model="sub", backend=backend, log_dir=tmp_path)


def test_logged_text_cannot_close_the_data_block_and_only_our_script_may_run(tmp_path: Path):
    r = _hostile_run(tmp_path)
    page = build_page(r.log_path)
    # exactly two script elements: the JSON data and our own code
    assert page.count("<script") == 2 and page.count("</script>") == 2
    data = _data(page)
    it = data["runs"][0]["iterations"][0]
    assert ESCAPE[:40] in it["code_blocks"][0]["result"]["stdout"]
    # A lone surrogate survives too: the question's. (A model's answer has its own written as a
    # backslash escape when it arrives: as it is, it could cross into the sandbox no more than back
    # to the model.)
    assert data["runs"][0]["metadata"]["query"] == ESCAPE
    assert it["code_blocks"][0]["result"]["rlm_calls"][0]["response"] == ESCAPE.replace("\ud800", "\\ud800")
    # the CSP allows our script by hash and nothing else: no network, no other script
    script = re.findall(r"<script>(.*?)</script>", page, re.S)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = re.search(r'Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # nothing loaded from anywhere
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script)


def test_run_totals_children_audit_and_unfinished_runs(tmp_path: Path):
    def respond(model: str, messages: list[dict]) -> str:
        first = messages[1]["content"] if len(messages) > 1 else messages[0]["content"]
        if model == "sub":
            return "sub"
        if "Question: outer" in first:
            return repl("a = rlm_query('inner', context='abc')\nb = llm_query_batched(['x', 'y'])\nFINAL(a)")
        return repl("FINAL(llm_query('leaf'))")

    r = run("outer", "ctx", model="root", sub_model="sub", max_depth=2, log_dir=tmp_path,
            backend=ScriptedBackend(respond, price_per_token=0.001))  # fmt: skip
    data = _data(build_page(r.log_path))
    root = data["runs"][0]
    assert data["kind"] == "run" and len(root["children"]) == 1
    child = next(iter(root["children"].values()))
    assert child["metadata"]["parent_run_id"] == r.run_id and child["summary"]["sub_calls"] == 1
    # totals per model: the root's come from its result (whole tree); they match the RLMResult
    assert {m: u["input_tokens"] for m, u in root["totals"].items()} == {
        m: u.input_tokens for m, u in r.usage.items()
    }
    assert root["summary"]["cost_usd"] == r.cost_usd and root["summary"]["sub_calls"] == 3
    # the child's totals are computed from its own lines: its root turn and its one sub-call
    assert child["totals"]["sub"]["calls"] == 1 and child["totals"]["root"]["calls"] == 1
    # each executed block is matched with its audit record, whose chain is verified
    assert root["audit"]["verify"]["ok"] and root["iterations"][0]["code_blocks"][0]["audit"] >= 0
    record = root["audit"]["records"][root["iterations"][0]["code_blocks"][0]["audit"]]
    assert record["outcome"] == "ok" and record["cpu_s"] >= 0 and record["max_rss_bytes"] > 0
    assert any(rec["internal"] for rec in root["audit"]["records"])  # the prelude
    # start times for the timeline
    assert all(isinstance(it["_t"], float) for it in root["iterations"])
    # a directory: one root run (its child nested); a run without its .result.json is "unfinished"
    Path(r.log_path).with_name(f"{r.run_id}.result.json").unlink()
    data = _data(build_page(tmp_path))
    assert data["kind"] == "dir" and len(data["runs"]) == 1 and data["runs"][0]["result"] is None


def test_cli_view_paths_and_errors(tmp_path: Path):
    r = _hostile_run(tmp_path / "logs")
    out = run_cli("view", r.log_path)
    assert out.returncode == 0 and out.stdout.strip() == str(default_output(r.log_path))
    assert Path(out.stdout.strip()).name == f"{r.run_id}.html"
    out = run_cli("view", str(tmp_path / "logs"), "-o", str(tmp_path / "all.html"))
    assert out.returncode == 0 and (tmp_path / "all.html").read_text().startswith("<!DOCTYPE html>")
    # an audit log on its own
    out = run_cli("view", r.audit_log_path, "-o", str(tmp_path / "a.html"))
    assert out.returncode == 0 and _data((tmp_path / "a.html").read_text())["kind"] == "audit"
    missing = run_cli("view", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    # a trajectory cut off mid-line still renders, the broken line counted
    cut = tmp_path / "logs" / "cut-off.jsonl"  # not rlm_*: the session check would flag it
    text = Path(r.log_path).read_text()
    cut.write_text(text[: len(text) - 40])
    data = _data(build_page(cut))
    assert data["runs"][0]["skipped_lines"] == 1 and data["runs"][0]["iterations"]


def test_logs_written_before_the_result_file_still_render(tmp_path: Path):
    """Older logs: a closing "result" line in the trajectory and the audit log as .audit.jsonl."""
    r = run("q", "c", model="root", backend=ScriptedBackend([repl("FINAL(7)")]), log_dir=tmp_path)
    old = tmp_path / "old" / "old-run.jsonl"
    old.parent.mkdir()
    outcome = json.loads(Path(r.log_path).with_name(f"{r.run_id}.result.json").read_text())
    old.write_text(Path(r.log_path).read_text() + json.dumps({"type": "result", **outcome}) + "\n")
    Path(r.audit_log_path).rename(old.with_name("old-run.audit.jsonl"))
    run_data = _data(build_page(old))["runs"][0]
    assert [it["type"] for it in run_data["iterations"]] == ["iteration"]
    assert run_data["result"]["answer"] == "7" and run_data["audit"]["verify"]["ok"]


def test_a_path_with_nothing_to_show_is_an_error_and_writes_no_page(tmp_path: Path):
    """A file that is neither a trajectory nor an audit log, and a directory with neither, exit 2
    naming the path; a damaged audit log and an empty trajectory (a run just started) still render."""
    notes, other, empty_dir = tmp_path / "notes.txt", tmp_path / "other.jsonl", tmp_path / "empty"
    notes.write_text("hello\n")
    other.write_text('{"a": 1}\n[2]\n')
    empty_dir.mkdir()
    (empty_dir / "readme.txt").write_text("not a log")
    neither = "neither a trajectory nor an audit log (no line is a JSON object with a hash)"
    for path, why in ((notes, neither), (other, neither),
                      (empty_dir, "no trajectory (*.jsonl) and no audit log (*.audit.log) in it")):  # fmt: skip
        out = run_cli("view", str(path))
        assert out.returncode == 2 and out.stderr == f"rlm: {path}: {why}\n", out.stderr
        assert out.stdout == "" and not default_output(path).exists()
    r = run("q", "c", model="root", backend=ScriptedBackend([repl("FINAL(7)")]), log_dir=tmp_path / "logs")
    damaged = tmp_path / "damaged.audit.log"
    lines = Path(r.audit_log_path).read_text().splitlines(keepends=True)
    damaged.write_text("garbage\n" + "".join(lines[1:]))
    out = run_cli("view", str(damaged))
    assert out.returncode == 0, out.stderr
    audit = _data(default_output(damaged).read_text())["audits"][0]
    assert audit["verify"]["ok"] is False and audit["verify"]["bad_line"] == 1
    started = tmp_path / "started.jsonl"
    started.write_text("")
    assert run_cli("view", str(started)).returncode == 0


def test_fifos_are_left_out_not_read_forever(tmp_path: Path):
    """``rlm view`` opened every trajectory, ``.result.json`` and audit log by name: a FIFO
    among them waited for a writer, forever. A FIFO where a trajectory or a result would be is
    left out as if it were not there, an audit log that is one is shown as unreadable, and a
    FIFO named on the command line is an error (exit 2)."""
    import os

    logs = tmp_path / "viewdir"
    r = run("q", "c", model="root", backend=ScriptedBackend([repl("FINAL(7)")]), log_dir=logs)
    stray = logs / "rlm_x.jsonl"  # rlm_*: removed below, or the session's check would read it
    os.mkfifo(stray)
    os.mkfifo(logs / "lone.audit.log")
    try:
        out = run_cli("view", str(logs), "-o", str(tmp_path / "all.html"), timeout=60)
        assert out.returncode == 0, out.stderr
        data = _data((tmp_path / "all.html").read_text(encoding="utf-8"))
        assert [run_["run_id"] for run_ in data["runs"]] == [r.run_id]
        (audit,) = data["audits"]
        assert audit["name"] == "lone.audit.log" and "not a regular file" in audit["verify"]["reason"]

        out = run_cli("view", str(stray), timeout=60)
        assert out.returncode == 2 and out.stderr == f"rlm: {stray}: not a regular file (nor a directory)\n"
    finally:
        stray.unlink()

    # a run whose result file and audit log are FIFOs: shown unfinished, its audit unreadable
    one = tmp_path / "viewdir3"
    one.mkdir()
    trajectory = one / "r.jsonl"
    trajectory.write_bytes(Path(r.log_path).read_bytes())
    os.mkfifo(one / "r.result.json")
    os.mkfifo(one / "r.audit.log")
    out = run_cli("view", str(trajectory), "-o", str(tmp_path / "r.html"), timeout=60)
    assert out.returncode == 0, out.stderr
    (shown,) = _data((tmp_path / "r.html").read_text(encoding="utf-8"))["runs"]
    assert shown["result"] is None and shown["iterations"]
    assert "not a regular file" in shown["audit"]["verify"]["reason"]


def test_a_fifo_where_the_page_goes_is_a_clear_error_not_a_hang(tmp_path: Path):
    """The page was written by name (``Path.write_text``): a FIFO at ``<run id>.html``, where
    ``rlm view`` writes without ``-o``, or named by ``-o``, waited for a reader, forever. It is
    refused (exit 2, one line naming it, no traceback), and a directory there is refused alike."""
    import os
    import stat

    r = run("q", "c", model="root", backend=ScriptedBackend([repl("FINAL(7)")]), log_dir=tmp_path / "logs")
    page = default_output(r.log_path)
    os.mkfifo(page)
    (tmp_path / "dir.html").mkdir()
    for args, named in (
        ((), page),
        (("-o", str(page)), page),
        (("-o", str(tmp_path / "dir.html")), tmp_path / "dir.html"),
    ):
        out = run_cli("view", r.log_path, *args, timeout=60)
        assert out.returncode == 2 and out.stderr == f"rlm: {named}: not a regular file\n", out
        assert out.stdout == ""
    assert stat.S_ISFIFO(page.lstat().st_mode)
    page.unlink()
    page.write_text("STALE PAGE " * 100_000)  # a regular file is rewritten whole, nothing of it left
    out = run_cli("view", r.log_path, timeout=60)
    text = page.read_text()
    assert out.returncode == 0 and text.startswith("<!DOCTYPE html>") and "STALE" not in text


def test_a_page_that_cannot_be_written_is_an_error_naming_the_page(tmp_path: Path):
    """A write of the page that fails (a full disk; here a file-size rlimit under the page's size)
    raised an OSError that names no file, and ``rlm view`` named its *input* instead ("rlm:
    logs/<run id>.jsonl: File too large"), sending the user to the wrong file."""
    import resource
    import subprocess
    import sys

    r = run("q", "c", model="root", backend=ScriptedBackend([repl("FINAL(7)")]), log_dir=tmp_path / "logs")
    page = tmp_path / "page.html"

    def small_files() -> None:  # (Python ignores SIGXFSZ: the write fails with EFBIG instead)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = subprocess.run(
        [sys.executable, "-m", "rlm", "view", str(r.log_path), "-o", str(page)],
        capture_output=True, text=True, preexec_fn=small_files, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr == f"rlm: {page}: File too large\n", out
    assert out.stdout == ""


def test_cli_view_open_without_a_browser_says_so(tmp_path: Path):
    """``--open`` where no browser can be started (a server; here ``$BROWSER`` names none) wrote
    the page and said nothing, as if it had opened it."""
    r = _hostile_run(tmp_path / "logs")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}  # no GUI browser
    env["BROWSER"] = str(tmp_path / "no-such-browser")
    out = run_cli("view", r.log_path, "-o", str(tmp_path / "p.html"), "--open", env=env)
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "p.html")  # the page is written
    assert (
        out.stderr == f"rlm: --open: no browser could be started here; open {tmp_path / 'p.html'} yourself\n"
    )


def test_a_large_audit_log_gives_a_bounded_page_that_says_what_it_left_out(tmp_path: Path, monkeypatch):
    """The page held every record of an audit log with all its code (a 50 MB log made a 46 MB
    page, and 252 MB of RSS to build it; a service's log of gigabytes, no page at all). It
    holds the last MAX_AUDIT_RECORDS records, each's code cut at MAX_AUDIT_CODE characters,
    and says how many there are; the hash chain is still verified over every line."""
    from rlm.view import load
    from sandbox.audit import AuditLog

    monkeypatch.setattr(load, "MAX_AUDIT_RECORDS", 50, raising=False)  # (raising: the old page had no limit)
    monkeypatch.setattr(load, "MAX_AUDIT_CODE", 1000, raising=False)
    path = tmp_path / "service.audit.log"
    log = AuditLog(path)
    for i in range(3000):
        code = f"x = {i}\n" + "y = 'filler'\n" * 150
        log.append({"seq": i, "code": code, "code_sha256": hashlib.sha256(code.encode()).hexdigest()})
    log.close()
    size = path.stat().st_size
    page = build_page(path)
    assert len(page) < size / 10, (len(page), size)
    (audit,) = _data(page)["audits"]
    assert audit["verify"] == {"ok": True, "lines": 3000, "bad_line": None, "reason": None}
    assert audit["total"] == 3000 and audit["first"] == 2951
    records = audit["records"]
    assert [r["seq"] for r in records] == list(range(2950, 3000))
    full = f"x = {2999}\n" + "y = 'filler'\n" * 150
    assert records[-1]["code"] == full[:1000] and records[-1]["code_cut"] == len(full) - 1000
    assert records[-1]["code_sha256"] == hashlib.sha256(full.encode()).hexdigest()  # of the whole code


def test_a_run_whose_audit_records_were_cut_is_matched_from_the_end():
    """With only the last records on the page, a run's blocks are matched to them from its last
    block back: matched from the first, the first blocks took the records of the last ones."""
    from rlm.view.load import _link_audit, _sha

    code = "x += 1"
    record = {"code_sha256": _sha(code), "internal": False}
    run_data = {
        "audit": {"records": [dict(record, seq=4), dict(record, seq=5)], "first": 4, "total": 5},
        "iterations": [{"code_blocks": [{"code": code, "n": n}]} for n in range(1, 6)],
    }
    _link_audit(run_data)
    linked = {it["code_blocks"][0]["n"]: it["code_blocks"][0].get("audit") for it in run_data["iterations"]}
    assert linked == {1: None, 2: None, 3: None, 4: 0, 5: 1}


def _depth(value: object) -> int:
    """How many levels of lists and objects *value* nests (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


DEEP_VARS = "def rlm_describe_vars():\n    print('{\"x\": ' + '[' * 97 + ']' * 97 + '}')\n"


def test_a_step_nested_too_deeply_is_shown_cut_not_dropped(tmp_path: Path):
    """A block that redefines ``rlm_describe_vars()`` to print JSON 98 levels deep (which the loop
    accepts) puts its step's line past MAX_JSON_DEPTH: the loader dropped the whole line, and
    with it the step's code and its sub-call (the one that sent the context out), under "a run
    cut off mid-write?". The too-deep part is cut, the rest of the step kept."""
    from rlm.trajectory import MAX_JSON_DEPTH
    from rlm.view.load import TOO_DEEP

    evil = "leaked = llm_query('EXFILTRATE: ' + context)\n" + DEEP_VARS + "answer = 'all fine'"
    backend = ScriptedBackend({"root": [repl("print(len(context))"), repl(evil) + "\nFINAL_VAR(answer)"],
                               "sub": ["ok"]})  # fmt: skip
    r = run("q", "SECRET", model="root", sub_model="sub", backend=backend, log_dir=tmp_path, max_iterations=4)
    assert r.answer == "all fine" and r.sub_calls == 1
    assert _depth(json.loads(Path(r.log_path).read_text().splitlines()[-1])) > MAX_JSON_DEPTH
    root = _data(build_page(r.log_path))["runs"][0]
    assert len(root["iterations"]) == 2 and root["skipped_lines"] == 0 and root["too_deep_lines"] == 0
    assert root["pruned_values"] == 1 and root["summary"]["sub_calls"] == 1
    step = root["iterations"][1]
    block = step["code_blocks"][0]
    assert block["code"] == evil and block["result"]["rlm_calls"][0]["prompt"] == "EXFILTRATE: SECRET"
    # cut at MAX_JSON_DEPTH levels of the line: the placeholder stands where the rest was
    assert _depth(step) == MAX_JSON_DEPTH and TOO_DEEP in json.dumps(block["result"]["locals"]["x"])


def test_lines_too_deep_for_the_page_or_the_parser_are_not_blamed_on_a_cut_off_write(tmp_path: Path):
    """A tool's argument 95 levels deep sits past MAX_JSON_DEPTH in its step's line: the step
    is kept, the argument cut. A line the JSON parser cannot read for its depth is skipped and
    said to be too deep; only a line that is not JSON is counted as a cut-off write."""
    from rlm.view.load import TOO_DEEP

    deep_args = [json.loads("[" * 95 + "]" * 95)]
    call = {"type": "tool", "name": "lookup", "args": deep_args, "kwargs": {}, "root_model": "tool:lookup",
            "prompt": "lookup([[...]])", "response": "found"}  # fmt: skip
    lines = [
        json.dumps({"type": "metadata", "run_id": "r"}),
        json.dumps(
            {"type": "iteration", "code_blocks": [{"code": "lookup(d)", "result": {"rlm_calls": [call]}}]}
        ),
        '{"type": "iteration", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",  # past the parser's depth
        '{"type": "iteration", "response": "cut o',  # a write cut off
        "null",  # JSON, but no object: skipped as one too (it was lost between "not JSON" and "null")
        "[1]",
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    root = _data(build_page(path))["runs"][0]
    assert (root["skipped_lines"], root["too_deep_lines"], root["pruned_values"]) == (3, 1, 1)
    (step,) = root["iterations"]
    (kept,) = step["code_blocks"][0]["result"]["rlm_calls"]
    assert kept["prompt"] == "lookup([[...]])" and TOO_DEEP in json.dumps(kept["args"])
    assert (root["summary"]["sub_calls"], root["summary"]["tool_calls"]) == (0, 1)  # a tool's call


def test_a_finished_run_whose_parsed_answer_nests_too_deeply_is_finished(tmp_path: Path):
    """An ``output_type=list`` answer 100 levels deep is written into ``.result.json`` as
    ``parsed``: the loader dropped the file, and the page said the run did not finish."""
    from rlm.trajectory import MAX_JSON_DEPTH
    from rlm.view.load import TOO_DEEP

    code = "x = []\nfor _ in range(99):\n    x = [x]\nanswer = x"
    backend = ScriptedBackend({"root": [repl(code) + "\nFINAL_VAR(answer)"]})
    r = run("q", "c", model="root", backend=backend, log_dir=tmp_path, max_iterations=3, output_type=list)
    assert r.stop_reason == "final"
    outcome = json.loads(Path(r.log_path).with_name(f"{r.run_id}.result.json").read_text())
    assert _depth(outcome) > MAX_JSON_DEPTH
    root = _data(build_page(r.log_path))["runs"][0]
    assert root["result"] is not None and root["result"]["stop_reason"] == "final"
    assert root["result"]["answer"] == r.answer and root["pruned_values"] == 1
    assert _depth(root["result"]) == MAX_JSON_DEPTH and TOO_DEEP in json.dumps(root["result"]["parsed"])


def test_sub_calls_past_a_blocks_cap_are_counted_on_the_page(tmp_path: Path, monkeypatch):
    """A block keeps BLOCK_CALL_ENTRIES call entries and counts the rest (``rlm_calls_omitted``):
    the page never read that count, so the calls past the cap (the one that sent the context
    out, say) were nowhere on it, and the run's totals left them out."""
    import rlm.core

    monkeypatch.setattr(rlm.core, "BLOCK_CALL_ENTRIES", 3)

    def lookup(query: str) -> str:
        """Look something up."""
        return "found"

    code = (
        "r = llm_query_batched(['x'] * 4)\nleak = llm_query('EXFIL ' + context)\nlookup('a')\nprint(len(r))"
    )

    def reply(model: str, messages: list[dict]) -> str:
        turn = sum(1 for m in messages if m.get("role") == "assistant")
        return "ok" if model == "sub" else [repl(code), "FINAL(done)"][min(turn, 1)]

    r = run("q", "SECRET", model="root", sub_model="sub", backend=ScriptedBackend(reply), log_dir=tmp_path,
            tools=[lookup])  # fmt: skip
    assert r.sub_calls == 5 and r.tool_calls == 1
    root = _data(build_page(r.log_path))["runs"][0]
    block = root["iterations"][0]["code_blocks"][0]
    assert len(block["result"]["rlm_calls"]) == 3
    assert block["result"]["rlm_calls_omitted"] == {"sub_calls": 2, "tool_calls": 1}
    summary = root["summary"]  # the run's own counts: tool calls apart, as RLMResult has them
    assert (summary["sub_calls"], summary["sub_calls_not_listed"]) == (r.sub_calls, 2)
    assert (summary["tool_calls"], summary["tool_calls_not_listed"]) == (r.tool_calls, 1)
    # a damaged count is no count
    lines = [{"type": "metadata", "run_id": "d"}] + [
        {"type": "iteration", "code_blocks": [{"result": {"rlm_calls_omitted": omitted}}]}
        for omitted in ({"sub_calls": "7", "tool_calls": -1}, [3], {"sub_calls": True, "tool_calls": 2})
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    damaged = _data(build_page(path))["runs"][0]
    results = [it["code_blocks"][0]["result"] for it in damaged["iterations"]]
    assert [res.get("rlm_calls_omitted") for res in results] == [
        None,
        None,
        {"sub_calls": 0, "tool_calls": 2},
    ]
    assert (damaged["summary"]["sub_calls"], damaged["summary"]["tool_calls"]) == (0, 2)


def test_the_page_escapes_the_characters_the_terminal_and_the_audit_log_escape():
    """The page draws control, separator and bidirectional characters as escapes (page.js
    ``UNSAFE``): the same set as the terminal's ``visible`` and a superset of the audit log's."""
    import rlm.view
    from rlm.display import _ESCAPES, visible
    from sandbox.audit import _UNSAFE

    script = (Path(rlm.view.__file__).parent / "page.js").read_text()
    found = re.search(r"const UNSAFE = /\[(.*?)\]\+/gu;", script)
    assert found is not None
    js_class = re.sub(r"\\u\{([0-9a-f]+)\}", lambda m: f"\\U{int(m.group(1), 16):08x}", found.group(1))
    in_class = re.compile(f"[{js_class}]")
    page = {c for c in range(0x110000) if in_class.fullmatch(chr(c))}
    assert page == set(_ESCAPES)
    assert {c for c in range(0x10000) if _UNSAFE.fullmatch(chr(c))} <= page
    assert {0x061C, 0x200E, 0x200F, 0x2028, 0x2029, 0x202E, 0x2067} <= page
    # and what draws as nothing: zero-width joiner, word joiner, BOM, soft hyphen, tag characters
    assert {0x200D, 0x2060, 0xFEFF, 0x00AD, 0xFE0F, 0xE0041} <= page
    assert visible("a\u200fb\u2028c\u061c") == "a\\u200fb\\u2028c\\u061c"
    assert visible("admin\u200d \U000e0041") == "admin\\u200d \\U000e0041"


def test_run_ids_that_are_not_text_are_replaced_by_the_file_name(tmp_path: Path):
    """A hostile log's ``run_id`` or ``parent_run_id`` that is an object (``{"toString": 1}``)
    reached the page as a key and stopped its script (no run drawn at all)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "good.jsonl").write_text(json.dumps({"type": "metadata", "run_id": "good"}) + "\n")
    bad = {"type": "metadata", "run_id": {"toString": 1}, "parent_run_id": {"x": 1}}
    step = {
        "type": "iteration",
        "code_blocks": [{"code": "x", "result": {"rlm_calls": [{"type": "rlm", "run_id": [1]}]}}],
    }
    (logs / "bad.jsonl").write_text(json.dumps(bad) + "\n" + json.dumps(step) + "\n")
    runs = _data(build_page(logs))["runs"]
    assert sorted(r["run_id"] for r in runs) == ["bad", "good"]
    assert all(not r["children"] for r in runs)
