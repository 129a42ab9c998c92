"""How fast `rlm view` writes and the browser loads the page of a large run.

Builds a synthetic trajectory of ITERATIONS iterations and SUB_CALLS sub-calls
(spread over the iterations, one child RLM run every 100 iterations), with its
audit log, then measures (medians of --repeats):

- generation: ``rlm.view.build_page`` on the trajectory (Python, this process);
- page load in headless chromium (Playwright on /usr/bin/chromium), from
  navigation start to the page's ``data-ready`` mark;
- opening one iteration with its sub-calls, scrolling the page top to bottom,
  and a search over everything.

    .venv/bin/python bench/view.py [--iterations 1000] [--sub-calls 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic_run(
    directory: Path, iterations: int = 1000, sub_calls: int = 10_000, run_id: str = "rlm_bench"
) -> Path:
    """Write a trajectory (and a valid audit log) of the given size; return the trajectory's path."""
    from sandbox.audit import AuditLog

    directory.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(directory / f"{run_id}.audit.log")
    start = datetime(2026, 1, 1, 12, 0, 0)
    per = sub_calls // iterations
    lines = [
        {"type": "metadata", "run_id": run_id, "parent_run_id": None, "root_model": "root-model",
         "sub_model": "sub-model", "depth": 0, "max_depth": 2, "max_iterations": iterations, "backend": "bench",
         "backend_kwargs": {}, "environment_type": "sandbox", "environment_kwargs": {"policy": "default"},
         "other_backends": ["sub-model"], "query": "How many widgets are there?", "context_description": "synthetic"}
    ]  # fmt: skip
    t = start
    for i in range(1, iterations + 1):
        code = f"# step {i}\nparts = context[{i}::{iterations}]\nanswers = llm_query_batched([f'count in {{p}}' for p in parts])\nprint(len(answers), 'done')"
        calls = []
        for c in range(per):
            calls.append({
                "root_model": "sub-model", "prompt": f"count widgets in part {i}.{c}: " + "lorem ipsum " * 20,
                "response": f"{(i * 31 + c) % 97} widgets", "prompt_tokens": 45, "completion_tokens": 3,
                "execution_time": 0.4 + (c % 7) * 0.1, "timestamp": (t + timedelta(seconds=0.2 + 0.01 * c)).isoformat(),
                "usage_summary": {"model_usage_summaries": {"sub-model": {"total_calls": 1, "total_input_tokens": 45,
                                  "total_output_tokens": 3, "cost_usd": 0.0001}}},
            })  # fmt: skip
        audit.append({"time": t.isoformat(), "sandbox_id": "bench", "seq": i, "policy": "default", "code": code,
                      "code_sha256": __import__("hashlib").sha256(code.encode()).hexdigest(), "outcome": "ok",
                      "duration_s": 1.1, "cpu_s": 0.01, "max_rss_bytes": 30_000_000})  # fmt: skip
        t += timedelta(seconds=1.5)
        lines.append({
            "type": "iteration", "iteration": i, "timestamp": t.isoformat(),
            "prompt": [{"role": "system", "content": "system prompt"}, {"role": "user", "content": f"turn {i}"}],
            "response": f"Step {i}: counting.\n```repl\n{code}\n```", "final_answer": "42" if i == iterations else None,
            "code_blocks": [{"code": code, "result": {"stdout": f"{per} done\n", "stderr": "", "locals": {"parts": "<list>"},
                             "execution_time": 1.1, "rlm_calls": calls}}],
            "iteration_time": 1.5, "usage": {"model": "root-model", "prompt_tokens": 900, "completion_tokens": 60, "cost_usd": 0.001},
        })  # fmt: skip
    audit.close()
    path = directory / f"{run_id}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (directory / f"{run_id}.result.json").write_text(json.dumps({
        "run_id": run_id, "answer": "42", "stop_reason": "final", "iterations": iterations,
        "execution_time": iterations * 1.5, "usage": {}}))  # fmt: skip
    return path


SCROLL = """async () => { const t = performance.now();
    for (let y = 0; y < document.body.scrollHeight; y += 800) {
        window.scrollTo(0, y); await new Promise(r => requestAnimationFrame(r)); }
    return performance.now() - t; }"""


# In-page timings (ms): the work and the layout it causes, without the test driver's round trips.
OPEN = """(n) => { const t = performance.now();
    const it = document.querySelectorAll("details.iteration")[n];
    it.open = true; it.dispatchEvent(new Event("toggle"));  // build now, not on the async toggle event
    const calls = it.querySelector("details.subcalls"); calls.open = true; calls.dispatchEvent(new Event("toggle"));
    document.body.offsetHeight; return performance.now() - t; }"""
SEARCH = """(q) => { const box = document.getElementById("search"); box.value = q; const t = performance.now();
    box.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter"}));
    document.body.offsetHeight; return performance.now() - t; }"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--sub-calls", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from rlm.view import build_page

    with tempfile.TemporaryDirectory(prefix="rlm-view-bench-") as tmp:
        path = synthetic_run(Path(tmp), args.iterations, args.sub_calls)
        gen = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            page = build_page(path)
            gen.append(time.perf_counter() - t0)
        html = Path(tmp) / "page.html"
        html.write_text(page, encoding="utf-8")
        print(f"trajectory {path.stat().st_size / 1e6:.1f} MB, page {len(page.encode()) / 1e6:.1f} MB")
        print(f"generation (build_page): median {statistics.median(gen):.2f} s over {args.repeats}")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            print("page load: skipped (pip install -e '.[browser]')")
            return 0
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"]
            )
            loads, opens, scrolls, searches, baselines = [], [], [], [], []
            for _ in range(args.repeats):
                pg = browser.new_page(viewport={"width": 1280, "height": 900})
                pg.goto(html.as_uri())
                pg.wait_for_selector("body[data-ready]", timeout=120_000)
                loads.append(float(pg.evaluate("document.body.dataset.ready")) / 1000)
                opens.append(pg.evaluate(OPEN, args.iterations // 2) / 1000)
                height = pg.evaluate("document.body.scrollHeight")
                scrolls.append(pg.evaluate(SCROLL) / 1000)
                # the same scroll over a plain page of text of the same height: what painting costs here
                plain = browser.new_page(viewport={"width": 1280, "height": 900})
                rows = "".join(
                    f"<p style='margin:0;height:40px'>Iteration {i}: lorem ipsum dolor sit amet</p>"
                    for i in range(height // 40)
                )
                plain.set_content(f"<body>{rows}</body>")
                baselines.append(plain.evaluate(SCROLL) / 1000)
                plain.close()
                searches.append(pg.evaluate(SEARCH, "part 777.3") / 1000)
                pg.close()
            browser.close()
        med = statistics.median
        print(f"page load to ready (chromium): median {med(loads):.2f} s")
        print(
            f"open an iteration and its sub-calls (in-page, layout included): median {med(opens) * 1000:.0f} ms"
        )
        print(
            f"scroll the whole page, one frame per 800 px: median {med(scrolls):.2f} s "
            f"(a plain text page of the same height: {med(baselines):.2f} s, ratio {med(scrolls) / med(baselines):.1f})"
        )
        print(f"search all text (in-page, results drawn): median {med(searches) * 1000:.0f} ms")
        print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
