"""The host side of a sandbox: :class:`Sandbox` and its asyncio twin :class:`AsyncSandbox`.

A ``Sandbox`` owns one child process at a time (forked by the shared fork
server, see :mod:`sandbox.forkserver`) and talks to it over a socket pair in
the frames of :mod:`sandbox.protocol`. Around each ``execute`` the host:

- resets the child's peak-RSS counter; CPU is counted from the moment the child
  last went idle (its previous ``done``), so a signal handler or a thread that
  ran between executes is charged to this one; the kernel CPU backstop
  (``prlimit``) is moved each time the child goes idle, so idle CPU is bounded too;
- waits for frames with a deadline: the wall limit (host-function time is not
  counted) and the CPU limit, read from the child's CPU clock only when it could
  have been reached, so a fast execute costs no extra system calls;
- writes to the child with the same deadline (a child that stops reading is
  killed, not waited for), and decodes what it sends within an element budget;
- services ``call`` frames by running host functions, replying in order;
- kills the child's process group at a deadline, on a protocol violation, or
  when it hangs up, and classifies how it ended (limit, crash);
- cuts stdout, stderr, the error message and the traceback to ``max_output_bytes``
  together;
- measures CPU time and peak RSS from the kernel, and appends an audit line.

A child is addressed by pid (process group, ``prlimit``, CPU clock,
``/proc/<pid>``) only until the host *releases* it (:func:`_collect_exit`):
the fork server does not reap a child, so its pid cannot be reused, before the
host has released it.

When a child has died, the next call starts a fresh one and the next
``ExecResult`` says ``state_lost=True``.

Children come ready from a :class:`~sandbox.pool.SandboxPool` when one holds a
child of the same policy (every layer applied, ``hello`` sent); the sandbox
then sends its own ``init`` (host-function names) before the first request.

Embedding: a ``Sandbox`` may be used from any thread (calls are serialized),
never re-entrantly from its own host functions (a clear ``SandboxError``); a
process forked from the host must open its own sandboxes (those inherited
from the parent refuse use there and close without touching the parent's).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import errno
import fcntl
import functools
import hashlib
import heapq
import inspect
import itertools
import keyword
import os
import random
import re
import select
import signal
import socket
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sandbox import forkserver, limits, protocol, uids
from sandbox.audit import AuditLog, default_audit_path, encode_fields
from sandbox.errors import (
    AuditError,
    ChildTimeoutError,
    LayerUnavailableError,
    ProtocolError,
    SandboxClosedError,
    SandboxError,
    SandboxStartError,
    VariableError,
)
from sandbox.files import open_dir, remove_tree
from sandbox.policy import Policy, load_policy
from sandbox.pool import DEFAULT, Default, SandboxPool, default_pool
from sandbox.result import ExecResult, LimitName
from sandbox.spin import CpuSlack, Spinner

__all__ = ["AsyncSandbox", "HostFunction", "Sandbox"]

HostFunction = Callable[..., Any]

_START_TIMEOUT = 15.0
#: Seconds a read or write of the child may run past its deadline before the child is killed.
DEADLINE_GRACE = 2.0
#: Default per-call timeout of set_variable/get_variable, on top of the policy's wall_seconds.
VARIABLE_TIMEOUT_EXTRA = 30.0
#: Seconds the host waits for its fork server's report of how a stopped child ended (the server's
#: lock included: another thread's spawn may hold it); past that the report is given up.
EXIT_REPORT_WAIT = 10.0
#: Bytes of markers the output cap may add to max_output_bytes (the child's cut and the host's).
_OUTPUT_SLACK = 4 * limits.CUT_MARKER_BYTES + 160
#: How long the host polls for the child's answer before it blocks (at most; see sandbox.spin).
SPIN_SECONDS = 0.0005
_SPIN_SLOT = threading.Lock()  # held by the one host thread that may spin now
_SLACK = CpuSlack()  # whether a CPU is free for spinning, on either end


class _Callers:
    """Which sandbox calls of this host are in flight now: sync calls, one per thread, and
    async executes. Only a lone caller spins, and only a lone caller's child is told it may
    spin (:func:`_child_may_spin`): a spinning thread takes and drops the GIL at every poll,
    which slows every other thread of the host (8 threads ran at 70% of one thread's rate,
    32 at 56%), and children that spin while the host serves others take its CPU.

    A set of keys (a sandbox's ``id``: one call at a time holds its lock), not a count: adding
    and discarding are single operations under the GIL, and discarding twice, or what was
    never added, is harmless, so a Ctrl-C that cuts a call's bookkeeping short cannot leave
    the count off for good (which would stop all spinning in the process)."""

    __slots__ = ("keys",)

    def __init__(self) -> None:
        self.keys: set[object] = set()

    @property
    def count(self) -> int:
        return len(self.keys)

    def enter(self, key: object) -> None:
        self.keys.add(key)

    def leave(self, key: object) -> None:
        self.keys.discard(key)


_CALLERS = _Callers()


def _child_may_spin() -> bool:
    """The ``spin`` word of an exec or reply frame: one call in flight and a CPU free."""
    return _CALLERS.count <= 1 and _SLACK.free()


#: Leases of children whose death could not be confirmed: kept (never reused) until the host exits.
_unconfirmed: list[uids.UidLease] = []


#: Draws sandbox ids (64 random bits, like the uuid4 prefix they replace, without a system call
#: per sandbox). Seeded from os.urandom, again in a forked process: ids never repeat across a fork.
_ids = random.Random()


def _after_fork_in_child() -> None:
    """A forked process: the calls other threads of the parent had in flight are not its own (its
    first lone call would never spin, nor tell its child it may), and a lock one of them held
    stays held there for good (the spin slot; the CPU watch's, which its first host function
    would wait for forever). Sandbox ids are drawn anew, and the descriptors of every child
    record are closed here (a copy of a scratch directory's kept its lock held after the parent
    died, for as long as this process lived)."""
    global _SPIN_SLOT, _cpu_watch_lock, _dropped_lock
    _ids.seed()
    _CALLERS.keys.clear()
    _SPIN_SLOT = threading.Lock()
    _cpu_watch_lock = threading.Lock()
    _dropped_lock = threading.Lock()
    for child in list(_children):  # the parent's: its sandboxes', its pools', one being started
        with contextlib.suppress(Exception):
            child.forget()
    for start in list(_starts):  # children being started: their descriptors are in no record yet
        with contextlib.suppress(Exception):
            start.forget()
    _dropped.clear()  # (forgotten above: the parent's to finish, scratch directories included)


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------ leftovers
# A host that dies without cleaning up (SIGKILL, an os._exit of its own) leaves
# its children's scratch directories (empty on the host's side: the tmpfs was mounted in the
# fork server's namespace) and uid lock files. Its fork server, seeing it go, removes the
# directories (forkserver._remove_orphaned_scratch), unless it was killed too (a whole job
# killed): what is left then is for the sweep below. The host holds an flock on each scratch
# directory of a live child (the kernel drops it when the host dies, whatever its PID
# namespace), and the first sandbox of each process removes, in a background thread, the
# scratch directories nobody holds that are over _SWEEP_AGE old (a directory is locked
# microseconds after it is made), named as mkdtemp names ours and owned by this user or a
# sandbox uid (never another program's "sandbox-..."), the uid lock files nobody holds, and
# (as root) the cgroup trees of dead fork servers anywhere in the hierarchy (cgroups.sweep_abandoned).

_SWEEP_AGE = 600.0
#: What tempfile.mkdtemp(prefix="sandbox-") names: anything else is not ours to remove.
_SCRATCH_NAME = re.compile(r"sandbox-[a-z0-9_]{8}")
_swept_by: int | None = None  # the pid that started the sweep (once per process)


def _lock_scratch(path: str) -> int:
    """An open descriptor of the scratch directory *path*, holding its flock (see above). Opened
    without following a symbolic link, and given owner rwx where the code of its sandbox took
    them away (:func:`files.open_dir`): a sweep must be able to lock, and then remove, it."""
    fd = open_dir(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sweep_scratch(root: str, limit: int = 1024, age: float = _SWEEP_AGE) -> int:
    """Remove scratch directories under *root* that no live host holds and that are over *age*
    seconds old; at most *limit* entries named as ours looked at. Returns how many were removed."""
    removed = 0
    oldest = time.time() - age
    try:
        with os.scandir(root) as entries:  # the limit counts ours only: a busy /tmp hides none
            ours = (e.path for e in entries if _SCRATCH_NAME.fullmatch(e.name))
            found = [path for _, path in zip(range(limit), ours, strict=False)]
    except OSError:
        return 0
    me = os.geteuid()
    for path in found:
        try:
            st = os.lstat(path)
            if (
                not stat.S_ISDIR(st.st_mode)
                or not (st.st_uid == me or uids.UID_BASE <= st.st_uid < uids.UID_BASE + uids.UID_SPAN)
                or st.st_mtime > oldest
            ):
                continue  # not one of ours (another program's "sandbox-..."), or too young
            fd = _lock_scratch(path)  # BlockingIOError: its host lives
        except OSError:
            continue
        try:
            remove_tree(path)
            removed += 1
        finally:
            os.close(fd)
    return removed


def _sweep_leftovers() -> None:
    """Once per process, in the background: what dead hosts left (see above)."""
    global _swept_by
    if _swept_by == os.getpid():
        return

    def sweep() -> None:
        with contextlib.suppress(Exception):  # best effort: clutter, never a failure of ours
            _sweep_scratch(tempfile.gettempdir())
            uids.sweep()
            if os.geteuid() == 0:  # cgroup trees of fork servers killed with a whole job
                from sandbox.isolation import cgroups

                cgroups.sweep_abandoned()

    try:
        threading.Thread(target=sweep, name="sandbox-sweep", daemon=True).start()
    except RuntimeError:  # no thread to be had now (a process limit): the next sandbox tries again
        return
    _swept_by = os.getpid()


def _reserve_identity() -> uids.UidLease | None:
    """A uid/gid no other live sandbox on the machine holds (a root that can switch to it; else
    the child gets a user namespace: see :func:`sandbox.uids.switchable`)."""
    try:
        if not uids.switchable():
            return None
    except OSError as exc:
        raise SandboxStartError(
            f"cannot tell whether this root may give the sandbox a uid of its own: {exc.strerror or exc}"
        ) from None
    try:
        return uids.reserve()
    except uids.UidReservationError as exc:
        raise SandboxStartError(f"cannot reserve a uid for the sandbox: {exc}") from None


def _host_functions(given: Mapping[str, HostFunction] | None, coroutines: bool) -> dict[str, HostFunction]:
    """Checked ``host_functions``: a mapping of identifiers (not keywords, not starting with
    ``_``) to callables; coroutine functions only where an event loop can await them."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise TypeError(f"host_functions must be a mapping of names to callables, not {type(given).__name__}")
    out: dict[str, HostFunction] = {}
    for name, fn in given.items():
        if not isinstance(name, str):
            raise TypeError(f"host function names must be str, not {type(name).__name__}")
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ValueError(
                f"host function name {name!r} must be an identifier, not a keyword, not starting with '_'"
            )
        if not callable(fn):
            raise TypeError(f"host function {name!r} is not callable")
        if not coroutines and inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"host function {name!r} is a coroutine function: use AsyncSandbox, which awaits it"
            )
        out[name] = fn
    return out


def _check_pool(pool: object) -> None:
    if not (pool is None or isinstance(pool, SandboxPool | Default)):
        raise TypeError(f"pool must be a SandboxPool or None, not {type(pool).__name__}")


def _check_audit_log(audit_log: object) -> None:
    """An ``audit_log`` argument: None (the policy's log) or a non-empty path. ``""`` was taken
    for None and wrote to the default log, though the caller named a path (an unset variable)."""
    if audit_log is None:
        return
    if not isinstance(audit_log, str | os.PathLike):
        raise TypeError(f"audit_log must be a path or None, not {type(audit_log).__name__}")
    if not os.fspath(audit_log):
        raise ValueError("audit_log is an empty path (None means the policy's log)")


def _resolve(policy: Policy | str | Path) -> Policy:
    return policy if isinstance(policy, Policy) else load_policy(policy)


#: Limits a child may report for its own exception (labelling only; nothing is enforced on its word).
_CHILD_LIMITS: dict[str, LimitName] = {k: k for k in ("memory", "output", "processes", "files", "disk")}


def _short_of(exc: OSError) -> str:
    """What the host ran out of, for a message: descriptors said as such (the fix is a limit)."""
    if exc.errno == errno.EMFILE:
        return "this process is out of file descriptors (RLIMIT_NOFILE)"
    if exc.errno == errno.ENFILE:
        return "the system is out of file descriptors (fs.file-max)"
    return exc.strerror or str(exc)


def _close_popped(fds: list[int], index: int = -1) -> None:
    """``os.close(fds.pop(index))`` in one call into C (``map`` calls both; see
    :func:`_try_acquire`): an exception a signal handler raises (Ctrl-C) comes before both or
    after both, never between, where the descriptor would be out of the list and still open."""
    for _ in map(os.close, itertools.starmap(fds.pop, ((index,),))):
        pass


