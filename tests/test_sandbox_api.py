"""The public Sandbox API on real child processes: state, variables, host functions, guards."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from sandbox import AsyncSandbox, ExecResult, Sandbox, load_policy
from sandbox.audit import verify
from sandbox.errors import AuditError, PolicyError, SandboxClosedError, VariableError
from sandbox.pool import SandboxPool
from tests.conftest import policy_with


def test_state_persists_between_executes(sb):
    assert sb.execute("x = 40").ok
    assert sb.execute("def inc(v):\n    return v + 1").ok
    r = sb.execute("print(inc(x) + 1)")
    assert r.ok and r.stdout == "42\n"
    assert sb.get_variable("x") == 40


def test_quick_start_shape(audit_path):
    with Sandbox(
        load_policy("default"), host_functions={"double": lambda x: 2 * x}, audit_log=audit_path
    ) as box:
        box.set_variable("context", "a" * 1000)
        r = box.execute("print(len(context)); y = double(21)")
        assert isinstance(r, ExecResult)
        assert r.ok and r.stdout == "1000\n"
        assert box.get_variable("y") == 42
        assert r.policy_name == "default" and len(r.policy_sha256) == 64
        assert r.layers["no_new_privs"] == "active"
        assert r.duration_s > 0 and r.max_rss_bytes > 1_000_000


def test_a_trailing_expression_is_displayed(sb):
    assert sb.execute("x = [1, 2]\nx").stdout == "[1, 2]\n"
    assert sb.execute("print('p')").stdout == "p\n"  # print returns None: nothing more shown
    assert sb.execute("None").stdout == ""


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        7,
        -(2**63),
        2**64 - 1,
        1.5,
        "text",
        "ünïcødé ✓",
        b"\x00\xff",
        [1, [2, "x"]],
        {"a": {"b": [None]}},
        {1: "int keys"},
        "",
    ],
)
def test_plain_values_cross_both_ways(sb, value):
    sb.set_variable("v", value)
    assert sb.get_variable("v") == value
    r = sb.execute("t = type(v).__name__")
    assert r.ok


def test_large_values_cross_out_of_band(sb):
    big = "word " * 700_000  # 3.5 MB: above the inline limit
    sb.set_variable("context", big)
    assert sb.execute("n = len(context)").ok
    assert sb.get_variable("n") == len(big)
    sb.execute("back = context[::-1]")
    assert sb.get_variable("back") == big[::-1]
    blob = bytes(range(256)) * 20_000
    sb.set_variable("blob", blob)
    assert sb.get_variable("blob") == blob


def test_values_over_max_file_mb_cross_both_ways(audit_path):
    """Large values travel through a pipe, which RLIMIT_FSIZE does not cap (a child's
    memfd holds at most max_file_mb: a get_variable of a 3 MB str killed the child)."""
    policy = policy_with({"limits.max_file_mb": 1})
    text, blob = "0123456789" * 300_000, bytes(range(256)) * 12_000
    with Sandbox(policy, audit_log=audit_path) as box:
        box.set_variable("text", text)
        box.set_variable("blob", blob)
        r = box.execute("made = text[::-1] + 'é' * 3\nascii = text.upper()\nok = type(blob) is bytes")
        assert r.ok, r
        assert box.get_variable("ascii") == text.upper()
        assert box.get_variable("made") == text[::-1] + "é" * 3  # not ASCII: streamed packed
        assert box.execute("listed = [text] * 3").ok
        assert box.get_variable("listed") == [text] * 3
        assert box.get_variable("blob") == blob and box.get_variable("ok") is True


def test_a_value_the_child_has_no_room_for_is_refused_and_the_child_lives_on(audit_path):
    policy = policy_with({"limits.memory_mb": 200, "limits.max_message_mb": 256})
    with Sandbox(policy, audit_log=audit_path) as box:
        box.set_variable("small", "kept")
        for value in (b"x" * 230_000_000, "y" * 230_000_000):
            with pytest.raises(VariableError, match="MemoryError|Cannot allocate memory"):
                box.set_variable("big", value)
            del value
        r = box.execute("print(small, 'big' in dir())")
        assert r.ok and r.stdout == "kept False\n" and not r.state_lost, r


@pytest.mark.parametrize("value", [{1, 2}, object(), lambda: 1, {"k": (x for x in [])}])
def test_non_plain_values_are_refused_with_a_clear_error(sb, value):
    with pytest.raises(VariableError, match="not plain data|cannot set"):
        sb.set_variable("v", value)


def test_getting_non_plain_or_missing_variables(sb):
    sb.execute("import re\nm = re.compile('x')\ns = {1, 2}")
    with pytest.raises(VariableError, match="'m'.*Pattern"):
        sb.get_variable("m")
    with pytest.raises(VariableError, match="'s'"):
        sb.get_variable("s")
    with pytest.raises(VariableError, match="no variable named 'missing'"):
        sb.get_variable("missing")
    with pytest.raises(VariableError):
        sb.set_variable("not an identifier", 1)
    assert sb.execute("print(1)").ok  # the child is fine after refusals


def test_model_code_exceptions_are_results_not_host_exceptions(sb):
    r = sb.execute("print('before')\ndef f():\n    return {}['k']\nf()")
    assert not r.ok and r.error_type == "KeyError" and r.error_message == "'k'"
    assert r.stdout == "before\n"
    assert r.traceback.startswith("Traceback") and "<cell-" in r.traceback
    assert "sandbox/child.py" not in r.traceback  # trimmed to the model's own code
    r = sb.execute("def broken(:\n  pass")
    assert r.error_type == "SyntaxError" and "broken" in r.traceback
    r = sb.execute("raise SystemExit(3)")
    assert r.error_type == "SystemExit" and not r.crashed
    assert sb.execute("print('still here')").stdout == "still here\n"


def test_host_functions_and_their_errors(audit_path):
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return {"args": list(args), "kwargs": kwargs}

    def boom(x):
        raise ValueError(f"bad input {x}")

    with Sandbox("default", host_functions={"record": record, "boom": boom}, audit_log=audit_path) as box:
        r = box.execute("out = record(1, 'two', [3], key={'k': None})\nprint(out['kwargs'])")
        assert r.ok and r.stdout == "{'key': {'k': None}}\n"
        assert calls == [((1, "two", [3]), {"key": {"k": None}})]
        r = box.execute("try:\n    boom(5)\nexcept HostFunctionError as e:\n    print('caught', e)")
        assert r.ok and r.stdout == "caught ValueError: bad input 5\n"
        r = box.execute("boom(1)")
        assert r.error_type == "HostFunctionError" and "bad input 1" in r.error_message
        r = box.execute("record({1, 2})")
        assert r.error_type == "TypeError" and "plain data" in r.error_message


def test_a_batch_of_1000_is_one_call(audit_path):
    calls = []

    def batch(prompts):
        calls.append(len(prompts))
        return [p.upper() for p in prompts]

    with Sandbox("default", host_functions={"batch": batch}, audit_log=audit_path) as box:
        r = box.execute("res = batch([f'p{i}' for i in range(1000)])\nprint(len(res), res[999])")
        assert r.ok and r.stdout == "1000 P999\n"
    assert calls == [1000]


def test_host_function_time_does_not_count_against_wall_time(audit_path):
    policy = policy_with({"limits.wall_seconds": 1})
    with Sandbox(
        policy, host_functions={"slow": lambda: time.sleep(1.5) or "done"}, audit_log=audit_path
    ) as box:
        r = box.execute("print(slow())")
        assert r.ok and r.stdout == "done\n"


@pytest.mark.parametrize("make", [Sandbox, AsyncSandbox])
def test_invalid_constructor_arguments_are_refused_at_once(make):
    """Before any child starts, in both twins, as ValueError/TypeError that name the problem."""
    for bad in ({"_hidden": print}, {"if": print}, {"a b": print}):
        with pytest.raises(ValueError, match="host function name"):
            make("default", host_functions=bad)
    for kwargs, says in [
        ({"host_functions": {"x": 3}}, "not callable"),
        ({"host_functions": [print]}, "mapping"),
        ({"host_functions": {1: print}}, "names must be str"),
        ({"pool": 5}, "pool must be"),
    ]:
        with pytest.raises(TypeError, match=says):
            make("default", **kwargs)
    for policy in (None, 5):
        with pytest.raises(TypeError, match="a policy is"):
            make(policy)


def test_a_coroutine_host_function_needs_the_async_twin():
    async def fetch():
        return 1

    with pytest.raises(TypeError, match="use AsyncSandbox"):
        Sandbox("default", host_functions={"fetch": fetch})
    AsyncSandbox("default", host_functions={"fetch": fetch})  # awaited by its loop: accepted


def test_a_home_that_cannot_be_expanded_is_our_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot expand"):
        load_policy("~no-such-user-here/p.toml")
    with pytest.raises(AuditError, match="cannot expand"):
        Sandbox("default", audit_log="~no-such-user-here/a.jsonl", pool=None)
    with pytest.raises(AuditError, match="cannot expand"):
        verify("~no-such-user-here/a.jsonl")


def test_async_twin_has_kill_pid_and_audit_path(audit_path):
    async def main():
        async with AsyncSandbox("default", audit_log=audit_path) as box:
            assert box.pid is not None and box.audit_path == audit_path
            await box.execute("x = 1")
            task = asyncio.create_task(box.execute("import time\ntime.sleep(30)"))
            await asyncio.sleep(0.3)
            await box.kill()
            r = await asyncio.wait_for(task, 10)
            assert not r.ok and r.crashed
            assert (await box.execute("print(1)")).state_lost

    asyncio.run(main())


def test_allowlist_guard_gives_readable_errors(sb):
    r = sb.execute("import os")
    assert (
        r.error_type == "ImportError"
        and r.error_message == "import of 'os' is not allowed by policy 'default'"
    )
    r = sb.execute("from urllib import request")
    assert r.error_type == "ImportError"
    assert sb.execute("import json, re, collections, urllib.parse").ok
    r = sb.execute("open('/etc/passwd')")
    assert r.error_type == "PermissionError" and "scratch" in r.error_message
    assert sb.execute("open('notes.txt', 'w').write('hi')\nprint(open('notes.txt').read())").stdout == "hi\n"
    r = sb.execute("().__class__.__bases__[0].__subclasses__()")
    assert r.error_type == "GuardError" and "is not allowed by policy 'default'" in r.error_message
    r = sb.execute("getattr((), '__cl' + 'ass__')")
    assert r.error_type == "AttributeError" and "not allowed" in r.error_message
    r = sb.execute("input()")
    assert r.error_type == "PermissionError" and "input()" in r.error_message


def test_restricted_guard_compiles_with_restrictedpython(audit_path):
    with Sandbox("strict", audit_log=audit_path) as box:
        r = box.execute(
            "total = 0\nfor i in range(5):\n    total += i\nprint(total)\n[x * 2 for x in [1, 2]]"
        )
        assert r.ok, r
        assert r.stdout == "10\n[2, 4]\n"
        assert box.execute("a, b = 1, 2\nd = {'k': [a, b]}\nprint(d['k'][1])").stdout == "2\n"
        r = box.execute("x = ().__class__")
        assert not r.ok and r.error_type == "GuardError"
        r = box.execute("import os")
        assert r.error_type == "ImportError" and "'strict'" in r.error_message
        r = box.execute("'{0.__class__}'.format(1)")
        assert not r.ok


def test_guard_none_is_plain_exec(audit_path):
    with Sandbox(policy_with({"python.guard": "none"}), audit_log=audit_path) as box:
        r = box.execute(
            "import os\nprint(os.getcwd() == os.path.realpath('.'))\nprint(type(().__class__).__name__)"
        )
        assert r.ok and r.stdout == "True\ntype\n"


def test_closed_sandbox_refuses_work(audit_path):
    box = Sandbox("default", audit_log=audit_path)
    box.close()
    box.close()  # idempotent
    with pytest.raises(SandboxClosedError):
        box.execute("1")


def test_async_twin_with_async_host_functions(audit_path):
    async def fetch(x):
        await asyncio.sleep(0.01)
        return x * 3

    async def main():
        async with AsyncSandbox("default", host_functions={"fetch": fetch}, audit_log=audit_path) as box:
            await box.set_variable("n", 5)
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1

            task = asyncio.create_task(ticker())
            r = await box.execute("import time\ntime.sleep(0.2)\nm = fetch(n)")
            task.cancel()
            assert r.ok, r
            assert await box.get_variable("m") == 15
            assert ticks >= 5  # the loop kept running while the child worked
            assert box.layers["rlimits"] == "active"

    asyncio.run(main())


def test_old_cell_sources_are_dropped_so_the_child_does_not_grow(audit_path):
    with Sandbox(policy_with({"python.guard": "none"}), audit_log=audit_path) as box:
        for i in range(250):
            box.execute(f"v{i} = {i}")
        r = box.execute(
            "import linecache\ncells = len([k for k in linecache.cache if k.startswith('<cell-')])"
        )
        assert r.ok
        assert box.get_variable("cells") <= 200
        r = box.execute("def f():\n    return 1 / 0\nf()")
        assert "return 1 / 0" in r.traceback  # recent cells keep their source


def test_alive_sees_a_child_that_exited_between_calls():
    """`alive` turns False once the child is gone for any reason (killed from outside, its fork
    server killed), before a call finds out; `execute` then reports the death."""
    import signal

    from sandbox import forkserver

    with Sandbox("default", pool=None) as sb:
        assert sb.execute("x = 1").ok and sb.alive
        os.kill(sb.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while sb.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not sb.alive
        r = sb.execute("x")
        assert not r.ok and r.crashed and r.error_type == "ChildCrashed"
        assert sb.execute("y = 2").state_lost and sb.alive
        os.kill(forkserver.shared(False).pid, signal.SIGKILL)  # its children die with it
        deadline = time.monotonic() + 10
        while sb.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not sb.alive
        assert sb.execute("1").error_type == "ChildExited"
        assert sb.execute("z = 3").state_lost and sb.alive


def test_alive_holds_for_a_pidfd_numbered_past_1024():
    """A busy host (an MCP server, many sessions) hands out descriptor numbers past 1024, which
    select() cannot take: alive must still say True for a live child."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    pads = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        with Sandbox("default", pool=None) as sb:
            assert sb.execute("x = 1").ok
            assert sb._child is not None and sb._child.pidfd >= 1024
            assert sb.alive
            assert sb.execute("print(x + 1)").stdout == "2\n"
    finally:
        for fd in pads:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_code_too_large_for_one_request_is_refused_before_anything_runs(audit_path):
    """Code over the frame cap (min(max_message_mb, 64 MiB)) made the child read a broken protocol
    and exit: the variables were lost and a line of the whole code audited. It is a ValueError
    now, in both APIs; the child and its variables stay, and nothing is audited."""
    policy = load_policy("default").override({"limits.max_message_mb": 1})
    big = "#" + "é" * 600_000  # 600,001 characters, 1.2 MB of UTF-8: the bytes count
    with Sandbox(policy, audit_log=audit_path) as sb:
        assert sb.execute("x = 5").ok
        with pytest.raises(ValueError, match=r"code is 1200001 bytes \(UTF-8\), over the 1032192"):
            sb.execute(big)
        r = sb.execute("#" + "a" * 1_000_000 + "\nprint(x)")  # under the cap: runs
        assert r.ok and r.stdout == "5\n" and not r.state_lost
    assert verify(audit_path).lines == 2

    async def run_async() -> None:
        async with AsyncSandbox(policy, audit_log=audit_path) as sb:
            assert (await sb.execute("y = 6")).ok
            with pytest.raises(ValueError, match="over the 1032192"):
                await sb.execute(big)
            r = await sb.execute("print(y)")
            assert r.ok and r.stdout == "6\n" and not r.state_lost

    asyncio.run(run_async())
    assert verify(audit_path).lines == 4


