"""Policies are validated strictly: no coercion, every error names the file and the dotted key,
contradictory settings are refused at load time. The same holds for ``Policy(...)`` in Python."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel

from sandbox import Policy, load_policy
from sandbox.errors import PolicyError
from sandbox.policy import LAYER_NEEDS, LAYERS, IsolationSettings

HEAD = 'schema_version = 1\nname = "t"\ndescription = "d"\n'
#: Everything off that needs no_new_privs, so a test can turn no_new_privs off on its own.
NO_NNP_USERS = "".join(f"{layer} = false\n" for layer in LAYER_NEEDS)


def _load(tmp_path: Path, body: str) -> Policy:
    path = tmp_path / "p.toml"
    path.write_text(HEAD + body)
    return load_policy(path)


def _error(tmp_path: Path, body: str) -> str:
    with pytest.raises(PolicyError) as err:
        _load(tmp_path, body)
    message = str(err.value)
    assert str(tmp_path / "p.toml") in message
    assert "<top>" not in message
    return message


@pytest.mark.parametrize(
    ("body", "key", "detail"),
    [
        ('[isolation]\nseccomp = "no"\n', "isolation.seccomp", "'no' of type str"),
        ("[isolation]\nlandlock = 1\n", "isolation.landlock", "valid boolean"),
        ('[limits]\ncpu_seconds = "10"\n', "limits.cpu_seconds", "'10' of type str"),
        ("[limits]\ncpu_seconds = true\n", "limits.cpu_seconds", "valid number"),
        ("[limits]\nmemory_mb = 512.0\n", "limits.memory_mb", "valid integer"),
        ('[limits]\nmax_output_bytes = "1e6"\n', "limits.max_output_bytes", "valid integer"),
        ('[isolation]\nrequire = "seccomp"\n', "isolation.require", "should be an array"),
        ('[python]\nallowed_imports = ["re", 1]\n', "python.allowed_imports.1", "valid string"),
        ("[audit]\npath = 1979-05-27\n", "audit.path", "valid string"),
        ("[audit]\nenabled = 0\n", "audit.enabled", "valid boolean"),
    ],
)
def test_a_wrong_type_is_an_error_naming_file_and_key(tmp_path, body, key, detail):
    message = _error(tmp_path, body)
    assert f"key {key!r}" in message and detail in message


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[limits]\nwall_seconds = inf\n", "limits.wall_seconds"),
        ("[limits]\ncpu_seconds = nan\n", "limits.cpu_seconds"),
        ("[limits]\nlifetime_cpu_seconds = 1e300\n", "limits.lifetime_cpu_seconds"),
        ("[limits]\nmemory_mb = 100000000000000000000\n", "limits.memory_mb"),
        ("[limits]\nmax_open_files = 99999999999\n", "limits.max_open_files"),
    ],
)
def test_infinite_and_huge_limits_are_refused(tmp_path, body, key):
    """Limits are bounded (a year of seconds, 16 TiB): an infinity or a huge number would
    overflow the kernel's limits and the host's waits instead of meaning "no limit"."""
    message = _error(tmp_path, body)
    assert f"key {key!r}" in message
    if "inf" in body or "nan" in body:
        assert "finite number" in message  # not "should be less than or equal to ..."


def test_right_types_load_and_arrays_become_tuples(tmp_path):
    p = _load(tmp_path, '[limits]\ncpu_seconds = 3\nwall_seconds = 2.5\n[isolation]\nrequire = ["seccomp"]\n')
    assert p.limits.cpu_seconds == 3.0 and isinstance(p.limits.cpu_seconds, float)
    assert p.isolation.require == ("seccomp",)


def test_schema_version_must_be_the_integer(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('schema_version = true\nname = "t"\ndescription = "d"\n')
    with pytest.raises(PolicyError, match="schema_version"):
        load_policy(path)


def test_read_paths_may_not_grant_the_whole_filesystem(tmp_path):
    # '/' was accepted, then every sandbox failed to start with "filesystem_view: Read-only file system"
    for entry in ("/", "/tmp/.."):
        message = _error(tmp_path, f'[isolation]\nread_paths = ["{entry}"]\n')
        assert "key 'isolation.read_paths'" in message and "whole filesystem" in message


def test_read_paths_may_not_show_the_hosts_processes_kernel_or_devices(tmp_path):
    """``read_paths = ["/proc"]`` bound the host's /proc into the view: the code listed every host
    process and read their command lines, past the pid layer (and /sys, /dev the same for the
    kernel's state and the devices). Such entries are refused when the policy loads."""
    (tmp_path / "hostproc").symlink_to("/proc")  # where a link leads counts: the view binds that
    (tmp_path / "shm").symlink_to("/dev/shm")  # as Debian's /run/shm does
    entries = ["/proc", "/proc/self", "/sys/kernel", "/dev", "/dev/../proc/1", "//proc", "///sys"]
    for entry in [*entries, str(tmp_path / "hostproc"), str(tmp_path / "shm")]:
        message = _error(tmp_path, f'[isolation]\nread_paths = ["{entry}"]\n')
        assert "key 'isolation.read_paths'" in message and "the host's" in message, (entry, message)
    for entry in ("//", "///"):  # POSIX normalization keeps a leading '//'
        message = _error(tmp_path, f'[isolation]\nread_paths = ["{entry}"]\n')
        assert "whole filesystem" in message, (entry, message)
    for entry in ("/process", "/devices", "/srv/proc"):  # only those trees themselves
        assert load_policy("default").override({"isolation.read_paths": [entry]})


def test_a_policy_loaded_again_is_the_same_unless_its_file_or_the_hosts_paths_could_differ(tmp_path):
    """``Sandbox()`` (policy "default") read, parsed and validated the shipped file each time,
    about 1 ms of its start (and a new Policy object, so the sandbox's spec was built anew too).
    A policy loaded again from the same bytes is the same object now; a file changed since is
    read anew, and so is one whose validity depends on the host's filesystem at the time (a
    read_path is checked where it leads now) or on the home directory ('~')."""
    assert load_policy("default") is load_policy("default")
    assert load_policy("default") is not load_policy("strict")
    first = _load(tmp_path, "[limits]\ncpu_seconds = 5\n")
    assert _load(tmp_path, "[limits]\ncpu_seconds = 5\n") is first
    changed = _load(tmp_path, "[limits]\ncpu_seconds = 6\n")
    assert changed.limits.cpu_seconds == 6 and first.limits.cpu_seconds == 5
    # A read_path that was a plain directory at the first load leads into /proc at the second.
    (tmp_path / "data").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "data")
    body = f'[isolation]\nread_paths = ["{link}"]\n'
    assert _load(tmp_path, body).isolation.read_paths == (str(link),)
    link.unlink()
    link.symlink_to("/proc")
    assert "the host's" in _error(tmp_path, body)


