"""Model calls through litellm: the only module of the project that imports it.

litellm is imported lazily, on the first call of a function below (importing
it takes seconds), after ``LITELLM_LOCAL_MODEL_COST_MAP`` is set so that it
reads its bundled price map instead of fetching one over the network.

- :func:`complete` / :func:`acomplete`: one chat call, returning a
  :class:`Completion` (text, token counts, cost in USD or ``None`` when the
  model is missing from litellm's price map);
- :func:`count_tokens`, :func:`max_input_tokens`: tokenizer and context window;
- litellm's exceptions are mapped onto :mod:`rlm.errors` (``ModelError`` and
  its subclasses), with every API key scrubbed from the messages: the
  ``api_key`` given, and the provider keys in the environment (see
  :func:`secret_values`), which litellm reads when no ``api_key`` is given, and
  any Python traceback litellm puts in them (with the host's paths) cut to the
  exception line it ends with;
- what a server sends is not trusted: a token count that is not a finite number
  of at least 0 counts 0, and a response that cannot be read is a
  :class:`~rlm.errors.ProviderUnavailable`, never a raw exception;
- every call has a request timeout: the ``timeout`` passed (the loop passes the
  time left of ``max_time_s``), else :data:`DEFAULT_REQUEST_TIMEOUT_S`
  (litellm's own default is 6000 s). A call that got no answer in that time is
  a :class:`~rlm.errors.ProviderUnavailable` saying so (retried like a 5xx);
- prompt caching: with ``cache_prefix=True`` a call to a provider that takes
  explicit cache markers (Anthropic's ``cache_control``, also for Claude on
  Bedrock and Vertex) marks the stable prefix of the conversation (the system
  prompt, and everything before the last message) as cacheable. Cached input
  tokens come back in :class:`Completion` (``cache_read_tokens``,
  ``cache_write_tokens``) for every provider that reports them, and litellm's
  cost prices them.
- a call that could not connect at all is :class:`~rlm.errors.ModelUnreachable`, naming
  the URL and why (connection refused, unknown host ...);
- the body of a response is read under a guard (OpenAI-compatible endpoints: the calls that go
  through ``litellm.client_session``, which :func:`_lib` sets when nobody else has): at most
  :data:`MAX_RESPONSE_BYTES`, uncompressed (``Accept-Encoding: identity``; a compressed reply
  is refused), and not past the call's ``timeout`` counted from its start; and a call given up
  by its caller (:class:`CallStop`, set by :mod:`rlm.core` in the thread it runs in) stops
  reading at once, its connection shut. Without it an abandoned call against a server that
  streams without end read on for ever, holding memory without bound.

API keys are passed straight to litellm and kept nowhere else.
"""

from __future__ import annotations

import atexit
import contextvars
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rlm.checks import check_api_base
from rlm.errors import (
    AuthenticationError,
    ContextWindowExceeded,
    ModelError,
    ModelUnreachable,
    ProviderUnavailable,
    RateLimited,
    UnknownModelError,
)

__all__ = [
    "CALL_STOP",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "MAX_ERROR_BYTES",
    "MAX_RESPONSE_BYTES",
    "CallStop",
    "Completion",
    "acomplete",
    "close_client",
    "complete",
    "count_tokens",
    "mark_cache_prefix",
    "max_input_tokens",
    "redact",
    "secret_values",
]

#: Sent to an OpenAI-compatible ``api_base`` when no key is configured (local servers ignore it).
_PLACEHOLDER_KEY = "no-key-configured"

#: Seconds a model call may wait for its answer when no ``timeout`` is given (litellm's own
#: default is 6000 s, so a server that accepts the connection and never answers hung a run).
#: Here it bounds the wait for each read (the HTTP client's timeout), not the whole call: a server
#: that answers a byte at a time is given up by the RLM loop instead, once the call has taken
#: that long in all (``LiteLLMBackend.request_timeout``, ``rlm.core._Run._complete``).
DEFAULT_REQUEST_TIMEOUT_S = 600.0

