"""The host's filesystem surface: what the code can do to files the host, or another local user,
meets outside the sandbox's own scratch directory.

Each attack runs under the default policy and with ``python.guard = "none"``, with layers
turned off where a policy may turn them off (or a machine lacks them): ``scratch_fs`` (the
scratch directory is then on the host's disk) and ``filesystem_view`` (the host's files can
then be named, and only Landlock, the uid and seccomp stand in the way). Then what another
unprivileged local user can make the host do to files through paths it shares with them.
"""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest

from rlm.errors import ConfigurationError
from rlm.trajectory import TrajectoryLogger
from rlm.view import default_output, write_page
from sandbox import Policy, Sandbox
from sandbox.layers import LAYERS
from tests.security.conftest import Env, assert_contained, policy_for


def without(mode: str, *layers: str, **changes: Any) -> Policy:
    """The attack policy of *mode* with *layers* turned off (and no longer required)."""
    over: dict[str, Any] = {f"isolation.{name}": False for name in layers}
    over["isolation.require"] = [name for name in LAYERS if name not in layers]
    over.update(changes)
    return policy_for(mode, **over)


#: Child code: ``attempts(calls)`` runs each ``(name, call)`` and says how it ended.
ATTEMPTS = textwrap.dedent(
    """
    def attempts(calls):
        seen = []
        for name, call in calls:
            try:
                call()
                seen.append(name + " done")
            except OSError as exc:
                seen.append(name + " " + type(exc).__name__)
        return seen
    """
)

