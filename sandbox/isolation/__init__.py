"""Protection layers the child applies to itself before any model code runs.

Three moments, three costs:

- :func:`server_setup` runs once in the fork server: its private mount
  namespace and empty network namespace (a user namespace first when not
  root), and its cgroup base directories. Children inherit the namespaces.
- :func:`prepare` runs in the fork server once per policy: it preloads the
  allowed modules, computes the read roots (where they live) and compiles
  the seccomp filter. :func:`before_fork` runs per child, in the server:
  the child's cgroup (limits written), its scratch tmpfs, and a fresh PID
  namespace for the fork that follows (:func:`after_fork` resets it);
  :func:`release` undoes the first two when the server reaps the child.
- :func:`apply` runs in each freshly forked child and returns each layer's
  state, ``"active"``, ``"off"`` (the policy switched it off) or
  ``"unavailable: <reason>"``. A layer listed in ``isolation.require`` that
  is not active raises :class:`LayerFailure`: the sandbox fails closed. A
  ``read_paths`` entry that is there but cannot be opened raises
  :class:`ReadPathFailure`, whatever the policy requires: a problem of that
  path, not of the machine, which must not cost the view and Landlock.

The layers are the records of :data:`sandbox.layers.LAYER_TABLE`;
:data:`_APPLY` maps each name to the function below that applies it, and
:func:`apply` runs them in the table's order:

===============  =============================================================
no_new_privs     PR_SET_NO_NEW_PRIVS; the parent-death signal (set at fork and
                 again after the identity change, which clears it)
rlimits          the policy's limits as rlimits; RLIMIT_CORE = 0
cgroup           own pids + memory cgroup (:mod:`.cgroups`)
scratch_fs       the scratch directory is a private tmpfs of ``disk_mb`` with
                 an inode cap (:mod:`.namespaces`)
network          an empty network namespace (:mod:`.namespaces`)
pid              pid 1 of its own PID namespace (made by the server before the
                 fork), and a session of its own
ipc              its own IPC and UTS namespaces
filesystem_view  its own mount namespace, ``pivot_root`` into a root holding
                 only the read roots, read_paths and scratch
landlock         filesystem, TCP and signal/abstract-socket scoping (:mod:`.landlock`)
identity         a uid/gid of its own, no groups, no capabilities (root); else
                 a user namespace and every capability dropped
seccomp          the system-call filter (:mod:`.seccomp`), last
===============  =============================================================

Before the first layer the child leaves nothing open but descriptors 0-2
(``/dev/null``) and its channel; after
the last it forgets the fork server's state (:func:`_forget_server`).

Stdlib only (ctypes): this runs in the fork server and the child.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import select
import signal
import sys
import sysconfig
from typing import Any

from sandbox import limits
from sandbox.isolation import cgroups, landlock, namespaces, seccomp
from sandbox.isolation._sys import libc, prctl
from sandbox.layers import LAYERS, host_state, mount_table

__all__ = [
    "LayerFailure",
    "Prepared",
    "ReadPathFailure",
    "Resources",
    "after_fork",
    "apply",
    "before_fork",
    "collect",
    "fork",
    "libc",
    "prepare",
    "release",
    "server_leave",
    "server_setup",
    "server_teardown",
]


PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

#: Modules the child needs beyond the policy's allowed imports (lazy imports of the stdlib), and
#: its own loop: imported once here, not by every child after its fork (7 ms a child on a VM).
BASE_PRELOAD = (
    "sandbox.child", "traceback", "linecache", "ast", "io", "codecs", "encodings.utf_8", "encodings.latin_1",
    "encodings.ascii", "encodings.utf_16", "encodings.utf_32", "encodings.cp1252", "encodings.idna",
    "encodings.unicode_escape", "encodings.raw_unicode_escape", "encodings.hex_codec",
    "encodings.base64_codec", "_strptime", "unicodedata",
)  # fmt: skip


class LayerFailure(Exception):
    """A required layer could not be applied in the child."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


