"""``print`` under the ``strict`` policy (RestrictedPython): every position works, nothing leaks to stderr."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbox import Sandbox
from tests.conftest import policy_with


@pytest.fixture(scope="module")
def strict() -> Iterator[Sandbox]:
    with Sandbox(policy_with({"audit.enabled": False}, base="strict")) as box:
        yield box


@pytest.mark.parametrize(
    ("code", "stdout"),
    [
        ("x = 5; print(x)", "5\n"),  # last statement: compiled on its own as the cell's value
        ("print('only')", "only\n"),
        ("print('first')\ny = 2", "first\n"),
        ("a = 1\nprint('middle', a)\nb = 2", "middle 1\n"),
        ("print('a')\nprint('b', end='')\nprint('c', sep='-')\nprint(1, 2, sep='-')", "a\nbc\n1-2\n"),
        ("def f():\n    print('in f')\n    return 3\nf()", "in f\n3\n"),
        ("def g():\n    print('in g')\ng()", "in g\n"),
        ("h = lambda: print('in lambda')\nh()", "in lambda\n"),
        ("(lambda: print('lambda as the value'))()", "lambda as the value\n"),
        ("class C:\n    print('class body')", "class body\n"),
        ("[print(i) for i in range(3)]", "0\n1\n2\n[None, None, None]\n"),
        ("print('x', file=None)", "x\n"),
        ("print('one')\n40 + 2", "one\n42\n"),
        ("for i in range(2):\n    print(i)\nprint('end')", "0\n1\nend\n"),
    ],
)
def test_print_in_every_position(strict, code, stdout):
    r = strict.execute(code)
    assert r.ok, (r.error_type, r.error_message)
    assert r.stdout == stdout
    assert r.stderr == ""  # no RestrictedPython SyntaxWarning, no install path


def test_print_keeps_order_across_functions_and_the_trailing_expression(strict):
    r = strict.execute(
        "def show(n):\n    print('f', n)\n"
        "print('start')\nshow(1)\nfor i in range(2):\n    show(i + 2)\nprint('end')"
    )
    assert r.ok and r.stdout == "start\nf 1\nf 2\nf 3\nend\n"
    # a function defined in an earlier cell prints from a later one, as the last statement
    r = strict.execute("show(9)")
    assert r.ok and r.stdout == "f 9\n" and r.stderr == ""


def test_print_to_a_file_is_refused_readably(strict):
    r = strict.execute("f = open('out.txt', 'w')\nprint('x', file=f)")
    assert not r.ok and r.error_type == "PermissionError" and "print(file=...)" in r.error_message
    assert r.stderr == ""


def test_printing_nothing_warns_nothing(strict):
    r = strict.execute("def quiet():\n    print('never called')\nx = 1")
    assert r.ok and r.stdout == "" and r.stderr == ""