class _Child:
    """Host-side record of one live child."""

    def __init__(
        self,
        server: forkserver.ForkServer,
        pid: int,
        pidfd: int,
        sock: socket.socket,
        scratch: str,
        lease: uids.UidLease | None,
        max_frame: int,
    ):
        self.server = server  # the fork server that forked it (and reports its exit)
        #: The child's uid reservation, released once its death is confirmed.
        self.lease = lease
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock
        self.scratch = scratch
        self.layers: dict[str, str] = {}
        self.reader = protocol.FrameReader(max_frame, protocol.MAX_ITEMS)
        self.fds: list[int] = []
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)
        self.poll.register(pidfd, select.POLLIN)
        #: Opened by _spawn_ready once this record is held: an exception in the making of it
        #: (Ctrl-C) would lose descriptors opened here, with no record to close them from.
        self.rss = limits.RSSMeter()
        #: Its CPU seconds (the whole cgroup's where processes are allowed: see _spawn_ready).
        self.cpu = limits.CpuMeter(pid, None)
        self.spinner = Spinner(SPIN_SECONDS)
        self.spinner.window = 0.0  # no spinning for the hello: forking takes milliseconds
        self.dead = False
        #: Held while the pidfd is used to signal or closed: kill() from another thread is safe.
        self.fd_lock = threading.Lock()
        #: The host is done with the pid (the fork server may reap it; it may be reused).
        self.released = False
        #: The child's CPU clock when it last went idle: CPU past it counts towards the next execute.
        self.cpu_mark: float | None = None
        #: The RLIMIT_CPU (seconds) the host last asked for it (limits.set_cpu_backstop).
        self.backstop: int | None = None
        self.exit_info: forkserver.ExitInfo | None = None
        self.init_frame = b""  # sent ahead of the first request (Sandbox._send)
        #: Open descriptor of the scratch directory, holding its flock while the child lives.
        self.scratch_lock = -1
        #: Memfds of values sent to the child (a host function's result, a set_variable), kept
        #: until it answers: see :meth:`take_back`.
        self.lent: list[int] = []
        _children.add(self)

    def kill(self) -> None:
        """SIGKILL the child and its process group, also when the child already exited on
        its own (leftovers in its group). Safe until released: the pid is not reused before.
        Callable from any thread (:meth:`Sandbox.kill`)."""
        with self.fd_lock:
            if self.released:
                return
            if not self.dead:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
            self.dead = True

    def drop_fds(self) -> None:
        while self.fds:
            _close_popped(self.fds)

    def lend(self) -> list[int]:
        """The list a memfd the host fills and sends now is made in (``into`` of
        :func:`protocol.write_shm`: a Ctrl-C cannot lose it between its making and this
        record), emptied at :meth:`take_back`; so is every one lent before it, here. An
        honest child reads a reply before it sends its next call, so an earlier memfd is read
        by now; a child that pipelined 200 calls in one write would otherwise have had 200
        memfds (3 GiB, charged to the host) lent at once."""
        self.take_back()
        return self.lent

    def take_back(self) -> None:
        """The child answered after reading what it was lent (or is gone): empty and close the memfds.

        The host wrote their pages, so they are charged to the host, not to the child's memory
        cgroup; a child that kept a duplicate of each (guard off) held 1 GiB of host memory after
        55 calls. Truncating frees the pages whoever holds the descriptor."""
        while self.lent:
            with contextlib.suppress(OSError):
                os.ftruncate(self.lent[-1], 0)  # cut short here: truncated again next time
            _close_popped(self.lent)

    def pidfd_ready(self) -> bool:
        """True once the child has exited (its pidfd is readable); one ``poll`` call."""
        return any(fd == self.pidfd for fd, _ in self.poll.poll(0))

    def usable(self) -> bool:
        """A ready child that has said nothing since ``hello``, still runs (not stopped), on a
        live server."""
        return not self.dead and not self.poll.poll(0) and self.server.alive and not self._stopped()

    def _stopped(self) -> bool:
        """True when the child is stopped (SIGSTOP, a tracer): its first execute would wait out
        the wall limit and blame the code. False when its state cannot be read (``/proc`` mounted
        with ``hidepid``): the pool must not discard every child for that; an exited one is
        caught by the pidfd."""
        try:
            fd = os.open(f"/proc/{self.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            stat = os.read(fd, 512)
        except OSError:
            return False
        finally:
            os.close(fd)
        # "pid (comm) S ...": the comm may hold anything, the state follows its last ")".
        state = stat.rfind(b")") + 2
        return stat[state : state + 1] in (b"T", b"t")

    def discard(self) -> None:
        """Stop a child nobody uses (a pool's, or one that failed to start)."""
        _stop_child(self, graceful=False)

    def forget(self) -> None:
        """In a process forked from the host: close our copies of its descriptors, nothing else."""
        self.dead = True
        self.released = True  # the pid is the parent's to use and release
        if self.lease is not None:
            self.lease.forget()
            self.lease = None
        self.drop_fds()
        while self.lent:  # only our copies: the parent's sandbox may still be reading them
            os.close(self.lent.pop())
        self.rss.close()
        self.cpu.close()
        self.sock.close()
        if self.pidfd >= 0:  # (forgotten twice: at the fork, then by its sandbox's close)
            pidfd, self.pidfd = self.pidfd, -1
            with contextlib.suppress(OSError):
                os.close(pidfd)
        if self.scratch_lock >= 0:  # the lock stays with the parent's copy of the descriptor
            lock, self.scratch_lock = self.scratch_lock, -1
            os.close(lock)


#: Every child record of this process: a forked process forgets them all (_after_fork_in_child).
_children: weakref.WeakSet[_Child] = weakref.WeakSet()


#: How long the exit waits, for all children together, to see each one dead before it gives back
#: its uid (its fork server, stopped first, killed it: this takes milliseconds).
_EXIT_WAIT = 1.0


def _clean_up_at_exit() -> None:
    """At exit, once :func:`forkserver.shutdown` stopped the fork servers (and so every child):
    remove the scratch directory and release the uid lease of each child record no ``close()``
    reached (see :func:`forkserver._at_exit`). Only those of a child seen dead lose their uid;
    the record's descriptors are left to the exit (a daemon thread may still be using them)."""
    deadline = time.monotonic() + _EXIT_WAIT
    for child in list(_children):
        with contextlib.suppress(Exception):
            _clean_up_child_at_exit(child, deadline)


def _clean_up_child_at_exit(child: _Child, deadline: float) -> None:
    if child.scratch_lock < 0 and child.lease is None:
        return  # stopped by its sandbox or pool, or a record forgotten in a forked process
    child.kill()
    pidfd = child.pidfd
    if pidfd < 0 or not forkserver.pidfd_exited(pidfd, max(0.0, deadline - time.monotonic())):
        return  # being stopped by another thread, or not dead: its uid stays held until the exit
    lease, child.lease = child.lease, None
    if lease is not None:
        lease.release()
    if child.scratch_lock >= 0:  # removed, still locked: the lock goes with the exit
        remove_tree(child.scratch)


forkserver._on_exit.append(_clean_up_at_exit)


@dataclass(frozen=True)
class _Spec:
    """Everything a ready child depends on: the same for every sandbox of one policy."""

    policy: dict[str, Any]
    policy_sha256: str
    restricted: bool
    max_frame: int
    identity: bool
    cpu_seconds: float
    lifetime_cpu_seconds: float
    processes: bool  # max_processes > 0: the code may fork (its CPU is the whole cgroup's)


#: id(policy) -> (policy, its _Spec, the function that spawns a ready child of it). The policy
#: itself is kept so that its id cannot be reused while the entry lives; bounded by _SPECS_KEPT.
_specs: dict[int, tuple[Policy, _Spec, Callable[[], _Child]]] = {}
_SPECS_KEPT = 64


def _spec_for(policy: Policy) -> tuple[_Spec, Callable[[], _Child]]:
    """The spec of *policy* and its spawn function, computed once per policy object.

    A policy is frozen, so its dump and hash (about 100 us together) cannot change: sandboxes
    opened with the same object share them.
    """
    hit = _specs.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1], hit[2]
    spec = _Spec(
        policy.model_dump(mode="json"),
        policy.sha256,
        policy.python.guard == "restricted",
        protocol.frame_cap(policy.limits.max_message_mb * 1024 * 1024),
        policy.isolation.identity,
        policy.limits.cpu_seconds,
        policy.limits.lifetime_cpu_seconds,
        policy.limits.max_processes > 0,
    )
    make = functools.partial(_spawn_ready, spec)
    if len(_specs) >= _SPECS_KEPT:
        with contextlib.suppress(RuntimeError, StopIteration):  # another thread changed it: fine
            _specs.pop(next(iter(_specs)), None)  # the oldest entry
    _specs[id(policy)] = (policy, spec, make)
    return spec, make


def _choose_identity(spec: _Spec) -> uids.UidLease | None:
    """The uid/gid of the next child (one place, chosen at spawn time; held while it lives)."""
    return _reserve_identity() if spec.identity else None


def _check_utf8_path(path: str) -> None:
    """SandboxStartError unless the fork server, whose file names are UTF-8 whatever the host's
    locale, names *path* (the scratch directory, under TMPDIR) by the same bytes: a spawn request
    cannot carry the surrogates a non-UTF-8 name decodes to."""
    raw = os.fsencode(path)
    if raw.decode("utf-8", "replace") != path:
        raise SandboxStartError(
            f"the temporary directory {os.path.dirname(raw)!r} is not a UTF-8 path: set TMPDIR to one that is"
        )


def _check_read_paths(spec: _Spec) -> None:
    """SandboxStartError naming the first of the policy's ``read_paths`` that leads nowhere on
    this machine now (nothing there, a dangling link): the code would miss what the policy says
    it may read, and the child, which opens each entry itself, would only leave it out. (What
    is there is judged again by the child: see :func:`sandbox.isolation._check_read_paths`.)"""
    for path in spec.policy["isolation"]["read_paths"]:
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            real = os.path.realpath(path)
            how = "does not exist" if real == path else f"leads to {real!r}, which does not exist"
            raise SandboxStartError(
                f"policy {spec.policy['name']!r}: isolation.read_paths entry {path!r} {how} on this machine"
            ) from None
        except OSError:
            pass  # there, but not to be judged from here (a directory it is under is closed to us)


def _read_path_refused(spec: _Spec, path: str, number: int, reason: str) -> str:
    """The message of the SandboxStartError for a ``read_paths`` entry the child found there but
    could not open (see :class:`sandbox.isolation.ReadPathFailure`)."""
    code = errno.errorcode.get(number, str(number))
    return (
        f"policy {spec.policy['name']!r}: isolation.read_paths entry {path!r} cannot be opened by the "
        f"sandbox ({code}: {reason}), so neither the filesystem view nor Landlock could grant it: "
        "fix the entry or the permissions of the directories on its way, or remove it"
    )


class _Start:
    """The descriptors of a child being started (:func:`_spawn_ready`) before its :class:`_Child`
    record holds them: a process another thread forks meanwhile closes its copies (a pre-fork
    server that forks while its pool refills: each worker kept the channel's two ends and the
    scratch directory's lock, and the directory outlived the host)."""

    __slots__ = ("__weakref__", "lock", "pidfds", "socks")

    def __init__(self) -> None:
        self.socks: tuple[socket.socket, ...] = ()
        self.lock = -1
        #: The child's pidfd, put here by the fork server's record as it hands it over.
        self.pidfds: list[int] = []

    def forget(self) -> None:
        """In a forked process: close this process's copies (a descriptor its record, or the fork
        server's, closed already is closed again to no effect: nothing opens one in between)."""
        for sock in self.socks:
            sock.close()
        fds, self.lock = [self.lock, *self.pidfds], -1
        self.pidfds.clear()
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


#: Starts in flight in this process (see :class:`_Start`).
_starts: weakref.WeakSet[_Start] = weakref.WeakSet()


class _Retry(Exception):
    """The fork server went under a start: started again from the beginning, under *lease*."""

    def __init__(self, why: str, lease: uids.UidLease | Default | None) -> None:
        super().__init__(why)
        self.lease = lease


#: Seconds a failed start waits to see no process under a uid a dead fork server may have
#: forked a child under (it dies with its server: milliseconds) before it lets the uid go.
_EXPOSED_WAIT = 1.0


def _let_go_once_unused(lease: uids.UidLease) -> None:
    """Release *lease* once no process of the machine runs under its uid (a child a dead fork
    server forked under it is killed with that server); still in use after :data:`_EXPOSED_WAIT`,
    or not known: kept until the host exits (it must never go to another sandbox while one runs)."""
    deadline = time.monotonic() + _EXPOSED_WAIT
    while (used := uids.in_use(lease.uid)) is not False:
        if used is None or time.monotonic() >= deadline:
            _unconfirmed.append(lease)
            return
        time.sleep(0.01)
    lease.release()


def _spawn_ready(spec: _Spec) -> _Child:
    """Fork a child of *spec*'s policy and wait for its ``hello``: it then waits for ``init``.

    A fork server that went under the request (killed, shut down) is replaced and the start made
    again once, with a new channel and scratch directory (the dead server may have forked a
    child with the first) and, if the request had reached it, the same uid (a child forked under
    it may not be dead yet; if the second start fails too, the uid goes once no process uses it)."""
    _finish_dropped()
    lease: uids.UidLease | Default | None = DEFAULT  # DEFAULT: the start chooses one
    for attempt in (1, 2):
        start = _Start()
        _starts.add(start)
        try:
            return _spawn_started(spec, start, lease)
        except _Retry as retry:
            lease = retry.lease
            if attempt == 2:
                if isinstance(lease, uids.UidLease):
                    _let_go_once_unused(lease)  # maybe a dead server's child's
                raise SandboxStartError(f"the fork server died twice in a row: {retry}") from None
        finally:
            _starts.discard(start)
    raise AssertionError("unreachable")


