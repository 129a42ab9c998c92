"""Nothing is left behind: processes, descriptors, scratch directories."""

from __future__ import annotations

import os

import psutil

import sandbox
from sandbox import Sandbox
from sandbox.pool import DEFAULT_SIZE, default_pool


def _fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def test_500_sandboxes_leave_no_process_fd_or_temp_dir(audit_path):
    sandbox.shutdown()  # start from no fork server at all, whatever ran before
    with Sandbox("default", audit_log=audit_path) as warm:  # the fork server starts here
        warm.execute("x = 1")
    me = psutil.Process()
    fds_before = _fds()
    scratches = []
    for i in range(500):
        with Sandbox("default", audit_log=audit_path) as box:  # from the default pool after the first
            scratches.append(box._child.scratch)
            if i % 50 == 0:
                assert box.execute("print('hi')").stdout == "hi\n"
    assert default_pool().wait_ready(30)  # no refill in flight
    ready = set(default_pool().ready_pids())
    assert len(ready) <= DEFAULT_SIZE
    leftover = [p for p in me.children(recursive=True) if p.pid != _server_pid() and p.pid not in ready]
    assert leftover == []
    assert len(set(scratches)) == 500  # a pooled child serves one sandbox only
    assert [d for d in scratches if os.path.exists(d)] == []
    sandbox.shutdown()  # drains the pool, stops the server
    assert me.children(recursive=True) == []
    assert _fds() <= fds_before | {max(fds_before) + 1}  # at most a lazily reopened log


def _server_pid() -> int:
    from sandbox import forkserver

    return forkserver.shared(False).pid


def test_shutdown_kills_live_children(audit_path):
    box = Sandbox("default", audit_log=audit_path)
    pid = box.pid
    assert psutil.pid_exists(pid)
    sandbox.shutdown()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    box.close()  # closing after the server is gone is still clean
    with Sandbox("default", audit_log=audit_path) as again:  # a new server starts on demand
        assert again.execute("print(2)").stdout == "2\n"