#: The longest timeout handed to the HTTP client, in seconds (about 31 years: for ever). Python's
#: socket timeouts overflow past ``threading.TIMEOUT_MAX`` (int64 nanoseconds, about 292 years):
#: ``--request-timeout 1e10``, a finite number like any other, made every call fail at its connect
#: ("timestamp out of range for platform time_t", retried as a provider error). A longer timeout
#: waits this long instead.
MAX_REQUEST_TIMEOUT_S = 1e9

#: Shortest ``api_key`` argument scrubbed from text (shorter ones would redact ordinary text).
_MIN_KEY_CHARS = 4
#: Shortest environment key scrubbed: real provider keys are long; shorter values are placeholders
#: such as ``EMPTY`` or ``none`` that local servers accept (the rule ``rlm batch`` has always used).
_MIN_ENV_KEY_CHARS = 8

#: The most bytes of one response body a call reads (it is read whole, then parsed): a chat
#: answer is kilobytes, some megabytes at most. Past it the call fails (ProviderUnavailable). A
#: server that streamed without end (or a gzip bomb, a few MB unpacking to gigabytes) grew the
#: host's memory until the request timeout, and a call given up went on reading for ever.
MAX_RESPONSE_BYTES = 32 * 2**20

#: The most of an error response's body (status 400 and above) that is read; the rest is dropped
#: (the call fails on its status either way). litellm scrubs an error's text of secrets with a
#: pattern of some twenty alternatives, six times over, each holding the GIL: an 800 KB error
#: body took 6 s of the host's CPU, 32 MB would take minutes (an ``rlm mcp`` server answered
#: nobody meanwhile). A provider's error says what went wrong in a few hundred bytes.
MAX_ERROR_BYTES = 64 * 2**10

_litellm: ModuleType | None = None
_import_lock = threading.Lock()
_warmed = False  # warm() has run
#: The process whose HTTP clients litellm holds (see :func:`_lib`); 0 before the import.
_clients_pid = 0
#: The guarded client :func:`_install_guard` made (replaced in a forked process), or None.
_guarded: Any = None
#: Calls of :func:`complete` under way in this process: :func:`close_client` leaves a client in use alone.
_calls = 0
_calls_lock = threading.Lock()
_close_at_exit: list[bool] = []  # [True] once close_client is registered with atexit


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock as it forked: that thread is not here to
    # release it. Nothing else runs in the child yet, so a new lock is the child's own, and
    # the parent's calls under way are not the child's.
    global _import_lock, _calls_lock, _calls
    _import_lock = threading.Lock()
    _calls_lock = threading.Lock()
    _calls = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class Completion:
    """The outcome of one model call."""

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # None when the model's price is unknown
    duration_s: float = 0.0
    cache_read_tokens: int = 0  # input tokens read from the provider's prompt cache (part of input_tokens)
    cache_write_tokens: int = 0  # input tokens written to it (part of input_tokens)