def _spawn_started(spec: _Spec, start: _Start, chosen: uids.UidLease | Default | None) -> _Child:
    _check_read_paths(spec)
    _sweep_leftovers()
    lease: uids.UidLease | None = None
    scratch: str | None = None
    ours = theirs = None
    scratch_lock = -1
    # A lease given (a retry's) may be the uid of a child the dead server forked: never released here.
    inherited = not isinstance(chosen, Default)
    try:  # each step may fail for want of a descriptor, space or a process: undo the ones before
        lease = chosen if not isinstance(chosen, Default) else _choose_identity(spec)
        scratch = tempfile.mkdtemp(prefix="sandbox-")
        _check_utf8_path(scratch)
        ours, theirs = start.socks = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The pair belongs to the host's network namespace, and binding a name to a connected
        # socket is allowed: the child could bind its end to an abstract name the host's
        # processes then find taken (and probe which ones are). An automatic name now (unique,
        # unguessable to no purpose: nothing can connect to a connected socket) makes any
        # later bind fail with EINVAL.
        theirs.bind("")
        scratch_lock = start.lock = _lock_scratch(scratch)
        if os.fstat(scratch_lock).st_uid != os.geteuid():  # not the directory mkdtemp made
            replaced, scratch = scratch, None  # nor ours to remove
            raise OSError(errno.EPERM, f"{replaced} was replaced by another user's directory")
        if lease is not None:
            # On the descriptor, not by name: in a shared TMPDIR that is not sticky, another
            # user could rename the directory away and leave a link to any directory there.
            os.fchown(scratch_lock, lease.uid, lease.gid)
        config = {
            "policy": spec.policy,
            "policy_sha256": spec.policy_sha256,
            "scratch": scratch,
            "uid": lease.uid if lease else None,
            "gid": lease.gid if lease else None,
        }
        server, pid, pidfd, cpu_path = forkserver.spawn(
            spec.restricted, config, theirs.fileno(), start.pidfds
        )
    except BaseException as exc:
        # Descriptors first: removing the directory takes some (they may be what ran out).
        if ours is not None:
            ours.close()
        if theirs is not None:
            theirs.close()
        if scratch_lock >= 0:
            start.lock = -1
            os.close(scratch_lock)
        gone = exc if isinstance(exc, forkserver.ServerGone) else None
        # Kept: a lease a dead server may have forked a child under (the request reached it).
        keep = lease is not None and (inherited or (gone is not None and gone.sent))
        if lease is not None and not keep:
            lease.release()  # no child was started under it
        if scratch is not None:
            remove_tree(scratch)
        if gone is not None:
            raise _Retry(str(gone), lease if keep else DEFAULT) from None
        if keep and lease is not None:
            _let_go_once_unused(lease)  # a retry that failed otherwise
        if isinstance(exc, OSError):
            raise SandboxStartError(f"cannot prepare a sandbox child: {exc}") from None
        raise
    child: _Child | None = None
    # From here to the return, whatever fails (a Ctrl-C included) stops the child: nothing
    # else knows of it yet (the sandbox records it only once it is returned).
    try:
        # The child has its own copy of its end. Closed in here, not in a ``finally`` of the
        # spawn: a Ctrl-C landing in that close left the child, its pidfd, scratch and uid behind.
        theirs.close()
        child = _Child(server, pid, pidfd, ours, scratch, lease, spec.max_frame)
        child.scratch_lock = scratch_lock
        start.lock, start.socks = -1, ()  # the record's now (see _Start.forget)
        start.pidfds.clear()
        child.rss.open(pid)  # here, where child.discard() closes what it opened (see _Child.rss)
        try:
            hello = Sandbox._next_frame(child, _START_TIMEOUT)
        except (_Timeout, _Died, protocol.WireError) as exc:
            why = {_Timeout: "no hello in time", _Died: "it exited"}.get(type(exc), str(exc))
            raise SandboxStartError(f"the sandbox child did not start: {why}") from None
        if hello["t"] != "hello" or hello["version"] != protocol.PROTOCOL_VERSION:
            raise SandboxStartError(
                f"the sandbox child did not start: got {hello['t']!r} version {hello.get('version')}"
                f" (host speaks protocol {protocol.PROTOCOL_VERSION})"
            )
        if "read_path" in hello:
            raise SandboxStartError(
                _read_path_refused(spec, hello["read_path"], hello.get("errno", 0), hello["error"])
            )
        if "error" in hello:
            raise LayerUnavailableError(hello.get("layer", "?"), hello["error"])
        child.layers = {str(k): str(v) for k, v in hello["layers"].items()}
        child.spinner.window = SPIN_SECONDS
        if spec.processes and cpu_path is not None and child.layers.get("cgroup") == "active":
            # Processes the code forks burn CPU the child's own clock does not show (those it
            # waited for too): the whole cgroup is charged, once the child is known to be in
            # it. Without processes the clock is all of it, and cheaper to read (no system
            # call, no hand-over of the GIL).
            child.cpu = limits.CpuMeter(pid, cpu_path)
        # It now blocks until its init (see child.Child.init): its CPU counts towards its
        # first execute from here, its peak memory too, and the kernel backstop holds while it
        # waits (in a pool, maybe long). Done here, these cost the first execute nothing.
        _mark_cpu(child, spec)
        child.rss.reset()
        return child
    except BaseException:
        theirs.close()  # again: a close cut short is finished (closing twice does nothing)
        if child is not None:
            child.discard()
        else:  # cut short while its record was made
            start.lock = -1
            start.pidfds.clear()
            _abandon(server, pid, pidfd, ours, scratch, lease, scratch_lock)
        raise


def _settle_lease(lease: uids.UidLease | None, exited: forkserver.ExitInfo | None, pidfd: int) -> None:
    """Release the uid *lease* of a child that was killed once its death is confirmed: by its fork
    server's report (*exited*), or without one (the server died too) by its pidfd, readable once
    that very process has exited. Not known to be dead: the uid must never go to another sandbox."""
    if lease is None:
        return
    if exited is not None or forkserver.pidfd_exited(pidfd, 10.0):
        lease.release()
    else:
        _unconfirmed.append(lease)


def _abandon(
    server: forkserver.ForkServer,
    pid: int,
    pidfd: int,
    sock: socket.socket,
    scratch: str,
    lease: uids.UidLease | None,
    scratch_lock: int,
) -> None:
    """Stop a child spawned without a :class:`_Child` record (its making was cut short): as
    :func:`_stop_child` does, from the pieces."""
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    try:
        _settle_lease(lease, server.wait_exit(pid, EXIT_REPORT_WAIT), pidfd)
    finally:
        sock.close()
        os.close(pidfd)
        remove_tree(scratch)
        if scratch_lock >= 0:
            os.close(scratch_lock)


def _mark_cpu(child: _Child, spec: _Spec, owed: float = 0.0) -> float | None:
    """The child goes idle: CPU from now on counts towards its next execute, and so do *owed*
    seconds (used while idle before a set_variable or get_variable: see :func:`_idle_cpu`).
    The kernel backstop allows the child process itself at most one CPU budget (+1 s) more
    until then, where the host may move it (never past the child's lifetime budget)."""
    cpu = child.cpu.seconds()
    if cpu is not None:
        child.cpu_mark = cpu - owed
        own = limits.cpu_seconds(child.pid) if child.cpu.whole_cgroup else cpu  # RLIMIT_CPU's count
        child.backstop = limits.set_cpu_backstop(
            child.pid,
            own if own is not None else cpu,
            spec.cpu_seconds,
            spec.lifetime_cpu_seconds,
            child.backstop,
        )
    return cpu


def _idle_cpu(child: _Child) -> float:
    """CPU used since the child last went idle (a thread or a process the code left running):
    a set_variable or get_variable, which marks the child idle again when it is done (its own
    work is not the code's), carries it over to the next execute."""
    now = child.cpu.seconds()
    if now is None or child.cpu_mark is None:
        return 0.0
    return max(0.0, now - child.cpu_mark)


def _absorb(child: _Child, events: list[tuple[int, int]], accept_fd: bool = False) -> None:
    """Act on what ``child.poll`` reported: read what the child sent (raises _Died when it
    hung up), or note that it exited (what it wrote before is still read first)."""
    if any(fd == child.sock.fileno() for fd, _ in events):
        try:
            alive = protocol.recv_frames(child.sock, child.reader, child.fds)
        except OSError:
            alive = False
        if not alive:
            raise _Died()
        if child.lent:  # it wrote again, so it has read what it was lent
            child.take_back()
        if len(child.fds) > (1 if accept_fd else 0):
            raise protocol.WireError("child sent descriptors nobody asked for")
    else:  # pidfd readable: the child exited
        child.poll.unregister(child.pidfd)
        child.dead = True


def _collect_exit(child: _Child) -> forkserver.ExitInfo | None:
    """How *child* ended (it must be dead or killed); asked of its fork server once.

    This releases the pid: the fork server reaps the child only now, so
    nothing may address it by pid afterwards (``kill`` becomes a no-op).
    """
    if not child.released:
        asked: list[bool] = []
        try:
            with child.fd_lock:
                child.released = True
            child.exit_info = child.server.wait_exit(child.pid, EXIT_REPORT_WAIT, asked)
        except BaseException:
            # Cut short (Ctrl-C) before the release was sent: nothing would ever send it (the
            # record says released), and the server kept the child's zombie until it exited.
            if child.released and not asked:
                child.server.release_later(child.pid)
            raise
    return child.exit_info


@contextlib.contextmanager
def _sigpipe_held() -> Iterator[None]:
    """Writes to a pipe inside fail with BrokenPipeError only: SIGPIPE, which kills a host that
    did not ignore it (a C program embedding Python, a CLI that restored it), is blocked in this
    thread, and the one such a write raised is taken before it is unblocked. (Socket writes
    pass ``protocol.NO_SIGPIPE`` instead.)"""
    if not hasattr(signal, "sigtimedwait"):  # not Linux: left as it is
        yield
        return
    held = {signal.SIGPIPE}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if signal.SIGPIPE not in before:
            try:
                signal.sigtimedwait(held, 0)
            finally:  # unblocked even if an exception (a second Ctrl-C) comes in between
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


#: Children of sandboxes dropped while their stop was cut short (an exception a signal handler
#: raised inside a finalizer): finished at the next start, or at the exit (_clean_up_at_exit).
_dropped: set[_Child] = set()
_dropped_lock = threading.Lock()


def _stopped(child: _Child) -> bool:
    """Everything of *child* has been let go (what :func:`_stop_child` does, done to the end)."""
    return child.released and child.pidfd < 0 and child.scratch_lock < 0 and child.lease is None


def _finish_dropped() -> None:
    """Stop the children in ``_dropped`` (one thread at a time; the others go on)."""
    if not _dropped or not _dropped_lock.acquire(False):
        return
    try:
        for child in list(_dropped):
            with contextlib.suppress(Exception):
                _stop_child(child, graceful=False)
            if _stopped(child):
                _dropped.discard(child)
    finally:
        _dropped_lock.release()


def _stop_child(child: _Child, graceful: bool) -> None:
    if graceful and not child.dead:
        try:
            protocol.send_frame(child.sock, protocol.encode({"t": "bye"}), None, 0.5)
            with contextlib.suppress(KeyError):  # unregistered by a stop cut short just after
                child.poll.unregister(child.sock.fileno())
            if not child.poll.poll(500):
                child.kill()
        except OSError:
            child.kill()
    child.kill()
    exited = _collect_exit(child)
    if child.lease is not None:
        _settle_lease(child.lease, exited, child.pidfd)
        child.lease = None
    child.drop_fds()
    child.take_back()  # a leftover process of the child may still hold them
    child.rss.close()
    child.cpu.close()
    child.sock.close()
    if child.pidfd >= 0:  # each step may be done again: a stop cut short (Ctrl-C) is finished later
        pidfd, child.pidfd = child.pidfd, -1
        os.close(pidfd)
    remove_tree(child.scratch)
    if child.scratch_lock >= 0:  # removed first, then let go: a sweep never sees it unlocked
        lock, child.scratch_lock = child.scratch_lock, -1
        os.close(lock)


class _Using:
    """``with sb._lock, sb._using_cm as child``, after ``sb._admit()``: the sandbox's lock, a
    live child, the call counted in ``_CALLERS``.

    The lock is taken and released by the ``with`` statement of the caller itself, through
    the lock's own (C) ``__enter__``/``__exit__``: Python code runs no signal handler between
    taking the lock and the protection that releases it, so a Ctrl-C (or any exception a
    signal handler raises) landing anywhere in a call cannot leave the lock held by nobody,
    which would block the next call and ``close()`` for ever. What this object keeps is
    bookkeeping that a Ctrl-C at the wrong moment may leave half done, and that the next
    call therefore mends: ``sb._holder`` is cleared last on the way out, so a call that finds
    it set knows the previous one was cut short in its exit and stops the child (an answer
    may be on its way); ``_CALLERS`` is a set that close() and the next call clear again.

    *replace_exited*: a child found dead between calls is replaced at once
    (set/get_variable). ``execute`` does not ask for that: its result then says
    how the child ended (a CPU limit reached while idle, a crash), and the next
    call gets a fresh child with ``state_lost=True``.

    The sandbox keeps its two of these, and they refer to it weakly: a reference cycle put
    every sandbox its embedder dropped unclosed off until the garbage collector's next pass,
    its child process, scratch directory and uid with it (28 children at once in a loop of
    100 such sandboxes), and the collector then finalized its channel's socket before the
    sandbox's ``__del__`` closed it ("ResourceWarning: unclosed <socket.socket ...>"). The
    caller of a call holds the sandbox for as long as the call lasts.
    """

    __slots__ = ("_sb", "replace_exited")

    def __init__(self, sb: Sandbox, replace_exited: bool) -> None:
        self._sb = weakref.ref(sb)
        self.replace_exited = replace_exited

    @property
    def sb(self) -> Sandbox:
        sb = self._sb()
        assert sb is not None  # its caller holds it
        return sb

    def __enter__(self) -> _Child:
        sb = self.sb
        if sb._holder is not None:  # the last call's exit was cut short (see the class)
            child = sb._child
            if child is not None:
                child.kill()
        sb._holder = threading.get_ident()
        try:
            child = sb._ensure_child(self.replace_exited)
            _CALLERS.enter(sb.id)
        except BaseException:
            _CALLERS.leave(sb.id)
            sb._holder = None
            raise
        return child

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        sb = self.sb
        if kind is not None and not issubclass(kind, SandboxError):
            # Cut short in the middle of an exchange (Ctrl-C, a MemoryError): an answer may be
            # on its way that the next call would take for its own (get_variable returning
            # another variable's value). The child is stopped; the next call starts a fresh
            # one, and the next result says state_lost. (Our own errors leave it in step, or
            # have stopped it already.)
            child = sb._child
            if child is not None:
                child.kill()
        sb._holder = None  # the exit got this far (no call in between: nothing interrupts it)
        _CALLERS.leave(sb.id)
        # The lock is released next, by the caller's ``with`` (see the class).


