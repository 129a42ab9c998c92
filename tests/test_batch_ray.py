"""``rlm batch --engine ray`` on a local Ray instance this module starts (2 CPUs), against the loopback server.

Ray binds its services to the machine's own address and to every interface,
so the module runs in a network namespace of its own with only a loopback
interface (entered by the test's main thread, left again at the end): every
Ray service, the model server and the batch command talk over 127.0.0.1 only.

The Ray instance is started by the test process *without* any provider key in
its environment, so a worker can only get the key from the batch job's
runtime environment; the server then sees that key on every request, and
no file of Ray's session directory (its logs included), no output and no
trajectory contains it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.llm_server import LLMServer
from tests.test_batch import KEY, MODEL, cli_env, expected, read_out, square_reply, write_items

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


CLONE_NEWNET = 0x40000000
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40


@contextlib.contextmanager
def loopback_only_network() -> Iterator[None]:
    """Move the calling thread (and whatever it starts) into a new network namespace whose only
    interface is loopback, up; move it back afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            pytest.skip(f"no private network namespace for Ray: {os.strerror(ctypes.get_errno())}")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                flags = IFF_UP | IFF_LOOPBACK | IFF_RUNNING
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22s", b"lo", flags, b""))
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
    finally:
        os.close(original)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """(address, Ray's temp dir) of a local Ray instance with 2 CPUs, stopped after the module."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rlmray", dir="/tmp"))
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.endswith("_API_KEY")}
    network = loopback_only_network()
    network.__enter__()
    try:
        context = ray.init(
            num_cpus=2,
            _node_ip_address="127.0.0.1",  # every service of the test's Ray instance on loopback
            include_dashboard=False,
            _temp_dir=str(temp_dir),
            log_to_driver=False,
        )
        yield context.address_info["gcs_address"], temp_dir
    finally:
        ray.shutdown()
        network.__exit__(None, None, None)
        os.environ.update(saved)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(900)
def test_ray_engine_gives_the_same_results_and_never_shows_the_key(tmp_path: Path, ray_cluster):
    address, ray_dir = ray_cluster
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 50)
    with LLMServer(square_reply, latency_s=0.05) as srv:  # 600 s: each Ray worker imports litellm
        done = run_cli("batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base", srv.base_url,
                       "--engine", "ray", "--ray-address", address, "--log-dir", str(tmp_path / "logs"),
                       env=cli_env(), cwd=tmp_path, timeout=600)  # fmt: skip
        requests = srv.requests
    assert done.returncode == 0, done.stderr
    records = read_out(out)
    assert sorted(r["id"] for r in records) == [f"q{i:02d}" for i in range(50)]
    assert all(r["answer"] == expected(r["id"]) and r["stop_reason"] == "final" for r in records)
    assert all(r["cost_usd"] > 0 for r in records)
    # each line records the question it answered, hashed in the driver as the context was read
    assert len({r["question_sha256"] for r in records}) == 50
    assert all(len(r["question_sha256"]) == 64 for r in records)
    # the key reached the workers (through the runtime environment: this cluster's processes lack it)
    assert len(requests) == 50
    assert all(q.headers.get("authorization") == f"Bearer {KEY}" for q in requests)
    # ... and was written nowhere: not in Ray's session directory (logs included), outputs or trajectories
    assert any(p.is_file() for p in ray_dir.glob("session_*/logs/*.log"))
    for path in [*ray_dir.rglob("*"), *tmp_path.rglob("*")]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in done.stderr + done.stdout


def test_ray_engine_fails_closed_on_a_missing_sandbox_layer(tmp_path: Path, ray_cluster):
    """The default policy requires every layer: on a node lacking one the batch stops, naming the layer."""
    from sandbox.doctor import layer_report

    missing = [layer for layer, state in layer_report().items() if state.startswith("unavailable")]
    if not missing:
        pytest.skip("every sandbox layer works on this machine (the only node): no node lacks one")
    address, _ = ray_cluster
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_items(inp, 3)
    done = run_cli("batch", str(inp), "--out", str(out), "-m", MODEL, "--api-base", "http://127.0.0.1:9/v1",
                   "--engine", "ray", "--ray-address", address, env=cli_env(), cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and missing[0] in done.stderr and "Ray node" in done.stderr, done.stderr
    assert read_out(out) == []
