"""The cgroup layer: each sandbox child in its own ``pids`` and ``memory`` cgroup.

- ``pids.max = 1 + max_processes`` counts processes *and* threads of the
  sandbox whatever their uid (RLIMIT_NPROC counts per uid and is not
  enforced for root): a fork or thread bomb gets ``EAGAIN``.
- ``memory.limit_in_bytes = memory_mb + disk_mb + 64 MiB`` bounds everything
  the kernel charges to the sandbox (heap, page tables, socket buffers and
  the scratch tmpfs pages), a backstop behind RLIMIT_AS.
- CPU time of every process of the sandbox, for the host to charge
  (:func:`cpu_file`): ``cpuacct.usage`` in a ``cpuacct`` cgroup per child
  on cgroup v1, where that controller is mounted (optional: without it the
  host counts the child's own CPU clock), or ``cpu.stat`` on cgroup v2,
  which every cgroup has.

The fork server creates ``rlm-<server pid>/`` beneath its own cgroup in each
hierarchy once (:func:`server_setup`, so host-level limits still apply) and
holds an ``flock`` on it for life: a tree nobody holds is a dead server's,
whatever PID namespace it ran in, and :func:`sweep_abandoned` (run by each
host process in the background) removes such trees wherever they are,
for servers killed together with their whole cgroup (a job, a container);
one directory per child before each fork (:func:`create`, kept warm in a
small pool), the child moves itself in (:func:`join`), and when the server
reaps the child it kills anything left in the cgroup (a background process
cannot outlive its sandbox), reads the OOM and pids counters for the host's
verdict, and removes the directory (:func:`release`).

cgroup v1 (separate ``pids`` and ``memory`` hierarchies) and cgroup v2 (one
unified hierarchy with both controllers enabled) are supported. Stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import signal
import threading
import time
from typing import Any

from sandbox import limits
from sandbox.isolation._sys import write_file

__all__ = [
    "Cgroups",
    "collect",
    "cpu_file",
    "cpu_used",
    "create",
    "join",
    "refill",
    "release",
    "remove",
    "server_setup",
    "sweep_abandoned",
    "teardown",
    "verify",
]

CONTROLLERS = ("pids", "memory")
#: The cgroup v1 controller that counts the CPU time of a cgroup's processes: used where mounted.
ACCOUNTING = "cpuacct"
MIB = 1024 * 1024


class Cgroups:
    """Where this fork server makes sandbox cgroups (or why it cannot)."""

    def __init__(self) -> None:
        self.bases: dict[str, str] = {}  # controller -> our base dir (v1); {"unified": dir} for v2
        self.version = 0
        self.reason = ""
        self.counter = 0
        self.stale: list[str] = []
        self.held: list[int] = []  # descriptors of our base dirs, each holding its flock (see above)
        self.mounts: dict[str, str] = {}  # same keys as bases: the hierarchy's mount point
        self.origin: dict[str, str] = {}  # same keys: the server's own cgroup directory
        self.main_tid = threading.get_native_id()
        self.current: list[str] | None = None  # where the main thread sits, waiting for the next child
        self.home = True  # the main thread is in the server's own cgroup (see go_home)
        self.worker: threading.Thread | None = None
        self.queue: queue.SimpleQueue[tuple[list[str] | None, dict[str, Any] | None]] = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        self.place_error = ""

    @property
    def ok(self) -> bool:
        return not self.reason

    def origin_dirs(self) -> list[str]:
        """The server's own cgroup directory in each hierarchy we use."""
        return [self.origin[k] for k in self.bases]


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def _mounts() -> tuple[dict[str, str], str | None]:
    """v1 mount point per controller, and the cgroup2 mount point (if any)."""
    v1: dict[str, str] = {}
    v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) < 3 or len(fields) < 5:
                continue
            fstype, options = rfields[0], rfields[2].split(",")
            if fstype == "cgroup":
                for c in (*CONTROLLERS, ACCOUNTING):
                    if c in options:
                        v1.setdefault(c, fields[4])
            elif fstype == "cgroup2" and v2 is None:
                v2 = fields[4]
    return v1, v2


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller ('' key: the v2 path)."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def _hold(base: str) -> int:
    """An open descriptor of *base* holding its flock for the server's life (-1 if that fails:
    the tree then looks abandoned only once the server's pid is gone)."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return -1
    for _ in range(200):  # a sweeper looking at the tree holds the lock for microseconds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            break
    os.close(fd)
    return -1


def _abandoned(tree: str, pid: int) -> bool:
    """No live fork server owns the ``rlm-<pid>`` *tree*: nobody holds its flock, and no
    process of that pid here is a fork server (a server that could not take the lock)."""
    try:
        fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its server lives (BlockingIOError), or we cannot tell
        return False
    finally:
        os.close(fd)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"sandbox.forkserver" not in f.read()  # that pid was reused
    except OSError:
        return True


def _kill_tree(tree: str) -> bool:
    """SIGKILL every process in the cgroup *tree* and beneath it: ``cgroup.kill`` where the
    kernel has it (v2, 5.14), else each pid of each ``cgroup.procs``, a few rounds (a process
    may fork meanwhile). Whether any was there. A dead server's children live on only if
    they disarmed their parent-death signal (the seccomp filter refuses that, but a tree may
    be older, or its sandboxes run without the filter)."""
    killed = False
    if os.path.exists(os.path.join(tree, "cgroup.kill")):
        with contextlib.suppress(OSError):
            write_file(os.path.join(tree, "cgroup.kill"), "1")
            return True
    for _ in range(5):
        found = False
        for root, _dirs, _files in os.walk(tree):
            try:
                pids = _read(os.path.join(root, "cgroup.procs")).split()
            except OSError:
                continue
            for pid in pids:
                if int(pid) == os.getpid():  # never: a tree is abandoned by its server
                    continue
                found = killed = True
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        if not found:
            break
        time.sleep(0.001)
    return killed


def _remove_tree(tree: str) -> None:
    """Kill what is left in *tree* (:func:`_kill_tree`), then bottom-up ``rmdir`` (the kernel
    refuses a cgroup that still holds a process; killed ones take a moment to exit)."""
    tries = 20 if _kill_tree(tree) else 1
    for root, _dirs, _files in os.walk(tree, topdown=False):
        _rmdir(root, tries)


def _is_tree(name: str) -> bool:
    """*name* is a fork server's ``rlm-<pid>`` directory."""
    return name.startswith("rlm-") and name[4:].isdigit()