@pytest.mark.parametrize("bad, error", [(True, TypeError), ("5", TypeError), (0, ValueError), (-1.0, ValueError)])
def test_a_variable_timeout_is_a_positive_number_not_a_bool(sb, bad, error):
    with pytest.raises(error, match="timeout must be a"):
        sb.set_variable("x", 1, timeout=bad)
    with pytest.raises(error, match="timeout must be a"):
        sb.get_variable("x", timeout=bad)
    sb.set_variable("x", 1, timeout=5)  # an int is a number of seconds
    assert sb.get_variable("x", timeout=2.5) == 1


def test_frames_near_the_cap_never_cost_the_child(audit_path):
    """Under max_message_mb = 1 (the frame cap equals INLINE_LIMIT) a value that packed just under
    1 MiB went inline, its frame over the cap: the child (for set_variable and a host function's
    result) or the host (for get_variable) took it for a broken protocol and the child was lost.
    So did a host function's error of 600,000 two-byte characters (cut by characters, not bytes)
    and a 2 MB variable name. Values go out of band before their frame outgrows the cap, error
    texts are cut in bytes, names are capped: the child and its variables stay."""
    policy = load_policy("default").override({"limits.max_message_mb": 1})
    big = ["x" * 1000] * 1040  # packs to about 1.04 MB

    def fail() -> None:
        raise ValueError("é" * 600_000)

    with Sandbox(policy, host_functions={"big": lambda: big, "fail": fail}, audit_log=audit_path) as sb:
        assert sb.execute("x = 5").ok
        sb.set_variable("v", big)
        r = sb.execute("w = big()\nprint(len(v), len(w))")
        assert r.ok and r.stdout == "1040 1040\n" and not r.state_lost, r
        r = sb.execute("try:\n    fail()\nexcept Exception as e:\n    print(len(str(e).encode()))")
        assert r.ok and int(r.stdout) <= 1_000_000 and not r.state_lost, r
        assert sb.get_variable("w") == big
        name = "a" * 2_000_000
        for call in (lambda: sb.get_variable(name), lambda: sb.set_variable(name, 1)):
            with pytest.raises(VariableError, match=r'^"a{60}"\.\.\. is not a valid variable name$'):
                call()
        r = sb.execute("print(x)")
        assert r.ok and r.stdout == "5\n" and not r.state_lost, r