class ReadPathFailure(Exception):
    """A ``read_paths`` entry is there but the child cannot open it (``EACCES``: a directory on
    its way is closed to the host's user; ``ELOOP``: a loop of symbolic links; ...). Neither the
    filesystem view nor Landlock could hold with it, and the policy turned them on: the start
    stops, naming the entry, whether or not the policy requires the layers (a typo or a
    permission problem must not silently cost two kernel layers)."""

    def __init__(self, path: str, exc: OSError) -> None:
        self.path = path
        self.errno = exc.errno or 0
        self.reason = exc.strerror or str(exc)
        super().__init__(f"read_paths entry {path}: {self.reason}")


class Server:
    """What the fork server set up once (inherited by every child it forks)."""

    def __init__(self, ns: namespaces.ServerState, cg: cgroups.Cgroups) -> None:
        self.ns = ns
        self.cg = cg
        self.landlock_abi = landlock.abi_version()
        self.landlock_reason = "" if self.landlock_abi else landlock.unavailable_reason()
        self.bounding_set = "not dropped"
        self.pidns = namespaces.PidNamespaces(in_userns=ns.userns == "active", root=ns.root)
        #: A child in its own PID namespace sees no parent pid (getppid() is 0): it
        #: learns whether the server still lives from this descriptor instead.
        self.pidfd = os.pidfd_open(os.getpid())


_server: Server | None = None


def server_setup() -> Server:
    """Fork-server start: private namespaces and cgroup bases (once per server)."""
    global _server
    if _server is None:
        _server = Server(namespaces.server_setup(), cgroups.server_setup())
        cgroups.refill(_server.cg)
        # The bounding set only limits what an execve could grant, and neither the
        # server nor its children ever exec: empty it here, once, not per child.
        try:
            namespaces.drop_bounding_set()
            _server.bounding_set = "empty"
        except OSError as exc:
            _server.bounding_set = exc.strerror or str(exc)
        # Resolve the C functions the children call now, not in each child.
        lib = libc()
        for name in (
            "prctl",
            "syscall",
            "setns",
            "mount",
            "umount2",
            "unshare",
            "pivot_root",
            "capget",
            "capset",
        ):
            getattr(lib, name)
    return _server


def server_leave() -> None:
    """Server exit, its children dead: its main thread leaves their cgroups (see cgroups.go_home)."""
    if _server is not None:
        cgroups.go_home(_server.cg)


def server_teardown() -> None:
    if _server is not None:
        cgroups.teardown(_server.cg)


class Prepared:
    """What the fork server computed once for a policy."""

    def __init__(self, policy: dict[str, Any], preload_failures: dict[str, str]) -> None:
        self.policy = policy
        self.preload_failures = preload_failures
        self.read_roots: list[str] = []
        self.seccomp_program: bytes = b""
        #: The filter for a child with neither a filesystem view nor a uid of its own: it also
        #: refuses changes of files' metadata (see seccomp.METADATA_SYSCALLS).
        self.seccomp_program_metadata: bytes = b""
        self.seccomp_error = ""


def _module_roots() -> list[str]:
    """Directories the loaded modules live in: the stdlib, lib-dynload, each package."""
    paths = sysconfig.get_paths()
    stdlib = sorted({os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths})
    roots: set[str] = set(stdlib)
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if not isinstance(file, str):
            continue
        real = os.path.realpath(file)
        if any(real.startswith(s + os.sep) for s in stdlib):
            continue
        top = sys.modules.get(name.partition(".")[0])
        top_file = getattr(top, "__file__", None)
        if isinstance(top_file, str):
            real = os.path.realpath(top_file)
            roots.add(os.path.dirname(real) if os.path.basename(real).startswith("__init__.") else real)
        else:
            roots.add(os.path.dirname(real))
    if os.path.exists("/etc/localtime"):  # time.localtime() reads it lazily
        roots.add(os.path.realpath("/etc/localtime"))
        roots.add("/etc/localtime")  # where the filesystem view must show it
    return sorted(roots)