def _remove_abandoned(parent: str, names: list[str]) -> int:
    """Remove those of the ``rlm-<pid>`` trees *names* under *parent* that no live server owns;
    how many are gone."""
    removed = 0
    for name in names:
        tree = os.path.join(parent, name)
        if _abandoned(tree, int(name[4:])):
            _remove_tree(tree)
            removed += not os.path.exists(tree)
    return removed


def _sweep_stale(parent: str) -> None:
    """Remove the abandoned ``rlm-<pid>`` trees right under *parent* (servers killed without
    tearing down: SIGKILL)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    _remove_abandoned(parent, [name for name in names if _is_tree(name)])


def sweep_abandoned(limit: int = 4096) -> int:
    """Remove abandoned ``rlm-<pid>`` trees anywhere in the hierarchies sandboxes use (at most
    *limit* directories looked at in each), for servers killed together with a cgroup other
    than the next server's (a whole job or container). Returns how many trees went."""
    try:
        v1, v2 = _mounts()
    except OSError:
        return 0
    roots = {v1[c] for c in (*CONTROLLERS, ACCOUNTING) if c in v1}
    if v2 is not None:
        roots.add(v2)
    removed = 0
    for root in roots:
        for looked, (parent, dirs, _files) in enumerate(os.walk(root)):
            if looked >= limit:
                break
            trees = [d for d in dirs if _is_tree(d)]
            dirs[:] = [d for d in dirs if not _is_tree(d)]  # never walked into: live, or removed here
            removed += _remove_abandoned(parent, trees)
    return removed