def test_an_output_cap_no_frame_can_carry_is_refused_when_the_policy_loads():
    """max_output_bytes = 100 MB passed: a cell that printed 70 MB then came back as a broken
    protocol with its child killed (the frame cap is 64 MiB). The policy names the key now."""
    with pytest.raises(PolicyError, match="limits.max_output_bytes.*more than one frame can carry"):
        load_policy("default").override({"limits.max_output_bytes": 60_000_000, "limits.max_message_mb": 32})
    assert load_policy("default").override({"limits.max_message_mb": 1}).limits.max_output_bytes == 1_000_000


def test_a_value_the_child_has_no_memory_to_send_is_a_named_error(audit_path):
    """get_variable of a value whose packed copy does not fit the child's memory said only
    "variable 'v': " (a MemoryError's message is empty). It says why now; the child lives on."""
    policy = load_policy("default").override({"limits.memory_mb": 300})
    with Sandbox(policy, audit_log=audit_path) as sb:
        assert sb.execute("v = '\u20ac' * (60 * 1024 * 1024)").ok  # 120 MB held, 180 MB packed
        with pytest.raises(VariableError, match=r"^variable 'v': no memory left to send it$"):
            sb.get_variable("v")
        r = sb.execute("print(len(v))")
        assert r.ok and r.stdout == "62914560\n" and not r.state_lost


