"""Ready children: new sandboxes start in microseconds instead of milliseconds.

Forking a child, building its namespaces and cgroup and applying every layer
costs several milliseconds. A :class:`SandboxPool` keeps up to ``size``
children per policy that have done all of that and said ``hello``; a new
:class:`~sandbox.Sandbox` of that policy takes one first thing and sends it
its own ``init`` (the host-function names) at once, so the child wakes up
while the sandbox finishes setting up; its CPU mark, kernel CPU backstop and
peak-memory reset were taken when it said ``hello``. A daemon thread refills
the pool in the background.

Rules:

- a pooled child serves exactly one sandbox and is never reused after it
  closes (no state can pass from one tenant to the next);
- uid/gid and scratch directory are chosen when the child is forked, one
  each, exactly as for a child forked on demand;
- a policy is pooled on demand: its first sandbox forks its child directly,
  the pool starts keeping ready children from the second one on (or at once
  after :meth:`SandboxPool.warm`). A one-shot program with one sandbox
  (``rlm exec``) never pays for filling a pool it will not use;
- a child found dead when taken (killed, or its fork server died) is
  discarded and the next one tried;
- after ``os.fork()`` of the host the new process starts with empty pools
  (it closes its copies of the parent's descriptors and touches nothing else);
- :func:`sandbox.shutdown` drains every pool (ready children stopped, their
  scratch removed) before it stops the fork servers.

Sizing: each idle ready child costs its memory (about 4 MiB USS with the
default policy; ``bench/sandbox_overhead.py`` prints the figure) and nothing
else. The process-wide default pool (:func:`default_pool`) keeps
:data:`DEFAULT_SIZE` per policy, which covers a burst of that many sandboxes
opened at once; a server opening many sandboxes in bursts gives them its own
larger ``SandboxPool(size=n)``, and ``Sandbox(..., pool=None)`` turns pooling off.
There is no global setting to change the default pool's size (no global mutable
configuration): pass the pool you want.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sandbox import forkserver

if TYPE_CHECKING:
    from sandbox.policy import Policy

__all__ = ["DEFAULT", "DEFAULT_SIZE", "Default", "SandboxPool", "default_pool"]

#: Ready children per policy in the process-wide default pool.
DEFAULT_SIZE = 2
_MAX_SIZE = 64
#: Consecutive failed refills after which a policy stops being pooled until asked for again.
_MAX_FAILURES = 3
#: The refill thread waits this long before each fork, so the sandbox that just took a child gets
#: its first result without competing for the GIL with the spawn's Python work.
_SETTLE_SECONDS = 0.005
#: While a policy is pooled, the refill thread looks for taken children this often (no wake-up
#: from the hand-out path, which stays free of thread switches).
_POLL_SECONDS = 0.02
#: Seconds drain() waits for the pool's condition (see drain()).
_DRAIN_LOCK_WAIT = 1.0


class Default:
    """Type of :data:`DEFAULT`: "use the process-wide default pool"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = Default()


class Ready(Protocol):
    """What the pool needs of a ready child (``sandbox.sandbox._Child``)."""

    pid: int

    def usable(self) -> bool: ...
    def discard(self) -> None: ...
    def forget(self) -> None: ...


class _Slot:
    """The ready children of one policy."""

    def __init__(self, make: Callable[[], Ready]) -> None:
        self.make = make
        self.ready: collections.deque[Ready] = collections.deque()
        self.requests = 0  # sandboxes that asked since the pool last drained
        self.wanted = False  # refill this policy
        self.pending = 0  # spawns in flight
        self.failures = 0


_pools: weakref.WeakSet[SandboxPool] = weakref.WeakSet()


