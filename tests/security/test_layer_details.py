"""The layers' own contracts: one table, seccomp names, capabilities, read_paths, the bounding set."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import resource
from pathlib import Path
from typing import Any

import pytest

import sandbox.isolation as iso
from sandbox import load_policy
from sandbox.errors import PolicyError
from sandbox.isolation import namespaces, seccomp
from sandbox.layers import LAYER_TABLE, LAYERS
from sandbox.policy import IsolationSettings
from tests.security.conftest import in_forked_child

SCMP_ARCH_X86_64 = 0xC000003E
SCMP_ARCH_AARCH64 = 0xC00000B7


def test_one_record_per_layer() -> None:
    """layers.py, the child's appliers, the policy switches and the shipped policies agree."""
    assert set(iso._APPLY) == set(LAYERS)
    fields = IsolationSettings.model_fields
    for entry in LAYER_TABLE:
        assert fields[entry.name].annotation in (bool, "bool")
        assert fields[entry.name].description == entry.policy_doc
        assert entry.doctor
    for name in ("default", "strict"):
        assert set(load_policy(name).isolation.require) == set(LAYERS), name
    assert load_policy("portable").isolation.require == ("rlimits",)


@pytest.mark.parametrize("arch", [SCMP_ARCH_X86_64, SCMP_ARCH_AARCH64], ids=["x86_64", "aarch64"])
def test_every_seccomp_name_resolves(arch: int) -> None:
    """Every name the filter uses is one libseccomp knows; the ones that matter exist on the arch."""
    lib = seccomp._libseccomp()
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    resolve = lambda name: lib.seccomp_syscall_resolve_name_arch(arch, name.encode())
    for name in seccomp.rule_names(allow_ipc=False):
        if name in seccomp.RECENT_NUMBERS and resolve(name) == seccomp.NR_SCMP_ERROR:
            # Newer than this libseccomp: refused by its number, the same on both.
            assert resolve("pidfd_send_signal") == 424, name
            continue
        assert resolve(name) != seccomp.NR_SCMP_ERROR, name
        if name in seccomp.RECENT_NUMBERS:
            assert resolve(name) == seccomp.RECENT_NUMBERS[name], name
    must_exist = [n for n in seccomp.IPC_SYSCALLS if n != "ipc"]
    must_exist += ["inotify_init1", "inotify_add_watch", "sysinfo", "execve", "ptrace", "unshare", "setns"]
    must_exist += ["clone", "clone3", "socket", "bpf", "io_uring_setup", "pidfd_getfd", "mount", "pivot_root"]
    for name in must_exist:
        assert resolve(name) >= 0, (name, resolve(name))


def test_unknown_seccomp_name_is_an_error_at_preparation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in a rule refuses the filter (the child then fails closed), never drops the rule."""
    monkeypatch.setattr(seccomp, "EPERM_SYSCALLS", (*seccomp.EPERM_SYSCALLS, "ptarce"))
    with pytest.raises(seccomp.SeccompError, match="ptarce"):
        seccomp.build((), 0)
    try:
        prepared = iso.prepare(load_policy("default").model_dump(mode="json"))
    finally:
        gc.unfreeze()  # prepare() freezes the fork server's heap; this is the test process
    assert "ptarce" in prepared.seccomp_error and not prepared.seccomp_program


def test_a_system_call_newer_than_the_review_is_refused_as_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The filter allows what it does not name: a call a later kernel adds went through. Numbers
    above the newest reviewed one get ENOSYS (what a kernel without the call says: glibc falls
    back), up to the tables' room; below, the filter's own rules decide. Checked on calls this
    kernel has, with the line moved down: fchmodat2 (452) is then refused, cachestat (451) not."""
    lib = ctypes.CDLL(None, use_errno=True)
    for nr in (451, 452):
        ctypes.set_errno(0)
        if lib.syscall(nr, -1, 0, 0, 0, 0) == -1 and ctypes.get_errno() == errno.ENOSYS:
            pytest.skip(f"this kernel has no system call {nr} (cachestat, fchmodat2: 6.5, 6.6)")
    monkeypatch.setattr(seccomp, "NEWEST_REVIEWED", 451, raising=False)
    program = seccomp.build((), 0)

    def probe(write: int) -> bool:
        from sandbox.isolation._sys import libc, prctl

        prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
        seccomp.load(program)
        lib = libc()
        got = []
        for nr in (451, 452, 1023):
            ctypes.set_errno(0)
            got.append(f"{nr}:{lib.syscall(nr, -1, 0, 0, 0, 0)}:{ctypes.get_errno()}")
        os.write(write, " ".join(got).encode())
        return True

    _, got = in_forked_child(probe)
    cachestat, fchmodat2, beyond = got.split()
    assert fchmodat2 == "452:-1:38" and beyond == "1023:-1:38", got
    assert cachestat.startswith("451:-1:") and cachestat != "451:-1:38", got  # EBADF: it ran