def test_host_functions_called_from_several_threads_of_the_child(audit_path):
    """With threads allowed, two threads of the code calling host functions at once could take
    each other's replies (a broken protocol), and a large result's memfd was emptied by the host
    at the other thread's next call while this one still read it (SIGBUS). The child makes one
    call at a time now."""
    policy = load_policy("default").override(
        {"python.guard": "none", "limits.max_processes": 4, "limits.wall_seconds": 60}
    )
    big = [f"s{i:07d}" for i in range(200_000)]  # about 2 MB packed: a memfd each time

    def h(kind: str) -> object:
        return big if kind == "big" else 1

    code = (
        "import threading\nres = {'a': [], 'b': 0}\n"
        "def a():\n    for _ in range(5):\n        res['a'].append(len(h('big')))\n"
        "def b():\n    for _ in range(500):\n        res['b'] += h('small')\n"
        "ts = [threading.Thread(target=a), threading.Thread(target=b)]\n"
        "for t in ts:\n    t.start()\nfor t in ts:\n    t.join()\nprint(res)"
    )
    with Sandbox(policy, host_functions={"h": h}, audit_log=audit_path) as sb:
        assert sb.execute("keep = 1").ok
        r = sb.execute(code)
        assert r.ok and r.stdout == "{'a': [200000, 200000, 200000, 200000, 200000], 'b': 500}\n", r
        assert sb.execute("print(keep)").stdout == "1\n"


