"""The ``rlm`` command line: parse arguments, call the library, map errors to exit codes.

Exit status: 0 success, 1 the code/run failed (error, limit, crash, no answer),
2 usage or policy errors (message on stderr). Nothing here imports litellm:
``rlm --help``, ``rlm exec``, ``rlm policy``, ``rlm audit``, ``rlm doctor`` and
``rlm view`` stay fast; ``rlm run`` pays for litellm on its first model call only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["entry", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a program that SIGPIPE ended


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2 with one line
        from rlm.display import visible

        self.print_usage(sys.stderr)
        # The message may quote an argument as given ("unrecognized arguments: ..."): shown inert.
        print(f"{self.prog}: error: {visible(message)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"rlm {version('rlm')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print("rlm (not installed: version unknown)")
        parser.exit()


def _needs_a_command(parser: argparse.ArgumentParser) -> None:
    """*parser* run without one of its sub-commands prints its help, which lists them, and exits 2.

    (argparse said "the following arguments are required: policy_cmd", an internal name.)
    """

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    parser.set_defaults(func=show_help)


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    from rlm.display import visible

    # Messages may quote a server's error body, a path, a model's text: shown inert (no escape
    # sequence reaches a terminal), whatever stderr is.
    print(f"rlm: {visible(message)}", file=sys.stderr)
    return code


# ------------------------------------------------------------------- exec
def _read_source(arg: str) -> str:
    """The text of a file, or of standard input for ``-``: UTF-8, strictly (under the C locale,
    ``sys.stdin`` would decode bad bytes to lone surrogates, refused later as another error)."""
    if not arg:  # Path("") is the current directory: "Is a directory" would not say what is wrong
        raise ValueError("'': an empty path (a file, or - for standard input)")
    try:
        if arg == "-":
            raw = getattr(sys.stdin, "buffer", None)  # None: a text stream put in its place
            return raw.read().decode("utf-8") if raw is not None else sys.stdin.read()
        return Path(arg).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{'standard input' if arg == '-' else arg}: not UTF-8 text (byte {exc.start})"
        ) from None


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects NAME=@FILE or NAME=TEXT, got {item!r}")
        if not name.isidentifier():
            raise ValueError(f"--set {item!r}: {name!r} is not a Python variable name")
        if spec.startswith("@"):
            try:
                data = Path(spec[1:]).read_bytes()
            except OSError as exc:  # named by its flag, as `rlm run` names --context
                raise ValueError(f"--set {item}: {exc.strerror}") from None
            try:
                values[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                values[name] = data
        else:
            values[name] = spec
    return values


def _path(text: str) -> str:
    """An argparse type: a path, refused when empty. ``--log-dir "$DIR"`` with DIR unset was the
    current directory, and ``--audit-log ""`` the default log, where the user meant a path."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (write . for the current directory)")
    return text


def _cmd_exec(args: argparse.Namespace) -> int:
    from sandbox import Sandbox, load_policy, shutdown
    from sandbox.errors import PolicyError, SandboxError

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        return _fail(str(exc))
    if args.audit_log and not policy.audit.enabled:
        return _fail(f"--audit-log: policy {policy.name!r} turns the audit log off (audit.enabled = false)")
    try:
        code = _read_source(args.file)
        variables = _parse_sets(args.set or [])
    except (OSError, ValueError) as exc:
        return _fail(str(exc) if isinstance(exc, ValueError) else f"{exc.filename}: {exc.strerror}")
    try:
        with Sandbox(policy, audit_log=args.audit_log) as sb:
            for name, value in variables.items():
                sb.set_variable(name, value)
            try:
                result = sb.execute(code)
            except ValueError as exc:  # too large for one request: nothing ran
                return _fail(f"{args.file}: {exc}")
            audit_path = sb.audit_path
    except SandboxError as exc:
        return _fail(str(exc))
    finally:
        shutdown()  # no helper process outlives the command
    if args.json:
        payload = result.model_dump(mode="json")
        payload["audit_log"] = str(audit_path) if audit_path else None
        print(json.dumps(payload))
    else:
        from rlm.display import visible

        # What the sandbox printed is the code's: written as it is into a pipe or file, with
        # control characters escaped on a terminal (no escape sequence of the child's reaches
        # it: window titles, hyperlinks, a line erased and rewritten).
        out = visible if sys.stdout.isatty() else str
        err = visible if sys.stderr.isatty() else str
        sys.stdout.write(out(result.stdout))
        sys.stderr.write(err(result.stderr))
        if not result.ok:
            what = f"limit: {result.limit}" if result.limit else ("crashed" if result.crashed else "error")
            detail = err(result.traceback or f"{result.error_type}: {result.error_message}\n")
            sys.stderr.write(detail if detail.endswith("\n") else detail + "\n")
            # Our own status line: the child's error_type in it is always shown inert.
            sys.stderr.write(f"rlm exec: {what} ({visible(result.error_type or '')})\n")
    return EXIT_OK if result.ok else EXIT_FAILED