class SandboxPool:
    """Up to *size* ready children per policy, refilled by a daemon thread. Thread- and fork-safe.

    ``size=0`` keeps nothing (every sandbox forks its own child). Use one pool
    for many sandboxes: ``Sandbox(policy, pool=my_pool)``. :meth:`close`
    stops the ready children; sandboxes that took one keep it.
    """

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if type(size) is not int:  # (a bool is not a size either)
            raise TypeError(
                f"pool size must be an int from 0 to {_MAX_SIZE}, not {type(size).__name__} {size!r}"
            )
        if not 0 <= size <= _MAX_SIZE:
            raise ValueError(f"pool size must be an int from 0 to {_MAX_SIZE}, not {size!r}")
        self.size = size
        self.closed = False
        self._init_state()
        _pools.add(self)

    def _init_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._slots: dict[str, _Slot] = {}
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._draining = 0  # drains waiting for the spawns in flight (see take)

    # ------------------------------------------------------------- public
    def warm(self, policy: Policy | str | Path = "default") -> None:
        """Start keeping ready children of *policy* now (returns at once; they fork in the background)."""
        from sandbox.sandbox import Sandbox, _spawn_ready

        spec = Sandbox._spec_of(policy)
        with self._cond:
            slot = self._slot(spec.policy_sha256, lambda: _spawn_ready(spec))
            slot.wanted = self.size > 0 and not forkserver._exiting  # (see take)
            self._wake()

    def ready_pids(self) -> list[int]:
        """Pids of the ready children now waiting (for measuring their cost)."""
        with self._cond:
            return [c.pid for slot in self._slots.values() for c in slot.ready]

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until every pooled policy holds *size* ready children (True) or *timeout* passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._full():
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return False
                self._cond.wait(min(left, threading.TIMEOUT_MAX))  # an infinite timeout waits on
            return True

    def close(self) -> None:
        """Stop every ready child and the refill thread. Idempotent."""
        self.closed = True
        self.drain()

    def drain(self) -> None:
        """Stop every ready child now; policies are pooled again when asked for again."""
        # Bounded: this thread may hold the condition itself (a signal handler that runs inside
        # its take() calls sandbox.shutdown()). Not had, the ready children are left: each is
        # found unusable when taken once its fork server was stopped.
        if not self._cond.acquire(True, _DRAIN_LOCK_WAIT):
            return
        try:
            if self._pid != os.getpid():
                return
            stale = [c for slot in self._slots.values() for c in slot.ready]
            for slot in self._slots.values():
                slot.ready.clear()
                slot.wanted = False
                slot.requests = 0
            self._cond.notify_all()
            deadline = time.monotonic() + 30.0
            # A spawn in flight adds its child (then discarded below); not waited for while this
            # thread holds a fork server's lock (a signal handler inside its own spawn): the spawn
            # waits for that lock, and the refill thread discards its child (no longer wanted).
            self._draining += 1
            try:
                while (
                    any(s.pending for s in self._slots.values())
                    and time.monotonic() < deadline
                    and not forkserver.held_here()
                ):
                    self._cond.wait(0.1)
            finally:
                self._draining -= 1
            stale += [c for slot in self._slots.values() for c in slot.ready]
            for slot in self._slots.values():
                slot.ready.clear()
        finally:
            self._cond.release()
        for child in stale:
            with contextlib.suppress(Exception):
                child.discard()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SandboxPool(size={self.size}, ready={len(self.ready_pids())})"

    # ----------------------------------------------------------- internal
    def take(self, key: str, make: Callable[[], Any]) -> Any:
        """A ready child for policy *key* (None: none ready; the caller forks its own with *make*).

        None once the process exits (:func:`forkserver._at_exit` has drained the pools): a
        sandbox an exit handler that runs after it opens (one registered before sandbox was
        imported) must not start refilling, whose ready children nobody stops then (their
        scratch directories and uids were left) and whose thread, frozen as the interpreter
        finalizes, could hold a fork server's lock."""
        if self.size == 0 or self.closed or forkserver._exiting:
            return None
        stale: list[Ready] = []
        child: Ready | None = None
        # A child taken off the queue is always named by a variable first (a Ctrl-C landing
        # anywhere here must not lose one: it would live, unseen, until the host exits).
        held: Ready | None = None
        try:
            with self._cond:
                if self._pid != os.getpid():  # never reached: the at-fork hook resets us
                    return None
                slot = self._slot(key, make)
                while slot.ready:
                    held = slot.ready[0]
                    slot.ready.popleft()
                    if held.usable():
                        child, held = held, None
                        break
                    stale.append(held)
                    held = None
                slot.requests += 1
                # Not while a drain waits for the spawns in flight: sandboxes opened meanwhile
                # wanted the policy again at once, a refill followed each spawn, and the drain
                # (sandbox.shutdown()) waited its whole 30 s under a steady load.
                if (
                    not slot.wanted
                    and slot.requests >= 2
                    and slot.failures < _MAX_FAILURES
                    and not self._draining
                ):
                    slot.wanted = True
                    self._wake()
                elif slot.wanted and (self._thread is None or not self._thread.is_alive()):
                    self._wake()
                # else: the refill thread polls (below); waking it here would make it compete
                # with this sandbox's first request for the CPU and the GIL
            for dead in stale:
                with contextlib.suppress(Exception):
                    dead.discard()
        except BaseException:
            for lost in (held, child, *stale):  # (discarding one twice is harmless)
                if lost is not None:
                    lost.discard()
            raise
        return child

    def _slot(self, key: str, make: Callable[[], Ready]) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(make)
        return slot

    def _full(self) -> bool:
        return all(len(s.ready) >= self.size for s in self._slots.values() if s.wanted)

    def _wake(self) -> None:
        """Caller holds the condition: make sure the refill thread runs and sees the change."""
        if self._thread is None or not self._thread.is_alive():
            thread = threading.Thread(target=self._refill, name="sandbox-pool", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had now (a process limit): the next take retries
                return
            self._thread = thread
        self._cond.notify_all()

    def _next_job(self) -> _Slot | None:
        """Caller holds the condition: a policy that needs one more child, or None."""
        for slot in self._slots.values():
            if slot.wanted and len(slot.ready) + slot.pending < self.size:
                return slot
        return None

    def _refill(self) -> None:
        cond = self._cond
        while True:
            with cond:
                slot = self._next_job()
                while slot is None:
                    if self.closed or cond is not self._cond:
                        return
                    pooling = any(s.wanted for s in self._slots.values())
                    cond.wait(_POLL_SECONDS if pooling else None)
                    slot = self._next_job()
                slot.pending += 1
            time.sleep(_SETTLE_SECONDS)
            child: Ready | None = None
            try:
                child = slot.make()
            except Exception:
                child = None
            with cond:
                slot.pending -= 1
                keep = child is not None and not self.closed and cond is self._cond and slot.wanted
                if child is None:
                    slot.failures += 1
                    if slot.failures >= _MAX_FAILURES:
                        slot.wanted = False
                else:
                    slot.failures = 0
                if keep:
                    assert child is not None
                    slot.ready.append(child)
                cond.notify_all()
            if child is not None and not keep:
                with contextlib.suppress(Exception):
                    child.discard()
            elif child is None:
                time.sleep(0.05 * slot.failures)

    def _after_fork_in_child(self) -> None:
        """The forked process: forget the parent's children (close our fds only) and start empty."""
        children = [c for slot in self._slots.values() for c in slot.ready]
        self._init_state()
        for child in children:
            with contextlib.suppress(Exception):
                child.forget()


_default: SandboxPool | None = None
_default_lock = threading.Lock()


def default_pool() -> SandboxPool:
    """The process-wide pool sandboxes use unless given ``pool=``: :data:`DEFAULT_SIZE` per policy."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SandboxPool(DEFAULT_SIZE)
        return _default


def _drain_all() -> None:
    for pool in list(_pools):
        pool.drain()


def _after_fork() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for pool in list(_pools):
        pool._after_fork_in_child()


def _register() -> None:
    forkserver._on_shutdown.append(_drain_all)
    os.register_at_fork(after_in_child=_after_fork)


_register()