def test_an_exception_or_a_value_with_a_huge_class_name_keeps_the_child(audit_path):
    """A class name has no length limit: an exception or an unsendable value of a class named
    with 1 MiB of characters put it whole into the done or value frame, over the cap, and the
    child was lost. The child cuts those names (and refusal texts) itself now."""
    policy = load_policy("default").override({"limits.max_message_mb": 1})
    n = 1024 * 1024 + 10
    with Sandbox(policy, audit_log=audit_path) as sb:
        assert sb.execute("keep = 42").ok
        r = sb.execute(f"E = type('E' * {n}, (Exception,), {{}})\nraise E()")
        assert not r.ok and r.error_type == "E" * 200 and not r.crashed, r.error_type[:80]
        assert sb.execute(f"v = type('X' * {n}, (), {{}})()").ok
        with pytest.raises(VariableError, match="^variable 'v': X+"):
            sb.get_variable("v")
        r = sb.execute("print(keep)")
        assert r.ok and r.stdout == "42\n" and not r.state_lost, r


def test_a_childs_refusal_reaches_variable_error_with_its_control_characters_escaped(audit_path):
    """The child words a get_variable refusal, with the code's class name in it: a class named
    with a terminal's escape sequences put them raw into the VariableError's message, and so
    onto the terminal or into the log that shows it (a window title set, the screen cleared).
    They are escaped now, as every peer text in a host exception's message is; the message is
    still cut to protocol.MAX_REFUSAL characters."""
    from sandbox import protocol

    with Sandbox("default", audit_log=audit_path) as sb:
        name = "'T\\x1b]0;pwned\\x07\\x1b[2J\\u202e\\x7f\\x9b2J\\x85' + 'X' * 5000"
        assert sb.execute(f"v = type({name}, (), {{}})()").ok
        with pytest.raises(VariableError) as err:
            sb.get_variable("v")
        message = str(err.value)
        assert message.startswith("variable 'v': "), message[:200]
        # DEL and the C1 controls too (a terminal may take U+009B for CSI, as ESC [).
        assert "T\\u001b]0;pwned\\u0007\\u001b[2J\\u202e\\u007f\\u009b2J\\u0085" in message, message[:200]
        assert all(" " <= c < "\x7f" for c in message), message[:200]
        assert len(message) <= protocol.MAX_REFUSAL + 100, len(message)
        r = sb.execute("print(type(v).__name__[:1])")
        assert r.ok and r.stdout == "T\n" and not r.state_lost, r