class _GivenUp(SandboxError):
    """A set_variable/get_variable whose caller gave it up before it reached the child (an
    :class:`AsyncSandbox` call cancelled while its worker thread waited): nothing was done.
    Nobody sees it: the awaiting task has its ``CancelledError`` already."""


class _Transfer:
    """One :class:`AsyncSandbox` set_variable/get_variable, run by :class:`Sandbox` in a worker
    thread (its context carries this in ``_TRANSFER``). A cancellation lets the task go on at
    once while the thread cannot be stopped: left alone, the thread went on with the call,
    after calls the caller made since (a cancelled ``set_variable`` overwrote the value of a
    later one) or for the rest of its own deadline (a minute with a stopped child, holding the
    sandbox). Entered with the sandbox's lock and child held: a call given up before that does
    nothing (:class:`_GivenUp`), and one given up inside kills the child, as a cancelled execute
    does, so that the thread ends at once and no answer on its way is left for the next call."""

    __slots__ = ("gate", "given_up", "inside", "sb")

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.gate = threading.Lock()
        self.given_up = False
        self.inside = False

    def __enter__(self) -> None:
        with self.gate:
            if self.given_up:
                raise _GivenUp("the call was cancelled before it reached the child")
            self.inside = True

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        with self.gate:
            self.inside = False

    def give_up(self) -> None:
        """The awaiting task was cancelled (from the loop's thread)."""
        with self.gate:
            self.given_up = True
            if self.inside:  # its thread holds the sandbox, so the child is the one it talks to
                self.sb.kill()


#: Outside an :class:`AsyncSandbox` worker a plain call: nothing to check (a null context).
_TRANSFER: contextvars.ContextVar[_Transfer | contextlib.nullcontext[None]] = contextvars.ContextVar(
    "sandbox_transfer",
    default=contextlib.nullcontext(),  # noqa: B039 (no state: nothing to mutate)
)


#: Longest variable name set_variable/get_variable take (a frame carries it whole).
MAX_NAME = 1024


def _cut(text: str, limit: int) -> str:
    """*text* from the child, cut at *limit* characters (marked ``...``) where no output cap
    covers it."""
    return text if len(text) <= limit else text[:limit] + "..."


def _error_type(name: str | None) -> str | None:
    """The child's exception class name, cut: it is not covered by the output cap, and it goes
    into every audit line (a child could otherwise grow the log by megabytes per execute)."""
    return None if name is None else _cut(name, protocol.MAX_ERROR_TYPE)


def _child_error(msg: dict[str, Any], default: str) -> str:
    """The ``error`` text of a child's refusal for a host exception's message: cut to
    ``protocol.MAX_REFUSAL`` characters, its control characters escaped (``\\u001b``) as
    :func:`protocol.shown` escapes every peer text in a message. The child words it (the
    name of a class of the code's, a message it chose, or any text a child taken over sends):
    raw, it reached whatever terminal or log shows the exception."""
    if "error" not in msg:
        return default
    return protocol.shown(msg["error"], protocol.MAX_REFUSAL, quoted=False)


def _signal_name(sig: int) -> str:
    """SIGKILL for 9; the number for a signal Python has no name for (a real-time one)."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


class _Died(Exception):
    """The child hung up or exited while we waited for it."""


class _Timeout(Exception):
    """A deadline passed while we waited for a frame."""


class _Watched:
    """One execute's entry in :class:`_CpuWatch`: *calling* while a host function of it runs."""

    __slots__ = ("calling", "ex", "killed", "lock", "used")

    def __init__(self, ex: _Exec) -> None:
        #: None once the execute ended: the watch never touches its child again, and keeps
        #: nothing of it (the entry stays scheduled until its next due time, or until
        #: :meth:`_CpuWatch.remove` drops the ended ones).
        self.ex: _Exec | None = ex
        self.lock = threading.Lock()  # held while the watch reads the child's clock or kills it
        self.calling = False
        self.killed = False
        self.used = 0.0


#: Entries of :class:`_CpuWatch`'s schedule kept before ended executes' are dropped from it.
_WATCH_COMPACT_MIN = 64


class _CpuWatch:
    """The CPU limit while a host function runs.

    The host checks the child's CPU clock between the frames it waits for; while a host
    function of the execute ran (a model call, a whole child RLM) it waited for nothing and
    checked nothing: the child, whose main thread waits for the reply, burnt CPU in a signal
    handler or its threads for as long as the function ran (5.9 s of a 1 s ``cpu_seconds``
    during a 6 s call), bounded only by ``lifetime_cpu_seconds``. One daemon thread per host
    process watches the executes that have made a host call, each on the schedule of its own
    CPU checks, and kills a child that reaches ``cpu_seconds`` while a call of its runs (the
    execute then ends with ``limit="cpu"``, as at its next check). Executes that make no host
    call never come here.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._due: list[tuple[float, int, _Watched]] = []
        self._order = itertools.count()
        self._started = False
        #: The schedule's length at which :meth:`remove` next drops the entries of ended executes.
        self._compact_at = _WATCH_COMPACT_MIN

    def add(self, ex: _Exec) -> _Watched | None:
        """Watch *ex* until :meth:`remove`; None when no thread can be started (a pids limit):
        the CPU is then checked between frames only."""
        watched = _Watched(ex)
        with self._cond:
            if not self._started:
                try:
                    threading.Thread(target=self._run, name="sandbox-cpu-watch", daemon=True).start()
                except RuntimeError:
                    return None
                self._started = True
            heapq.heappush(self._due, (ex.next_cpu_check, next(self._order), watched))
            if self._due[0][2] is watched:  # due before whatever the thread waits for
                self._cond.notify()
        return watched

    def remove(self, watched: _Watched) -> None:
        """Stop watching. The entry leaves the schedule at its next due time, which is up to
        ``cpu_seconds`` away: the entries of ended executes are dropped whenever the schedule
        has doubled since they last were, so that it holds at most about twice the executes
        still watched (it held every execute that made a host call in the last ``cpu_seconds``:
        with ``cpu_seconds`` of an hour, some 190 bytes per such execute, without bound)."""
        with watched.lock:
            watched.ex = None
        with self._cond:
            if len(self._due) >= self._compact_at:
                self._due = [entry for entry in self._due if entry[2].ex is not None]
                heapq.heapify(self._due)  # the thread finds its next due time at its next wake-up
                self._compact_at = max(_WATCH_COMPACT_MIN, 2 * len(self._due))

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.perf_counter()
                    if self._due and self._due[0][0] <= now:
                        watched = heapq.heappop(self._due)[2]
                        break
                    self._cond.wait(self._due[0][0] - now if self._due else None)
            try:
                due = self._check(watched)
            except Exception:  # never the end of the watch for every other execute
                due = None
            if due is not None:
                with self._cond:
                    heapq.heappush(self._due, (due, next(self._order), watched))

    @staticmethod
    def _check(watched: _Watched) -> float | None:
        """When to look again, or None (the execute ended, or its child was killed)."""
        with watched.lock:
            ex = watched.ex
            if ex is None:
                return None
            used = ex.cpu_so_far()
            if watched.calling and used >= ex.lim.cpu_seconds:
                watched.killed = True
                watched.used = used
                ex.child.kill()
                return None
            return ex.cpu_check_after(used, time.perf_counter())


_cpu_watch: _CpuWatch | None = None
_cpu_watch_lock = threading.Lock()


def _the_cpu_watch() -> _CpuWatch:
    """This process's :class:`_CpuWatch` (a forked process makes its own: threads do not survive a fork)."""
    global _cpu_watch
    watch = _cpu_watch
    if watch is None or watch.pid != os.getpid():
        with _cpu_watch_lock:
            watch = _cpu_watch
            if watch is None or watch.pid != os.getpid():
                watch = _cpu_watch = _CpuWatch()
    return watch