def prepare(policy: dict[str, Any]) -> Prepared:
    """Fork-server side, once per policy: preload modules, Landlock roots, seccomp program."""
    failures: dict[str, str] = {}
    names = list(BASE_PRELOAD) + list(policy["python"]["allowed_imports"])
    if policy["python"]["guard"] == "restricted":
        names += ["RestrictedPython", "RestrictedPython.Guards"]
    for name in names:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # a module this Python lacks is simply not importable in the child
            failures[name] = f"{type(exc).__name__}: {exc}"
    prepared = Prepared(policy, failures)
    iso = policy["isolation"]
    if iso["landlock"] or iso["filesystem_view"]:
        prepared.read_roots = _module_roots()
    if iso["seccomp"]:
        try:
            processes = int(policy["limits"]["max_processes"])
            prepared.seccomp_program = seccomp.build(
                iso["allowed_sockets"], processes, bool(iso["allow_ipc"])
            )
            prepared.seccomp_program_metadata = seccomp.build(
                iso["allowed_sockets"], processes, bool(iso["allow_ipc"]), metadata=True
            )
        except OSError as exc:
            prepared.seccomp_error = exc.strerror or str(exc)
    # What exists now (modules, this policy) is permanent: the child's gc.collect(),
    # which clears what it must not see, then walks only what came later, and does not
    # touch (copy) every page of the inherited heap.
    gc.collect()
    gc.freeze()
    return prepared


class Resources:
    """What :func:`before_fork` made for one child; :func:`release` undoes it."""

    __slots__ = ("cgroup_dirs", "cpu_path", "mount")

    def __init__(self) -> None:
        self.cgroup_dirs: list[str] = []
        #: The file counting the CPU time of the child's cgroup (cgroups.cpu_file), if any.
        self.cpu_path: str | None = None
        self.mount: str | None = None


def before_fork(prepared: Prepared, config: dict[str, Any]) -> Resources:
    """Fork-server side, per child: its cgroup and its scratch tmpfs.

    What the child must know goes into ``config["isolation"]``: per layer a
    list of cgroup directories / ``"mounted"``, or the reason it failed.
    """
    server = server_setup()
    policy = prepared.policy
    iso = policy["isolation"]
    res = Resources()
    info: dict[str, Any] = {}
    global _placed
    cgroups.settle(server.cg)  # the main thread has left the previous child's cgroup
    if not iso["cgroup"] and server.cg.current is not None:
        # The main thread waits in the next sandbox's cgroup: a child that wants
        # none must not be born there and stay (it would count against, and be
        # killed with, that sandbox). It moves back to the server's own cgroup.
        info["cgroup_leave"] = server.cg.origin_dirs()
        # Until it has left, that cgroup is not clean: give it up (removed once
        # empty) and let refill() place the main thread in a fresh one.
        server.cg.stale.extend(server.cg.current)
        server.cg.current = None
    if iso["cgroup"]:
        try:
            helpers = 1 if iso["pid"] and server.pidns.mode == "helper" else 0
            res.cgroup_dirs, born = cgroups.create(server.cg, policy["limits"], helpers)
            res.cpu_path = cgroups.cpu_file(server.cg, res.cgroup_dirs)
            info["cgroup"] = {
                "dirs": res.cgroup_dirs,
                "born": born,
                "paths": cgroups.relative_paths(server.cg, res.cgroup_dirs),
            }
            if born:
                _placed = (res.cgroup_dirs, policy["limits"])
        except OSError as exc:
            info["cgroup"] = exc.strerror or str(exc)
    if iso["scratch_fs"]:
        if not server.ns.mount_ok:
            info["scratch_fs"] = f"no private mount namespace: {server.ns.mountns}"
        else:
            try:
                namespaces.mount_scratch(
                    config["scratch"], int(policy["limits"]["disk_mb"]), config.get("uid"), config.get("gid")
                )
                res.mount = config["scratch"]
                info["scratch_fs"] = "mounted"
            except OSError as exc:
                info["scratch_fs"] = exc.strerror or str(exc)
    if iso["pid"]:
        try:
            server.pidns.fresh()  # the fork that follows makes pid 1 of a new namespace
            info["pid"] = "fresh"
        except OSError as exc:
            info["pid"] = exc.strerror or str(exc)
    config["isolation"] = info
    return res


def fork(config: dict[str, Any]) -> int:
    """Fork-server side: fork the child :func:`before_fork` prepared (0 in the child)."""
    return server_setup().pidns.fork(fresh=config["isolation"].get("pid") == "fresh")


def after_fork() -> None:
    """Fork-server side, right after a fork (or a failed one): children are born in the
    server's own PID namespace again, and the next child's cgroup is prepared."""
    if _server is not None:
        with contextlib.suppress(OSError):
            _server.pidns.reset()
    refill()