def test_a_read_path_with_nothing_there_stops_the_sandbox_naming_it(tmp_path, audit_path):
    """A ``read_paths`` entry with nothing there when a sandbox started (a typo, a directory not
    mounted yet, a link whose target is gone) was left out by the child without a word: the
    sandbox started and the code found nothing where the policy said it could read. It is a
    SandboxStartError naming the key and the path now, whatever the layers; once the path is
    there, the same policy starts."""
    from sandbox.errors import SandboxStartError

    data = tmp_path / "data"
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    for entry, says in [
        (data, f"'{data}' does not exist"),
        (dangling, f"'{dangling}' leads to '{tmp_path / 'gone'}', which does not exist"),
        (data / ".." / "data" / "f.txt", f"'{data / 'f.txt'}' does not exist"),
    ]:
        views_off = {"isolation.filesystem_view": False, "isolation.landlock": False, "isolation.require": []}
        for changes in ({}, views_off):
            policy = load_policy("default").override({"isolation.read_paths": [str(entry)], **changes})
            for pool in (None, SandboxPool(size=1)):
                with pytest.raises(SandboxStartError) as err:
                    with Sandbox(policy, audit_log=audit_path, pool=pool):
                        raise AssertionError("started")
                assert f"isolation.read_paths entry {says}" in str(err.value), str(err.value)
                if pool is not None:
                    pool.close()
    data.mkdir()
    (data / "f.txt").write_text("granted")
    policy = load_policy("default").override({"isolation.read_paths": [str(data)], "python.guard": "none"})
    with Sandbox(policy, audit_log=audit_path, pool=None) as sb:
        r = sb.execute(f"print(open({str(data / 'f.txt')!r}).read())")
        assert r.ok and r.stdout == "granted\n", r


def test_a_read_path_the_sandbox_cannot_open_stops_the_start_naming_it(tmp_path, audit_path):
    """A ``read_paths`` entry that is there but that the child cannot open (here a loop of
    symbolic links, ELOOP; for a host that is not root, a directory on its way closed to it,
    EACCES: see tests/test_unprivileged_host.py) made the child report ``filesystem_view`` and
    ``landlock`` "unavailable": a policy that does not require them (a custom one, or
    portable.toml) then ran without both. It stops the start now, a SandboxStartError (not a
    missing layer) naming the key, the path and the errno, whatever the policy requires."""
    from sandbox.errors import LayerUnavailableError, SandboxStartError

    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    custom = load_policy("default").override({"isolation.require": []})
    for base in (custom, load_policy("portable"), load_policy("default")):
        policy = base.override({"isolation.read_paths": [str(loop)]})
        for pool in (None, SandboxPool(size=1)):
            with pytest.raises(SandboxStartError) as err:
                with Sandbox(policy, audit_log=audit_path, pool=pool) as sb:
                    raise AssertionError(f"started: {sb.layers}")
            assert not isinstance(err.value, LayerUnavailableError), err.value
            message = str(err.value)
            assert f"isolation.read_paths entry '{loop}' cannot be opened" in message, message
            assert "ELOOP" in message, message
            if pool is not None:
                pool.close()