class _Exec:
    """The bookkeeping of one ``execute``, whichever way the host waits for the child.

    :meth:`Sandbox._run` (a thread that polls) and :meth:`AsyncSandbox._run`
    (an event loop that is called back) drive it the same way: inside
    ``with ex:`` (its ``__exit__`` decides how an exception ends the execute)
    send :meth:`request`, call :meth:`sent`, then wait at most :meth:`timeout`
    seconds at a time for a frame, handing each to :meth:`received` (it
    returns a ``call`` to serve, or None once the cell is done) and each
    expired wait to :meth:`expired`; :meth:`finish` builds the result.
    """

    __slots__ = (
        "audit", "built", "child", "code", "cpu_rate", "cpu_start", "cpu_used", "done", "exec_id", "handed",
        "host_time", "idle", "killed_for", "lim", "next_cpu_check", "protocol_error", "sb", "state_lost", "t0",
        "watched",
    )  # fmt: skip

    def __init__(
        self, sb: Sandbox, child: _Child, code: str, state_lost: bool, handed: list[bool] | None = None
    ) -> None:
        self.sb = sb
        self.child = child
        self.code = code
        self.state_lost = state_lost
        self.lim = lim = sb.policy.limits
        sb._exec_id += 1
        self.exec_id = sb._exec_id
        # CPU counts from when the child last went idle: whatever ran in between
        # (a signal handler, a thread) is charged to this execute.
        cpu_now = child.cpu.seconds()
        self.cpu_start = start = child.cpu_mark if child.cpu_mark is not None else (cpu_now or 0.0)
        self.idle = max(0.0, (cpu_now if cpu_now is not None else start) - start)
        self.cpu_used = self.idle
        self.cpu_rate = 1 + lim.max_processes  # CPU seconds per wall second the code can burn at most
        self.t0 = time.perf_counter()
        self.host_time = 0.0  # spent in host functions: not counted against the wall limit
        self.next_cpu_check = self.t0 + max(0.0, lim.cpu_seconds - self.idle) / self.cpu_rate
        self.killed_for: LimitName | None = None
        self.done: dict[str, Any] | None = None
        self.protocol_error: str | None = None
        self.audit: dict[str, str] | None = None  # the audit line's fields known before the result
        self.built: ExecResult | None = None  # the result, once built (finish may be called twice)
        #: Given when an event loop drives this execute (nothing may wait for the audit log's lock
        #: there): set when the sandbox's lock is handed to a thread that releases it (:meth:`cancelled`).
        self.handed = handed
        self.watched: _Watched | None = None  # in the CPU watch since its first host call

    def __enter__(self) -> _Exec:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        """How the conversation with the child ended, for both drivers: it hung up or exited
        (``_Died``), a read or write ran out of time (``_Timeout``: the wall limit), it broke
        the protocol (``WireError``), or the execute was given up (any other exception:
        KeyboardInterrupt, asyncio cancellation, a host function's BaseException), which
        kills the child, is audited and goes on."""
        if self.watched is not None:
            _the_cpu_watch().remove(self.watched)
        if kind is None or issubclass(kind, _Died):
            return True
        if issubclass(kind, _Timeout):
            self.killed_for = "wall"
            return True
        if issubclass(kind, protocol.WireError):
            self.broke(str(exc))
            return True
        self.cancelled()
        return False

    def request(self) -> bytes | None:
        """The ``exec`` frame; None when the CPU spent while idle left this execute
        nothing (the child is then killed and the result says ``limit="cpu"``)."""
        if self.idle >= self.lim.cpu_seconds:
            self.killed_for = "cpu"
            self.child.kill()
            return None
        return protocol.encode(
            {"t": "exec", "id": self.exec_id, "code": self.code, "spin": _child_may_spin()}
        )

    def sent(self) -> None:
        """The request is on its way. The peak-RSS count starts now (the child cannot run
        any of the code before it has woken, read and compiled it), and what the audit
        line needs of the code is prepared while the child runs it."""
        self.child.rss.reset()
        self.audit = self.sb._audit_head(self.code)

    def wall_deadline(self) -> float:
        return self.t0 + self.host_time + self.lim.wall_seconds

    def timeout(self) -> float:
        """Seconds to wait for the next frame before :meth:`expired` must look."""
        return min(self.wall_deadline(), self.next_cpu_check) - time.perf_counter()

    def expired(self) -> bool:
        """A wait of :meth:`timeout` passed: True when a limit is reached (the child is
        killed); False to wait on (the CPU clock said there is budget left)."""
        now = time.perf_counter()
        used = self.cpu_so_far()
        if used >= self.lim.cpu_seconds:
            self.killed_for = "cpu"
        elif now >= self.wall_deadline():
            self.killed_for = "wall"
        else:
            self.next_cpu_check = self.cpu_check_after(used, now)
            return False
        self.cpu_used = used
        self.child.kill()
        return True

    def cpu_so_far(self) -> float:
        """CPU seconds this execute has used (what its child used since it went idle)."""
        return (self.child.cpu.seconds() or self.cpu_start) - self.cpu_start

    def cpu_check_after(self, used: float, now: float) -> float:
        """When the CPU clock is next worth a look, *used* seconds spent at *now*: the soonest
        the rest of ``cpu_seconds`` can be burnt (at most ``cpu_rate`` per second)."""
        return now + max(0.005, (self.lim.cpu_seconds - used) / self.cpu_rate)

    def call_started(self) -> None:
        """A host function of this execute is about to run: its child's CPU is watched meanwhile
        (see :class:`_CpuWatch`)."""
        watched = self.watched
        if watched is None:
            watched = self.watched = _the_cpu_watch().add(self)
            if watched is None:
                return
        with watched.lock:
            watched.calling = True

    def call_ended(self) -> bool:
        """The host function returned (or raised). True when the CPU watch killed the child
        meanwhile: the caller raises :class:`_Died` (nothing is replied), and the execute ends
        with ``limit="cpu"``."""
        watched = self.watched
        if watched is None:
            return False
        with watched.lock:
            watched.calling = False
            if not watched.killed:
                return False
        self.killed_for = "cpu"
        self.cpu_used = watched.used
        return True

    def received(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """A frame from the child: the ``call`` to serve, or None when the cell is done."""
        if msg["t"] == "done" and msg["id"] == self.exec_id:
            self.done = msg
            return None
        if msg["t"] != "call":
            raise protocol.WireError(f"unexpected {msg['t']!r} frame during execute")
        return msg

    def broke(self, why: str) -> None:
        """The child broke the protocol: it is killed and the result says so."""
        self.protocol_error = why
        self.child.kill()

    def finish(self) -> ExecResult:
        """The result, once its audit line is written."""
        result = self.try_finish(wait=True)
        assert result is not None
        return result

    def try_finish(self, wait: bool = False) -> ExecResult | None:
        """:meth:`finish`, or None when another writer holds the audit log's lock right now
        (an event loop then calls :meth:`finish` where waiting blocks nobody)."""
        result = self.built
        if result is None:
            self.child.drop_fds()
            result = self.built = self.sb._result(
                self.child, self.done, self.killed_for, self.protocol_error, time.perf_counter() - self.t0,
                self.cpu_start, self.cpu_used, self.state_lost,
            )  # fmt: skip
        try:
            if not self.sb._audit_line(self.code, result, head=self.audit, wait=wait):
                return None
        except AuditError as exc:  # the cell ran all the same: its result goes with the error
            exc.result = result
            raise
        return result

    def cancelled(self) -> None:
        """The execute was given up (asyncio cancellation, KeyboardInterrupt): the child is
        killed, and the audit line says the cell was cancelled."""
        self.child.kill()
        result = ExecResult(
            ok=False, error_type="Cancelled", error_message="the execute was cancelled; the child was killed",
            duration_s=time.perf_counter() - self.t0, state_lost=self.state_lost,
            policy_name=self.sb.policy.name, policy_sha256=self.sb._policy_sha, layers=dict(self.child.layers),
        )  # fmt: skip
        if self.sb._audit_line(self.code, result, "cancelled", self.audit, wait=self.handed is None):
            return
        # On an event loop, and another writer holds the log's lock: the cancellation goes on now,
        # and a thread of its own writes the line, then releases the sandbox (the next execute's
        # line comes after it). A failure to write it is the seq gap only: nobody awaits this one.
        assert self.handed is not None
        self.handed[0] = True
        sb = self.sb

        def write() -> None:
            try:
                with contextlib.suppress(AuditError):
                    sb._audit_line(self.code, result, "cancelled", self.audit)
            finally:
                sb._lock.release()

        try:
            threading.Thread(target=write, name="sandbox-audit").start()
        except RuntimeError:  # no thread to be had (a pids limit): wait here after all
            write()


class Sandbox:
    """A persistent Python REPL in a locked-down child process.

    >>> with Sandbox("default", host_functions={"double": lambda x: 2 * x}) as sb:
    ...     sb.set_variable("context", "some text")
    ...     r = sb.execute("print(len(context)); y = double(21)")
    ...     sb.get_variable("y")
    42

    *pool* supplies ready children: by default the process's shared
    :func:`sandbox.pool.default_pool`; pass your own :class:`SandboxPool`, or
    ``None`` to fork every child on demand.
    """

    #: Whether host functions may be coroutine functions (only where an event loop awaits them).
    _AWAITS_HOST_FUNCTIONS = False

    def __init__(
        self,
        policy: Policy | str | Path = "default",
        *,
        host_functions: Mapping[str, HostFunction] | None = None,
        audit_log: str | Path | None = None,
        pool: SandboxPool | Default | None = DEFAULT,
    ) -> None:
        self.policy = _resolve(policy)
        self.id = f"{_ids.getrandbits(64):016x}"
        self._host = _host_functions(host_functions, coroutines=self._AWAITS_HOST_FUNCTIONS)
        _check_pool(pool)
        _check_audit_log(audit_log)
        self._spec, self._make = _spec_for(self.policy)
        self._policy_sha = self._spec.policy_sha256
        self._pool = default_pool() if isinstance(pool, Default) else pool
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread inside execute/set/get (re-entrancy check)
        self._owner_pid = os.getpid()
        self._audit: AuditLog | None = None
        self._child: _Child | None = None
        self._layers: dict[str, str] = {}
        self.closed = False
        try:
            # The child first: a pooled one is woken by its init, and wakes up while the rest of
            # this set-up runs (see _start).
            self._start()
            lim = self.policy.limits
            self._max_message = lim.max_message_mb * 1024 * 1024
            self._max_frame = protocol.frame_cap(self._max_message)
            #: Largest value sent inside a frame (a larger one goes out of band): the frame
            #: around it must fit the child's cap, even with max_message_mb = 1.
            self._inline = protocol.inline_limit(self._max_frame)
            if self.policy.audit.enabled:
                path = audit_log or self.policy.audit.path or default_audit_path()
                self._audit = AuditLog(path)
            self._audit_fixed = encode_fields(
                {
                    "sandbox_id": self.id,
                    "policy": self.policy.name,
                    "schema_version": self.policy.schema_version,
                    "policy_sha256": self._policy_sha,
                }
            )
            self._using_cm = _Using(self, replace_exited=True)
            self._executing_cm = _Using(self, replace_exited=False)
            self._seq = 0
            self._exec_id = 0
            self._lost = False
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- public
    @property
    def audit_path(self) -> Path | None:
        """Where this sandbox's audit lines go (None when auditing is off)."""
        return self._audit.path if self._audit else None

    @property
    def layers(self) -> dict[str, str]:
        """Each protection layer of the current child -> 'active', 'off' or 'unavailable: <reason>'."""
        return dict(self._layers)

    @property
    def alive(self) -> bool:
        """True while the current child is running: False after a limit or crash killed it, and
        as soon as it has exited for any reason (its fork server died, someone killed it), before
        a call finds out. Safe from any thread. False in a process forked from the host: the
        child is the parent's."""
        child = self._child
        if child is None or child.dead or os.getpid() != self._owner_pid:
            return False
        # A poll object of its own (pidfd_exited): child.poll may not be used by two threads at
        # once (and select() cannot take a descriptor number of 1024 or more).
        try:
            return not forkserver.pidfd_exited(child.pidfd, 0)
        except (OSError, ValueError):  # its pidfd was closed (the sandbox closed meanwhile)
            return False

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def kill(self) -> None:
        """Kill the current child at once, from any thread, without waiting for a running ``execute``.

        That ``execute`` returns a result saying the child died; the next call
        starts a fresh child (``state_lost=True``). A no-op when no child runs, and in a
        process forked from the host (the child is the parent's: see :meth:`close`).
        """
        child = self._child
        if child is not None and os.getpid() == self._owner_pid:
            child.kill()

    def execute(self, code: str) -> ExecResult:
        """Run *code* in the persistent namespace and report what happened."""
        if not isinstance(code, str):
            raise TypeError(f"code must be str, not {type(code).__name__}")
        code = protocol.clean_text(code)  # what runs and what is audited: lone surrogates escaped
        self._check_size(code)
        self._admit()
        with self._lock, self._executing_cm as child:  # see _Using
            state_lost, self._lost = self._lost, False
            return self._run(child, code, state_lost)

    def _admit(self) -> None:
        """Refuse a call before it waits for the sandbox's lock: from a process forked from the
        host (the lock may have been held by a thread at fork), or from a host function of the
        call that holds it (it would wait for itself)."""
        if os.getpid() != self._owner_pid:
            raise SandboxClosedError(
                f"this sandbox belongs to process {self._owner_pid}; a forked process must open its own"
            )
        # (A holder left by a call whose exit was cut short does not hold the lock.)
        if self._holder == threading.get_ident() and self._lock.locked():
            raise SandboxError(
                "re-entrant use is not allowed: a host function called execute, set_variable,"
                " get_variable or close on the sandbox that is running it"
            )

    def _check_size(self, code: str) -> None:
        """ValueError when *code* cannot fit in one frame: the child would read the oversized frame
        as a broken protocol and exit, losing its variables. Nothing runs and nothing is audited."""
        room = self._max_frame - protocol.FRAME_ROOM
        if len(code) > room // 4 and (size := limits.utf8_size(code)) > room:
            raise ValueError(
                f"code is {size} bytes (UTF-8), over the {room} a request may carry"
                f" (min(limits.max_message_mb, 64 MiB), less room for the frame)"
            )

    def set_variable(self, name: str, value: Any, *, timeout: float | None = None) -> None:
        """Bind *name* to a copy of *value* (plain data: None, bool, int, float, str, bytes, list, dict).

        *timeout*: seconds the child has to take the value and acknowledge it
        (default: the policy's ``wall_seconds`` + 30); past it the child is
        killed and :class:`ChildTimeoutError` raised.
        """
        if (
            not isinstance(name, str)
            or len(name) > MAX_NAME
            or not name.isidentifier()
            or name.startswith("__")
        ):
            raise VariableError(f"{protocol.shown(name)} is not a valid variable name")
        # Large strings and bytes skip msgpack's copy: bytes and ASCII text stream from their own
        # buffer through a pipe, other text goes into a memfd as UTF-8 (see sandbox.protocol).
        direct = type(value) in (str, bytes) and len(value) > self._inline
        stream = protocol.stream_kind(value) if direct else None
        data = b""
        try:
            size = len(value) + 5 if direct else len(data := protocol.pack_value(value))
        except (protocol.WireError, TypeError, ValueError, OverflowError) as exc:
            raise VariableError(f"cannot set {name!r}: {exc}") from None
        if size > self._max_message:
            raise VariableError(
                f"cannot set {name!r}: {size} bytes is over the policy's max_message_mb ({self.policy.limits.max_message_mb} MiB)"
            )
        wait = self._variable_timeout(timeout)
        self._admit()
        with self._lock, self._using_cm as child, _TRANSFER.get():  # see _Using, _Transfer
            end = time.monotonic() + wait
            owed = _idle_cpu(child)
            if size <= self._inline:
                self._post(
                    child, protocol.encode_with_value({"t": "set", "name": name}, data), None, wait, name
                )
            elif stream is not None:
                self._stream_to(child, name, value, stream, end)
            else:
                try:  # the memfd is made in child.lent (a Ctrl-C cannot lose it) and closed from there
                    lent = child.lend()
                    fd, size = (
                        protocol.write_value_shm(value, lent)
                        if direct
                        else (protocol.write_shm(data, lent), size)
                    )
                except (protocol.WireError, UnicodeEncodeError) as exc:
                    child.take_back()
                    raise VariableError(f"cannot set {name!r}: {exc}") from None
                except OSError as exc:  # no memfd here (descriptors, memory): nothing was sent
                    child.take_back()
                    raise VariableError(
                        f"cannot set {name!r}: no memory file for it: {_short_of(exc)}"
                    ) from None
                if size > self._max_message:  # non-ASCII text is longer in bytes than in characters
                    child.take_back()
                    raise VariableError(
                        f"cannot set {name!r}: {size} bytes is over the policy's max_message_mb"
                    )
                self._post(child, protocol.encode({"t": "set", "name": name, "shm": size}), fd, wait, name)
            msg = self._expect(child, "ack", end - time.monotonic())
            self._mark_cpu(child, owed)
            if not msg["ok"]:
                raise VariableError(f"cannot set {name!r}: {_child_error(msg, 'refused by the child')}")

    def _stream_to(self, child: _Child, name: str, value: str | bytes, kind: str, end: float) -> None:
        """Send *value* to the child as a ``set`` through a pipe (see :func:`protocol.write_stream`),
        by *end* (monotonic) or the child is killed; its ``ack`` is left to read."""
        size = len(value)  # bytes, or an ASCII str: one byte per character
        ends: list[int] = []  # the pipe's [read, write] once made: each closed from here (_close_popped)
        try:
            r, w = protocol.open_stream(ends)
        except BaseException as exc:
            while ends:
                _close_popped(ends)
            if isinstance(exc, OSError):  # no pipe here: nothing was sent, the child is unharmed
                raise VariableError(f"cannot set {name!r}: no pipe for it: {_short_of(exc)}") from None
            raise
        try:
            try:
                frame = protocol.encode({"t": "set", "name": name, "stream": size, "kind": kind})
                self._post(child, frame, r, end - time.monotonic(), name)
            finally:
                _close_popped(ends, 0)  # the read end: the child has its own copy now
            with _sigpipe_held():
                protocol.write_stream(w, value, end - time.monotonic())
        except BrokenPipeError:
            pass  # the child stopped reading (no room for the value): its ack says why
        except TimeoutError:
            child.kill()
            raise ChildTimeoutError(
                f"the sandbox child did not take the value of {name!r} in time; it was killed"
            ) from None
        except OSError as exc:
            child.kill()
            raise ProtocolError(f"cannot stream the value of {name!r}: {exc.strerror or exc}") from None
        except BaseException:  # a half-sent value leaves the child out of step with us
            child.kill()
            raise
        finally:
            while ends:
                _close_popped(ends)

    def get_variable(self, name: str, *, timeout: float | None = None) -> Any:
        """A copy of the variable *name* (plain data only, else :class:`VariableError`).

        The value may decode to at most ``protocol.MAX_ITEMS`` elements (lists,
        dicts and their items), else :class:`VariableError`. *timeout*: as for
        :meth:`set_variable`.
        """
        if not isinstance(name, str):
            raise VariableError("variable name must be a str")
        if len(name) > MAX_NAME:
            raise VariableError(f"{protocol.shown(name)} is not a valid variable name")
        wait = self._variable_timeout(timeout)
        self._admit()
        with self._lock, self._using_cm as child, _TRANSFER.get():  # see _Using, _Transfer
            end = time.monotonic() + wait
            owed = _idle_cpu(child)
            self._post(
                child, protocol.encode({"t": "get", "name": protocol.clean_text(name)}), None, wait, name
            )
            msg = self._expect(child, "value", end - time.monotonic())
            self._mark_cpu(child, owed)
            if not msg["ok"]:
                child.drop_fds()
                error = _child_error(msg, f"cannot get {name!r}")
                if self._lost:  # the child was replaced since the last execute: say why it is missing
                    error += " (the sandbox's child was restarted: variables set before are gone)"
                raise VariableError(error)
            if ("shm" in msg or "stream" in msg) and not child.fds:
                self._fail(child, "value announced out of band without a descriptor")
            if "stream" in msg:
                value = self._stream_from(child, name, msg, end)
                self._mark_cpu(child, owed)  # the child was busy writing the stream until now
                return value
            if "shm" in msg:
                try:
                    return protocol.read_shm(  # closed from child.fds (drop_fds), as it arrived
                        child.fds[0],
                        msg["shm"],
                        self._max_message,
                        mapped=False,
                        max_items=protocol.MAX_ITEMS,
                        close=False,
                    )
                except protocol.BudgetError as exc:  # too big to decode here: the child lives on
                    raise VariableError(f"cannot get {name!r}: {exc}") from None
                except protocol.WireError as exc:
                    self._fail(child, str(exc))
                finally:
                    child.drop_fds()
            child.drop_fds()
            return msg.get("value")

    def _stream_from(self, child: _Child, name: str, msg: dict[str, Any], end: float) -> Any:
        """The value a ``value{stream, kind}`` frame announced, read from its pipe by *end*
        (monotonic): checked as :func:`protocol.read_stream` says, or the child is killed."""
        try:
            if "shm" in msg:
                self._fail(child, "value announced both in a memfd and in a stream")
            return protocol.read_stream(  # closed from child.fds (drop_fds), as it arrived
                child.fds[0],
                msg["stream"],
                msg.get("kind"),
                self._max_message,
                end - time.monotonic(),
                protocol.MAX_ITEMS,
                close=False,
            )
        except MemoryError:  # no room here: the child saw the pipe close and lives on
            raise VariableError(f"cannot get {name!r}: no memory for {msg['stream']} bytes") from None
        except protocol.BudgetError as exc:  # read whole, too big to decode here: the child lives on
            raise VariableError(f"cannot get {name!r}: {exc}") from None
        except TimeoutError:
            child.kill()
            raise ChildTimeoutError(
                f"the sandbox child did not send the value of {name!r} in time; it was killed"
            ) from None
        except protocol.WireError as exc:
            self._fail(child, str(exc))
        finally:
            child.drop_fds()

    def close(self) -> None:
        """Stop the child and delete its scratch directory. Idempotent.

        From another thread while a call runs: the child is killed at once (that call ends
        with a result saying the child died, or a ``ProtocolError`` for set/get_variable),
        then the sandbox is closed once the call has returned (a host function that is
        running is let finish)."""
        # Looked at first: in a process a host function forked, the one thread is the call's
        # (same ident, the lock copied held), which is no re-entrant use.
        if os.getpid() != self._owner_pid:  # inherited through os.fork(): the parent's child, not ours
            self.closed = True
            if self._child is not None:
                self._child.forget()
                self._child = None
            return
        if self._holder == threading.get_ident() and self._lock.locked():
            raise SandboxError("re-entrant use is not allowed: a host function closed its own sandbox")
        # Closed first: a call that takes the lock from now on finds it so (_ensure_child), and
        # one that holds it already shows in locked().
        self.closed = True
        if self._lock.locked():  # another thread's call runs: stop its cell
            self.kill()
        # The lock's own with: nothing can come between taking it and the release (see _Using).
        with self._lock:  # may be done again: a close cut short (Ctrl-C) is finished by the next
            _CALLERS.leave(self.id)  # left by a call whose exit was cut short, if any
            if self._child is not None:
                self._stop_child(self._child, graceful=True)
                self._child = None
            if self._audit is not None:
                self._audit.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_child", None) is None and getattr(self, "closed", True):
            return
        with contextlib.suppress(Exception):
            if os.getpid() != self._owner_pid:  # inherited through os.fork(): the parent's child
                self.closed = True
                child, self._child = self._child, None
                if child is not None:
                    child.forget()  # (its scratch directory is the parent's to remove)
                return
            child = self._child
            if child is not None:
                # Held strongly until stopped: a stop cut short here (a second Ctrl-C) left the
                # record to its weak references only, and nothing could finish it.
                _dropped.add(child)
            if not self.closed and self._lock.acquire(False):  # nobody else can take it now
                self._lock.release()
                self.close()
            else:
                # Closed already: a close() cut short (an exception a signal handler raised:
                # Ctrl-C, a request timeout's SIGALRM in a ``with`` block's exit), which nobody
                # calls again, had left the child (pid, pidfd, uid, scratch) for good. Or the
                # lock is held by a call nobody will finish: an AsyncSandbox execute whose task
                # was dropped pending with its event loop (the garbage collector finalizes the
                # two in any order; a thread in a call would keep us alive), and close() waited
                # for it for ever: at exit the host never ended. Either way the child is stopped
                # here, at once, without the lock.
                self.closed = True
                self._child = None
                if child is not None:
                    _stop_child(child, graceful=False)
            if child is not None and _stopped(child):
                _dropped.discard(child)

    # --------------------------------------------------------------- children
    def _ensure_child(self, replace_exited: bool = True) -> _Child:
        if self.closed:
            raise SandboxClosedError("this sandbox is closed")
        child = self._child
        if child is not None and not child.dead:
            if replace_exited and child.pidfd_ready():  # died between calls (a kill, its fork server's death)
                child.dead = True
            else:
                return child
        if child is not None:
            self._lost = True
            self._stop_child(child, graceful=False)  # cut short (Ctrl-C): the next call finishes it
            self._child = None
        child = self._start()
        if self.closed:  # close() from another thread while the child started: it killed the old one
            self._child = None
            self._stop_child(child, graceful=False)
            raise SandboxClosedError("this sandbox was closed while its child started")
        return child

    def _start(self) -> _Child:
        # What is this sandbox's own reaches the child in its init (a pooled child was forked
        # before the sandbox existed).
        init = protocol.encode({"t": "init", "host_functions": sorted(self._host)})
        child: _Child | None = None
        try:  # a child taken or spawned here is stopped if anything fails before it is ours
            child = self._pool.take(self._policy_sha, self._make) if self._pool is not None else None
            if child is not None:
                # A pooled child has slept since its hello: wake it now, so that its wake-up and
                # its first steps overlap with the rest of this set-up and the caller's next line
                # instead of delaying the first request. Its socket is empty: the small frame never
                # blocks. Its first answer comes late (it is still waking, then runs with cold
                # caches): the host blocks for it instead of spinning, which on a busy machine takes
                # the CPU the child needs (measured: 2.5 -> 1.9 ms to the first result with two
                # cores busy).
                child.spinner.skip = 1
                try:
                    protocol.send_frame(child.sock, init, None, 1.0)
                except OSError:
                    child.discard()
                    child = None
            if child is None:
                child = _spawn_ready(self._spec)
                # A child forked just now is awake: its init rides with the first request (_send).
                child.init_frame = init
            self._layers = child.layers  # (its CPU was marked when it said hello: _spawn_ready)
            self._child = child
            return child
        except BaseException:
            if child is not None and self._child is not child:
                child.discard()
            raise

    def _stop_child(self, child: _Child, graceful: bool) -> None:
        _stop_child(child, graceful)

    @staticmethod
    def _spec_of(policy: Policy | str | Path) -> _Spec:
        return _spec_for(_resolve(policy))[0]

    def _exit_info(self, child: _Child) -> forkserver.ExitInfo | None:
        return _collect_exit(child)

    def _mark_cpu(self, child: _Child, owed: float = 0.0) -> float | None:
        return _mark_cpu(child, self._spec, owed)

    def _variable_timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.policy.limits.wall_seconds + VARIABLE_TIMEOUT_EXTRA
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        return float(timeout)

    # ---------------------------------------------------------------- framing
    def _send(self, child: _Child, frame: bytes, fd: int | None, timeout: float) -> None:
        """Write one frame within *timeout* seconds; else kill the child and raise
        _Timeout (it stopped reading) or _Died (it hung up)."""
        if child.init_frame:  # the sandbox's init rides with its first request: one wake-up, not two
            frame, child.init_frame = child.init_frame + frame, b""
        try:
            protocol.send_frame(child.sock, frame, fd, timeout)
        except TimeoutError:
            child.kill()
            raise _Timeout() from None
        except OSError:
            child.kill()
            raise _Died() from None

    def _post(self, child: _Child, frame: bytes, fd: int | None, timeout: float, name: str) -> None:
        """:meth:`_send` for set_variable/get_variable: failures as the public errors."""
        try:
            self._send(child, frame, fd, timeout)
        except _Timeout:
            raise ChildTimeoutError(
                f"the sandbox child did not read the request for {name!r} within {timeout:g} s; it was killed"
            ) from None
        except _Died:
            raise ProtocolError(f"the sandbox child exited before it read the request for {name!r}") from None

    @staticmethod
    def _next_frame(child: _Child, timeout: float | None, accept_fd: bool = False) -> dict[str, Any]:
        """Next valid frame from the child; raises _Timeout, _Died or protocol.WireError.

        Descriptors are accepted only with *accept_fd* (an out-of-band ``value``
        is awaited), and then at most one.
        """
        # One deadline for the whole frame: a child that sends it a byte at a time does not
        # get a fresh timeout per byte.
        child.spinner.wait_started()
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            raw = next(child.reader, None)
            if raw is not None:
                return protocol.check(raw, "child")
            if child.dead:
                raise _Died()
            alone = _CALLERS.count <= 1
            events = child.poll.poll(0) if alone else []
            # Spin briefly before blocking (a blocked process on a VM takes 100+ us
            # to wake), adaptively and one host thread at a time: see sandbox.spin.
            if not events and alone and (budget := child.spinner.budget()) and _SLACK.free():
                spins: list[bool] = []  # [True] once this thread holds the slot (see _try_acquire)
                try:
                    _try_acquire(_SPIN_SLOT, spins)
                    if spins[0]:
                        child.spinner.spin_started()
                        spin_until = time.perf_counter() + budget
                        while not events and time.perf_counter() < spin_until:
                            events = child.poll.poll(0)
                finally:
                    if spins and spins[0]:
                        _SPIN_SLOT.release()
                if spins[0]:
                    child.spinner.spin_ended(bool(events))
            if not events:
                left = None if deadline is None else deadline - time.perf_counter()
                events = child.poll.poll(None if left is None else protocol.poll_ms(left))
                if events:
                    child.spinner.woke()  # would a spin have caught it?
                elif deadline is not None and time.perf_counter() < deadline:
                    continue  # a wait longer than poll takes (weeks): on to the deadline
            if not events:
                raise _Timeout()
            _absorb(child, events, accept_fd)

    def _expect(self, child: _Child, kind: str, timeout: float) -> dict[str, Any]:
        end = time.perf_counter() + timeout
        try:
            msg = self._next_frame(child, timeout, accept_fd=kind == "value")
        except _Timeout:
            child.kill()
            raise ChildTimeoutError(
                f"no {kind!r} from the sandbox child within {max(timeout, 0):.3g} s; it was killed"
            ) from None
        except _Died:
            child.kill()
            raise ProtocolError(f"the sandbox child exited while the host waited for {kind!r}") from None
        except protocol.BudgetError as exc:
            if kind != "value":
                self._fail(child, str(exc))
            child.drop_fds()  # the frame was consumed whole: the child may live on
            raise VariableError(f"cannot get the value: {exc}") from None
        except protocol.DescriptorsDropped as exc:
            # The value's pipe was dropped for want of a descriptor slot here: the child finds it
            # closed and goes on. The value is lost, the child is not, once its frame is read.
            if kind != "value":
                self._fail(child, str(exc))
            try:
                self._next_frame(child, max(0.0, end - time.perf_counter()), accept_fd=True)
            except (_Timeout, _Died, protocol.WireError):
                child.kill()
            child.drop_fds()
            raise VariableError(f"cannot get the value: {exc}") from None
        except protocol.WireError as exc:
            self._fail(child, str(exc))
        if msg["t"] != kind:
            self._fail(child, f"expected {kind!r}, got {msg['t']!r}")
        return msg

    def _fail(self, child: _Child, why: str) -> Any:
        child.kill()
        raise ProtocolError(f"sandbox child broke the protocol and was killed: {why}")

    # ---------------------------------------------------------------- execute
    def _run(self, child: _Child, code: str, state_lost: bool) -> ExecResult:
        """One execute, waiting for the child in this thread (the asyncio driver is
        :meth:`AsyncSandbox._run`; both drive the same :class:`_Exec`)."""
        ex = _Exec(self, child, code, state_lost)
        with ex:
            frame = ex.request()
            if frame is not None:
                self._send(child, frame, None, ex.lim.wall_seconds + DEADLINE_GRACE)
                ex.sent()
                while True:
                    try:
                        msg = self._next_frame(child, max(ex.timeout(), 0.0))
                    except _Timeout:
                        if ex.expired():
                            break
                        continue
                    call = ex.received(msg)
                    if call is None:
                        break
                    ex.host_time += self._serve_call(child, call, ex)
        return ex.finish()

    def _serve_call(self, child: _Child, msg: dict[str, Any], ex: _Exec) -> float:
        """Run the host function a ``call`` frame names and send its ``reply`` before the
        execute's wall deadline (shifted by the function's own time). Returns that time."""
        wall_deadline = ex.wall_deadline()
        fn = self._host.get(msg["fn"])
        h0 = time.perf_counter()
        ex.call_started()
        try:
            if fn is None:
                raise LookupError(f"no host function named {protocol.shown(msg['fn'])}")
            outcome: Any = fn(*msg["args"], **msg["kwargs"])
            failed = False
        except Exception as exc:  # the host function's failure is the child's HostFunctionError
            outcome, failed = exc, True
        finally:
            killed = ex.call_ended()
        if killed:
            raise _Died
        spent = time.perf_counter() - h0
        frame, fd = self._reply(child, msg, outcome, failed)
        self._send(child, frame, fd, wall_deadline + spent - time.perf_counter() + DEADLINE_GRACE)
        return spent

    def _reply(
        self, child: _Child, msg: dict[str, Any], outcome: Any, failed: bool
    ) -> tuple[bytes, int | None]:
        """The ``reply`` frame to a ``call``, and the memfd of a large value to send with it (lent
        to *child*: see :meth:`_Child.lend`)."""
        reply: dict[str, Any] = {"t": "reply", "id": msg["id"], "spin": _child_may_spin()}
        if not failed:
            try:
                data = protocol.pack_value(outcome)
            except Exception as exc:  # not plain data: the child gets the error
                outcome, failed = exc, True
        if failed:
            try:
                shown = str(outcome)
            except Exception:  # its __str__ fails: the child gets its type all the same
                shown = ""
            text = f"{type(outcome).__name__}: {shown}" if shown else type(outcome).__name__
            # Cut in UTF-8 bytes (a character may take 4), to fit the output cap and the frame.
            cap = min(self.policy.limits.max_output_bytes, self._inline)
            cut = protocol.clean_text(text).encode()[:cap].decode(errors="ignore")
            reply.update(ok=False, error=cut)
            return protocol.encode(reply), None
        if len(data) > self._max_message:
            reply.update(ok=False, error=f"{msg['fn']}() returned {len(data)} bytes, over max_message_mb")
            return protocol.encode(reply), None
        reply["ok"] = True
        if len(data) <= self._inline:
            return protocol.encode_with_value(reply, data), None
        try:
            fd = protocol.write_shm(data, child.lend())
        except OSError as exc:  # no memfd here (descriptors, memory): the child gets the error
            child.take_back()
            reply.update(
                ok=False, error=f"{msg['fn']}() returned a value the host cannot send: {_short_of(exc)}"
            )
            return protocol.encode(reply), None
        return protocol.encode({**reply, "shm": len(data)}), fd

    def _result(
        self,
        child: _Child,
        done: dict[str, Any] | None,
        killed_for: LimitName | None,
        protocol_error: str | None,
        duration: float,
        cpu_start: float,
        cpu_used: float,
        state_lost: bool,
    ) -> ExecResult:
        lim = self.policy.limits
        common: dict[str, Any] = {
            "duration_s": duration,
            "state_lost": state_lost,
            "policy_name": self.policy.name,
            "policy_sha256": self._policy_sha,
            "layers": dict(child.layers),
        }
        if done is not None:
            cpu = self._mark_cpu(child)
            rss = child.rss.peak()
            # The host enforces the output cap itself, over everything that comes back
            # together: the child's cut is a courtesy.
            texts, cut = limits.cap_texts(
                [done["stdout"], done["stderr"], done.get("error_message", ""), done.get("traceback", "")],
                lim.max_output_bytes + _OUTPUT_SLACK,
            )
            stdout, stderr = texts[0], texts[1]
            error_message = texts[2] if "error_message" in done else None
            traceback_text = texts[3] if "traceback" in done else None
            # limit="output" when printing was stopped by the cap (or the child ignored it);
            # a cut error text alone is only output_truncated: the code's exception ended it.
            output_cut = bool(done["truncated"]) or cut[0] or cut[1]
            truncated = output_cut or any(cut) or bool(done.get("cut"))
            hint = done.get("limit_hint")
            limit: LimitName | None = _CHILD_LIMITS.get(hint) if isinstance(hint, str) else None
            if output_cut:
                limit = limit or "output"
            return ExecResult(
                ok=bool(done["ok"]) and limit is None,
                stdout=stdout,
                stderr=stderr,
                error_type=_error_type(done.get("error_type")),
                error_message=error_message,
                traceback=traceback_text,
                limit=limit,
                output_truncated=truncated,
                cpu_s=max(0.0, (cpu if cpu is not None else cpu_start) - cpu_start),
                max_rss_bytes=rss or 0,
                **common,
            )
        # The child is gone (or being killed): learn how it ended from the fork server.
        child.kill()
        info = self._exit_info(child)
        cpu_total = info.cpu if info else cpu_start + cpu_used
        if info is not None and child.cpu.whole_cgroup and "cpu_ns" in info.events:
            cpu_total = info.events["cpu_ns"] / 1e9  # the cgroup's, as cpu_start is
        maxrss = info.maxrss if info else 0
        sig = info.signal if info else None
        limit = killed_for
        crashed = False
        error_type: str | None
        if protocol_error is not None:
            error_type, message = (
                "ProtocolError",
                f"sandbox child broke the protocol and was killed: {protocol_error}",
            )
        elif killed_for == "cpu":
            error_type, message = (
                "CPULimitExceeded",
                f"CPU time limit of {lim.cpu_seconds:g} s exceeded; the child was killed",
            )
        elif killed_for == "wall":
            error_type, message = (
                "WallLimitExceeded",
                f"wall-time limit of {lim.wall_seconds:g} s exceeded; the child was killed",
            )
        elif sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and cpu_total - cpu_start >= lim.cpu_seconds):
            limit, error_type, message = (
                "cpu",
                "CPULimitExceeded",
                f"CPU time limit of {lim.cpu_seconds:g} s exceeded (kernel)",
            )
        elif (
            sig in (signal.SIGXCPU, signal.SIGKILL)
            and not (info is not None and info.events.get("oom_kill"))
            and cpu_total >= 0.8 * lim.lifetime_cpu_seconds
        ):  # the kernel's limit counts on the CPU clock; wait4's rusage comes out up to ~10% lower
            limit, error_type, message = (
                "cpu",
                "CPULimitExceeded",
                f"the child used up its lifetime CPU budget of {lim.lifetime_cpu_seconds:g} s"
                " (limits.lifetime_cpu_seconds); the next execute starts a fresh one",
            )
        elif sig == signal.SIGXFSZ:
            limit, error_type, message = "disk", "FileSizeLimitExceeded", "file size limit exceeded"
        elif sig is not None and (
            maxrss >= 0.8 * lim.memory_mb * 1024 * 1024 or (info is not None and info.events.get("oom_kill"))
        ):  # the memory cgroup's OOM killer also counts memory the RSS does not show (tmpfs, memfd)
            limit, error_type, message = (
                "memory",
                "MemoryLimitExceeded",
                f"memory limit of {lim.memory_mb} MiB reached; the child was killed by signal {_signal_name(sig)}",
            )
        elif sig is None and info is not None and info.exit_code == protocol.EXIT_OUT_OF_MEMORY:
            limit, error_type, message = (
                "memory",
                "MemoryLimitExceeded",
                f"memory limit of {lim.memory_mb} MiB reached; the child could not go on",
            )
        elif sig is not None:
            crashed = True
            error_type, message = "ChildCrashed", f"the sandbox child died of signal {_signal_name(sig)}"
        else:
            crashed = True
            if info is None:  # its fork server is gone (killed), and with it the exit report
                error_type, message = "ChildExited", "the sandbox child is gone (its fork server died)"
            else:
                error_type, message = "ChildExited", f"the sandbox child exited (status {info.exit_code})"
        return ExecResult(
            ok=False,
            error_type=error_type,
            error_message=message,
            limit=limit,
            crashed=crashed,
            cpu_s=max(0.0, cpu_total - cpu_start),
            max_rss_bytes=maxrss,
            **common,
        )

    def _audit_head(self, code: str) -> dict[str, str] | None:
        """The audit line's fields that do not depend on the result, encoded (see
        :func:`sandbox.audit.encode_fields`); None when auditing is off."""
        if self._audit is None:
            return None
        return {
            **self._audit_fixed,
            **encode_fields(
                {
                    "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "code_sha256": hashlib.sha256(code.encode()).hexdigest(),
                    "code": code,
                }
            ),
        }

    def _audit_line(
        self,
        code: str,
        result: ExecResult,
        outcome: str | None = None,
        head: dict[str, str] | None = None,
        wait: bool = True,
    ) -> bool:
        """Append the line of one execute (*head*: from :meth:`_audit_head` when the cell was sent).
        ``wait=False``: False, and nothing written, when another writer holds the log's lock now."""
        if self._audit is None:
            return True
        seq = self._seq + 1
        if outcome is None:
            if result.ok:
                outcome = "ok"
            elif result.limit:
                outcome = f"limit:{result.limit}"
            elif result.crashed:
                outcome = "crashed"
            else:
                outcome = f"error:{result.error_type}"
        try:
            written = self._audit.append(
                {
                    "seq": seq,
                    "outcome": outcome,
                    "duration_s": round(result.duration_s, 6),
                    "cpu_s": round(result.cpu_s, 6),
                    "max_rss_bytes": result.max_rss_bytes,
                },
                head or self._audit_head(code),
                wait=wait,
            )
        except AuditError:
            self._seq = seq  # a gap in seq marks the line that could not be written
            raise
        if written is None:
            return False
        self._seq = seq
        return True