def collect(res: Resources) -> dict[str, int]:
    """Fork-server side, once the child was reaped: kill what it left behind, read its counters
    (``cpu_ns``: the CPU time of every process the cgroup held, where it is counted)."""
    events = cgroups.collect(res.cgroup_dirs) if res.cgroup_dirs else {}
    cpu = cgroups.cpu_used(res.cpu_path)
    if cpu is not None:
        events["cpu_ns"] = cpu
    return events


def release(res: Resources) -> None:
    """Fork-server side, after :func:`collect`: remove the child's cgroup and scratch mount."""
    if res.cgroup_dirs and _server is not None:
        cgroups.remove(_server.cg, res.cgroup_dirs)
        res.cgroup_dirs = []
    if res.mount is not None:
        try:
            namespaces.umount_scratch(res.mount)
        except OSError:
            pass
        res.mount = None


_placed: tuple[list[str], dict[str, Any]] | None = None


def refill() -> None:
    """Fork-server side, right after a fork: prepare the next child's cgroup in the background."""
    global _placed
    if _server is not None:
        previous, _placed = _placed, None
        if previous is not None:
            cgroups.refill(_server.cg, previous[0], previous[1])
        elif _server.cg.current is None:
            cgroups.refill(_server.cg)


# ------------------------------------------------------------------ child side
def _die_with_server(server: Server | None, parent_pid: int) -> None:
    """Die with the fork server: the parent-death signal, then a check that it is still alive
    (it may have died before the signal was armed)."""
    if sys.platform == "linux":
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if server is not None:  # in its own PID namespace the child has no visible parent
        probe = select.poll()
        probe.register(server.pidfd, select.POLLIN)
        if probe.poll(0):
            os._exit(1)
    elif os.getppid() != parent_pid:
        os._exit(1)


def _process_hygiene(chan_fd: int, ctx: _Ctx) -> None:
    """Own process group, die with the fork server, no descriptor but 0-2 (``/dev/null``) and
    the channel (and, until :func:`apply` ends, the server's pidfd).

    The ``pid`` layer makes the child a session leader; without it the child
    makes a process group of its own (the host kills the group).
    """
    if not ctx.policy["isolation"]["pid"]:
        os.setpgid(0, 0)
    _die_with_server(ctx.server, ctx.config["server_pid"])
    keep = sorted({chan_fd, ctx.server.pidfd if ctx.server else chan_fd})
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


class _Ctx:
    def __init__(self, prepared: Prepared, config: dict[str, Any], server: Server | None) -> None:
        self.prepared = prepared
        self.policy = prepared.policy
        self.config = config
        self.server = server
        self.info: dict[str, Any] = config.get("isolation") or {}
        self.network_error: OSError | None = None
        #: The policy's read_paths kept, checked once (_check_read_paths): path -> (where it is,
        #: its device and inode), for the view; the Landlock ruleset made from them, or why not.
        self.read_views: dict[str, tuple[str, tuple[int, int]]] = {}
        self.ruleset: int | None = None
        self.ruleset_error: OSError | None = None
        #: The filesystem view is in place; the child runs under a uid of its own (identity as
        #: root). Either keeps the files it can change to its own: see _seccomp.
        self.in_view = False
        self.own_uid = False


def _no_new_privs(ctx: _Ctx) -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def _rlimits(ctx: _Ctx) -> None:
    limits.apply_rlimits(ctx.policy["limits"], own_uid=ctx.config.get("uid") is not None)


def _cgroup(ctx: _Ctx) -> None:
    info = ctx.info.get("cgroup")
    if not isinstance(info, dict):
        raise OSError(info or "the fork server made no cgroup")
    if not info["born"]:  # cgroup v2, or the server could not pre-place itself
        cgroups.join(info["dirs"])
    cgroups.verify(info["paths"])
    # First in line for the OOM killer, host-wide and within the cgroup.
    cgroups.write_oom_score_adj(1000)


def _scratch_fs(ctx: _Ctx) -> None:
    state = ctx.info.get("scratch_fs")
    if state != "mounted":
        raise OSError(state or "the fork server mounted no scratch filesystem")
    scratch = ctx.config["scratch"]
    os.chdir(scratch)
    if os.stat(scratch).st_dev == os.stat(os.path.dirname(scratch)).st_dev:
        raise OSError("the scratch directory is not a private mount")