def server_setup() -> Cgroups:
    cg = Cgroups()
    try:
        v1, v2 = _mounts()
        own = _own_paths()
        name = f"rlm-{os.getpid()}"
        if all(c in v1 for c in CONTROLLERS):
            for c in CONTROLLERS:
                _add_base(cg, c, v1[c], own.get(c, "/"), name)
            cg.version = 1
            if ACCOUNTING in v1 and v1[ACCOUNTING] not in {v1[c] for c in CONTROLLERS}:
                # Optional: without it the host counts the child's own CPU clock only.
                with contextlib.suppress(OSError):
                    _add_base(cg, ACCOUNTING, v1[ACCOUNTING], own.get(ACCOUNTING, "/"), name)
        elif v2 is not None:
            parent = v2 + own.get("", "/")
            available = _read(os.path.join(parent, "cgroup.controllers")).split()
            missing = [c for c in CONTROLLERS if c not in available]
            if missing:
                raise OSError(errno.ENOTSUP, f"cgroup2 at {parent} lacks the {'/'.join(missing)} controller")
            _sweep_stale(parent)
            base = os.path.join(parent, name)
            os.makedirs(base, exist_ok=True)
            cg.mounts["unified"] = v2
            cg.origin["unified"] = os.path.normpath(parent)
            write_file(os.path.join(base, "cgroup.subtree_control"), "+pids +memory")
            cg.bases["unified"] = base
            cg.held.append(_hold(base))
            cg.version = 2
        else:
            missing = [c for c in CONTROLLERS if c not in v1]
            raise OSError(errno.ENOTSUP, f"no cgroup hierarchy with the {'/'.join(missing)} controller")
    except OSError as exc:
        cg.reason = _reason(exc)
        for base in cg.bases.values():
            with contextlib.suppress(OSError):
                os.rmdir(base)
        cg.bases.clear()
        _let_go(cg)
    return cg


def _add_base(cg: Cgroups, key: str, mount: str, own: str, name: str) -> None:
    """The cgroup v1 hierarchy *key* (mounted at *mount*, the server's own cgroup *own* in it)
    as one of the server's bases: ``rlm-<pid>`` made beneath its own cgroup, and held."""
    origin = os.path.normpath(mount + own)
    _sweep_stale(origin)
    base = os.path.join(origin, name)
    os.makedirs(base, exist_ok=True)
    cg.mounts[key] = mount
    cg.origin[key] = origin
    cg.bases[key] = base
    cg.held.append(_hold(base))


def cpu_file(cg: Cgroups, dirs: list[str]) -> str | None:
    """The file that counts the CPU time of the processes in the cgroup *dirs* (read by
    :func:`sandbox.limits.cgroup_cpu_seconds`), or None where there is none."""
    if cg.version == 2:
        return os.path.join(dirs[0], "cpu.stat") if dirs else None
    base = cg.bases.get(ACCOUNTING)
    if base is None:
        return None
    return next((os.path.join(d, "cpuacct.usage") for d in dirs if d.startswith(base + os.sep)), None)


def _let_go(cg: Cgroups) -> None:
    for fd in cg.held:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    cg.held.clear()


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"cgroup hierarchy not writable{where}: {exc.strerror}"
    return exc.strerror or str(exc)


def _mkdirs(cg: Cgroups) -> list[str]:
    cg.counter += 1
    dirs: list[str] = []
    try:
        for base in cg.bases.values():
            d = os.path.join(base, str(cg.counter))
            os.mkdir(d)
            dirs.append(d)
    except OSError:
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    return dirs


def _move_main_thread(cg: Cgroups, dirs: list[str]) -> None:
    cg.home = False
    for d in dirs:
        write_file(os.path.join(d, "tasks"), str(cg.main_tid))
    cg.home = dirs == cg.origin_dirs()


