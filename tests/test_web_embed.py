"""AsyncSandbox behind a real ASGI server: uvicorn, two worker processes, HTTP clients.

Sessions live in the workers; a client that goes away mid-cell has the cell stopped; SIGTERM to
the server while cells run ends it within its graceful timeout and leaves no process and no
scratch directory, although every uvicorn worker ends by re-raising that SIGTERM (no exit
handler runs: the fork server removes what the worker's sandboxes and pool held).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent

APP = '''
import asyncio, secrets
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from sandbox import AsyncSandbox

SESSIONS = {}

async def create(request):
    sid = secrets.token_hex(8)
    SESSIONS[sid] = await AsyncSandbox("default", audit_log=None).start()
    return JSONResponse({"id": sid})

async def execute(request):
    sb, code = SESSIONS.get(request.path_params["sid"]), (await request.json())["code"]
    if sb is None:  # held by the other worker: a client on a new connection may land here
        return JSONResponse({"error": "no such session in this worker"}, status_code=404)
    task = asyncio.ensure_future(sb.execute(code))

    async def stop_when_the_client_goes():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(stop_when_the_client_goes())
    try:
        r = await task
    finally:
        watcher.cancel()
    return JSONResponse({"ok": r.ok, "stdout": r.stdout, "state_lost": r.state_lost})

app = Starlette(routes=[
    Route("/sessions", create, methods=["POST"]),
    Route("/sessions/{sid}/execute", execute, methods=["POST"]),
])
'''


def test_uvicorn_two_workers_sessions_disconnect_and_sigterm_leave_nothing(tmp_path: Path) -> None:
    (tmp_path / "webapp.py").write_text(APP)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "webapp:app", "--fd", str(listener.fileno()), "--workers", "2",
         "--timeout-graceful-shutdown", "2", "--log-level", "critical"],
        cwd=tmp_path, env=env, pass_fds=[listener.fileno()], start_new_session=True,
    )  # fmt: skip
    listener.close()
    seen: list[psutil.Process] = []
    try:

        async def session(i: int, step: asyncio.Event) -> bool:
            async with contextlib.AsyncExitStack() as stack:
                client = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=180))
                sid = (await client.post("/sessions")).json()["id"]
                url = f"/sessions/{sid}/execute"
                first = (await client.post(url, json={"code": f"n = {i}"})).json()
                if i == 0:  # goes away mid-cell: the cell is stopped, the next one says so
                    with pytest.raises(httpx.ReadTimeout):
                        await client.post(url, json={"code": "import time\ntime.sleep(60)"}, timeout=1.0)
                    # The timed-out connection is closed; a new one reaches either worker, and only
                    # one holds the session (sticky sessions are the deployment's job, not ours).
                    for _ in range(100):
                        client = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=180))
                        reply = await client.post(url, json={"code": "print(globals().get('n'))"})
                        if reply.status_code != 404:
                            break
                        await client.aclose()
                    again = reply.json()
                else:
                    again = (await client.post(url, json={"code": "print(globals().get('n'))"})).json()
                assert first["ok"] and again["stdout"] == ("None\n" if i == 0 else f"{i}\n")
                step.set()
                try:  # running when the server is told to stop
                    await client.post(url, json={"code": "while True: pass"})
                except httpx.HTTPError:
                    pass
                return bool(again["state_lost"])

        async def drive() -> list[bool]:
            deadline = time.monotonic() + 120
            while True:
                try:
                    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                        await client.get("/nothing")
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline and server.poll() is None, "uvicorn did not start"
                    await asyncio.sleep(0.1)
            steps = [asyncio.Event() for _ in range(6)]
            tasks = [asyncio.ensure_future(session(i, steps[i])) for i in range(6)]
            # (A hang detector, not a speed bound.) A session that fails before its step says why.
            stepped = asyncio.ensure_future(asyncio.gather(*(s.wait() for s in steps)))
            await asyncio.wait([stepped, *tasks], timeout=180, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done():
                    task.result()
            assert stepped.done(), f"sessions {[i for i, s in enumerate(steps) if not s.is_set()]} hung"
            await asyncio.sleep(0.5)  # the last cells are running
            seen.extend(psutil.Process(server.pid).children(recursive=True))
            # two workers, each with its fork server, the sandboxes' children and the pool's
            assert len(seen) > 2 + 2 + 6
            server.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(asyncio.gather(*tasks), 180)

        outcomes = asyncio.run(drive())
        assert outcomes == [True] + [False] * 5
        assert server.wait(30) == 0
        _, alive = psutil.wait_procs(seen, timeout=10)
        assert alive == []
        assert os.listdir(tmp) == []
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