class CallStop:
    """Ends the model call of the thread whose context holds it in :data:`CALL_STOP`, from any
    thread: :meth:`stop` makes the guard of its response (see :func:`_guard_response`) stop
    reading and shuts its connection, so that a call its caller gave up (``rlm.core`` leaves it
    to end in a daemon thread) ends now instead of reading on. A new connection is shut from
    the moment it opens (see :func:`_guard_request`); one kept alive from an earlier call only
    once the response has begun: before that, the call ends at its HTTP client's timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._sockets: set[socket.socket] = set()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            sockets, self._sockets = self._sockets, set()
            for sock in sockets:
                _shut(sock)

    def _watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self._stopped:
                _shut(sock)
            else:
                self._sockets.add(sock)

    def _unwatch(self, sock: socket.socket) -> None:
        """Called before the connection goes back to the pool: another call may use it next."""
        with self._lock:
            self._sockets.discard(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a read blocked on it returns at once
    except OSError:
        pass


#: The :class:`CallStop` of the model call made in this context (``rlm.core`` sets it in the
#: thread a call runs in); None: the call cannot be given up from outside.
CALL_STOP: contextvars.ContextVar[CallStop | None] = contextvars.ContextVar("rlm_call_stop", default=None)


class _Guard:
    """What the response of one call of :func:`complete` may do: its deadline (monotonic, or None),
    its :class:`CallStop`, and why the guard ended it (``reason``), for :func:`_map_error`."""

    def __init__(self, deadline: float | None, stop: CallStop | None) -> None:
        self.deadline = deadline
        self.stop = stop
        self.reason: str | None = None  # "stopped", "timeout", "too_large" or "compressed"

    def end(self, reason: str, error: type[Exception], message: str) -> Exception:
        self.reason = reason
        return error(message)


_GUARD: contextvars.ContextVar[_Guard | None] = contextvars.ContextVar("rlm_response_guard", default=None)


def _guard_request(request: Any) -> None:
    """httpx request hook: ask a call of ours for an uncompressed body (its size is then what is
    read); and when it opens a new connection, let its :class:`CallStop` shut that connection
    from then on, before any response has come (a server that stalls or floods ``1xx`` lines
    before its answer held a call given up for ever; one on a connection kept alive is shut
    only once its response has begun, see :func:`_guard_response`)."""
    guard = _GUARD.get()
    if guard is None:
        return
    request.headers["Accept-Encoding"] = "identity"
    stop = guard.stop
    if stop is None:
        return
    earlier = request.extensions.get("trace")
    plain = request.url.scheme == "http"

    def trace(event: str, info: dict[str, Any]) -> None:
        if earlier is not None:
            earlier(event, info)
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        try:
            stream: Any = info.get("return_value")
            if event.endswith("start_tls.complete"):
                ssl = stream.get_extra_info("ssl_object")
                if ssl is not None and ssl.selected_alpn_protocol() == "h2":
                    return  # HTTP/2: the connection may carry other calls' streams
            elif not plain:
                return  # TLS: watched once its protocol is known
            sock = stream.get_extra_info("socket")
        except Exception:
            return
        if isinstance(sock, socket.socket):
            stop._watch(sock)

    request.extensions["trace"] = trace


def _guard_response(response: Any) -> None:
    """httpx response hook, run once the headers are in, before the body is read: a call of ours
    (:data:`_GUARD` set) reads its body through :class:`_GuardedStream`; anyone else's is left alone."""
    import httpx

    guard = _GUARD.get()
    if guard is None:
        return
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # it would unpack past any bound: a few MB to gigabytes
        raise guard.end(
            "compressed", httpx.DecodingError, f"a body compressed ({encoding}) though none was asked for"
        )
    length = response.headers.get("content-length", "")
    if length.strip().isdigit() and int(length) > MAX_RESPONSE_BYTES:
        raise guard.end("too_large", httpx.DecodingError, f"a body of {int(length)} bytes")
    sock = None
    stream = response.extensions.get("network_stream")
    # Only an HTTP/1 connection is this call's alone: an HTTP/2 one carries other calls' streams.
    if stream is not None and guard.stop is not None and response.http_version in ("HTTP/1.1", "HTTP/1.0"):
        try:
            sock = stream.get_extra_info("socket")
        except Exception:
            sock = None
        if isinstance(sock, socket.socket):
            guard.stop._watch(sock)
        else:
            sock = None
    cut = MAX_ERROR_BYTES if response.status_code >= 400 else None
    response.stream = _guarded_stream(response.stream, guard, sock, cut)