# ----------------------------------------------------------------- policy
def _cmd_policy(args: argparse.Namespace) -> int:
    from sandbox import load_policy
    from sandbox.errors import PolicyError

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        return _fail(str(exc))
    if args.subcommand == "check":
        print(
            f"{args.policy}: ok (policy {policy.name!r}, schema_version {policy.schema_version}, sha256 {policy.sha256[:16]}...)"
        )
        from rlm.checks import module_found
        from rlm.display import visible

        for name in (n for n in policy.python.allowed_imports if not module_found(n)):
            print(f"rlm policy check: warning: python.allowed_imports: no module {visible(name)!r} here (a typo?)",
                  file=sys.stderr)  # fmt: skip
        return EXIT_OK
    data = policy.model_dump(mode="json")
    data["sha256"] = policy.sha256
    print(json.dumps(data, indent=2))
    return EXIT_OK


# ------------------------------------------------------------------ audit
def _cmd_audit(args: argparse.Namespace) -> int:
    from rlm.display import visible
    from sandbox.audit import verify
    from sandbox.errors import AuditError

    kept = args.expect or []
    try:
        report = verify(args.log, expect=kept)
    except AuditError as exc:
        return _fail(str(exc))
    except ValueError as exc:  # a kept hash that is no hash: verify checks them before the file
        return _fail(f"--{exc}, as 'last hash' prints")
    if report.ok:
        torn = report.torn_lines
        note = f" (line(s) {', '.join(map(str, torn))} cut off by a crash, recorded)" if torn else ""
        found = f", {len(set(kept))} kept hash(es) found" if kept else ""
        head = f", last hash {report.last_hash}" if report.last_hash else ""
        # The path as given, shown inert (no escape sequence in a file name reaches the terminal).
        print(visible(f"{args.log}: ok, {report.lines} line(s), hash chain intact{note}{found}{head}"))
        return EXIT_OK
    where = f"line {report.bad_line}: " if report.bad_line is not None else ""
    print(visible(f"{args.log}: {where}{report.reason}"), file=sys.stderr)
    return EXIT_FAILED


# ----------------------------------------------------------------- doctor
def _cmd_doctor(args: argparse.Namespace) -> int:
    from sandbox.doctor import layer_report
    from sandbox.errors import PolicyError, SandboxError

    try:
        report = layer_report(args.policy)
    except PolicyError as exc:
        return _fail(str(exc))
    except SandboxError as exc:  # not even a child with no layer required starts here
        return _fail(f"no sandbox starts on this machine: {exc}")
    width = max(len(k) for k in report)
    for layer, state in report.items():
        print(f"{layer:<{width}}  {state}")
    return EXIT_OK