#: The AsyncSandbox whose host function this context runs, in a list emptied when the call
#: returns (tasks the function started inherit the list: after the call, theirs is no re-entry).
_IN_HOST_CALL: contextvars.ContextVar[list[AsyncSandbox]] = contextvars.ContextVar(
    "sandbox_in_host_call",
    default=[],  # noqa: B039 (never mutated: each call sets its own list)
)


class AsyncSandbox:
    """The asyncio twin of :class:`Sandbox`: the same methods, as coroutines.

    ``execute`` runs on the event loop itself: the request is written without
    blocking and the answer awaited through the loop's reader callbacks, so
    one loop drives many sandboxes with no thread per call. Work that may
    block (starting or replacing a child, ``set_variable``/``get_variable``,
    sync host functions) runs in the loop's default executor; ``close`` in a
    thread of its own.
    Host functions may be coroutine functions; they run on the loop that
    called ``execute``. Calls on one object are served one at a time; concurrent
    first calls share one child. Cancelling an ``execute`` (``task.cancel()``,
    ``asyncio.timeout``) kills the child running the cell, and the next result
    says ``state_lost=True``. The object may be used from successive event
    loops (``asyncio.run`` twice), one loop at a time.
    """

    def __init__(
        self,
        policy: Policy | str | Path = "default",
        *,
        host_functions: Mapping[str, HostFunction] | None = None,
        audit_log: str | Path | None = None,
        pool: SandboxPool | Default | None = DEFAULT,
    ) -> None:
        self.policy = _resolve(policy)
        self._host = _host_functions(host_functions, coroutines=True)
        _check_pool(pool)
        _check_audit_log(audit_log)
        self._audit_log = audit_log
        self._pool = pool
        self._sync: Sandbox | None = None
        self._make_lock = threading.Lock()
        self._serial: tuple[asyncio.AbstractEventLoop, _Turn] | None = None
        self._closed = False

    def _make(self) -> Sandbox:
        with self._make_lock:  # concurrent first calls wait here and share one sandbox
            if self._closed:
                raise SandboxClosedError("this sandbox is closed")
            if self._sync is None:
                self._sync = _LoopSandbox(
                    self.policy, host_functions=self._host, audit_log=self._audit_log, pool=self._pool
                )
            return self._sync

    def _turn(self) -> _Turn:
        """The lock that serves this object's calls one at a time, on the running loop."""
        loop = asyncio.get_running_loop()
        if self._serial is None or self._serial[0] is not loop:
            self._serial = (loop, _Turn(loop))
        return self._serial[1]

    async def _sandbox(self) -> Sandbox:
        if self._closed:
            raise SandboxClosedError("this sandbox is closed")
        if self in _IN_HOST_CALL.get():
            raise SandboxError(
                "re-entrant use is not allowed: a host function called this AsyncSandbox while it runs the function"
            )
        sb = self._sync
        if sb is None:
            sb = await _to_thread(self._make)
        return sb

    async def start(self) -> AsyncSandbox:
        await self._sandbox()
        return self

    @property
    def layers(self) -> dict[str, str]:
        return self._sync.layers if self._sync else {}

    @property
    def alive(self) -> bool:
        return self._sync is not None and self._sync.alive

    @property
    def pid(self) -> int | None:
        """The current child's pid (None before the first call starts one)."""
        return self._sync.pid if self._sync else None

    @property
    def audit_path(self) -> Path | None:
        """Where the audit lines go (None when auditing is off, or before the first call)."""
        return self._sync.audit_path if self._sync else None

    async def kill(self) -> None:
        """:meth:`Sandbox.kill`: stop the running cell now (its ``execute`` reports the child's
        death; the next call starts a fresh child). Does not wait for the sandbox's turn."""
        if self._sync is not None:
            self._sync.kill()

    async def execute(self, code: str) -> ExecResult:
        """Run *code* in the persistent namespace and report what happened."""
        if not isinstance(code, str):
            raise TypeError(f"code must be str, not {type(code).__name__}")
        code = protocol.clean_text(code)  # as Sandbox.execute
        sb = await self._sandbox()
        sb._check_size(code)
        async with self._turn():
            child = await self._hold(sb)
            handed = [False]  # set by _run when a worker thread it leaves behind releases the lock
            try:
                _CALLERS.enter(sb.id)
                state_lost, sb._lost = sb._lost, False
                return await self._run(sb, child, code, state_lost, handed)
            finally:
                try:
                    _CALLERS.leave(sb.id)
                finally:  # released even if an exception lands in the bookkeeping
                    if not handed[0]:
                        sb._lock.release()

    async def _hold(self, sb: Sandbox) -> _Child:
        """Take *sb*'s own lock and a live child without blocking the loop."""
        if os.getpid() != sb._owner_pid:
            raise SandboxClosedError(
                f"this sandbox belongs to process {sb._owner_pid}; a forked process must open its own"
            )
        loop = asyncio.get_running_loop()
        held: list[bool] = []  # whether this call holds sb._lock (see _try_acquire)
        try:
            _try_acquire(sb._lock, held)
            if not held[0]:  # only a close() from another thread holds it
                await _in_thread(loop, sb._lock.acquire, sb._lock.release)
                held[0] = True  # (no signal handler runs between the await's end and this)
            child = sb._child
            if sb.closed or child is None or child.dead:  # replacing a child may wait for its server
                child = await _in_thread(loop, functools.partial(sb._ensure_child, False), sb._lock.release)
            return child
        except asyncio.CancelledError:
            raise  # _in_thread releases the lock once the thread is done with it
        except BaseException:
            if held and held[0]:
                sb._lock.release()
            raise

    async def _run(
        self, sb: Sandbox, child: _Child, code: str, state_lost: bool, handed: list[bool]
    ) -> ExecResult:
        """:meth:`Sandbox._run` on the event loop: the same :class:`_Exec`, awaited instead of polled."""
        ex = _Exec(sb, child, code, state_lost, handed)
        with ex:  # a cancellation ends here too: the cell must not run on
            frame = ex.request()
            if frame is not None:
                await _send_async(sb, child, frame, None, ex.lim.wall_seconds + DEADLINE_GRACE)
                ex.sent()
                while True:
                    try:
                        msg = await _next_frame_async(child, max(ex.timeout(), 0.0))
                    except _Timeout:
                        if ex.expired():
                            break
                        continue
                    call = ex.received(msg)
                    if call is None:
                        break
                    ex.host_time += await self._serve_call(sb, child, call, ex)
                    # A turn for the loop's other tasks between calls: a coroutine host function
                    # that does not suspend, and calls already read (a child that wrote 5,000 at
                    # once), would otherwise be served back to back (400 ms stalls measured).
                    await asyncio.sleep(0)
        # Finished on the loop when nothing can make that wait; else in a thread: how the child
        # ended is asked of its fork server, and another writer may hold the audit log's lock.
        if ex.done is not None:
            done = ex.try_finish()
            if done is not None:
                return done
        try:
            result: ExecResult = await _in_thread(asyncio.get_running_loop(), ex.finish, sb._lock.release)
            return result
        except asyncio.CancelledError:  # the result is built (and audited) all the same,
            handed[0] = True  # and the sandbox stays locked until then
            raise

    async def _serve_call(self, sb: Sandbox, child: _Child, msg: dict[str, Any], ex: _Exec) -> float:
        """:meth:`Sandbox._serve_call` on the loop: coroutine host functions are awaited here,
        others run in the executor so that they cannot block the loop."""
        wall_deadline = ex.wall_deadline()
        fn = self._host.get(msg["fn"])
        h0 = time.perf_counter()
        calling = [self]
        token = _IN_HOST_CALL.set(calling)  # this task's context only: a re-entrant call can tell
        ex.call_started()
        try:
            if fn is None:
                raise LookupError(f"no host function named {protocol.shown(msg['fn'])}")
            if inspect.iscoroutinefunction(fn):
                outcome: Any = await fn(*msg["args"], **msg["kwargs"])
            else:
                outcome = await _to_thread(fn, *msg["args"], **msg["kwargs"])
            failed = False
        except Exception as exc:  # the host function's failure is the child's HostFunctionError
            outcome, failed = exc, True
        finally:
            calling.clear()
            # ValueError: the coroutine is closed outside the task's context (its loop was closed
            # without cancelling it, and the garbage collector closes it): nothing to reset there.
            with contextlib.suppress(ValueError):
                _IN_HOST_CALL.reset(token)
            killed = ex.call_ended()
        if killed:
            raise _Died
        spent = time.perf_counter() - h0
        frame, fd = sb._reply(child, msg, outcome, failed)
        await _send_async(sb, child, frame, fd, wall_deadline + spent - time.perf_counter() + DEADLINE_GRACE)
        return spent

    async def set_variable(self, name: str, value: Any, *, timeout: float | None = None) -> None:
        """:meth:`Sandbox.set_variable`, in a worker thread. Cancelled before the value reached
        the child, it does nothing; cancelled while it was on its way, the child is killed (the
        next result says ``state_lost=True``), as for a cancelled :meth:`execute`."""
        sb = await self._sandbox()
        async with self._turn():
            await _transfer(sb, functools.partial(sb.set_variable, name, value, timeout=timeout))

    async def get_variable(self, name: str, *, timeout: float | None = None) -> Any:
        """:meth:`Sandbox.get_variable`, in a worker thread; cancelled, as :meth:`set_variable`."""
        sb = await self._sandbox()
        async with self._turn():
            return await _transfer(sb, functools.partial(sb.get_variable, name, timeout=timeout))

    async def close(self) -> None:
        """Stop the child. Idempotent. A start whose caller was cancelled (``asyncio.timeout``
        around ``start()``) may still be building the sandbox in a worker thread: close waits
        for it and stops that child too, and nothing starts one afterwards.

        From another task while a call runs: as :meth:`Sandbox.close` from another thread, the
        child is killed at once (that call ends with a result saying the child died, or a
        ``ProtocolError`` for set/get_variable), and the sandbox is closed once the call has
        returned. Not in the object's turn: waiting for it waited out the running cell (up to
        ``wall_seconds``). Cancelled, the close still goes on in its worker thread.

        From one of its own host functions: :class:`SandboxError`, as for the sync
        :meth:`Sandbox.close` (it would wait for its own execute to end, for ever: time in
        host functions is not wall time)."""
        if self in _IN_HOST_CALL.get():
            raise SandboxError("re-entrant use is not allowed: a host function closed its own sandbox")
        self._closed = True
        # In a thread of its own, not the loop's executor: it waits for the running call's end,
        # which needs an executor thread to build that call's result (see _in_own_thread).
        await _in_own_thread(asyncio.get_running_loop(), self._close_sync)

    def _close_sync(self) -> None:
        with self._make_lock:  # a start still under way finishes first
            sb = self._sync
        if sb is not None:
            sb.close()

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _LoopSandbox(Sandbox):
    """The :class:`Sandbox` inside an :class:`AsyncSandbox`, whose event loop awaits coroutine
    host functions."""

    _AWAITS_HOST_FUNCTIONS = True


