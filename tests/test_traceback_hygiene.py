"""What the model sees of an error: its own frames only, no sandbox frame, no host path."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandbox
from sandbox import ExecResult, Sandbox
from tests.conftest import policy_with

PACKAGE_PARENT = str(Path(sandbox.__file__).resolve().parent.parent)
HOST_MARKERS = {
    PACKAGE_PARENT,
    sys.prefix,
    sys.base_prefix,
    str(Path(sys.base_prefix).resolve()),
    "site-packages",
    "sandbox/",
    "sandbox.child",
    "sandbox.guard",
    "RestrictedPython",
    'File "/',
    "/tmp/sandbox-",
}


def _shown(r: ExecResult) -> str:
    return f"{r.error_message}\n{r.traceback}"


def assert_clean(r: ExecResult) -> None:
    assert not r.ok and r.traceback and r.error_message is not None
    text = _shown(r)
    leaked = sorted(m for m in HOST_MARKERS if m in text)
    assert not leaked, f"{leaked} in:\n{text}"


def boom(n: int = 0) -> int:
    raise ValueError(f"bad input {n}")


@pytest.fixture(scope="module", params=["default", "strict"])
def box(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    policy = policy_with({"audit.enabled": False, "limits.max_output_bytes": 4000}, base=request.param)
    with Sandbox(policy, host_functions={"boom": boom}) as b:
        yield b


def test_output_limit_traceback_shows_the_print_only(box):
    r = box.execute("for i in range(1000):\n    print('x' * 50)")
    assert r.error_type == "OutputLimitExceeded" and r.limit == "output"
    assert_clean(r)
    assert r.traceback.splitlines()[-1].startswith("OutputLimitExceeded: ")
    assert '  File "<cell-' in r.traceback and "print('x' * 50)" in r.traceback
    frames = [x for x in r.traceback.splitlines() if x.lstrip().startswith("File ")]
    assert len(frames) == 1 and re.fullmatch(r'  File "<cell-[0-9]+>", line 2, in <module>', frames[0])


def test_host_function_error_shows_the_call_only(box):
    r = box.execute("def go():\n    return boom(3)\ngo()")
    assert r.error_type == "HostFunctionError" and "bad input 3" in r.error_message
    assert_clean(r)
    assert r.traceback.splitlines()[-1].startswith("HostFunctionError: ValueError: bad input 3")
    assert "in go" in r.traceback and "return boom(3)" in r.traceback


def test_host_function_stub_refusing_arguments_shows_the_call_only(box):
    r = box.execute("boom(object())")
    assert r.error_type == "TypeError" and "plain data" in r.error_message
    assert_clean(r)
    assert "host_function" not in r.traceback and "boom(object())" in r.traceback


def test_refused_import_shows_the_import_line_only(box):
    r = box.execute("x = 1\nimport os")
    assert r.error_type == "ImportError" and "not allowed by policy" in r.error_message
    assert_clean(r)
    assert "guarded_import" not in r.traceback and "import os" in r.traceback


def test_chained_exceptions_are_cleaned_too(box):
    r = box.execute(
        "try:\n    import subprocess\nexcept ImportError as e:\n    raise RuntimeError('no') from e"
    )
    assert r.error_type == "RuntimeError"
    assert_clean(r)
    assert "direct cause" in r.traceback and "not allowed by policy" in r.traceback


def test_library_frames_and_paths_are_dropped(box):
    r = box.execute("import json\njson.loads('{')")
    assert r.error_type == "JSONDecodeError"
    assert_clean(r)
    r = box.execute("from json import no_such_name")
    assert r.error_type == "ImportError" and "no_such_name" in r.error_message
    assert_clean(r)


def test_scratch_paths_become_relative(box):
    r = box.execute("open('missing.txt')")
    assert r.error_type == "FileNotFoundError"
    assert_clean(r)
    assert "'missing.txt'" in r.error_message


def test_guard_refusals_are_one_readable_line(box):
    r = box.execute("y = x.__class__")
    assert r.error_type == "GuardError"
    assert_clean(r)
    assert r.traceback.startswith("GuardError: ") and "__class__" in r.traceback
    assert not r.error_message.startswith("(")  # not the repr of RestrictedPython's tuple


def test_guard_refusals_at_run_time(box):
    if box.policy.python.guard == "restricted":  # RestrictedPython's safer_getattr, in its own module
        r = box.execute("'{}'.format(1)")
        assert "format" in r.error_message
    else:  # the allowlist guard's getattr, in sandbox/guard.py
        r = box.execute("getattr(1, '__class__')")
        assert r.error_type == "AttributeError" and "__class__" in r.error_message
    assert_clean(r)


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x85"])
def test_a_traceback_quotes_the_line_that_raised_whatever_the_code_holds_between_lines(box, sep):
    # str.splitlines() ends a line at these, the compiler does not: the cell's source split so
    # quoted a decoy ("nothing to see here") for the line that raised.
    code = f'note = "build ok"  # see docs{sep}print("nothing to see here")\nraise KeyError("the real line")\n'
    r = box.execute(code)
    assert r.error_type == "KeyError", r
    assert 'raise KeyError("the real line")' in r.traceback, r.traceback
    assert "nothing to see here" not in r.traceback, r.traceback


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
def test_a_traceback_quotes_the_line_that_raised_with_any_line_end(box, end):
    r = box.execute(end.join(["a = 1", "b = 2", "raise KeyError('third')", "c = 3"]))
    assert "line 3" in r.traceback and "raise KeyError('third')" in r.traceback, r.traceback