def _network_early(ctx: _Ctx) -> None:
    """Runs before the descriptors are closed: a network=false child may need the host's netns fd."""
    server = ctx.server
    if not ctx.policy["isolation"]["network"]:
        if server is not None and server.ns.net_ok:
            try:
                namespaces.return_to_host_netns(server.ns)
            except OSError:
                pass  # rootless: the host's namespace is out of reach; the child stays offline
        return
    try:
        if server is None or not server.ns.net_ok:
            raise OSError(f"no network namespace: {server.ns.netns if server else 'no fork server'}")
        if namespaces.current_netns() == server.ns.host_netns_ino:
            raise OSError("still in the host's network namespace")
    except OSError as exc:
        ctx.network_error = exc


def _network(ctx: _Ctx) -> None:
    if ctx.network_error is not None:
        raise ctx.network_error
    if ctx.policy["isolation"]["allowed_sockets"]:
        # The fork server's empty namespace is shared by its children: with sockets allowed,
        # what one binds (an abstract unix name, a UDP port) would be seen by another (the bind
        # fails there, a send tells taken from free). A namespace of its own (about 1 ms).
        namespaces.unshare_net()


def _pid(ctx: _Ctx) -> None:
    os.setsid()  # first, so that the host can kill the child's group even if the rest fails
    state = ctx.info.get("pid")
    if state != "fresh":
        raise OSError(state or "the fork server made no PID namespace")
    if os.getpid() != 1:
        raise OSError(f"not pid 1 of a new PID namespace (pid {os.getpid()})")


def _ipc(ctx: _Ctx) -> None:
    namespaces.unshare_ipc_uts()


def _check_read_paths(ctx: _Ctx) -> None:
    """Before any layer: open each of the policy's read_paths once (``O_PATH``), check what it is
    (the policy refused entries that are, lead to, or hold below them the host's /proc, /sys,
    /dev or /, when it loaded; one that has come to since is left out here), and note what the
    view must bind (where it is, its device and inode: :func:`namespaces.enter_view` keeps a
    bind only if it shows that file). An entry that is there but cannot be opened raises
    :class:`ReadPathFailure`: neither layer could hold with it. Landlock's ruleset is made now
    from the same descriptors, and enforced in its turn: renaming or relinking a path meanwhile
    changes nothing. Each descriptor is closed at once, so later limits (RLIMIT_NOFILE) never
    meet them. (Paths are absolute and '~'-free: expanded on the host.)"""
    iso = ctx.policy["isolation"]
    checked: list[tuple[str, int]] = []  # (path, descriptor) of the entries kept
    mounts = mount_table() if iso["read_paths"] else []  # read once for every entry
    try:
        for path in dict.fromkeys(str(p) for p in iso["read_paths"]):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                continue  # nothing there to show
            except OSError as exc:  # it is there but cannot be judged: the policy's path is wrong
                raise ReadPathFailure(path, exc) from None
            checked.append((path, fd))
            real = os.readlink(f"/proc/self/fd/{fd}")
            if host_state(real, fd, mounts) is not None:
                checked.pop()
                os.close(fd)
                continue
            st = os.fstat(fd)
            ctx.read_views[path] = (real, (st.st_dev, st.st_ino))
        if iso["landlock"]:
            server = ctx.server
            abi = server.landlock_abi if server else landlock.abi_version()
            try:
                ctx.ruleset = landlock.ruleset(
                    abi, [*ctx.prepared.read_roots, *(fd for _, fd in checked)], [ctx.config["scratch"]]
                )
            except OSError as exc:
                ctx.ruleset_error = exc
    finally:
        for _, fd in checked:
            os.close(fd)


def _filesystem_view(ctx: _Ctx) -> None:
    scratch = ctx.config["scratch"]
    namespaces.enter_view([*ctx.prepared.read_roots, *ctx.read_views], [scratch], sources=ctx.read_views)
    os.chdir(scratch)
    ctx.in_view = True


def _landlock(ctx: _Ctx) -> None:
    if ctx.ruleset_error is not None:
        raise ctx.ruleset_error
    if ctx.ruleset is None:
        raise OSError("no Landlock ruleset was made")
    ruleset, ctx.ruleset = ctx.ruleset, None
    landlock.enforce(ruleset)


