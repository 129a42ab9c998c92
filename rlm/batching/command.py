"""``rlm batch INPUT.jsonl --out OUT.jsonl -m MODEL ...``: the command behind the CLI's ``batch`` block.

Exit status: 0 when every item of the input has an answer in OUT; 1 when
some item failed or was skipped for the budget (its line says why), in this
run or in an earlier one whose line is still in OUT; 2 for
usage errors, bad input without ``--skip-bad``, an id whose line in OUT answered
another question (its query or context changed since), and failures that would fail
every item (a rejected key, an unknown model, an endpoint that refuses
connections, a missing sandbox layer); 130 on Ctrl-C. Whatever the status,
the lines already in OUT are whole and final, and rerunning the same command
runs only the items that are missing. A batch that wrote no line removes the
OUT it made (an OUT that was there stays).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from rlm.batching.engine import BatchResult, batch
from rlm.batching.items import BatchItem, InputProblem, read_input
from rlm.batching.outfile import ResultsFile
from rlm.batching.progress import Progress
from rlm.batching.worker import error_record
from rlm.checks import check_log_dir, module_found
from rlm.display import visible
from rlm.errors import ConfigurationError, RLMError

__all__ = ["run_batch_command"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_SHOWN_PROBLEMS = 20
_SHOWN_IDS = 5


def _say(message: str) -> None:
    """A line to the operator. Its control characters are shown escaped: a fatal error quotes the
    model server's reply, and a bad input line names what it holds."""
    print(f"rlm batch: {visible(message)}", file=sys.stderr, flush=True)


def _bad_records(problems: list[InputProblem], taken: set[str], done: set[str]) -> list[BatchResult]:
    """The output lines standing for bad input lines (--skip-bad): the line's id, or ``line:N``."""
    records = []
    for problem in problems:
        if problem.id is not None and problem.id in done:
            continue  # already answered under this id by an earlier run
        record_id = problem.id or f"line:{problem.line}"
        while record_id in taken:
            record_id += "'"
        taken.add(record_id)
        records.append(BatchResult.from_record(error_record(record_id, "bad_input", str(problem))))
    return records


def _read(path: Path) -> tuple[list[BatchItem], list[InputProblem]]:
    items: list[BatchItem] = []
    problems: list[InputProblem] = []
    for entry in read_input(path):
        if isinstance(entry, InputProblem):
            problems.append(entry)
        else:
            items.append(entry)
    return items, problems


def _changed(items: list[BatchItem], results: ResultsFile) -> list[str]:
    """The ids whose line in OUT records another question than the item's now (lines without
    ``question_sha256``, written before it was recorded, are taken as answering it). A
    ``context_path`` is read again to be hashed; one that cannot be read raises ConfigurationError."""
    changed = []
    for item in items:
        recorded = results.questions.get(item.id)
        if recorded is None:
            continue
        try:
            question = item.question_sha256()
        except ConfigurationError as exc:
            raise ConfigurationError(f"cannot check what id {item.id!r} asks now: {exc}") from None
        if question != recorded:
            changed.append(item.id)
    return changed


def _engine_flag_problem(args: argparse.Namespace) -> str | None:
    """``--ray-address`` without ``--engine ray`` (refused, not ignored), or the ray engine
    without Ray installed: said before anything runs, not after a summary of nothing."""
    if args.engine != "ray":
        return "--ray-address needs --engine ray" if args.ray_address is not None else None
    if not module_found("ray"):
        return "the ray engine needs Ray: pip install 'rlm[ray]' (no module named 'ray')"
    return None


def run_batch_command(args: argparse.Namespace) -> int:
    """Run ``rlm batch`` with parsed arguments (see :func:`rlm.cli._add_batch_parser`)."""
    if not args.model:
        _say("no model: pass -m MODEL or set RLM_MODEL")
        return EXIT_USAGE
    from rlm.cli import check_run_flags

    bad_flag = check_run_flags(args) or _engine_flag_problem(args)  # before anything is read, run or written
    if bad_flag is not None:
        _say(bad_flag)
        return EXIT_USAGE
    source, out = Path(args.input), Path(args.out)
    with contextlib.suppress(OSError):
        if out.exists() and os.path.samefile(source, out):
            _say("--out must not be the input file")
            return EXIT_USAGE
    try:
        items, problems = _read(source)
    except RLMError as exc:
        _say(str(exc))
        return EXIT_USAGE
    if problems and not args.skip_bad:
        for problem in problems[:_SHOWN_PROBLEMS]:
            _say(f"{source}: {problem}")
        if len(problems) > _SHOWN_PROBLEMS:
            _say(f"... and {len(problems) - _SHOWN_PROBLEMS} more bad line(s)")
        _say(
            f"{len(problems)} bad line(s); nothing was run (--skip-bad records them as errors and runs the rest)"
        )
        return EXIT_USAGE
    if args.log_dir is not None and args.engine == "local":  # with Ray it is a path on the nodes
        try:
            check_log_dir(args.log_dir, "--log-dir")
        except RLMError as exc:
            _say(str(exc))
            return EXIT_USAGE
    try:
        with ResultsFile(out) as results:
            try:
                code = _run(args, items, problems, results)
            finally:  # a setting no run can work with, a fatal first run, Ctrl-C: no empty OUT made
                results.discard_if_unused()
            return code
    except RLMError as exc:
        _say(str(exc))
        return EXIT_USAGE
    finally:
        from sandbox import shutdown

        shutdown()  # no helper process outlives the command (runs abandoned by Ctrl-C included)


