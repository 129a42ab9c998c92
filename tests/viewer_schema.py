"""What the reference RLM trajectory viewer reads from each line of a ``.jsonl`` file.

The viewer is the Next.js app in ``visualizer/`` of the official RLM repository
(github.com/alexzhang13/rlm, read at commit 72d6940). Its parser,
``visualizer/src/lib/parse-logs.ts`` (``parseJSONL``), splits the file into
lines, ``JSON.parse``s each one, keeps a line whose ``type`` is ``"metadata"``
as the run's config and treats *every other line* as an iteration
(``RLMIteration`` in ``visualizer/src/lib/types.ts``). ``computeMetadata`` and
the components then read, without guards:

- ``iteration.code_blocks.length`` and ``for (block of iteration.code_blocks)``
  (parse-logs.ts ``computeMetadata``, IterationTimeline.tsx, ExecutionPanel.tsx);
- ``iteration.prompt.map(m => m.content).join('')`` and ``msg.content.length``,
  ``msg.content.match(...)`` (IterationTimeline.tsx, TrajectoryPanel.tsx,
  parse-logs.ts ``extractContextQuestion``);
- ``iteration.response.length`` / ``.slice`` (IterationTimeline.tsx,
  TrajectoryPanel.tsx); ``new Date(iteration.timestamp)`` (ExecutionPanel.tsx);
- ``block.code.split('\\n')`` (CodeWithLineNumbers.tsx); ``block.result.stdout``,
  ``.stderr`` (``.length``), ``.locals`` (``Object.keys``), ``.execution_time``
  (``.toFixed``), ``.rlm_calls`` (``.length``, ``.map``) (CodeBlock.tsx);
- per sub-call ``call.prompt_tokens``, ``call.completion_tokens``,
  ``call.execution_time.toFixed(2)``, ``call.prompt`` (string, else
  ``JSON.stringify``), ``call.response.slice(0, 500)`` (CodeBlock.tsx,
  ExecutionPanel.tsx);
- ``final_answer``: ``string | [string, string] | null`` (types.ts
  ``extractFinalAnswer``); ``iteration_time``: ``number | null``.

The metadata line's fields are read with ``?? null`` and shown as text
(LogViewer.tsx), so each must be null/absent or of the type ``RLMConfigMetadata``
declares. :func:`problems` returns what would break or mislead the viewer.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["METADATA_FIELDS", "problems", "problems_in_file"]

NUMBER = (int, float)

#: RLMConfigMetadata (types.ts): field -> accepted Python types (None always allowed).
METADATA_FIELDS: dict[str, tuple[type, ...]] = {
    "root_model": (str,),
    "max_depth": NUMBER,
    "max_iterations": NUMBER,
    "backend": (str,),
    "backend_kwargs": (dict,),
    "environment_type": (str,),
    "environment_kwargs": (dict,),
    "other_backends": (list,),
}


def _number(value: Any) -> bool:
    return isinstance(value, NUMBER) and not isinstance(value, bool)


def _check_call(call: Any, where: str) -> list[str]:
    if not isinstance(call, dict):
        return [f"{where}: not an object"]
    out = []
    if not isinstance(call.get("prompt"), (str, dict, list)):
        out.append(f"{where}.prompt: not a string or object")
    if not isinstance(call.get("response"), str):
        out.append(f"{where}.response: not a string")
    for key in ("prompt_tokens", "completion_tokens", "execution_time"):
        if not _number(call.get(key)):
            out.append(f"{where}.{key}: not a number")
    return out


def _check_block(block: Any, where: str) -> list[str]:
    if not isinstance(block, dict):
        return [f"{where}: not an object"]
    out = []
    if not isinstance(block.get("code"), str):
        out.append(f"{where}.code: not a string")
    result = block.get("result")
    if not isinstance(result, dict):
        return [*out, f"{where}.result: not an object"]
    for key in ("stdout", "stderr"):
        if not isinstance(result.get(key), str):
            out.append(f"{where}.result.{key}: not a string")
    if not isinstance(result.get("locals"), dict):
        out.append(f"{where}.result.locals: not an object")
    if not _number(result.get("execution_time")):
        out.append(f"{where}.result.execution_time: not a number")
    calls = result.get("rlm_calls")
    if not isinstance(calls, list):
        return [*out, f"{where}.result.rlm_calls: not an array"]
    for i, call in enumerate(calls):
        out += _check_call(call, f"{where}.result.rlm_calls[{i}]")
    return out


def problems(line: str) -> list[str]:
    """Why the viewer would fail on (or misread) this line; ``[]`` when it reads it fine."""
    try:
        entry = json.loads(line)
    except ValueError:
        return ["not valid JSON"]
    if not isinstance(entry, dict):
        return ["not a JSON object"]
    if entry.get("type") == "metadata":
        out = [
            f"metadata.{key}: not {'/'.join(t.__name__ for t in types)} or null"
            for key, types in METADATA_FIELDS.items()
            if entry.get(key) is not None and not isinstance(entry[key], types)
        ]
        others = entry.get("other_backends")
        if isinstance(others, list) and not all(isinstance(x, str) for x in others):
            out.append("metadata.other_backends: not a list of strings")
        return out
    # Anything else is read as an RLMIteration.
    out = []
    if not _number(entry.get("iteration")):
        out.append("iteration: not a number")
    try:
        datetime.fromisoformat(str(entry.get("timestamp")))
    except ValueError:
        out.append("timestamp: not an ISO date")
    prompt = entry.get("prompt")
    if not isinstance(prompt, list):
        out.append("prompt: not an array")
    else:
        for i, message in enumerate(prompt):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                out.append(f"prompt[{i}]: not {{role: string, content: string}}")
    if not isinstance(entry.get("response"), str):
        out.append("response: not a string")
    blocks = entry.get("code_blocks")
    if not isinstance(blocks, list):
        out.append("code_blocks: not an array")
    else:
        for i, block in enumerate(blocks):
            out += _check_block(block, f"code_blocks[{i}]")
    final = entry.get("final_answer")
    if not (
        final is None
        or isinstance(final, str)
        or (isinstance(final, list) and len(final) == 2 and all(isinstance(x, str) for x in final))
    ):
        out.append("final_answer: not a string, [string, string] or null")
    if entry.get("iteration_time") is not None and not _number(entry["iteration_time"]):
        out.append("iteration_time: not a number or null")
    return out


def problems_in_file(path: Path) -> list[str]:
    """Every problem of every line of *path*, as ``"<file>:<line>: <problem>"``."""
    text = path.read_text(encoding="utf-8")
    return [
        f"{path.name}:{n}: {problem}"
        for n, line in enumerate(text.strip().split("\n"), 1)
        if line.strip()
        for problem in problems(line)
    ]