@pytest.mark.parametrize(
    "body",
    [
        '[isolation]\nrequire = ["teleport"]\n',
        '[isolation]\nnetwork = false\nrequire = ["network"]\n',
        '[isolation]\nrequire = ["pid", "seccomp", "pid"]\n',
    ],
)
def test_require_errors_name_isolation_require(tmp_path, body):
    assert "key 'isolation.require'" in _error(tmp_path, body)


@pytest.mark.parametrize("layer", sorted(LAYER_NEEDS))
@pytest.mark.parametrize("required", [True, False])
def test_a_layer_on_without_what_it_needs_is_refused_at_load(tmp_path, layer, required):
    others = "".join(f"{x} = false\n" for x in LAYER_NEEDS if x != layer)
    body = f"[isolation]\nno_new_privs = false\n{others}{layer} = true\n"
    if required:
        body += f'require = ["{layer}"]\n'
    message = _error(tmp_path, body)
    assert "key 'isolation.no_new_privs'" in message and f"isolation.{layer}" in message


def test_no_new_privs_off_is_fine_when_nothing_needs_it(tmp_path):
    p = _load(tmp_path, f"[isolation]\nno_new_privs = false\n{NO_NNP_USERS}")
    assert not p.isolation.no_new_privs


def test_every_dependency_names_known_layers():
    for layer, needs in LAYER_NEEDS.items():
        assert layer in LAYERS and set(needs) <= set(LAYERS)


def test_several_problems_are_all_named(tmp_path):
    message = _error(tmp_path, '[limits]\ncpu_seconds = "1"\nmemory_mb = "2"\n')
    assert "limits.cpu_seconds" in message and "limits.memory_mb" in message


def test_policy_built_in_python_is_strict_too():
    base = {"schema_version": 1, "name": "py", "description": "d"}
    with pytest.raises(PolicyError, match="'limits.cpu_seconds'"):
        Policy(**base, limits={"cpu_seconds": "10"})
    with pytest.raises(PolicyError, match="'isolation.seccomp'"):
        Policy(**base, isolation={"seccomp": "no"})
    with pytest.raises(PolicyError, match="'isolation.no_new_privs'"):
        Policy(**base, isolation=IsolationSettings(no_new_privs=False))
    with pytest.raises(PolicyError, match="'schema_version'"):
        Policy(**{**base, "schema_version": True})
    p = Policy(**base, isolation={"require": ["seccomp"]})  # a list for a tuple field is an array
    assert p.isolation.require == ("seccomp",)
    with pytest.raises(PolicyError, match="'isolation.require'"):
        p.override({"isolation.seccomp": False})
    with pytest.raises(PolicyError, match="'limits.memory_mb'"):
        p.override({"limits.memory_mb": "512"})