def _guarded_stream(inner: Any, guard: _Guard, sock: socket.socket | None, cut: int | None = None) -> Any:
    """*inner* (a response's byte stream), ended by an httpx error once *guard* says so, and
    ended quietly after *cut* bytes when given (an error's body: see :data:`MAX_ERROR_BYTES`)."""
    import httpx

    class _GuardedStream(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            read = 0
            for chunk in inner:
                if cut is not None and read + len(chunk) >= cut:
                    yield chunk[: cut - read]
                    return
                read += len(chunk)
                if guard.stop is not None and guard.stop.stopped:
                    raise guard.end("stopped", httpx.ReadError, "the call was given up")
                if guard.deadline is not None and time.monotonic() > guard.deadline:
                    raise guard.end("timeout", httpx.ReadTimeout, "the request timeout passed")
                if read > MAX_RESPONSE_BYTES:
                    raise guard.end(
                        "too_large", httpx.DecodingError, f"a body over {MAX_RESPONSE_BYTES} bytes"
                    )
                yield chunk

        def close(self) -> None:
            if sock is not None and guard.stop is not None:
                guard.stop._unwatch(sock)  # before the connection may go back to the pool
            inner.close()

    return _GuardedStream()


def _install_guard(litellm: Any) -> None:
    """Give litellm's OpenAI-compatible calls an HTTP client whose hooks guard the calls of this
    module (see :func:`_guard_response`), built as litellm builds its own (TLS settings, HTTP/2).
    A ``litellm.client_session`` set by someone else is left alone (its calls are not guarded)."""
    global _guarded
    if getattr(litellm, "client_session", None) is not None:
        return
    try:
        from litellm.llms.openai.common_utils import BaseOpenAILLM

        client = BaseOpenAILLM.get_sync_http_client()
    except Exception:
        client = None
    if client is None:
        import httpx

        client = httpx.Client(follow_redirects=True)
    hooks = client.event_hooks
    client.event_hooks = {
        "request": [*hooks.get("request", []), _guard_request],
        "response": [*hooks.get("response", []), _guard_response],
    }
    litellm.client_session = client
    _guarded = client
    if not _close_at_exit:
        atexit.register(close_client)
        _close_at_exit.append(True)


def close_client() -> None:
    """Close the HTTP client :func:`_install_guard` made, unless a call of :func:`complete` is
    using it (then leave it: closing a connection that a call in another thread is reading
    does not wake that read). Run at interpreter exit, and again by ``rlm.core`` once it has
    stopped the calls still in flight then. The connection it kept alive to the server was
    otherwise left to the interpreter's last collection, which warned "ResourceWarning:
    unclosed <socket.socket ...>" (``python -X dev``). litellm is let go of it (and of its
    cached provider clients, which hold it): a later call, an exit handler's, is litellm's own,
    unguarded."""
    global _guarded
    with _calls_lock:
        if _calls:
            return
        client, _guarded = _guarded, None
        if client is None:
            return
        litellm: Any = _litellm
        if litellm is not None and getattr(litellm, "client_session", None) is client:
            litellm.client_session = None
    try:
        client.close()
        flush = getattr(getattr(litellm, "in_memory_llm_clients_cache", None), "flush_cache", None)
        if callable(flush):
            flush()
    except Exception:  # best effort: the process ends anyway
        pass


def _fresh_clients(litellm: Any) -> None:
    """Forget the HTTP clients this process inherited through ``fork()``: their pooled
    keep-alive connections are the parent's sockets. A pre-fork server's workers (or a
    multiprocessing ``fork`` worker) each sent their first request on the connection the
    parent had last used, all on one socket: a worker read another's answer (two of four runs
    of each of two forked workers answered the other worker's question; one hung until its
    ``max_time_s``), and the server got requests spliced into each other. The guarded client
    is made again and litellm's cache of provider clients (which hold it) is emptied; the old
    ones are dropped unclosed (closing a connection's descriptor here leaves the parent's
    open). A ``litellm.client_session`` someone else set is theirs to renew."""
    if getattr(litellm, "client_session", None) is _guarded and _guarded is not None:
        litellm.client_session = None
        _install_guard(litellm)
    cache = getattr(litellm, "in_memory_llm_clients_cache", None)
    flush = getattr(cache, "flush_cache", None)
    if callable(flush):
        try:
            flush()
        except Exception:  # litellm's cache of another version: the client above is new anyway
            pass


def _lib() -> ModuleType:
    """Import and quiet litellm once (thread-safe); in a process forked since, give it HTTP
    clients of its own first (see :func:`_fresh_clients`)."""
    global _litellm, _clients_pid
    if _litellm is not None and _clients_pid == os.getpid():
        return _litellm
    with _import_lock:
        if _litellm is not None and _clients_pid != os.getpid():
            _fresh_clients(_litellm)
            _clients_pid = os.getpid()
        if _litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            os.environ.setdefault("LITELLM_TELEMETRY", "False")
            import litellm

            litellm.telemetry = False
            litellm.suppress_debug_info = True
            litellm.drop_params = True  # a parameter a provider lacks is dropped, not an error
            _install_guard(litellm)
            _clients_pid = os.getpid()
            _litellm = litellm
    return _litellm


def warm() -> None:
    """Load what litellm loads for its first call, once per process (thread-safe): the import of
    litellm and one mock completion (no network), which imports the HTTP stack and the types the
    first call builds. Seconds on a slow machine: :meth:`rlm.backend.LiteLLMBackend.prepare`
    calls it before a call's request timeout starts counting."""
    global _warmed
    if _warmed:
        return
    litellm = _lib()
    with _import_lock:
        if _warmed:
            return
        try:
            litellm.completion(
                model="openai/warm-up",
                messages=[{"role": "user", "content": "-"}],
                mock_response="-",
                api_key="sk-warm-up",
                api_base="http://127.0.0.1:9/v1",  # never contacted: the response is the mock
            )
            import httpcore  # noqa: F401 (the real call's HTTP client loads it; the mock does not)
        except Exception:  # a warm-up only: the real call reports what is wrong
            pass
        _warmed = True


def secret_values(*keys: str | None) -> list[str]:
    """The texts never to show: *keys* (``api_key`` arguments, at least 4 characters) and the
    value of every environment variable whose name ends in ``_API_KEY`` (at least 8 characters),
    where litellm finds a provider's key when no ``api_key`` is given. Longest first, so a key
    that contains another is replaced whole."""
    values = {k for k in keys if isinstance(k, str) and len(k) >= _MIN_KEY_CHARS}
    values.update(
        v for name, v in os.environ.items() if name.endswith("_API_KEY") and len(v) >= _MIN_ENV_KEY_CHARS
    )
    values.discard(_PLACEHOLDER_KEY)
    return sorted(values, key=lambda v: (-len(v), v))


def redact(text: str, secrets: Sequence[str]) -> str:
    """*text* with each of *secrets* replaced by ``[REDACTED]``."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


def _scrub(text: str, api_key: str | None) -> str:
    return redact(text, secret_values(api_key))


def _prepare(
    model: str,
    messages: list[dict[str, Any]],
    api_base: str | None,
    api_key: str | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The litellm keyword arguments for one call; raises UnknownModelError / AuthenticationError early."""
    if not isinstance(model, str) or not model.strip():
        raise UnknownModelError("no model given", model=model)
    check_api_base(api_base)  # "not a url" would be retried as a server error, not refused
    litellm = _lib()
    try:
        litellm.get_llm_provider(model=model, api_base=api_base)
    except Exception as exc:
        raise UnknownModelError(
            f"litellm cannot route model {model!r}; prefix it with a provider, e.g. 'openai/{model}'"
            f" or 'anthropic/{model}' ({type(exc).__name__})",
            model=model,
        ) from None
    if api_key is None:
        try:
            env = litellm.validate_environment(model=model, api_base=api_base)
        except Exception:
            env = {"missing_keys": []}
        missing = [k for k in env.get("missing_keys") or [] if k.endswith("_KEY")]
        if missing and api_base:
            api_key = _PLACEHOLDER_KEY  # an OpenAI-compatible local server needs some key
        elif missing:
            raise AuthenticationError(
                f"no API key for model {model!r}: set {' or '.join(missing)} in the environment", model=model
            )
    call = dict(kwargs)
    if call.pop("cache_prefix", False) and _takes_cache_markers(litellm, model, api_base):
        messages = mark_cache_prefix(messages)
    call.setdefault("max_retries", 0)  # retries are the loop's (rlm.core), counted and bounded by budgets
    timeout = call.get("timeout")
    if timeout is None:  # litellm would wait 6000 s for a server that never answers
        call["timeout"] = DEFAULT_REQUEST_TIMEOUT_S
    elif (
        isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > MAX_REQUEST_TIMEOUT_S
    ):
        call["timeout"] = MAX_REQUEST_TIMEOUT_S
    call.update(model=model, messages=messages)
    if api_base:
        call["api_base"] = api_base
    if api_key:
        call["api_key"] = api_key
    return call


#: Providers whose prompt caching needs explicit ``cache_control`` markers (Claude models).
_MARKER_PROVIDERS = ("anthropic", "bedrock", "vertex_ai", "vertex_ai_beta")


def _takes_cache_markers(litellm: Any, model: str, api_base: str | None) -> bool:
    try:
        provider = litellm.get_llm_provider(model=model, api_base=api_base)[1]
    except Exception:
        return False
    return provider == "anthropic" or (provider in _MARKER_PROVIDERS and "claude" in model.lower())


def mark_cache_prefix(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of *messages* with ``cache_control`` on the system prompt and on the message before the last.

    Those two markers (of the four Anthropic allows) make the system prompt and
    every earlier turn a cached prefix: the next call of the same conversation
    reads it from the cache and pays full price only for the newest message.
    """
    marked = [dict(m) for m in messages]
    targets = {i for i, m in enumerate(marked) if m.get("role") == "system"}
    if len(marked) >= 2:
        targets.add(len(marked) - 2)
    for i in targets:
        content = marked[i].get("content")
        if isinstance(content, str):
            if not content:
                continue
            content = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content and isinstance(content[-1], dict):
            content = [*content[:-1], dict(content[-1])]
        else:
            continue
        content[-1]["cache_control"] = {"type": "ephemeral"}
        marked[i]["content"] = content
    return marked


def _retry_after(exc: Exception) -> float | None:
    """The wait a provider asked for in its ``Retry-After`` (or ``retry-after-ms``) header, in seconds."""
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return max(0.0, float(millis) / 1000)
        value = headers.get("retry-after")
    except Exception:
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(str(value))
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


#: Exceptions (by class name, so that httpx and openai need not be imported) that mean no connection was made.
_NO_CONNECTION = {
    "ConnectionRefusedError": "connection refused",
    "gaierror": "unknown host",
    "ConnectTimeout": "connection timed out",
    "ConnectError": "cannot connect",
}


def _no_connection(exc: BaseException) -> str | None:
    """Why no connection to the endpoint could be made, found in the exception's chain; None otherwise.

    A connection that was made and then broke (a read error, a reset) is not one of these.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    found: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        why = _NO_CONNECTION.get(type(current).__name__)
        text = str(current).lower()
        if why is None and ("connection refused" in text or "errno 111" in text):
            why = "connection refused"
        if why is not None and (found is None or found == "cannot connect"):
            found = why  # keep looking for the most precise reason down the chain
        current = current.__cause__ or current.__context__
    return found


#: Where a Python traceback starts in an exception's text: litellm puts one (with the paths of the
#: host's site-packages) into the message of some errors, e.g. "Invalid response object Traceback ...".
_TRACEBACK = "Traceback (most recent call last):"


def _without_traceback(text: str) -> str:
    """*text* with an embedded Python traceback replaced by the exception line it ends with: the
    frames (indented ``File "/path/...", line N`` lines and code) and anything after that line
    (chained tracebacks, litellm's dump of its arguments) are dropped."""
    start = text.find(_TRACEBACK)
    if start < 0:
        return text
    head = text[:start].rstrip()
    last = ""
    for line in text[start + len(_TRACEBACK) :].splitlines():
        if line.strip() and not line[:1].isspace():
            last = line.strip()  # the first line back at the margin: "SomeError: what"
            break
    if not last:
        return head
    return f"{head} ({last})" if head else last


def _short(text: str, limit: int) -> str:
    """*text* without an embedded traceback, stripped, cut at *limit* characters."""
    text = _without_traceback(text).strip()
    return text[:limit] + " ..." if len(text) > limit else text


def _map_error(
    exc: Exception,
    model: str,
    api_key: str | None,
    api_base: str | None = None,
    timeout: Any = None,
) -> ModelError:
    litellm = _lib()
    why = _no_connection(exc)
    where = api_base or "the provider's API endpoint"
    if why is not None:
        return ModelUnreachable(_scrub(f"{model}: cannot connect to {where}: {why}", api_key), model=model)
    if isinstance(exc, litellm.Timeout):
        return ProviderUnavailable(
            _scrub(_no_answer(model, where, timeout), api_key),
            model=model,
            retry_after=_retry_after(exc),
        )
    message = _short(_scrub(str(exc), api_key), 600) or type(exc).__name__
    lowered = message.lower()
    if (
        isinstance(exc, litellm.AuthenticationError)
        or "missing credentials" in lowered
        or "api_key client option" in lowered
    ):
        return AuthenticationError(f"{model}: authentication failed: {message}", model=model)
    if isinstance(exc, litellm.ContextWindowExceededError):
        return ContextWindowExceeded(
            f"{model}: the prompt does not fit the context window: {message}", model=model
        )
    if isinstance(exc, litellm.NotFoundError) and api_base:
        # A 404 from a server named by api_base is more often a wrong path (a missing or extra
        # /v1) than a wrong model: say both, and where it came from.
        return UnknownModelError(
            f"{model}: {api_base} answered 404 (not found): check the API base URL (an OpenAI-compatible"
            f" server's usually ends in /v1) and the model name: {message}",
            model=model,
        )
    if isinstance(exc, litellm.NotFoundError) or "llm provider not provided" in lowered:
        return UnknownModelError(f"{model}: unknown model: {message}", model=model)
    retry_after = _retry_after(exc)
    if isinstance(exc, litellm.RateLimitError):
        return RateLimited(f"{model}: rate limited: {message}", model=model, retry_after=retry_after)
    status = getattr(exc, "status_code", None)
    transient = (
        litellm.Timeout,
        litellm.APIConnectionError,
        litellm.InternalServerError,
        litellm.ServiceUnavailableError,
        litellm.BadGatewayError,
    )
    if isinstance(exc, transient) or (isinstance(status, int) and (status >= 500 or status == 408)):
        return ProviderUnavailable(
            f"{model}: provider unavailable: {type(exc).__name__}: {message}",
            model=model,
            retry_after=retry_after,
        )
    return ModelError(f"{model}: {type(exc).__name__}: {message}", model=model)


def _count(value: Any) -> int:
    """A token count as a server reported it: an int for a finite number of at least 0, else 0
    (a string, a list, a bool, ``nan``, a negative count: nothing a budget can use)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return max(0, int(value))


def _completion_from(
    response: Any,
    model: str,
    messages: list[dict[str, Any]],
    started: float,
    api_base: str | None = None,
    api_key: str | None = None,
) -> Completion:
    """The :class:`Completion` of a response; a response it cannot read is a
    :class:`~rlm.errors.ProviderUnavailable` (retried like a 5xx) with a short message."""
    try:
        return _read_response(response, model, messages, started)
    except Exception as exc:  # a shape nothing above expected: the server's fault, not a traceback
        where = api_base or "the provider's API endpoint"
        detail = _short(_scrub(str(exc), api_key), 200)
        raise ProviderUnavailable(
            f"{model}: unreadable response from {where}: {type(exc).__name__}"
            + (f": {detail}" if detail else ""),
            model=model,
        ) from None


def _read_response(response: Any, model: str, messages: list[dict[str, Any]], started: float) -> Completion:
    litellm = _lib()
    try:
        text = response.choices[0].message.content or ""
    except (AttributeError, IndexError):
        text = ""
    if not isinstance(text, str):
        raise TypeError(f"the message content is a {type(text).__name__}, not text")
    usage = getattr(response, "usage", None)
    # What a server reports is not trusted to be sane: a negative count would undo the token
    # budget, a negative or non-finite cost the cost budget, and a count that is not a number
    # (a string, a list) must not raise.
    input_tokens = _count(getattr(usage, "prompt_tokens", 0))
    output_tokens = _count(getattr(usage, "completion_tokens", 0))
    # No request is read in zero tokens, and no text written in zero. A server that sends no
    # usage gets zeros from litellm (they are its only sign), and so does a count that is not a
    # number: as they were, every such call was free for max_tokens and max_cost_usd. Such a
    # count is litellm's estimate instead, and the call's cost the price of the counts used.
    estimated = False
    if input_tokens == 0 and messages:
        input_tokens, estimated = count_tokens(model, messages), True
    if output_tokens == 0 and text:
        output_tokens, estimated = count_tokens(model, [{"role": "assistant", "content": text}]), True
    details = getattr(usage, "prompt_tokens_details", None)
    cache_read = _count(getattr(usage, "cache_read_input_tokens", None)) or _count(
        getattr(details, "cached_tokens", None)
    )
    cache_write = _count(getattr(usage, "cache_creation_input_tokens", None)) or _count(
        getattr(details, "cache_creation_tokens", None)
    )
    cost: float | None = None
    hidden = getattr(response, "_hidden_params", None) or {}
    raw_cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
    if estimated:  # litellm priced the counts the server sent, not these
        try:
            prices = litellm.cost_per_token(
                model=model, prompt_tokens=input_tokens, completion_tokens=output_tokens
            )
            cost = float(prices[0]) + float(prices[1])
        except Exception:
            cost = None  # not in the price map
    elif raw_cost is not None:
        cost = float(raw_cost)
    else:
        try:
            cost = float(litellm.completion_cost(completion_response=response, model=model))
        except Exception:
            cost = None  # not in the price map: a local server, a new model ...
    if cost is not None and not (math.isfinite(cost) and cost >= 0):
        cost = None  # a negative or non-finite figure would undo the cost budget
    return Completion(
        text=text,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost,
        duration_s=time.perf_counter() - started,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def complete(
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> Completion:
    """One chat completion through litellm.

    *model* is any litellm model string; extra keyword arguments (``timeout``,
    ``temperature``, ``num_retries`` ...) go to ``litellm.completion``. Without a
    ``timeout``, a call waits at most :data:`DEFAULT_REQUEST_TIMEOUT_S` for its answer.
    Raises :class:`~rlm.errors.ModelError` (or a subclass) on failure.
    """
    call = _prepare(model, messages, api_base, api_key, kwargs)
    litellm = _lib()
    started = time.perf_counter()
    timeout = call.get("timeout")
    deadline = None
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and math.isfinite(timeout):
        deadline = time.monotonic() + timeout
    guard = _Guard(deadline, CALL_STOP.get())
    token = _GUARD.set(guard)
    _using_client(1)
    try:
        response = litellm.completion(**call)
    except ModelError:
        raise
    except Exception as exc:
        raise _guard_error(guard, model, call) or _map_error(
            exc, model, call.get("api_key"), call.get("api_base"), timeout
        ) from None
    finally:
        _using_client(-1)
        _GUARD.reset(token)
    return _completion_from(response, model, messages, started, call.get("api_base"), call.get("api_key"))


def _using_client(step: int) -> None:
    global _calls
    with _calls_lock:
        _calls += step


def _guard_error(guard: _Guard, model: str, call: dict[str, Any]) -> ModelError | None:
    """The error of a call whose response the guard ended (None when it did not)."""
    if guard.reason is None:
        return None
    where = call.get("api_base") or "the provider's API endpoint"
    text = {
        "stopped": f"{model}: the call to {where} was given up",
        "timeout": _no_answer(model, where, call.get("timeout")),
        "too_large": f"{model}: a response from {where} over {MAX_RESPONSE_BYTES // 2**20} MiB (cut off)",
        "compressed": f"{model}: a compressed response from {where}, though none was asked for",
    }[guard.reason]
    return ProviderUnavailable(_scrub(text, call.get("api_key")), model=model)


def _no_answer(model: str, where: str, timeout: Any) -> str:
    """What a call that got no answer within its request timeout says (by the HTTP client or the guard)."""
    within = f" within {timeout:g} s" if isinstance(timeout, (int, float)) else ""
    return f"{model}: no answer from {where}{within} (request timeout)"


async def acomplete(
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> Completion:
    """The asyncio twin of :func:`complete` (``litellm.acompletion``)."""
    call = _prepare(model, messages, api_base, api_key, kwargs)
    litellm = _lib()
    started = time.perf_counter()
    try:
        response = await litellm.acompletion(**call)
    except ModelError:
        raise
    except Exception as exc:
        raise _map_error(exc, model, call.get("api_key"), call.get("api_base"), call.get("timeout")) from None
    return _completion_from(response, model, messages, started, call.get("api_base"), call.get("api_key"))


def count_tokens(model: str, messages: list[dict[str, Any]]) -> int:
    """Tokens of *messages* for *model* (litellm's tokenizer; a generic one for unknown models)."""
    litellm = _lib()
    try:
        return int(litellm.token_counter(model=model, messages=messages))
    except Exception:
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        return chars // 4 + 4 * len(messages)


def max_input_tokens(model: str) -> int | None:
    """The model's input window in tokens, or ``None`` when litellm does not know the model."""
    litellm = _lib()
    try:
        info = litellm.get_model_info(model=model)
    except Exception:
        return None
    value = info.get("max_input_tokens") or info.get("max_tokens")
    return int(value) if value else None