def _identity(ctx: _Ctx) -> None:
    uid, gid = ctx.config.get("uid"), ctx.config.get("gid")
    if os.geteuid() == 0 and uid is not None and gid is not None and not _in_userns(ctx):
        bounding = ctx.server.bounding_set if ctx.server else "no fork server"
        if bounding != "empty":  # an execve could not use it (seccomp), but the drop is promised
            raise OSError(f"the capability bounding set could not be emptied: {bounding}")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability set but the bounding set
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
            raise OSError("uid/gid did not change")
        ctx.own_uid = True
    elif _in_userns(ctx):
        namespaces.drop_capabilities(bounding=False)
    elif os.geteuid() == 0:
        # Whatever the policy requires, a child of root that cannot drop its uid keeps no
        # capability (no real-time priority, no raw I/O, no bypassing file permissions).
        namespaces.drop_capabilities(bounding=False)
        raise OSError("started as root but the host gave no uid to drop to")
    else:
        reason = ctx.server.ns.userns if ctx.server else "no fork server"
        raise OSError(f"not root and {reason}")
    if any(namespaces.capabilities()):
        raise OSError("capabilities remain after the drop")
    # A credential change clears the parent-death signal: set it again.
    _die_with_server(ctx.server, ctx.config["server_pid"])


def _in_userns(ctx: _Ctx) -> bool:
    return ctx.server is not None and ctx.server.ns.userns == "active"


def _seccomp(ctx: _Ctx) -> None:
    # Landlock does not govern chmod, chown, utime or xattrs: outside a filesystem view, a child
    # running as the host's user (or as a root without capabilities) could change those of every
    # file of that user it can name. Such a child gets the filter that refuses them.
    fenced = ctx.in_view or ctx.own_uid
    program = ctx.prepared.seccomp_program if fenced else ctx.prepared.seccomp_program_metadata
    if not program:
        raise OSError(ctx.prepared.seccomp_error or "no seccomp program was built")
    seccomp.load(program)


_APPLY = {
    "no_new_privs": _no_new_privs,
    "rlimits": _rlimits,
    "cgroup": _cgroup,
    "scratch_fs": _scratch_fs,
    "network": _network,
    "pid": _pid,
    "ipc": _ipc,
    "filesystem_view": _filesystem_view,
    "landlock": _landlock,
    "identity": _identity,
    "seccomp": _seccomp,
}


def apply(prepared: Prepared, config: dict[str, Any], chan_fd: int) -> dict[str, str]:
    """Child side: apply every layer in order; fail closed on required ones (:class:`LayerFailure`)
    and on a read path that cannot be opened (:class:`ReadPathFailure`)."""
    ctx = _Ctx(prepared, config, _server)
    leave = ctx.info.get("cgroup_leave")
    if leave:
        try:
            cgroups.join(leave)
        except OSError as exc:
            raise LayerFailure("cgroup", f"cannot leave the fork server's cgroup: {exc.strerror}") from None
    _network_early(ctx)
    _process_hygiene(chan_fd, ctx)
    os.chdir(config["scratch"])
    iso = prepared.policy["isolation"]
    required = set(iso["require"])
    states: dict[str, str] = {}
    try:
        if iso["filesystem_view"] or iso["landlock"]:
            _check_read_paths(ctx)  # after the hygiene (it closes descriptors), before the limits
        for layer in LAYERS:
            if not iso[layer]:
                states[layer] = "off"
                continue
            try:
                _APPLY[layer](ctx)
            except (
                OSError,
                AttributeError,
            ) as exc:  # AttributeError: the C library lacks the call (not Linux)
                reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
                if layer in required:
                    raise LayerFailure(layer, reason) from None
                states[layer] = f"unavailable: {reason}"
            else:
                states[layer] = "active"
    finally:
        if ctx.ruleset is not None:  # made, never enforced (an earlier required layer failed)
            os.close(ctx.ruleset)
        if ctx.server is not None:
            os.close(ctx.server.pidfd)  # the child's code gets no handle on its fork server
        _forget_server()
    return states


def _forget_server() -> None:
    """Child side: drop what the fork server knew (its cgroups, the next child's cgroup,
    sibling cgroups awaiting removal), so the child's code cannot find it."""
    global _server, _placed
    _server = None
    _placed = None