def test_a_bad_value_built_in_python_raises_policy_error_itself_naming_the_key(tmp_path):
    """``Policy(...)`` with a bad value raised ``sandbox.policy._Invalid``, a private subclass
    that could not be unpickled (its ``__init__`` took two arguments: a Ray task or a
    multiprocessing worker handing it back raised TypeError instead), and a section built
    alone (``Limits(cpu_seconds=-1)``) raised pydantic's ValidationError, outside the package's
    error tree. Each is now a PolicyError itself, naming the dotted key."""
    import pickle

    from sandbox.policy import AuditSettings, Limits, PythonSettings

    base = {"schema_version": 1, "name": "py", "description": "d"}
    attempts = [
        (lambda: Policy(**base, limits={"cpu_seconds": -1}), "policy 'py': key 'limits.cpu_seconds'"),
        (
            lambda: Policy.model_validate({**base, "python": {"guard": "x"}}),
            "policy 'py': key 'python.guard'",
        ),
        (lambda: Limits(cpu_seconds=-1), "Limits: key 'limits.cpu_seconds'"),
        (lambda: PythonSettings(guard="x"), "PythonSettings: key 'python.guard'"),
        (lambda: IsolationSettings(read_paths=["rel"]), "IsolationSettings: key 'isolation.read_paths'"),
        (lambda: AuditSettings(path="rel"), "AuditSettings: key 'audit.path'"),
        (lambda: Limits.model_validate({"memory_mb": "2"}), "Limits: key 'limits.memory_mb'"),
    ]
    for attempt, names in attempts:
        with pytest.raises(PolicyError) as err:
            attempt()
        assert type(err.value) is PolicyError, type(err.value)
        assert str(err.value).startswith(names), str(err.value)
        again = pickle.loads(pickle.dumps(err.value))
        assert type(again) is PolicyError and str(again) == str(err.value)
    # From a file the message still names the file (and a section's key in full).
    message = _error(tmp_path, "[limits]\ncpu_seconds = -1\n")
    assert message.startswith(str(tmp_path / "p.toml")) and "'limits.cpu_seconds'" in message


def test_a_copy_or_a_construct_is_validated_as_the_constructor_is():
    """pydantic's ``model_copy(update=...)`` and ``model_construct`` skip validation: a policy
    derived with ``model_copy`` could require seccomp and switch it off (the sandbox then started
    without it: fail-closed bypassed), or carry ``cpu_seconds = -5`` and a ``max_output_bytes``
    no frame can carry. Both validate now, and a bad value is a PolicyError naming its key."""
    from sandbox.policy import Limits

    p = load_policy("default")
    no_seccomp = p.isolation.model_copy(update={"seccomp": False, "require": ("seccomp",)})
    attempts = [
        (lambda: p.limits.model_copy(update={"cpu_seconds": -5.0}), "'limits.cpu_seconds'"),
        (lambda: p.model_copy(update={"isolation": no_seccomp}), "'isolation.require'"),
        (lambda: p.model_copy(update={"limits": {"max_output_bytes": 10**12}}), "'limits.max_output_bytes'"),
        (lambda: p.model_copy(update={"nosuch": 1}), "'nosuch'"),
        (lambda: p.model_copy(update={"name": ""}, deep=True), "'name'"),
        (lambda: Limits.model_construct(memory_mb="2"), "'limits.memory_mb'"),
        (lambda: Policy.model_construct(name="x"), "'schema_version'"),
    ]
    for attempt, key in attempts:
        with pytest.raises(PolicyError) as err:
            attempt()
        assert type(err.value) is PolicyError and key in str(err.value), str(err.value)
    # Good updates work as pydantic's do: the other fields kept, the copy a new policy.
    q = p.model_copy(update={"name": "derived", "limits": p.limits.model_copy(update={"cpu_seconds": 2.5})})
    assert (q.name, q.limits.cpu_seconds, q.limits.memory_mb) == ("derived", 2.5, p.limits.memory_mb)
    assert q.isolation == p.isolation and q.sha256 != p.sha256
    assert p.model_copy() == p and p.model_copy(deep=True) == p
    assert Limits.model_construct(cpu_seconds=3) == Limits(cpu_seconds=3)


def test_every_model_is_strict_frozen_and_documented():
    def walk(model: type[BaseModel]) -> None:
        config = model.model_config
        assert (
            config.get("strict") is True and config.get("frozen") is True and config.get("extra") == "forbid"
        )
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann)
            elif not field.is_required():
                assert "Default" in (field.description or ""), f"{model.__name__}.{name}: no default stated"

    walk(Policy)