class _Turn:
    """``async with``: an :class:`asyncio.Lock` whose release says nothing when the loop is
    closed. A call left pending on a loop closed without cancelling it is closed by the garbage
    collector, and its release woke the next waiting call through that loop: "Exception
    ignored in: <coroutine AsyncSandbox.get_variable> ... RuntimeError: Event loop is closed"."""

    __slots__ = ("lock", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = asyncio.Lock()

    async def __aenter__(self) -> None:
        await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        try:
            self.lock.release()
        except RuntimeError:
            if not self.loop.is_closed():
                raise


def _try_acquire(lock: threading.Lock, outcome: list[bool]) -> None:
    """``lock.acquire(blocking=False)``, its outcome appended to *outcome*.

    A signal handler runs as a call into C returns, before the caller can store what it
    returned: a Ctrl-C landing just after ``acquire`` succeeded lost the lock, held by nobody
    for good (every later call, and ``close()``, waited for it). Here C calls ``acquire`` and
    stores its outcome (``map``, ``list.extend``), so such an exception comes once it is known.
    """
    outcome.extend(map(lock.acquire, (False,)))


def _no_op() -> None:
    return None


async def _in_thread(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], Any], on_cancel: Callable[[], None]
) -> Any:
    """``fn()`` in the executor. If the awaiting task is cancelled, *on_cancel* runs once
    ``fn`` has returned (the thread cannot be stopped), and the cancellation goes on.

    *on_cancel* runs in that thread, or here when ``fn`` was already done: never
    through the loop, which may be closed by the time ``fn`` returns.
    """
    gate = threading.Lock()
    state = {"done": False, "abandoned": False}

    def run() -> Any:
        try:
            return fn()
        finally:
            with gate:
                state["done"] = True
                abandoned = state["abandoned"]
            if abandoned:
                on_cancel()

    try:
        fut = loop.run_in_executor(None, run)
    except RuntimeError:
        # The executor takes no more work: the interpreter is exiting (a loop in a daemon thread
        # whose execute saw its child stopped at exit) or its owner shut it down. Raised, an
        # execute's result was never built: the cell had no audit line, the caller a RuntimeError.
        # Done here, on the loop's own thread, instead.
        return run()
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with gate:
            state["abandoned"] = True
            done = state["done"]
        if done:
            on_cancel()
        # Nobody awaits it now: what it raises later (an AuditError) is not "never retrieved".
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


