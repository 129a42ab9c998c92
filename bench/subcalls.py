"""Sub-call throughput and overhead of the RLM path, against the loopback server.

Two measurements, each repeated and reported as medians:

1. **Batch**: the model's code calls ``llm_query_batched`` with N prompts
   (default 256) against a server that sleeps L (default 50 ms) per request.
   Wall time of that block vs the ideal lower bound ``N / concurrency x L``.
   For reference, the same N calls made straight from the host with
   ``rlm.llm.complete`` on a thread pool of the same size (no sandbox, no
   RLM): the ceiling litellm itself sets on this machine.
2. **Overhead**: sequential ``llm_query`` calls (child -> parent -> litellm
   -> server -> back) against a server that answers at once, per call, vs a
   direct ``rlm.llm.complete`` call from the host to the same server.

The server runs in its own process (``python -m tests.llm_server``) so its
CPU does not compete with the client for this interpreter's GIL. The root
model is scripted (no server round trip); sub-calls go through litellm.

    .venv/bin/python bench/subcalls.py [--prompts 256] [--latency 0.05] [--concurrency 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlm import RLM, Completion, LiteLLMBackend, ScriptedBackend  # noqa: E402
from rlm import llm as rlm_llm  # noqa: E402

SUB_MODEL = "openai/bench-sub"
KEY = "bench-key"


class _Router:
    """Root model scripted, everything else through litellm."""

    def __init__(self, root: ScriptedBackend, rest: LiteLLMBackend) -> None:
        self.root, self.rest = root, rest

    def complete(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Completion:
        return (self.root if model == "root" else self.rest).complete(model, messages, **kwargs)

    def count_tokens(self, model: str, messages: list[dict[str, Any]]) -> int:
        return self.root.count_tokens(model, messages)

    def max_input_tokens(self, model: str) -> int | None:
        return None


@contextmanager
def server(latency: float) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.llm_server", "--latency", str(latency), "--reply", "ok"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(10)


def _block_time(rlm: RLM, code: str) -> float:
    result = rlm.completion("bench context", "bench")
    block = result.history[0]["code_blocks"][0]
    assert result.answer == "done", (result.stop_reason, block["result"]["stderr"])
    return float(block["result"]["execution_time"])


def _rlm(base: str, code: str, concurrency: int) -> RLM:
    reply = f"```repl\n{code}\nFINAL('done')\n```"
    backend = _Router(
        ScriptedBackend(lambda model, messages: reply), LiteLLMBackend(api_base=base, api_key=KEY)
    )
    return RLM("root", sub_model=SUB_MODEL, backend=backend, max_concurrency=concurrency)


def batch(prompts: int, latency: float, concurrency: int, repeats: int) -> None:
    code = f"r = llm_query_batched(['p' + str(i) for i in range({prompts})])\nassert len(r) == {prompts} and r[0] == 'ok', r[:3]"
    ideal = prompts / concurrency * latency
    with server(latency) as base:
        messages = [{"role": "user", "content": "warm up"}]
        for _ in range(3):
            rlm_llm.complete(SUB_MODEL, messages, api_base=base, api_key=KEY)
        rlm = _rlm(base, code, concurrency)
        rlm_times, direct_times = [], []
        for _ in range(repeats):
            rlm_times.append(_block_time(rlm, code))
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(
                    pool.map(
                        lambda i: rlm_llm.complete(
                            SUB_MODEL, [{"role": "user", "content": f"p{i}"}], api_base=base, api_key=KEY
                        ),
                        range(prompts),
                    )
                )
            direct_times.append(time.perf_counter() - t0)
    rlm_med, direct_med = statistics.median(rlm_times), statistics.median(direct_times)
    print(
        f"batch: {prompts} prompts, {latency * 1000:.0f} ms latency per request, max_concurrency {concurrency}, {repeats} runs"
    )
    print(f"  ideal lower bound ({prompts}/{concurrency} x {latency * 1000:.0f} ms)   {ideal:7.3f} s")
    print(f"  llm_query_batched from the sandbox       {rlm_med:7.3f} s   {rlm_med / ideal:5.2f}x ideal")
    print(
        f"  same calls straight from the host        {direct_med:7.3f} s   {direct_med / ideal:5.2f}x ideal"
    )
    print(f"  RLM path vs direct litellm               {rlm_med / direct_med:5.2f}x")


def overhead(calls: int, repeats: int) -> None:
    code = f"for i in range({calls}):\n    assert llm_query('p' + str(i)) == 'ok'"
    with server(0.0) as base:
        messages = [{"role": "user", "content": "p"}]
        for _ in range(3):
            rlm_llm.complete(SUB_MODEL, messages, api_base=base, api_key=KEY)
        rlm = _rlm(base, code, 1)
        per_call, direct = [], []
        for _ in range(repeats):
            per_call.append(_block_time(rlm, code) / calls)
            t0 = time.perf_counter()
            for i in range(calls):
                rlm_llm.complete(
                    SUB_MODEL, [{"role": "user", "content": f"p{i}"}], api_base=base, api_key=KEY
                )
            direct.append((time.perf_counter() - t0) / calls)
    rlm_med, direct_med = statistics.median(per_call), statistics.median(direct)
    print(f"overhead: {calls} sequential llm_query calls, server answering at once, {repeats} runs")
    print(f"  per sub-call, child -> parent -> litellm -> server -> back   {rlm_med * 1000:7.2f} ms")
    print(f"  per call, rlm.llm.complete straight from the host          {direct_med * 1000:7.2f} ms")
    print(
        f"  added by the sandbox round trip and the RLM bookkeeping    {(rlm_med - direct_med) * 1000:7.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--calls", type=int, default=100, help="sequential calls for the overhead measurement"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch(args.prompts, args.latency, args.concurrency, args.repeats)
    overhead(args.calls, args.repeats)
    from sandbox import shutdown

    shutdown()


if __name__ == "__main__":
    main()