#: Every change of a file's metadata that Landlock does not govern, on the file FILE.
METADATA = ATTEMPTS + textwrap.dedent(
    """
    import os
    print(attempts((
        ("chmod", lambda: os.chmod(FILE, 0o644)),
        ("chown", lambda: os.chown(FILE, -1, -1)),
        ("utime", lambda: os.utime(FILE, (0, 0))),
        ("setxattr", lambda: os.setxattr(FILE, "user.planted", b"1")),
        ("fchmod", lambda: os.fchmod(os.open(FILE, os.O_PATH), 0o644)),
    )))
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
SET_ID = ATTEMPTS + textwrap.dedent(
    """
    import os, sys
    with open("py", "wb") as f:
        f.write(b"#!" + sys.executable.encode() + b"\\n")
    print(attempts((
        ("chmod 4755", lambda: os.chmod("py", 0o4755)),
        ("chmod 2755", lambda: os.chmod("py", 0o2755)),
        ("fchmod", lambda: os.fchmod(os.open("py", os.O_RDONLY), 0o4755)),
        ("open", lambda: os.close(os.open("made", os.O_CREAT | os.O_WRONLY, 0o4755))),
        ("mknod", lambda: os.mknod("node", 0o100000 | 0o6755)),
        ("chmod 755", lambda: os.chmod(".", 0o755)),
    )))
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


# ------------------------------------------------------------------ another local user
#: The uid of the other local user who plants links (nobody: any uid but the host's and root's).
OTHER_UID = 65534


def plant_link(where: Path, target: Path) -> None:
    """A symbolic link at *where* to *target*, owned by another local user, as one they made in a
    directory they may write (a shared log directory, 0777 without the sticky bit)."""
    os.symlink(target, where)
    os.lchown(where, OTHER_UID, OTHER_UID)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A log directory every local user may write (not sticky: fs.protected_symlinks does not
    cover it), and a file of the host's user beside it that nobody else may write."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    victim = tmp_path / "victim"
    victim.write_text("the host user's own file\n")
    victim.chmod(0o600)
    return d


@pytest.mark.skipif(os.geteuid() != 0, reason="planting a link owned by another user needs root")
def test_a_trajectory_is_not_appended_through_a_link_another_user_planted(shared: Path) -> None:
    """A trajectory line is appended by opening ``<run_id>.jsonl`` again each time. Another user
    who may write the log directory replaced the file with a link to a file of the host's user,
    and the next line (text the model chose) was appended to that file. A link owned by another
    user is now not followed: the write fails, nothing reaches the target."""
    victim = shared.parent / "victim"
    log = TrajectoryLogger(shared, "rlm_planted")
    log.metadata(model="m")
    log.path.unlink()
    plant_link(log.path, victim)
    with pytest.raises(ConfigurationError, match="symbolic link owned by uid 65534"):
        log.metadata(model="echo pwned")
    assert victim.read_text() == "the host user's own file\n"
    log.path.unlink()  # the link (what the suite's check of every trajectory would read)


@pytest.mark.skipif(os.geteuid() != 0, reason="planting a link owned by another user needs root")
def test_rlm_view_writes_no_page_through_a_link_another_user_planted(shared: Path) -> None:
    """``rlm view LOG`` writes its page beside LOG, at a name anyone can tell from LOG's: another
    user who may write the directory planted a link there, and the page overwrote the file it
    led to (truncated, then the page). Refused now; a link of the host's own user is followed."""
    victim = shared.parent / "victim"
    log = TrajectoryLogger(shared, "rlm_viewed")
    log.metadata(model="m")
    page = default_output(log.path)
    plant_link(page, victim)
    with pytest.raises(OSError, match="symbolic link owned by uid 65534"):
        write_page(log.path)
    assert victim.read_text() == "the host user's own file\n"
    page.unlink()
    mine = shared.parent / "mine.html"
    page.symlink_to(mine)  # the host user's own link: followed, as before
    assert write_page(log.path) == page and mine.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.skipif(os.geteuid() != 0, reason="a scratch directory is given to a uid of its own only as root")
@pytest.mark.parametrize(
    "swap", ["a link, before the lock", "a link, after the lock", "a directory of another user"]
)
def test_the_scratch_directory_given_to_the_sandbox_uid_cannot_be_swapped(
    swap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host makes the scratch directory (``mkdtemp`` in TMPDIR), locks it, and gives it to the
    sandbox's uid. It gave it by name: in a TMPDIR another user may write and that is not sticky,
    they could rename the directory away and leave a link to any directory (or a directory of
    their own) at its name, and ``chown`` made that the sandbox uid's. It is given on the
    descriptor the host locks, opened without following a link, and only if it is the host's
    user's: here the swap lands at each moment, and the victim keeps its owner."""
    import tempfile

    import sandbox.sandbox as host
    from sandbox.errors import SandboxStartError

    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o755)
    if swap == "a directory of another user":
        os.chown(victim, OTHER_UID, OTHER_UID)
    owner = os.stat(victim).st_uid

    def plant(scratch: str) -> None:
        os.rename(scratch, scratch + "-moved")
        if swap == "a directory of another user":
            os.rename(victim, scratch)
        else:
            os.symlink(victim, scratch)

    real_mkdtemp, real_lock = tempfile.mkdtemp, host._lock_scratch
    made: list[str] = []

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        path = real_mkdtemp(*args, **kwargs)
        if kwargs.get("prefix") == "sandbox-" and not made:
            made.append(path)
            if swap != "a link, after the lock":
                plant(path)
        return path

    def lock(path: str) -> int:
        fd = real_lock(path)
        if swap == "a link, after the lock" and path in made:
            plant(path)
        return fd

    monkeypatch.setattr(host.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(host, "_lock_scratch", lock)
    policy = policy_for("default")
    try:
        try:
            with Sandbox(policy, pool=None) as sb:
                assert swap == "a link, after the lock", swap  # the start had to fail
                assert sb.execute("x = 1").ok
        except SandboxStartError as exc:
            assert swap != "a link, after the lock", exc
        assert made
        assert os.stat(victim if swap != "a directory of another user" else made[0]).st_uid == owner
    finally:
        monkeypatch.undo()
        for path in made:
            if os.path.islink(path):
                os.unlink(path)
            elif os.path.isdir(path) and swap == "a directory of another user":
                os.rename(path, victim)
            for leftover in (path + "-moved",):
                if os.path.isdir(leftover):
                    os.rmdir(leftover)