def go_home(cg: Cgroups) -> None:
    """Server exit: the main thread back in the server's own cgroup, before the sandboxes'
    cgroups are removed. It may sit in a child's: one whose spawn was cut short (the host hung
    up before it was told of the child) before the next child's cgroup took the thread in. Left
    there, that cgroup could not be removed (20 then 40 tries per hierarchy: 1.7 s of the exit
    on cgroup v1), nor the server's tree, left for a later host's sweep."""
    _wait(cg)
    if not cg.home and cg.bases:
        with contextlib.suppress(OSError):
            _move_main_thread(cg, cg.origin_dirs())


def _write_limits(cg: Cgroups, dirs: list[str], limits: dict[str, Any], extra_tasks: int) -> None:
    pids = 1 + int(limits["max_processes"]) + extra_tasks
    memory = (int(limits["memory_mb"]) + int(limits["disk_mb"]) + 64) * MIB
    for d in dirs:
        if cg.version == 2:
            write_file(os.path.join(d, "pids.max"), str(pids))
            write_file(os.path.join(d, "memory.max"), str(memory))
            with contextlib.suppress(OSError):
                write_file(os.path.join(d, "memory.swap.max"), "0")
        elif d.startswith(cg.bases["pids"] + os.sep):
            write_file(os.path.join(d, "pids.max"), str(pids))
        elif d.startswith(cg.bases["memory"] + os.sep):
            write_file(os.path.join(d, "memory.limit_in_bytes"), str(memory))
            with contextlib.suppress(OSError):  # only with swap accounting
                write_file(os.path.join(d, "memory.memsw.limit_in_bytes"), str(memory))


def _wait(cg: Cgroups) -> None:
    cg.idle.wait()


def settle(cg: Cgroups) -> None:
    """Wait until a background placement of the main thread is done."""
    _wait(cg)


def _worker(cg: Cgroups) -> None:
    while True:
        previous, limits = cg.queue.get()
        try:
            _place_next(cg, previous, limits)
        finally:
            cg.idle.set()


def _place_next(cg: Cgroups, previous: list[str] | None, limits: dict[str, Any] | None) -> None:
    """Background: make the next child's cgroup and move the server's main thread into it.

    A cgroup migration waits for an RCU grace period (milliseconds on a
    quiet VM); done here, off the start path, a child forked by the main
    thread is simply born in its cgroup. Then the previous child's pids
    limit drops the slot the main thread held there.
    """
    try:
        dirs = _mkdirs(cg)
        _move_main_thread(cg, dirs)
        cg.current = dirs
    except OSError as exc:
        cg.current = None
        cg.place_error = _reason(exc)
    if previous is not None and limits is not None:
        with contextlib.suppress(OSError):
            _write_limits(cg, previous, limits, extra_tasks=0)


def refill(cg: Cgroups, previous: list[str] | None = None, limits: dict[str, Any] | None = None) -> None:
    """Start placing the main thread in the next child's cgroup (cgroup v1; idle-time work)."""
    if not cg.ok or cg.version != 1 or cg.place_error:
        return
    _wait(cg)
    if cg.worker is None:
        # Started while the main thread is still in the server's own cgroup,
        # so the worker stays there and never counts against a sandbox.
        cg.worker = threading.Thread(target=_worker, args=(cg,), name="cgroup-placer", daemon=True)
        cg.worker.start()
    cg.idle.clear()
    cg.queue.put((previous, limits))


def create(cg: Cgroups, limits: dict[str, Any], helpers: int = 0) -> tuple[list[str], bool]:
    """The next child's cgroup with the policy's limits written.

    Returns ``(dirs, born_inside)``: with cgroup v1 the server's main thread
    already sits in them, so the child is born inside (and ``pids.max``
    counts that thread until :func:`refill` moves it on); otherwise the
    child must :func:`join` them itself. *helpers*: processes the server forks
    on the way to the child, born there too (the PID namespace helper).
    """
    if not cg.ok:
        raise OSError(errno.ENOTSUP, cg.reason)
    _wait(cg)
    born = cg.current is not None
    try:
        if born:
            dirs = cg.current or []
            cg.current = None
        else:
            dirs = _mkdirs(cg)
        _write_limits(cg, dirs, limits, extra_tasks=1 + helpers if born else 0)
    except OSError as exc:
        raise OSError(exc.errno, _reason(exc)) from None
    return dirs, born