def test_every_list_valued_setting_takes_a_toml_array(tmp_path):
    from sandbox.policy import _takes_tuple

    sections = {}
    for name, field in Policy.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys = [k for k, f in ann.model_fields.items() if _takes_tuple(f.annotation)]
            if keys:
                sections[name] = keys
    assert sections, "no list-valued settings found"
    body = "".join(f"[{sec}]\n" + "".join(f"{k} = []\n" for k in keys) for sec, keys in sections.items())
    policy = _load(tmp_path, body)
    for sec, keys in sections.items():
        for k in keys:
            assert getattr(getattr(policy, sec), k) == ()


def test_a_policy_path_that_is_not_a_regular_file_is_a_policy_error(tmp_path):
    """A FIFO blocked the read forever (``rlm policy check`` too), ``/dev/zero`` filled memory
    (a raw MemoryError): only a regular file of at most 1 MiB is read."""
    import subprocess
    import sys

    fifo = tmp_path / "policy.toml"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 110_000)  # 1.1 MB of comments: valid TOML, not a policy
    for path, why in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                      (tmp_path, "not a regular file"), (big, "over 1048576 bytes")):  # fmt: skip
        with pytest.raises(PolicyError, match=why) as info:
            load_policy(path)
        assert str(info.value).startswith(f"{path}: ")
    done = subprocess.run([sys.executable, "-m", "rlm", "policy", "check", str(fifo)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stderr == f"rlm: {fifo}: not a regular file\n", done.stderr


def test_a_read_path_that_is_not_utf8_is_a_policy_error(monkeypatch):
    """A ``read_paths`` entry that is not UTF-8 (``~`` under a HOME that is not, or a name with
    such bytes) cannot be sent to the fork server: Sandbox() raised msgpack's
    UnicodeEncodeError. It is refused with the policy, naming the key."""
    bad = os.fsdecode(b"/srv/data-\xff")
    with pytest.raises(PolicyError, match="read_paths"):
        load_policy("default").override({"isolation.read_paths": [bad]})
    monkeypatch.setenv("HOME", os.fsdecode(b"/home/user-\xfe"))
    with pytest.raises(PolicyError, match="not a UTF-8 path"):
        load_policy("default").override({"isolation.read_paths": ["~/data"]})
    assert load_policy("default").override({"isolation.read_paths": ["/srv/données"]})


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("[limits]\ncpu_seconds = " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
        ("x = " + "{a=" * 1000 + "1" + "}" * 1000 + "\n", "nested too deeply"),
        ("[limits]\nmemory_mb = " + "9" * 4301 + "\n", "4300 digits"),
    ],
)
def test_a_policy_file_the_toml_parser_chokes_on_is_a_policy_error(tmp_path, body, why):
    """Nesting past the parser's recursion limit (RecursionError) and an integer past Python's
    digit limit (ValueError) escaped load_policy raw; `rlm policy check` printed a traceback."""
    import subprocess
    import sys

    message = _error(tmp_path, body)
    assert "not valid TOML" in message and why in message, message
    done = subprocess.run([sys.executable, "-m", "rlm", "policy", "check", str(tmp_path / "p.toml")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"rlm: {tmp_path / 'p.toml'}: not valid TOML"), done.stderr


def test_a_policy_path_with_a_nul_is_a_policy_error(tmp_path):
    for path in (str(tmp_path / "a\0.toml"), tmp_path / "a\0.toml", "~/a\0.toml"):
        with pytest.raises(PolicyError, match="NUL") as info:
            load_policy(path)
        assert "a\\x00.toml" in str(info.value)


@pytest.mark.parametrize(
    ("value", "why"),
    [("/tmp/a\\u0000b", "NUL byte"), ("logs/audit.jsonl", "not an absolute path"), ("", "not an absolute")],
)
def test_audit_path_must_be_absolute_and_without_nul(tmp_path, value, why):
    """A NUL was a raw ValueError only when a sandbox started; a relative path was taken against
    whatever the working directory was then. Both are refused at load, naming the key."""
    message = _error(tmp_path, f'[audit]\npath = "{value}"\n')
    assert "key 'audit.path'" in message and why in message, message
    with pytest.raises(PolicyError, match="audit.path"):
        load_policy("default").override({"audit.path": value.replace("\\u0000", "\0")})
    for fine in ("/var/log/rlm/audit.jsonl", "~/audit.jsonl"):
        assert _load(tmp_path, f'[audit]\npath = "{fine}"\n').audit.path == fine


def test_a_value_our_validator_refuses_is_named_in_its_words_only(tmp_path):
    """pydantic wrapped our validators' messages as "Value error, <ours> (got ('docs',) of type
    tuple)": its prefix and the value again, as Python spells it, after our message had named it."""
    message = _error(tmp_path, '[isolation]\nread_paths = ["docs"]\n')
    assert message.endswith("key 'isolation.read_paths': read_paths entry 'docs' is not an absolute path"), (
        message
    )
    assert "Value error" not in message and "of type" not in message