# -------------------------------------------------------------------- run
def _add_run_parser(sub: Any) -> None:
    import os

    p = sub.add_parser(
        "run",
        help="answer a question about a long context with a Recursive Language Model",
        description=(
            "Answer --query about the text in --context with a Recursive Language Model. API keys are read "
            "from the provider's usual environment variables (OPENAI_API_KEY, ANTHROPIC_API_KEY, ...), never "
            "from the command line. Exit status: 0 with an answer, 1 without one, 2 for usage errors and "
            "setup errors (a missing or rejected key, an unknown model, an endpoint that cannot be reached)."
        ),
    )
    p.add_argument(
        "-m",
        "--model",
        default=os.environ.get("RLM_MODEL"),
        help="litellm model string (default: $RLM_MODEL)",
    )
    p.add_argument("--sub-model", help="model for llm_query sub-calls (default: the root model)")
    p.add_argument(
        "--api-base",
        help="base URL of an OpenAI-compatible or proxy endpoint, for every model (default: $RLM_API_BASE)",
    )
    p.add_argument(
        "--context", required=True, metavar="FILE|-", help="the context: a text file, or - for standard input"
    )
    p.add_argument("--query", required=True, help="the question to answer")
    p.add_argument("--max-iterations", type=int, default=20, metavar="N", help="root turns (default: 20)")
    p.add_argument(
        "--max-depth",
        type=int,
        default=1,
        metavar="N",
        help="1: rlm_query is a plain sub-call; 2: one level of child RLMs (default: 1)",
    )
    p.add_argument("--policy", default="default", help="sandbox policy name or .toml path (default: default)")
    p.add_argument("--log-dir", type=_path, help="write the JSONL trajectory and the audit log here")
    p.add_argument("--budget-usd", type=float, metavar="X", help="stop when the run has cost this much")
    p.add_argument("--max-sub-calls", type=int, metavar="N", help="stop after this many sub-calls")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="stop after this much wall time")
    _add_request_timeout(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with the RLMResult fields")
    p.add_argument("--verbose", action="store_true", help="show each turn live (on stderr)")
    p.set_defaults(func=_cmd_run)


def _add_request_timeout(p: argparse.ArgumentParser) -> None:
    """``--request-timeout``, the same for ``rlm run`` and ``rlm batch``."""
    p.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help=(
            "give up a model call whose whole answer has not arrived in this long; it is retried like a "
            "server error "
            "(default: rlm.llm.DEFAULT_REQUEST_TIMEOUT_S, 600)"
        ),
    )


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``model_kwargs`` of the run flags: ``timeout`` when ``--request-timeout`` was given
    (not given: rlm.llm's own default, not imported here: it is loaded only when a model is called)."""
    timeout = getattr(args, "request_timeout", None)
    return {} if timeout is None else {"timeout": timeout}


#: The run flags of ``rlm run`` and ``rlm batch`` (those present in the command's namespace), by flag:
#: (attribute, least value, whether it may be fractional). Checked before anything runs or is written.
_RUN_FLAGS: dict[str, tuple[str, float, bool]] = {
    "--workers": ("workers", 1, False),
    "--max-iterations": ("max_iterations", 1, False),
    "--max-depth": ("max_depth", 1, False),
    "--max-sub-calls": ("max_sub_calls", 0, False),
    "--budget-usd": ("budget_usd", 0, True),
    "--item-budget-usd": ("item_budget_usd", 0, True),
    "--max-time": ("max_time", 0, True),
    "--request-timeout": ("request_timeout", 0, True),
}


def check_run_flags(args: argparse.Namespace) -> str | None:
    """The first bad run flag in *args*, as one line naming the flag (``None``: all good).

    A limit is a finite number (``nan`` or ``inf`` would silently mean "no limit") of at least its
    least value; ``--api-base`` is an http(s) URL with a host. ``--log-dir`` is checked (and
    created) separately, by :func:`rlm.checks.check_log_dir`, once nothing else can fail.
    """
    from rlm.checks import check_api_base, check_number
    from rlm.errors import ConfigurationError

    api_base_flag = _api_base_from_env(args)
    for flag, (name, least, fractional) in _RUN_FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not fractional:
            if value < least:
                return f"{flag} must be at least {least:g}, got {value}"
            continue
        try:
            check_number(flag, value, minimum=least)
        except ConfigurationError as exc:
            return str(exc)
    timeout = getattr(args, "request_timeout", None)
    if timeout is not None and not timeout > 0:
        return f"--request-timeout must be > 0, got {timeout!r}"
    try:
        check_api_base(getattr(args, "api_base", None), api_base_flag)
    except ConfigurationError as exc:
        return str(exc)
    return None


def _api_base_from_env(args: argparse.Namespace) -> str:
    """``--api-base`` defaults to ``$RLM_API_BASE`` (as ``-m`` to ``$RLM_MODEL``, and as the
    examples read it): set in *args* when the flag was not given. Returns the name to show in
    an error about the value."""
    if getattr(args, "api_base", None) is None and os.environ.get("RLM_API_BASE"):
        args.api_base = os.environ["RLM_API_BASE"]
        args.api_base_from_env = True  # said in a setup error, where the URL would be a mystery
        return "$RLM_API_BASE"
    return "--api-base"


def _run_error(args: argparse.Namespace, message: str, code: int) -> int:
    """Report an error as one line on stderr (and as a result object with --json)."""
    if args.json:
        print(
            json.dumps(
                {"answer": None, "stop_reason": "error", "error": message, "root_model": args.model or ""}
            )
        )
    return _fail(message, code)


def _cmd_run(args: argparse.Namespace) -> int:
    from rlm.errors import (
        AuthenticationError,
        ConfigurationError,
        ModelUnreachable,
        RLMError,
        UnknownModelError,
    )

    if not args.model:
        return _run_error(args, "no model: pass -m MODEL or set RLM_MODEL", EXIT_USAGE)
    problem = check_run_flags(args)
    if problem is not None:
        return _run_error(args, problem, EXIT_USAGE)
    from rlm.checks import check_text

    # Bytes that are not UTF-8 in argv arrive as lone surrogates U+DC80-U+DCFF (surrogateescape).
    escaped = next((at for at, ch in enumerate(args.query) if "\udc80" <= ch <= "\udcff"), None)
    if escaped is not None:
        byte = ord(args.query[escaped]) - 0xDC00
        return _run_error(
            args, f"--query is not valid UTF-8 (byte 0x{byte:02x} at character {escaped})", EXIT_USAGE
        )
    try:
        check_text("--query", args.query)
    except ConfigurationError as exc:
        return _run_error(args, str(exc), EXIT_USAGE)
    if not args.query.strip():  # a paid run about nothing
        return _run_error(args, "--query is empty", EXIT_USAGE)
    try:
        context = _read_source(args.context)
    except OSError as exc:
        return _run_error(args, f"--context {args.context}: {exc.strerror}", EXIT_USAGE)
    except ValueError as exc:  # not UTF-8 (_read_source names the file or standard input)
        return _run_error(args, f"--context {exc}", EXIT_USAGE)
    if not context:
        from rlm.display import visible

        print(visible(f"rlm: warning: the context ({args.context}) is empty"), file=sys.stderr)
    from rlm.checks import check_log_dir
    from rlm.core import run

    if args.log_dir is not None:
        try:
            check_log_dir(args.log_dir, "--log-dir")
        except ConfigurationError as exc:
            return _run_error(args, str(exc), EXIT_USAGE)

    try:
        result = run(
            args.query,
            context,
            model=args.model,
            sub_model=args.sub_model,
            api_base=args.api_base,
            max_iterations=args.max_iterations,
            max_depth=args.max_depth,
            policy=args.policy,
            log_dir=args.log_dir,
            max_cost_usd=args.budget_usd,
            max_sub_calls=args.max_sub_calls,
            max_time_s=args.max_time,
            verbose=args.verbose,
            model_kwargs=model_kwargs(args),
        )
    except (ConfigurationError, AuthenticationError, UnknownModelError, ModelUnreachable) as exc:
        # ModelUnreachable reaches here only from the first call (later ones stop the run instead):
        # a wrong --api-base or a server that is down is a setup error, like a bad key.
        where = " (the URL is $RLM_API_BASE's)" if getattr(args, "api_base_from_env", False) else ""
        return _run_error(args, str(exc) + where, EXIT_USAGE)
    except RLMError as exc:
        return _run_error(args, str(exc), EXIT_FAILED)
    finally:
        from sandbox import shutdown

        shutdown()
    from rlm.display import visible

    if args.json:
        # JSON escapes C0 controls; the C1 ones, DEL and bidi overrides are escaped too (same value).
        print(result.model_dump_json().translate(_json_escapes()))
    elif result.answer is not None:
        # The answer is the model's: written as it is into a pipe or file, with control characters
        # escaped on a terminal (as rlm exec does with what the code printed).
        print(visible(result.answer) if sys.stdout.isatty() else result.answer)
    if result.answer is None:
        why = f": {result.error}" if result.error else ""
        return _fail(f"stopped without an answer ({result.stop_reason}){why}", EXIT_FAILED)
    if not args.json:
        cost = "unknown" if result.cost_usd is None else f"${result.cost_usd:.4f}"
        print(
            visible(
                f"rlm: {result.stop_reason}, {result.iterations} turn(s), {result.sub_calls} sub-call(s), "
                f"{result.total_input_tokens + result.total_output_tokens} tokens, cost {cost}"
                + (f", log {result.log_path}" if result.log_path else "")
            ),
            file=sys.stderr,
        )
    return EXIT_OK


#: JSON escapes for the characters JSON itself lets through raw but a terminal may act on or draw as
#: nothing: those of :data:`rlm.display.UNSAFE_CODES` JSON writes raw (all but the C0 controls), a
#: character past U+FFFF as its surrogate pair, as JSON spells it.
def _json_escape(code: int) -> str:
    if code < 0x10000:
        return f"\\u{code:04x}"
    high, low = divmod(code - 0x10000, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"


def _json_escapes() -> dict[int, str]:
    from rlm.display import UNSAFE_CODES

    return {code: _json_escape(code) for code in UNSAFE_CODES if code >= 0x20}


# ------------------------------------------------------------------- view
def _add_view_parser(sub: Any) -> None:
    p = sub.add_parser(
        "view",
        help="write one self-contained HTML page for a trajectory, a log directory or an audit log",
        description=(
            "Write one HTML page (no network, opens from file://) showing a run: its child runs, every "
            "iteration, code, output, sub-calls, a timeline, tokens and cost per model, and the audit log "
            "with its hash chain checked. A directory gives an index of its runs. Exit status: 0 the page"
            " was written, 2 a path that cannot be read or is not a trajectory, a log directory or an audit log."
        ),
    )
    p.add_argument("path", metavar="PATH", help="<run id>.jsonl, a log directory, or an audit log")
    p.add_argument(
        "-o", "--output", type=_path, metavar="FILE.html", help="where to write (default: beside PATH, .html)"
    )
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=_cmd_view)


def _cmd_view(args: argparse.Namespace) -> int:
    from rlm.errors import ConfigurationError
    from rlm.view import write_page

    path = Path(args.path)
    if not path.exists():
        return _fail(f"{path}: no such file or directory")
    try:
        out = write_page(path, args.output)
    except OSError as exc:
        return _fail(f"{exc.filename or path}: {exc.strerror}")
    except ConfigurationError as exc:  # nothing to show: no page is written
        return _fail(str(exc))
    except RecursionError:  # a hostile or broken log: hundreds of child runs, each inside the last
        return _fail(f"{path}: its runs nest too deeply to draw (child runs hundreds of levels deep)")
    print(out)
    if args.open:
        import webbrowser

        if not webbrowser.open(out.resolve().as_uri()):  # no browser here (a server, no $BROWSER)
            _fail(f"--open: no browser could be started here; open {out} yourself")
    return EXIT_OK


# -------------------------------------------------------------------- mcp
def _add_mcp_parser(sub: Any) -> None:
    import os

    p = sub.add_parser(
        "mcp",
        help="serve the sandbox (and an RLM) to agents and IDEs over the Model Context Protocol",
        description=(
            "Serve python_exec, sessions and (with --model) rlm_query over MCP. The policy is the server's: "
            "no tool argument loosens it. Needs the optional extra: pip install 'rlm[mcp]'."
        ),
    )
    p.add_argument("--policy", default="default", help="sandbox policy name or .toml path (default: default)")
    p.add_argument("--transport", choices=("stdio", "http"), default="stdio", help="default: stdio")
    p.add_argument("--host", help="HTTP bind address, with --transport http (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, help="HTTP port, 0 for any free one, with --transport http (default: 8765)"
    )
    p.add_argument(
        "--max-sessions", type=int, default=8, metavar="N", help="open sessions at most (default: 8)"
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="close a session unused this long (default: 600)",
    )
    p.add_argument(
        "--allow-read",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory rlm_query's context_path may read from (repeatable; default: none)",
    )
    p.add_argument(
        "--audit-log",
        type=_path,
        help="audit log path (default: the policy's, else $XDG_STATE_HOME/rlm/audit.jsonl, else"
        " ~/.local/state/rlm/audit.jsonl)",
    )
    p.add_argument(
        "-m",
        "--model",
        default=os.environ.get("RLM_MODEL"),
        help="offer rlm_query with this root model (default: $RLM_MODEL; unset: no rlm_query)",
    )
    p.add_argument("--sub-model", help="rlm_query's sub-model (default: the root model)")
    p.add_argument(
        "--api-base",
        help="base URL of an OpenAI-compatible endpoint, for rlm_query's models (default with --model: $RLM_API_BASE)",
    )
    p.add_argument("--log-dir", type=_path, help="write rlm_query trajectories here (default: none)")
    p.add_argument("--max-iterations", type=int, metavar="N", help="rlm_query's turns at most (default: 20)")
    p.add_argument(
        "--max-time",
        type=float,
        metavar="SECONDS",
        help="each rlm_query's wall-clock budget: its code is stopped and it answers with what it has"
        " (default: 600)",
    )
    p.add_argument(
        "--max-cost",
        type=float,
        metavar="USD",
        help="each rlm_query's cost budget in US dollars, its priced model calls counted: once spent it"
        ' stops (stop_reason "max_cost_usd") (default: none)',
    )
    p.add_argument(
        "--pool-size",
        type=int,
        default=2,
        metavar="N",
        help="ready sandbox children kept for new sandboxes, 0 to fork each on demand (default: 2)",
    )
    p.set_defaults(func=_cmd_mcp)


def _rlm_query_flags(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The flags of ``rlm mcp`` that only rlm_query uses, with their values (``None``: not given)."""
    return [
        ("--sub-model", args.sub_model),
        ("--api-base", args.api_base),
        ("--log-dir", args.log_dir),
        ("--max-iterations", args.max_iterations),
        ("--max-time", args.max_time),
        ("--max-cost", args.max_cost),
    ]


def _cmd_mcp(args: argparse.Namespace) -> int:
    try:
        from rlm.mcp_server import ServerConfig, run_server
    except ImportError as exc:
        return _fail(f"rlm mcp needs the optional extra: pip install 'rlm[mcp]' ({exc})")
    from sandbox import load_policy
    from sandbox.errors import PolicyError

    # rlm_query's flags mean nothing without --model (the tool is not offered): refused, not ignored.
    given = [flag for flag, value in _rlm_query_flags(args) if value is not None]
    api_base_flag = (
        _api_base_from_env(args) if args.model else "--api-base"
    )  # (the variable: only for rlm_query)
    if given and not args.model:
        return _fail(f"{given[0]} needs --model (rlm_query is offered only with a model)")
    max_iterations = 20 if args.max_iterations is None else args.max_iterations
    for flag, value in (
        ("--max-sessions", args.max_sessions),
        ("--idle-timeout", args.idle_timeout),
        ("--max-iterations", max_iterations),
    ):
        if not value > 0:
            return _fail(f"{flag} must be positive")
    if args.max_time is not None and not 0 < args.max_time < float("inf"):
        return _fail("--max-time must be a positive number of seconds")
    from rlm.checks import check_api_base, check_log_dir, check_number
    from rlm.errors import ConfigurationError

    try:
        check_number("--max-cost", args.max_cost, minimum=0)  # as rlm run's --budget-usd
        check_api_base(args.api_base, api_base_flag)
    except ConfigurationError as exc:
        return _fail(str(exc))
    if args.transport != "http":  # meaningless for stdio: refused, not ignored
        for flag, value in (("--host", args.host), ("--port", args.port)):
            if value is not None:
                return _fail(f"{flag} needs --transport http (the stdio transport listens on nothing)")
    args.host = "127.0.0.1" if args.host is None else args.host
    args.port = 8765 if args.port is None else args.port
    if not 0 <= args.port <= 65535:
        return _fail("--port must be between 0 and 65535")
    if not 0 <= args.pool_size <= 64:
        return _fail("--pool-size must be between 0 and 64")
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        return _fail(str(exc))
    allow: list[Path] = []
    for d in args.allow_read:
        real = Path(d).resolve()
        if not real.is_dir():
            return _fail(f"--allow-read {d}: not a directory")
        allow.append(real)
    if args.log_dir is not None:
        try:
            check_log_dir(args.log_dir, "--log-dir")
        except ConfigurationError as exc:
            return _fail(str(exc))
    config = ServerConfig(
        policy=policy,
        max_sessions=args.max_sessions,
        idle_timeout=args.idle_timeout,
        allow_read=tuple(allow),
        audit_log=Path(args.audit_log).expanduser() if args.audit_log else None,
        model=args.model or None,
        sub_model=args.sub_model,
        api_base=args.api_base,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        max_iterations=max_iterations,
        pool_size=args.pool_size,
        max_cost_usd=args.max_cost,
        **({} if args.max_time is None else {"max_time_s": args.max_time}),
    )
    from sandbox.errors import SandboxError

    if args.transport == "stdio" and sys.stdin.isatty():  # started by hand: say what it waits for
        print(
            "rlm mcp: serving MCP over stdin/stdout; an MCP client starts this command (Ctrl-D or Ctrl-C to stop)",
            file=sys.stderr,
        )
    try:
        run_server(config, args.transport, args.host, args.port)
    # ConfigurationError: the port is taken, the address is not ours, ... (checked first);
    # SandboxError: a layer the policy requires is missing, the audit log is not writable, ...
    except (ConfigurationError, SandboxError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # anything else the server could not do (the address was bound above)
        return _fail(f"cannot serve: {exc.strerror or exc}")
    return EXIT_OK


# ------------------------------------------------------------------ batch
def _add_batch_parser(sub: Any) -> None:
    import os

    p = sub.add_parser(
        "batch",
        help="answer many questions from a JSONL file, resumably, on this machine or a Ray cluster",
        description=(
            'Run one RLM per line of INPUT ({"id", "query", "context"} or {"id", "query", "context_path"}) '
            "and append one result line per item to OUT as each finishes. Ids already in OUT are skipped, "
            "so rerunning the command after a crash or Ctrl-C runs only what is missing; an id whose line "
            "in OUT answered another question (its query or context changed) is refused. Exit status: 0 "
            "every item answered, 1 some failed or were skipped, 2 usage, bad input, a changed question "
            "or a setup failure (key, model, endpoint, sandbox), 130 Ctrl-C."
        ),
    )
    p.add_argument("input", metavar="INPUT.jsonl", help="one item per line")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help="results, appended one line per item")
    p.add_argument(
        "-m", "--model", default=os.environ.get("RLM_MODEL"), help="root model (default: $RLM_MODEL)"
    )
    p.add_argument("--sub-model", help="model for llm_query sub-calls (default: the root model)")
    p.add_argument(
        "--api-base",
        help="base URL of an OpenAI-compatible or proxy endpoint, for every model (default: $RLM_API_BASE)",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="runs at once (default: CPUs here, or the cluster's)"
    )
    p.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="where runs happen (default: local)"
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join ('auto': the one on this machine); default: start a local Ray instance",
    )
    p.add_argument("--budget-usd", type=float, metavar="X", help="start no item once the batch has cost X")
    p.add_argument("--item-budget-usd", type=float, metavar="X", help="stop any one run that has cost X")
    p.add_argument("--policy", default="default", help="sandbox policy name or .toml path (default: default)")
    p.add_argument(
        "--log-dir",
        type=_path,
        help="write each run's trajectory and audit log here (on the node that runs it)",
    )
    p.add_argument(
        "--max-iterations", type=int, default=20, metavar="K", help="root turns per run (default: 20)"
    )
    p.add_argument(
        "--max-depth", type=int, default=1, metavar="N", help="recursion depth per run (default: 1)"
    )
    p.add_argument(
        "--max-sub-calls", type=int, metavar="N", help="stop any one run after this many sub-calls"
    )
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="stop any one run after this wall time")
    _add_request_timeout(p)
    p.add_argument(
        "--skip-bad", action="store_true", help="record bad input lines as errors and run the rest"
    )
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> int:
    from rlm.batching.command import run_batch_command

    return run_batch_command(args)


# ------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlm", description="Recursive Language Models on a hardened sandbox.")
    parser.add_argument("--version", action=_Version, help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _needs_a_command(parser)

    p = sub.add_parser(
        "exec",
        help="run a Python file in a fresh sandbox",
        description=(
            "Run a Python file in a fresh sandbox under a policy, audited. What the code prints goes to"
            " stdout and stderr (control characters escaped on a terminal). Exit status: 0 ok, 1 the code"
            " failed, hit a limit or crashed, 2 usage or policy errors, or a sandbox error (a child that"
            " cannot start, an audit log that cannot be written)."
        ),
    )
    p.add_argument("file", help="the code to run, or - for standard input")
    p.add_argument(
        "--policy", default="default", help="a shipped policy name or a .toml path (default: default)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the ExecResult fields")
    p.add_argument("--audit-log", type=_path, help="append the audit line here instead of the policy's log")
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME=@FILE|NAME=TEXT",
        help=(
            "bind a variable to a file's text (bytes when it is not UTF-8), or to TEXT itself (repeatable)"
        ),
    )
    p.set_defaults(func=_cmd_exec)

    p = sub.add_parser("policy", help="show or check a policy")
    psub = p.add_subparsers(dest="subcommand", parser_class=_Parser)
    _needs_a_command(p)
    q = psub.add_parser(
        "show",
        help="print a policy's effective values, defaults included",
        description="Print a policy's effective values as JSON, defaults included. Exit status: 0 ok, 2 a"
        " policy that does not load (the error names the file and the key).",
    )
    q.add_argument("policy", metavar="NAME|PATH")
    q.set_defaults(func=_cmd_policy)
    q = psub.add_parser(
        "check",
        help="validate a policy file",
        description="Load a policy strictly and say ok, or name each bad key. Warns on stderr of an"
        " allowed import this Python does not have. Exit status: 0 ok, 2 a policy that does not load.",
    )
    q.add_argument("policy", metavar="PATH")
    q.set_defaults(func=_cmd_policy)

    p = sub.add_parser("audit", help="work with audit logs")
    asub = p.add_subparsers(dest="subcommand", parser_class=_Parser)
    _needs_a_command(p)
    q = asub.add_parser(
        "verify",
        help="check an audit log's hash chain; name the first bad line",
        description=(
            "Check an audit log's hash chain and name the first bad line. Lines cut off its end leave a"
            " shorter chain that verifies: keep the last hash it prints elsewhere and pass it back with"
            " --expect later. Exit status: 0 ok, 1 a bad line or a kept hash not in the log, 2 usage"
            " errors or a log that cannot be read."
        ),
    )
    q.add_argument("log")
    q.add_argument(
        "--expect",
        action="append",
        metavar="HASH",
        help="a hash kept from an earlier verify (its 'last hash'): fail unless it is the hash of a line"
        " of the log (repeatable)",
    )
    q.set_defaults(func=_cmd_audit)

    p = sub.add_parser(
        "doctor",
        help="show which protection layers work on this machine",
        description="Start a sandbox child with every kernel layer tried (none required) and say, per layer,"
        " whether it works here or why not, and whether the default policy starts. Exit status: 0, 2 when"
        " no sandbox starts at all.",
    )
    p.add_argument(
        "--policy", default="default", help="the policy whose required layers are judged (default: default)"
    )
    p.set_defaults(func=_cmd_doctor)

    _add_run_parser(sub)
    _add_view_parser(sub)
    _add_mcp_parser(sub)
    _add_batch_parser(sub)
    return parser


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The sub-command's parser *args* went through (``rlm policy check``'s, say), else *parser*."""
    for dest in ("command", "subcommand"):
        choices = next(
            (
                a.choices
                for a in parser._actions
                if isinstance(a, argparse._SubParsersAction) and a.dest == dest
            ),
            None,
        )
        name = getattr(args, dest, None)
        if not choices or name not in choices:
            break
        parser = choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A server's malformed reply (a message that is not an object, content that is not text) is
    # reported as one error line; on the way litellm serializes the response and pydantic warns,
    # several lines on stderr naming the host's site-packages. Not in this process's output.
    warnings.filterwarnings("ignore", message="Pydantic serializer warnings", category=UserWarning)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, with its usage (the top one showed rlm's)
        _chosen(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can be told apart, not at exit
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`rlm policy show default | head -1`): stop quietly, as `cat` does,
        # instead of a traceback. Output still buffered goes nowhere, not to the closed pipe at exit.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def entry() -> None:
    """The ``rlm`` program (``python -m rlm`` and the console script): :func:`main`, then exit.

    On the way out every object is put beyond the garbage collector's reach (``gc.freeze``): the
    interpreter's last collection walked all the objects litellm's import had made, 1.7 s of CPU at
    the end of each ``rlm run`` or ``rlm batch`` here. Exit handlers (which close sandboxes, pools
    and connections) run and output is flushed as before; only objects kept alive by a reference
    cycle are left to the process's end instead of being finalized one by one.
    """
    try:
        code = main()
    finally:
        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
