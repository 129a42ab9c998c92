"""``rlm mcp`` through the official MCP client over stdio: round trips and sessions per second.

    python -m bench.mcp [--calls 200] [--sessions 100] [--policy NAME|PATH] [--out FILE.json]

Starts ``python -m rlm mcp`` the way an MCP client does (a subprocess on
stdio) and measures, after a warm-up, medians and p95 of:

- ``ping``: the SDK's own request round trip, the floor for any tool call;
- ``session_list``: a tool call that touches no sandbox (the SDK's tool-call path and ours);
- ``python_exec("x = 1 + 1")`` in an open session (the REPL kept warm);
- ``python_exec("x = 1 + 1")`` without a session (a fresh sandbox per call);
- ``session_open`` + ``session_close`` one after the other, as sessions per second,
  and with 8 clients' worth of calls in flight at once.

The audit log goes to a temporary file. Figures depend on the machine and its load: compare them with
``ping`` (the ratio) rather than across machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: its own directory would shadow the mcp package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import anyio  # noqa: E402
from mcp import ClientSession, StdioServerParameters, stdio_client  # noqa: E402


async def sample(fn: Callable[[], Awaitable[Any]], n: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(name: str, xs: list[float]) -> dict[str, Any]:
    xs = sorted(xs)
    return {
        "measure": name,
        "n": len(xs),
        "median_ms": round(statistics.median(xs) * 1000, 3),
        "p95_ms": round(xs[int(0.95 * (len(xs) - 1))] * 1000, 3),
    }


async def measure(calls: int, sessions: int, policy: str) -> list[dict[str, Any]]:
    audit = Path(tempfile.mkdtemp(prefix="rlm-bench-mcp-")) / "audit.jsonl"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "rlm", "mcp", "--policy", policy, "--audit-log", str(audit), "--max-sessions", "16"],
        cwd=str(ROOT),
    )
    rows: list[dict[str, Any]] = []
    async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        await s.list_tools()  # the client caches the output schemas it validates results against

        async def exec_(session_id: str | None = None) -> None:
            args = {"code": "x = 1 + 1", **({"session_id": session_id} if session_id else {})}
            res = await s.call_tool("python_exec", args)
            assert not res.is_error and res.structured_content["ok"], res

        async def open_close() -> None:
            res = await s.call_tool("session_open", {})
            await s.call_tool("session_close", {"session_id": res.structured_content["session_id"]})

        ping = await sample(s.send_ping, calls)
        rows.append(summary("ping (SDK floor)", ping))
        sid = (await s.call_tool("session_open", {})).structured_content["session_id"]
        rows.append(
            summary(
                "session_list (a tool call, no sandbox)",
                await sample(lambda: s.call_tool("session_list", {}), calls),
            )
        )
        rows.append(summary("python_exec in a session", await sample(lambda: exec_(sid), calls)))
        rows.append(summary("python_exec, fresh sandbox", await sample(exec_, max(20, calls // 4))))
        await s.call_tool("session_close", {"session_id": sid})

        cycle = await sample(open_close, sessions)
        row = summary("session_open + session_close", cycle)
        row["per_second"] = round(1 / statistics.median(cycle), 1)
        rows.append(row)

        async def worker() -> None:
            for _ in range(sessions // 8):
                await open_close()

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(worker)
        elapsed = time.perf_counter() - t0
        rows.append(
            {
                "measure": "session_open + session_close, 8 in flight",
                "n": 8 * (sessions // 8),
                "per_second": round(8 * (sessions // 8) / elapsed, 1),
            }
        )
    floor = rows[0]["median_ms"]
    for row in rows:
        if "median_ms" in row:
            row["ratio_to_ping"] = round(row["median_ms"] / floor, 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200, help="round trips per measure (default: 200)")
    ap.add_argument("--sessions", type=int, default=100, help="open/close cycles (default: 100)")
    ap.add_argument("--policy", default="default")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = anyio.run(measure, args.calls, args.sessions, args.policy)
    print("| measure | n | median | p95 | ratio to ping | per second |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        med = f"{r['median_ms']:.2f} ms" if "median_ms" in r else "-"
        p95 = f"{r['p95_ms']:.2f} ms" if "p95_ms" in r else "-"
        print(
            f"| {r['measure']} | {r['n']} | {med} | {p95} | {r.get('ratio_to_ping', '-')} | {r.get('per_second', '-')} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