def test_scheduling_rlimits_are_pinned_below_a_lower_hard_limit_of_the_host() -> None:
    """RLIMIT_RTPRIO and RLIMIT_NICE are 0 and RLIMIT_SIGPENDING 128 in a child, whatever the
    host's; a hard limit the host already holds lower stays (it cannot be raised)."""
    from sandbox import limits

    def apply(write: int) -> bool:
        resource.setrlimit(resource.RLIMIT_SIGPENDING, (16, 16))  # the host's, lower
        limits.apply_rlimits(load_policy("default").model_dump(mode="json")["limits"], own_uid=False)
        got = [
            resource.getrlimit(getattr(resource, n))
            for n in ("RLIMIT_RTPRIO", "RLIMIT_NICE", "RLIMIT_SIGPENDING")
        ]
        os.write(write, repr(got).encode())
        return True

    assert in_forked_child(apply) == (0, "[(0, 0), (0, 0), (16, 16)]")
    assert limits.SIGPENDING == 128


def test_seccomp_ipc_switch() -> None:
    assert seccomp.build((), 0, allow_ipc=True) != seccomp.build((), 0, allow_ipc=False)


def test_capabilities_use_the_c_library_wrappers(monkeypatch: pytest.MonkeyPatch) -> None:
    """capget/capset go through libc (right on every architecture), not x86_64 syscall numbers."""
    real = namespaces.libc()

    class NoRawSyscalls:
        def __getattr__(self, name: str) -> Any:
            if name == "syscall":
                raise AssertionError("raw syscall() used for capabilities")
            return getattr(real, name)

    monkeypatch.setattr(namespaces, "libc", NoRawSyscalls)
    effective, permitted, _ = namespaces.capabilities()
    if os.geteuid() == 0:
        assert effective and permitted


def test_read_paths_expand_home_on_the_host_and_must_be_absolute() -> None:
    pol = load_policy("default").override({"isolation.read_paths": ["~/data", "/srv/x/../y"]})
    assert pol.isolation.read_paths == (str(Path.home() / "data"), "/srv/y")
    with pytest.raises(PolicyError, match="absolute"):
        load_policy("default").override({"isolation.read_paths": ["data"]})


def test_bounding_set_failure_is_reported_not_ignored() -> None:
    """A fork server that could not empty the bounding set makes the identity layer fail (closed)."""
    if os.geteuid() != 0:
        pytest.skip("the bounding set is dropped by a root fork server only")

    def drop(write: int) -> bool:
        server = iso.Server.__new__(iso.Server)
        server.bounding_set = "Operation not permitted"
        server.ns = namespaces.ServerState()
        ctx = iso._Ctx(
            iso.Prepared({"isolation": {}, "limits": {}}, {}), {"uid": 1_999_999, "gid": 1_999_999}, server
        )
        try:
            iso._identity(ctx)
        except OSError as exc:
            os.write(write, str(exc).encode())
            return True
        os.write(write, f"dropped to {os.getuid()}".encode())
        return False

    _, got = in_forked_child(drop)
    assert "bounding set" in got and "Operation not permitted" in got, got


def test_doctor_reports_every_layer() -> None:
    from sandbox.doctor import layer_report

    report = layer_report()
    for name in LAYERS:
        assert name in report
    for name in ("pid", "ipc", "filesystem_view"):
        assert report[name].startswith("works:"), report[name]
