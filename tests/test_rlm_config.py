"""Bad arguments of RLM and rlm.batch are refused when given, with a message naming the argument.

A limit that is NaN or infinite, a string or a bool where a number belongs, an
``api_base`` that is not an http(s) URL and a ``log_dir`` that cannot be written
are :class:`~rlm.errors.ConfigurationError` (a ``ValueError``) from the
constructor, never a silent "no limit", a raw ``TypeError`` from a comparison,
a retried call or a raw ``OSError`` at completion time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

import rlm
from rlm import RLM
from rlm.backend import LiteLLMBackend
from rlm.errors import ConfigurationError, RLMError
from tests.conftest import run_cli
from tests.llm_server import LLMServer

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({"max_cost_usd": NAN}, "max_cost_usd must be a finite number, got nan"),
        ({"max_cost_usd": INF}, "max_cost_usd must be a finite number, got inf"),
        ({"max_time_s": NAN}, "max_time_s must be a finite number, got nan"),
        ({"max_time_s": INF}, "max_time_s must be a finite number, got inf"),
        ({"max_cost_usd": "0.5"}, "max_cost_usd must be a number or None, not str"),
        ({"max_time_s": "60"}, "max_time_s must be a number or None, not str"),
        ({"max_iterations": "3"}, "max_iterations must be an int, not str"),
        ({"max_depth": "2"}, "max_depth must be an int, not str"),
        ({"max_concurrency": "4"}, "max_concurrency must be an int, not str"),
        ({"max_iterations": 2.5}, "max_iterations must be an int, not float"),
        ({"max_iterations": True}, "max_iterations must be an int, not bool"),
        ({"max_depth": True}, "max_depth must be an int, not bool"),
        ({"max_sub_calls": True}, "max_sub_calls must be an int or None, not bool"),
        ({"max_tokens": 1.5}, "max_tokens must be an int or None, not float"),
        ({"max_cost_usd": True}, "max_cost_usd must be a number or None, not bool"),
        ({"retry_backoff_s": NAN}, "retry_backoff_s must be a finite number, got nan"),
        ({"api_base": "not a url"}, "api_base 'not a url' is not an http:// or https:// URL"),
        ({"api_base": "ftp://x"}, "api_base 'ftp://x' is not an http:// or https:// URL"),
        ({"api_base": "http://"}, "api_base 'http://' is not an http:// or https:// URL"),
        ({"api_base": "127.0.0.1:8000/v1"}, "is not an http:// or https:// URL"),
    ],
)
def test_bad_limits_and_endpoints_are_refused_naming_the_argument(kwargs: dict[str, Any], expect: str):
    with pytest.raises(ConfigurationError) as info:
        RLM("openai/x", **kwargs)
    assert expect in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RLMError)


def test_good_limits_and_endpoints_are_kept():
    r = RLM("openai/x", api_base="https://example.com/v1", max_iterations=3, max_depth=2, max_cost_usd=1,
            max_time_s=2.5, max_sub_calls=0, max_tokens=None, max_concurrency=4)  # fmt: skip
    assert (r.max_iterations, r.max_depth, r.budgets.max_cost_usd, r.budgets.max_time_s) == (3, 2, 1, 2.5)
    with pytest.raises(ConfigurationError, match="api_base"):
        LiteLLMBackend(api_base="not a url")  # the backend on its own, too


def test_batch_refuses_a_nan_budget_and_a_bad_endpoint_before_running():
    items = [{"id": "a", "query": "q", "context": "c"}]
    with pytest.raises(ConfigurationError, match="budget_usd must be a finite number, got nan"):
        rlm.batch(items, model="openai/x", budget_usd=NAN)
    with pytest.raises(ConfigurationError, match="budget_usd must be a finite number, got inf"):
        rlm.batch(items, model="openai/x", budget_usd=INF)
    with pytest.raises(ConfigurationError, match="api_base 'not a url'"):
        rlm.batch(items, model="openai/x", api_base="not a url")


@pytest.mark.parametrize("where", ["proc", "file", "under_a_file"])
def test_a_log_dir_that_cannot_be_written_is_refused_at_construction(tmp_path: Path, where: str):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    log_dir = {"proc": Path("/proc/rlm-no-such-dir"), "file": a_file, "under_a_file": a_file / "logs"}[where]
    with pytest.raises(ConfigurationError) as info:
        RLM("openai/x", log_dir=log_dir)
    assert str(info.value).startswith(f"log_dir {log_dir}: ")
    good = RLM("openai/x", log_dir=tmp_path / "new" / "logs")  # created, as a run would
    assert good.log_dir is not None and good.log_dir.is_dir()


def test_an_empty_path_is_refused_not_taken_for_the_current_directory_or_the_default_log(tmp_path: Path):
    """``--log-dir "$DIR"`` with DIR unset wrote the run's logs into the current directory, and
    ``--audit-log ""`` (``Sandbox(audit_log="")``) appended to the default audit log: an empty path
    is now refused, in the Python API and on the command line (exit 2), before anything runs."""
    from sandbox import AsyncSandbox, Sandbox

    with pytest.raises(ConfigurationError, match="log_dir is an empty path"):
        RLM("openai/x", log_dir="")
    for cls in (Sandbox, AsyncSandbox):
        with pytest.raises(ValueError, match="audit_log is an empty path"):
            cls(audit_log="")
    for args in (
        ["run", "-m", "openai/x", "--context", "-", "--log-dir", "", "q"],
        ["batch", "IN", "--out", "OUT", "-m", "openai/x", "--log-dir", ""],
        ["exec", "--audit-log", "", "-"],
        ["mcp", "--audit-log", ""],
        ["mcp", "--log-dir", ""],
        ["view", "PATH", "-o", ""],
    ):
        out = run_cli(*args, stdin="print(1)", cwd=tmp_path)
        assert out.returncode == 2 and "an empty path" in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written where the empty path would have led


def test_a_log_dir_gone_after_construction_is_a_configuration_error_not_an_oserror(tmp_path: Path):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    with LLMServer("FINAL(42)") as srv:
        r = RLM("openai/local", api_base=srv.base_url, api_key="k-test", log_dir=log_dir)
        shutil.rmtree(log_dir)
        log_dir.write_text("now a file")
        with pytest.raises(ConfigurationError, match=f"log_dir {log_dir}: "):
            r.completion("context", "question")
        assert srv.requests == []  # refused before any model call


@pytest.mark.parametrize(
    ("configured", "left", "expect"),
    [
        (None, None, None),
        (None, 30.0, 30.0),
        (None, 5000.0, 600.0),
        (120.0, 5000.0, 120.0),
        (120.0, 7.0, 7.0),
        ("7", 100.0, "7"),  # not a number (an httpx.Timeout, say): kept as configured
    ],
)
def test_the_time_left_shortens_the_request_timeout_never_lengthens_it(monkeypatch, configured, left, expect):
    """With max_time_s the loop passes the time left as the call's timeout: a large budget must not
    stretch the request timeout (configured, else rlm.llm's default) past itself."""
    from rlm import llm

    seen: dict[str, Any] = {}
    monkeypatch.setattr(llm, "complete", lambda model, messages, **kw: seen.update(kw))
    extra = {} if configured is None else {"timeout": configured}
    backend = LiteLLMBackend(api_base="http://127.0.0.1:9/v1", **extra)
    backend.complete("openai/m", [], **({} if left is None else {"timeout": left}))
    assert seen.get("timeout") == expect