def _run(
    args: argparse.Namespace, items: list[BatchItem], problems: list[InputProblem], results: ResultsFile
) -> int:
    from rlm.cli import model_kwargs

    options: dict[str, Any] = {"model_kwargs": kw} if (kw := model_kwargs(args)) else {}
    changed = _changed(items, results)
    if changed:
        shown_ids = ", ".join(repr(item_id) for item_id in changed[:_SHOWN_IDS])
        more = f" and {len(changed) - _SHOWN_IDS} more" if len(changed) > _SHOWN_IDS else ""
        _say(
            f"{results.path}: {len(changed)} id(s) of the input have a line there that answered "
            f"another question (their query or context changed): {shown_ids}{more}. Nothing was run: "
            "delete those lines to run these items again, or write to another file"
        )
        return EXIT_USAGE
    done = set(results.done)
    todo = [item for item in items if item.id not in done]
    bad = _bad_records(problems, {item.id for item in items} | done, done)
    already = len(items) - len(todo)
    # Lines of earlier runs that failed stay in OUT and are not run again: they still count.
    already_failed = len({item.id for item in items} & results.unanswered)
    progress = Progress(len(todo) + len(bad))
    shown = visible(str(results.path))  # a file name may hold terminal escapes too
    runs = None
    if todo:
        # Built before anything is written: a policy, model or option that cannot work is a usage
        # error (exit 2) leaving OUT as it was, not one after --skip-bad's lines were written.
        # (No engine starts here: that is on the first result, a failure there is a fatal one.)
        runs = batch(
            todo,
            model=args.model,
            workers=args.workers,
            engine=args.engine,
            ray_address=args.ray_address,
            # What the runs already in OUT spent counts: a rerun after a crash or Ctrl-C goes on
            # with what is left, not with the whole budget again.
            budget_usd=None if args.budget_usd is None else max(0.0, args.budget_usd - results.spent_usd),
            sub_model=args.sub_model,
            api_base=args.api_base,
            policy=args.policy,
            log_dir=args.log_dir,
            max_iterations=args.max_iterations,
            max_depth=args.max_depth,
            max_sub_calls=args.max_sub_calls,
            max_time_s=args.max_time,
            max_cost_usd=args.item_budget_usd,
            on_idle=progress.draw,
            **options,
        )
    for record in bad:
        results.append(record.record())
        progress.add(record)
    interrupted, stopped = False, None
    try:
        if runs is None:  # nothing to run: start no engine (no Ray instance, no sandbox)
            summary = progress.summary(
                shown, already=already, already_failed=already_failed, written=bool(results.done)
            )
            print(summary, file=sys.stderr)
            return EXIT_OK if not bad and not already_failed else EXIT_FAILED
        with contextlib.closing(runs):
            for result in runs:
                results.append(result.record())
                progress.add(result)
    except KeyboardInterrupt:
        interrupted = True
    except RLMError as exc:  # a failure that would fail every item (see rlm.batching.worker.FATAL_ERRORS)
        stopped = exc
    summary = progress.summary(
        shown,
        already=already,
        already_failed=already_failed,
        interrupted=interrupted,
        written=bool(results.done),
    )
    print(summary, file=sys.stderr)
    if interrupted:
        _say("stopped by Ctrl-C; rerun the same command to run the items that are missing")
        return EXIT_INTERRUPTED
    if stopped is not None:
        _say(f"stopped: {stopped}")
        return EXIT_USAGE
    complete = progress.done == progress.total and progress.failed == 0 and progress.skipped == 0
    complete = complete and not already_failed
    return EXIT_OK if complete else EXIT_FAILED