def relative_paths(cg: Cgroups, dirs: list[str]) -> dict[str, str]:
    """What /proc/<pid>/cgroup shows for *dirs*, per hierarchy ('' for v2)."""
    out: dict[str, str] = {}
    for key, base in cg.bases.items():
        mount = cg.mounts[key]
        for d in dirs:
            if d.startswith(base + os.sep):
                out["" if key == "unified" else key] = d[len(mount) :] or "/"
    return out


def verify(expected: dict[str, str]) -> None:
    """Child side: check that the calling process is in the expected cgroups."""
    own = _own_paths()
    for key, path in expected.items():
        if own.get(key) != path:
            raise OSError(errno.EPERM, f"not in its {key or 'v2'} cgroup {path} (in {own.get(key)})")


def write_oom_score_adj(value: int) -> None:
    write_file("/proc/self/oom_score_adj", str(value))


def join(dirs: list[str]) -> None:
    """Child side: move the calling process into each directory."""
    for d in dirs:
        write_file(os.path.join(d, "cgroup.procs"), "0")


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


def release(cg: Cgroups, dirs: list[str]) -> dict[str, int]:
    """Kill what is left in the cgroup, read its limit counters, remove it."""
    events = collect(dirs)
    remove(cg, dirs)
    return events


def collect(dirs: list[str]) -> dict[str, int]:
    """Kill what is left in the cgroup (a process that escaped the process group), read its counters."""
    events: dict[str, int] = {}
    for d in dirs:
        with contextlib.suppress(OSError, ValueError):
            for pid in _read(os.path.join(d, "cgroup.procs")).split():
                if int(pid) == os.getpid():
                    continue
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            if os.path.exists(os.path.join(d, "pids.events")):
                events["pids_max"] = _counter(_read(os.path.join(d, "pids.events")), "max")
            if os.path.exists(os.path.join(d, "memory.oom_control")):
                events["oom_kill"] = _counter(_read(os.path.join(d, "memory.oom_control")), "oom_kill")
            elif os.path.exists(os.path.join(d, "memory.events")):
                events["oom_kill"] = _counter(_read(os.path.join(d, "memory.events")), "oom_kill")
    return events


def cpu_used(path: str | None) -> int | None:
    """Nanoseconds of CPU the cgroup's processes used, by its :func:`cpu_file` (None if unread)."""
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return round(limits.cgroup_cpu_seconds(fd) * 1e9)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def remove(cg: Cgroups, dirs: list[str]) -> None:
    for d in cg.stale[:]:
        if _rmdir(d, tries=1):
            cg.stale.remove(d)
    for d in dirs:
        if not _rmdir(d):
            cg.stale.append(d)


def _rmdir(d: str, tries: int = 20) -> bool:
    for i in range(tries):
        try:
            os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return False
            time.sleep(0.0005 * (i + 1))  # killed leftovers are still exiting
    return False


def teardown(cg: Cgroups) -> None:
    """Server exit: move the main thread home, remove every directory we made."""
    go_home(cg)
    if cg.current is not None:
        remove(cg, cg.current)
        cg.current = None
    for d in list(cg.stale):
        if _rmdir(d, tries=40):
            cg.stale.remove(d)
    for base in cg.bases.values():
        with contextlib.suppress(OSError):
            os.rmdir(base)
    _let_go(cg)
    # Trees of servers killed while their children still held them (a sweep at start-up
    # could not remove those): by now their children are gone too.
    for parent in set(cg.origin.values()):
        _sweep_stale(parent)
