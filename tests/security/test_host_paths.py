"""The host's filesystem surface: what the code can do to files the host, or another local user,
meets outside the sandbox's own scratch directory.

Each attack runs under the default policy and with ``python.guard = "none"``, with layers
turned off where a policy may turn them off (or a machine lacks them): ``scratch_fs`` (the
scratch directory is then on the host's disk) and ``filesystem_view`` (the host's files can
then be named, and only Landlock, the uid and seccomp stand in the way).
"""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path
from typing import Any

from sandbox import Policy, Sandbox
from sandbox.layers import LAYERS
from tests.security.conftest import Env, assert_contained, policy_for


def without(mode: str, *layers: str, **changes: Any) -> Policy:
    """The attack policy of *mode* with *layers* turned off (and no longer required)."""
    over: dict[str, Any] = {f"isolation.{name}": False for name in layers}
    over["isolation.require"] = [name for name in LAYERS if name not in layers]
    over.update(changes)
    return policy_for(mode, **over)


#: Every change of a file's metadata that Landlock does not govern, on the file FILE.
METADATA = textwrap.dedent(
    """
    import os
    seen = []
    for name, call in (
        ("chmod", lambda: os.chmod(FILE, 0o644)),
        ("chown", lambda: os.chown(FILE, -1, -1)),
        ("utime", lambda: os.utime(FILE, (0, 0))),
        ("setxattr", lambda: os.setxattr(FILE, "user.planted", b"1")),
        ("fchmod", lambda: os.fchmod(os.open(FILE, os.O_PATH), 0o644)),
    ):
        try:
            call()
            seen.append(name + " done")
        except OSError as exc:
            seen.append(name + " " + type(exc).__name__)
    print(seen)
    """
)


def test_without_a_view_the_code_changes_no_metadata_of_the_hosts_files(mode: str, env: Env) -> None:
    """Landlock governs reads, writes, creations, renames and removals, not chmod, chown, utime or
    extended attributes. Without the filesystem view, a child whose uid owns host files (the
    invoking user's, for a host that is not root; uid 0 without capabilities here, root without
    the identity layer) made a 0600 file of that user 0644, for every local user to read, and
    set its times and attributes. Seccomp refuses those calls to such a child."""
    secret = env.canary_file
    before = os.stat(secret)
    with Sandbox(without(mode, "filesystem_view", "identity")) as sb:
        assert sb.layers["landlock"] == "active" and sb.layers["seccomp"] == "active", sb.layers
        r = sb.execute(METADATA.replace("FILE", repr(str(secret))))
        after = os.stat(secret)
        assert stat.S_IMODE(after.st_mode) == 0o600, oct(after.st_mode)
        assert (after.st_mtime_ns, after.st_atime_ns) == (before.st_mtime_ns, before.st_atime_ns)
        assert os.listxattr(secret) == []
        if mode == "guard_none":
            assert r.stdout.strip() == (
                "['chmod PermissionError', 'chown PermissionError', 'utime PermissionError',"
                " 'setxattr PermissionError', 'fchmod PermissionError']"
            ), r
        assert_contained(env, r, sb)
        if mode == "guard_none":  # what it may still do in its scratch directory
            done = sb.execute("open('mine', 'w').close()\nimport os\nprint(os.stat('mine').st_size)")
            assert done.ok and done.stdout.strip() == "0", done


#: Set-id files in the scratch directory: by chmod, and made with the bits in their mode.
SET_ID = textwrap.dedent(
    """
    import os, sys
    with open("py", "wb") as f:
        f.write(b"#!" + sys.executable.encode() + b"\\n")
    seen = []
    for name, call in (
        ("chmod 4755", lambda: os.chmod("py", 0o4755)),
        ("chmod 2755", lambda: os.chmod("py", 0o2755)),
        ("fchmod", lambda: os.fchmod(os.open("py", os.O_RDONLY), 0o4755)),
        ("open", lambda: os.close(os.open("made", os.O_CREAT | os.O_WRONLY, 0o4755))),
        ("mknod", lambda: os.mknod("node", 0o100000 | 0o6755)),
        ("chmod 755", lambda: os.chmod(".", 0o755)),
    ):
        try:
            call()
            seen.append(name + " done")
        except OSError as exc:
            seen.append(name + " " + type(exc).__name__)
    print(seen)
    print(os.getcwd())
    """
)


def test_no_set_id_file_is_left_where_other_users_can_run_it(mode: str, env: Env) -> None:
    """Without the scratch tmpfs the scratch directory is on the host's disk and the child owns
    it: it wrote a file there, made it set-user-ID (``chmod 4755``) and the directory 0755, and
    every local user could run it as the child's uid (for a host that is not root, the host's own
    user: a copy of the interpreter, and that user's account was theirs). Seccomp refuses a mode
    with a set-id bit to chmod and to the calls that create files; other modes stay allowed."""
    with Sandbox(without(mode, "scratch_fs")) as sb:
        r = sb.execute(SET_ID)
        if mode == "guard_none":
            seen, scratch = r.stdout.strip().splitlines()
            assert seen == (
                "['chmod 4755 PermissionError', 'chmod 2755 PermissionError', 'fchmod PermissionError',"
                " 'open PermissionError', 'mknod PermissionError', 'chmod 755 done']"
            ), r
            found = {p.name: os.lstat(p).st_mode for p in Path(scratch).iterdir()}
            assert set(found) == {"py"}, found  # looked at while the sandbox lives
            assert not any(m & (stat.S_ISUID | stat.S_ISGID) for m in found.values()), found
        assert_contained(env, r, sb)