async def _to_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``asyncio.to_thread(fn, *args, **kwargs)``; once the loop's executor takes no more work
    (see :func:`_in_thread`), the call runs here, on the loop's thread, instead of raising."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    try:
        fut = asyncio.get_running_loop().run_in_executor(None, call)
    except RuntimeError:
        return call()
    return await fut


async def _in_own_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a new thread; if the awaiting task is cancelled, it still runs to its end.

    For a call that waits for another call's end, which may need the loop's executor (an
    execute's result is built there): run there, as many of them at once as the executor
    has threads took them all, and the calls they waited for never got one."""
    fut: asyncio.Future[Any] = loop.create_future()

    def deliver(outcome: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(outcome)
        else:
            fut.set_exception(error)

    def run() -> None:
        try:
            outcome, error = fn(), None
        except BaseException as exc:
            outcome, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it now
            loop.call_soon_threadsafe(deliver, outcome, error)

    try:
        threading.Thread(target=run, name="sandbox-close").start()
    except RuntimeError:  # no thread to be had: the executor's, then
        return await _in_thread(loop, fn, _no_op)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        # Nobody awaits it now: what it raises later (an AuditError) is not "never retrieved".
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


async def _transfer(sb: Sandbox, call: Callable[[], Any]) -> Any:
    """*call* (*sb*'s set_variable or get_variable) in a worker thread, given up with the
    awaiting task: see :class:`_Transfer`."""
    ticket = _Transfer(sb)
    token = _TRANSFER.set(ticket)  # _to_thread runs the call in a copy of this context
    try:
        return await _to_thread(call)
    except asyncio.CancelledError:
        ticket.give_up()
        raise
    finally:
        # ValueError: the coroutine is closed outside the task's context (its loop was closed
        # without cancelling it, and the garbage collector closes it): nothing to reset there.
        with contextlib.suppress(ValueError):
            _TRANSFER.reset(token)


async def _send_async(sb: Sandbox, child: _Child, frame: bytes, fd: int | None, timeout: float) -> None:
    """:meth:`Sandbox._send` from the event loop: one write that does not block (the child
    reads its requests as they come, so one almost always takes the whole frame); what
    is left goes out from a worker thread, with the same deadline."""
    if child.init_frame:
        frame, child.init_frame = child.init_frame + frame, b""
    try:
        if fd is None:
            sent = child.sock.send(frame, socket.MSG_DONTWAIT | protocol.NO_SIGPIPE)
        else:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            sent = child.sock.sendmsg([frame], rights, socket.MSG_DONTWAIT | protocol.NO_SIGPIPE)
    except BlockingIOError:
        sent = 0
    except OSError:
        child.kill()
        raise _Died() from None
    if sent < len(frame):
        await _to_thread(sb._send, child, frame[sent:], fd if sent == 0 else None, timeout)


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


async def _next_frame_async(child: _Child, timeout: float) -> dict[str, Any]:
    """:meth:`Sandbox._next_frame` from the event loop: woken by the loop when the child's
    socket or pidfd becomes readable (no spinning: the loop has other work)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout  # one deadline for the whole frame, as in the sync wait
    while True:
        raw = next(child.reader, None)
        if raw is not None:
            return protocol.check(raw, "child")
        if child.dead:
            raise _Died()
        events = child.poll.poll(0)
        if events:
            _absorb(child, events)
            continue
        woken: asyncio.Future[bool] = loop.create_future()
        fds = (child.sock.fileno(), child.pidfd)
        for fd in fds:
            loop.add_reader(fd, _settle, woken, True)
        timer = loop.call_at(deadline, _settle, woken, False)
        try:
            if not await woken:
                raise _Timeout()
        finally:
            timer.cancel()
            for fd in fds:
                loop.remove_reader(fd)
