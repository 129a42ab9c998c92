"""Policies: what a sandbox may do, declared in versioned TOML files.

:class:`Policy` is the schema's single source of truth: every key a policy
file may hold is a field below, with its unit and default in the field's
description. Models are frozen, refuse unknown keys and coerce nothing, so a
typo or a wrong type (``seccomp = "no"``) in a policy is an error naming the
file and the dotted key, never a silently ignored or reinterpreted setting.
Settings that contradict each other (a required layer switched off, a layer
on without one it needs, see :data:`LAYER_NEEDS`) are refused when the policy
is built, from a file, by :meth:`Policy.override` or by ``Policy(...)``.

``load_policy("default")`` loads a policy shipped with the package (the
``policies/`` directory of the checkout, packaged as ``sandbox/policies``);
anything that contains a path separator or ends in ``.toml`` is a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Any, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandbox import protocol
from sandbox.errors import PolicyError
from sandbox.files import NOT_REGULAR, read_regular
from sandbox.layers import LAYERS, host_state, host_tree, layer

__all__ = [
    "LAYERS",
    "LAYER_NEEDS",
    "SCHEMA_VERSION",
    "AuditSettings",
    "IsolationSettings",
    "Limits",
    "Policy",
    "PythonSettings",
    "load_policy",
    "shipped_policies",
]

SCHEMA_VERSION = 1


DEFAULT_IMPORTS: tuple[str, ...] = (
    "re", "json", "math", "cmath", "statistics", "random", "string", "textwrap",
    "collections", "itertools", "functools", "operator", "heapq", "bisect",
    "datetime", "time", "calendar", "decimal", "fractions", "numbers",
    "dataclasses", "enum", "typing", "copy", "pprint", "difflib", "unicodedata",
    "csv", "io", "base64", "hashlib", "hmac", "binascii", "zlib", "struct",
    "array", "uuid", "html", "html.parser", "urllib.parse", "ast",
)  # fmt: skip

#: Every model: frozen, unknown keys refused, and no coercion ("no" is not a bool, "10" not a
#: number, 10.0 not an int; an int is accepted where a float is asked for).
_MODEL = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)
#: Upper bounds of the limits: a year of seconds, 16 TiB in MiB. Far above any real policy, they keep
#: infinities and huge numbers out of the kernel's limits and the host's waits (which overflow).
_MAX_SECONDS = 365 * 24 * 3600
_MAX_MB = 1 << 24

#: Layers that cannot work with another one switched off: the kernel loads a seccomp filter or a
#: Landlock ruleset into an unprivileged process only once PR_SET_NO_NEW_PRIVS is set.
LAYER_NEEDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "seccomp": ("no_new_privs",),
        "landlock": ("no_new_privs",),
    }
)


class _Contradiction(ValueError):
    """Two settings of a policy that cannot hold together; ``key`` is the dotted key to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


#: Where the policy being validated comes from (its file), set by :func:`_validate` for the
#: messages of :func:`_strict_init`; None for ``Policy(...)`` built in code.
_WHERE: ContextVar[str | None] = ContextVar("_WHERE", default=None)
#: True while a model of this module is being validated: a section built inside a Policy leaves
#: its ValidationError to the policy, which names the section's key in its PolicyError.
_INSIDE: ContextVar[bool] = ContextVar("_INSIDE", default=False)


def _strict_init(model: BaseModel, data: dict[str, Any], where: str) -> None:
    """``BaseModel.__init__`` of *model*, a ValidationError turned into a :class:`PolicyError`
    naming the keys, after *where*: the error tree's own class, never a private subclass
    (``_Invalid`` was one, and could not be unpickled: Ray and multiprocessing hand exceptions
    from one process to another)."""
    if _INSIDE.get():
        BaseModel.__init__(model, **data)
        return
    token = _INSIDE.set(True)
    try:
        BaseModel.__init__(model, **data)
    except ValidationError as exc:
        raise PolicyError(f"{_WHERE.get() or where}: {_explain(exc, _section_key(type(model)))}") from None
    finally:
        _INSIDE.reset(token)


def _section_key(model: type[BaseModel]) -> str:
    """The key a section model is found under in a policy (``limits`` for Limits); "" for Policy."""
    return next((key for key, field in Policy.model_fields.items() if field.annotation is model), "")


class _Checked(BaseModel):
    """A model of this module: every instance validated, whichever way it is made.

    pydantic's ``model_copy(update=...)`` and ``model_construct(...)`` build an instance
    without validating it: ``policy.model_copy(update={"isolation": ...})`` (the documented way
    to derive a frozen model) gave a policy whose ``require`` named a layer it switched off, and
    the sandbox started without that layer; a ``cpu_seconds`` of -5 went through too. Here both
    validate as the constructor does, and a bad value is a :class:`PolicyError` naming its key.
    """

    model_config = _MODEL

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy, with the fields in *update* replaced and the result validated."""
        if not update:
            return super().model_copy(deep=deep)
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        made = type(self)(**{**fields, **update})
        return made.model_copy(deep=True) if deep else made

    @classmethod
    def model_construct(  # type: ignore[override]  # (pydantic's mypy plugin writes its own signature)
        cls, _fields_set: set[str] | None = None, **values: Any
    ) -> Self:
        """The same as the constructor: validated (pydantic's skips validation)."""
        return cls(**values)


class _Section(_Checked):
    """A table of a policy. Built alone (``Limits(cpu_seconds=-1)``), a bad value is a
    :class:`PolicyError` naming the key as a policy file would (``limits.cpu_seconds``)."""

    def __init__(self, **data: Any) -> None:
        _strict_init(self, data, type(self).__name__)


def _takes_tuple(annotation: Any) -> bool:
    """``tuple[...]``, alone or in a union (``tuple[str, ...] | None``)."""
    if get_origin(annotation) is tuple:
        return True
    return get_origin(annotation) in (Union, UnionType) and any(
        get_origin(arg) is tuple for arg in get_args(annotation)
    )


def _arrays_as_tuples(model: type[BaseModel], data: Any) -> Any:
    """TOML and JSON arrays (lists) for the tuple fields of *model*, nested models included.

    Only a list where the field is a tuple is converted: strict validation still refuses
    every other mismatch (a string for a tuple, a list for a bool ...).
    """
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        ann = field.annotation
        if isinstance(value, list) and _takes_tuple(ann):
            out[key] = tuple(value)
        elif isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            out[key] = _arrays_as_tuples(ann, value)
    return out


class Limits(_Section):
    """Resource limits, applied per ``execute`` call unless stated otherwise."""

    model_config = _MODEL

    cpu_seconds: float = Field(
        10.0,
        gt=0,
        le=_MAX_SECONDS,
        description="CPU time one execute may use, in seconds (at most a year). Default 10.",
    )
    lifetime_cpu_seconds: float = Field(
        600.0,
        gt=0,
        le=_MAX_SECONDS,
        description=(
            "CPU time a sandbox child may use over its whole life, in seconds (at most a year): the kernel's RLIMIT_CPU, "
            "set when the child starts. It bounds CPU used while the host is not watching (between "
            "executes); the host cannot rely on raising a child's limit later (that needs "
            "CAP_SYS_RESOURCE, which containers often lack). A child that reaches it is killed: the "
            "execute it ran reports limit='cpu', the next one gets a fresh child (state_lost). "
            "At least cpu_seconds. Default 600."
        ),
    )
    wall_seconds: float = Field(
        30.0,
        gt=0,
        le=_MAX_SECONDS,
        description=(
            "Wall-clock time one execute may take, in seconds (at most a year); the host kills the child's process "
            "group at the deadline. Time the host spends inside host functions is not counted. Default 30."
        ),
    )
    memory_mb: int = Field(
        1024,
        gt=16,
        le=_MAX_MB,
        description="Address space of the child process, in MiB (RLIMIT_AS). Default 1024.",
    )
    max_output_bytes: int = Field(
        1_000_000,
        gt=0,
        le=64 * 1024 * 1024 - 16 * 1024,
        description=(
            "stdout, stderr, error message and traceback of one execute together, in bytes (at most"
            " what one frame carries: min(max_message_mb MiB, 64 MiB) - 16 KiB); printing past it stops"
            " the cell (limit 'output') and what fits comes back cut with a marker. Default 1000000."
        ),
    )
    max_processes: int = Field(
        0,
        ge=0,
        le=65_536,
        description=(
            "Extra processes or threads the code may start. Default 0 (none). With the cgroup layer, "
            "the CPU of every process of the sandbox counts towards cpu_seconds (one left running "
            "after a cell towards the next execute); without it only the child's own (see SECURITY.md). "
            "A forked process that reaches the end of the cell exits there (0, 1 after an exception), "
            "and calling a host function from one raises RuntimeError: only the child answers the host."
        ),
    )
    max_open_files: int = Field(
        64, ge=8, le=1 << 20, description="Open file descriptors (RLIMIT_NOFILE). Default 64."
    )
    max_file_mb: int = Field(
        64, ge=0, le=_MAX_MB, description="Size of any one written file, in MiB (RLIMIT_FSIZE). Default 64."
    )
    disk_mb: int = Field(
        256,
        ge=1,
        le=_MAX_MB,
        description="Total size of everything in the scratch directory, in MiB. Default 256.",
    )
    max_message_mb: int = Field(
        256,
        ge=1,
        le=65_536,
        description=(
            "Largest value or message that may cross between host and child, in MiB (at most 65536). "
            "Frames over 64 MiB always travel out of band. Default 256."
        ),
    )


class PythonSettings(_Section):
    """The Python-level guard: readable errors for the model, not the security boundary."""

    model_config = _MODEL

    guard: Literal["allowlist", "restricted", "none"] = Field(
        "allowlist",
        description=(
            "'allowlist': imports limited to allowed_imports and host-reaching builtins removed; "
            "'restricted': compiled with RestrictedPython and every guard; 'none': plain exec. Default 'allowlist'."
        ),
    )
    allowed_imports: tuple[str, ...] = Field(
        DEFAULT_IMPORTS,
        description="Modules the code may import (a package allows its submodules). Default: a safe stdlib set.",
    )


class IsolationSettings(_Section):
    """Kernel layers applied in the child before any model code runs.

    One switch per layer of :data:`sandbox.layers.LAYER_TABLE` (its
    description comes from there), then the settings the layers read.
    """

    model_config = _MODEL

    no_new_privs: bool = Field(True, description=layer("no_new_privs").policy_doc)
    rlimits: bool = Field(True, description=layer("rlimits").policy_doc)
    cgroup: bool = Field(True, description=layer("cgroup").policy_doc)
    scratch_fs: bool = Field(True, description=layer("scratch_fs").policy_doc)
    network: bool = Field(True, description=layer("network").policy_doc)
    pid: bool = Field(True, description=layer("pid").policy_doc)
    ipc: bool = Field(True, description=layer("ipc").policy_doc)
    filesystem_view: bool = Field(True, description=layer("filesystem_view").policy_doc)
    landlock: bool = Field(True, description=layer("landlock").policy_doc)
    identity: bool = Field(True, description=layer("identity").policy_doc)
    seccomp: bool = Field(True, description=layer("seccomp").policy_doc)
    allowed_sockets: tuple[Literal["unix", "inet", "inet6"], ...] = Field(
        (),
        description=(
            "Socket families the code may create (seccomp). Default none. With 'unix', socket files "
            "under read_paths that the sandbox's uid may write can be connected to."
        ),
    )
    allow_ipc: bool = Field(
        False,
        description=(
            "Let the code make SysV IPC (shmget/shmat/shmctl/shmdt, msgget/msgsnd/msgrcv/msgctl, "
            "semget/semop/semtimedop/semctl) and POSIX message-queue (mq_*) system calls; "
            "when false seccomp refuses them with EPERM. Even when true they reach only the "
            "sandbox's own IPC namespace (layer 'ipc'). Default false."
        ),
    )
    read_paths: tuple[str, ...] = Field(
        (),
        description=(
            "Extra absolute paths the code may read (bound read-only into its filesystem view, "
            "granted by Landlock); a leading '~' is expanded on the host when the policy is "
            "loaded, relative paths are refused, and so are '/' and anything in, leading by a "
            "symbolic link to, or being a mount of /proc, /sys and /dev (the host's, not the "
            "sandbox's), or holding one mounted beneath. An entry with nothing there when a sandbox "
            "starts (a dangling link included), or one the sandbox cannot open (a directory on "
            "its way closed to the host's user, a loop of links), stops that start "
            "(SandboxStartError naming it). Default none."
        ),
    )
    require: tuple[str, ...] = Field(
        (),
        description="Layers that must be active; the sandbox refuses to start without them. Default none.",
    )

    @field_validator("read_paths", mode="before")
    @classmethod
    def _host_paths(cls, value: Any) -> Any:
        """Expand ``~`` here, on the host: the child has no home and must not guess one."""
        if not isinstance(value, (list, tuple)):
            return value
        out = []
        for item in value:
            if isinstance(item, str):
                item = os.path.expanduser(item) if item.startswith("~") else item
                if item.startswith("~"):
                    raise ValueError(f"read_paths entry {item!r}: cannot expand '~' on this host")
                if not os.path.isabs(item):
                    raise ValueError(f"read_paths entry {item!r} is not an absolute path")
                item = "/" + os.path.normpath(item).lstrip("/")  # normpath keeps a leading '//'
                if os.fsencode(item).decode("utf-8", "replace") != item:  # (a non-UTF-8 HOME, say)
                    raise ValueError(
                        f"read_paths entry {item!r} is not a UTF-8 path: the sandbox names files in UTF-8"
                    )
                # Its name counts, and so does where it leads (the view binds the target of a
                # symbolic link) and what it is there: a bind or another mount of a host tree.
                real = os.path.realpath(item)
                shown = repr(item) if real == item else f"{item!r} (a link to {real!r})"
                why = host_state(item) if host_tree(item) else _host_state_at(real)
                if why is not None:
                    raise ValueError(f"read_paths entry {shown} {why}")
                if item in out:  # the same path twice (spelt differently): once is enough
                    continue
            out.append(item)
        return tuple(out)


def _host_state_at(path: str) -> str | None:
    """:func:`sandbox.layers.host_state` of *path* and of what is there now, if anything is."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return host_state(path)
    try:
        return host_state(path, fd)
    finally:
        os.close(fd)


class AuditSettings(_Section):
    """Where the tamper-evident execution log goes."""

    model_config = _MODEL

    enabled: bool = Field(True, description="Append one hash-chained line per execute. Default true.")
    path: str | None = Field(
        None,
        description="Log file, an absolute path; '~' is expanded. Default: $XDG_STATE_HOME/rlm/audit.jsonl (~/.local/state/rlm/audit.jsonl).",
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Checked here, not when a sandbox starts: a NUL was a raw ValueError then, and a
        relative path was taken against whatever the working directory was at that moment."""
        if value is None:
            return value
        if "\0" in value:
            raise ValueError(f"{value!r} contains a NUL byte")
        if not value.startswith("~") and not os.path.isabs(value):
            raise ValueError(
                f"{value!r} is not an absolute path (a relative one would be taken against the"
                " working directory of whichever process starts a sandbox)"
            )
        return value


class Policy(_Checked):
    """A sandbox policy (schema version 1)."""

    schema_version: Literal[1] = Field(description="Version of this schema; only 1 exists.")
    name: str = Field(min_length=1, description="Short name, reported in every result and audit line.")
    description: str = Field(description="What the policy is for and what it gives up.")
    limits: Limits = Field(default_factory=Limits, description="Resource limits.")
    python: PythonSettings = Field(default_factory=PythonSettings, description="The Python-level guard.")
    isolation: IsolationSettings = Field(default_factory=IsolationSettings, description="Kernel layers.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="The audit log.")

    def __init__(self, **data: Any) -> None:
        """Validate strictly; a bad key or value is a :class:`PolicyError` naming it."""
        _strict_init(self, data, f"policy {data.get('name', '?')!r}")

    @model_validator(mode="before")
    @classmethod
    def _arrays(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("schema_version"), bool):
            # Literal[1] compares by equality, and True == 1
            raise _Contradiction("schema_version", "must be the integer 1, not a bool")
        return _arrays_as_tuples(cls, data)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        """Refuse settings that contradict each other, naming the key to change."""
        if self.limits.lifetime_cpu_seconds < self.limits.cpu_seconds:
            raise _Contradiction(
                "limits.lifetime_cpu_seconds",
                f"is {self.limits.lifetime_cpu_seconds:g}, less than limits.cpu_seconds "
                f"({self.limits.cpu_seconds:g}): one execute could never use its CPU budget",
            )
        fits = protocol.frame_cap(self.limits.max_message_mb * 1024 * 1024) - protocol.FRAME_ROOM
        if self.limits.max_output_bytes > fits:
            raise _Contradiction(
                "limits.max_output_bytes",
                f"is {self.limits.max_output_bytes}, more than one frame can carry under"
                f" limits.max_message_mb = {self.limits.max_message_mb} (at most {fits}): a cell"
                " printing that much would be lost with its child",
            )
        iso = self.isolation
        twice = sorted({layer for layer in iso.require if iso.require.count(layer) > 1})
        if twice:
            raise _Contradiction("isolation.require", f"names {twice} more than once")
        unknown = [layer for layer in iso.require if layer not in LAYERS]
        if unknown:
            raise _Contradiction(
                "isolation.require", f"unknown layer(s) {unknown}; known: {', '.join(LAYERS)}"
            )
        off = [layer for layer in iso.require if not getattr(iso, layer)]
        if off:
            raise _Contradiction(
                "isolation.require",
                f"requires layer(s) {off} that the policy switches off "
                f"(set isolation.{off[0]} = true or drop it from require)",
            )
        for name in LAYERS:
            if not getattr(iso, name):
                continue
            for needed in LAYER_NEEDS.get(name, ()):
                if not getattr(iso, needed):
                    raise _Contradiction(
                        f"isolation.{needed}",
                        f"is off, but isolation.{name} is on and needs it "
                        f"(an unprivileged process can load {name} only with {needed} set); "
                        f"set isolation.{needed} = true or isolation.{name} = false",
                    )
        return self

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON of the policy: identifies exactly what was enforced."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def override(self, changes: dict[str, Any]) -> Policy:
        """A validated copy with dotted keys replaced: ``p.override({"python.guard": "none"})``."""
        data = self.model_dump()
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise PolicyError(f"policy {self.name!r}: unknown key {dotted!r}")
                node = node[part]
            if leaf not in node:
                raise PolicyError(f"policy {self.name!r}: unknown key {dotted!r}")
            node[leaf] = value
        return _validate(data, f"policy {self.name!r} (override)")


#: The shipped policies' directory (resolved once: about 40 us a time).
_SHIPPED_DIR = Path(__file__).resolve().parent / "policies"


def shipped_policies() -> dict[str, Path]:
    """Names of the policies shipped with the package, and their files."""
    return {p.stem: p for p in sorted(_SHIPPED_DIR.glob("*.toml"))}


def _validate(data: Any, where: str) -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: a policy must be a TOML table")
    version = data.get("schema_version")
    if version is None:
        raise PolicyError(f"{where}: missing key 'schema_version' (this version reads schema_version = 1)")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise PolicyError(
            f"{where}: unknown schema_version {version!r} (this version reads schema_version = 1)"
        )
    token = _WHERE.set(where)
    try:
        return Policy.model_validate(data)  # runs Policy.__init__, whose PolicyError says *where*
    except RecursionError:  # a value nested too deeply (an override from code, say)
        raise PolicyError(f"{where}: a value is nested too deeply") from None
    finally:
        _WHERE.reset(token)


def _explain(exc: ValidationError, section: str = "") -> str:
    """``key 'a.b': what is wrong; key ...``, for the first three problems (the keys of a
    section built alone, ``Limits(...)``, under that *section*'s key)."""
    problems = [_describe(error, section) for error in exc.errors()]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _describe(error: Any, section: str = "") -> str:
    """One pydantic error as ``key 'a.b': what is wrong``."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _Contradiction):
        return f"key {cause.key!r}: {cause.message}"
    key = ".".join(str(p) for p in [*([section] if section else []), *error["loc"]]) or "<top>"
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"key {key!r}: unknown key"
    if kind == "missing":
        return f"key {key!r}: missing key"
    if kind == "value_error" and cause is not None:  # our validator's own words name the value
        return f"key {key!r}: {cause}"
    if kind == "tuple_type":
        msg = "Input should be an array"
    shown = repr(error.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"key {key!r}: {msg} (got {shown} of type {type(error.get('input')).__name__})"


#: Largest policy file read (the shipped ones are about 3 KB): a bigger one is not a policy.
MAX_POLICY_BYTES = 1024 * 1024


def _read_policy_file(path: Path) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_POLICY_BYTES`; else PolicyError. A FIFO
    would block the read forever, ``/dev/zero`` would fill memory."""
    if "\0" in str(path):  # os.open would raise ValueError
        raise PolicyError(f"policy file {str(path)!r}: a path cannot contain a NUL byte")
    try:
        raw = read_regular(path, MAX_POLICY_BYTES + 1)
    except OSError as exc:
        if exc.strerror == NOT_REGULAR:
            raise PolicyError(f"{path}: not a regular file") from None
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: over {MAX_POLICY_BYTES} bytes: not a policy file")
    return raw


def load_policy(name_or_path: str | Path) -> Policy:
    """Load a shipped policy by bare name (``"default"``) or a policy file by path."""
    if not isinstance(name_or_path, str | Path):
        raise TypeError(
            f"a policy is a Policy, a shipped policy's name or a path, not {type(name_or_path).__name__}"
        )
    text = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or "/" in text or text.endswith(".toml") or text.startswith(".")
    if is_path:
        if "\0" in text:  # (expanding '~' or opening it would raise ValueError)
            raise PolicyError(f"policy file {text!r}: a path cannot contain a NUL byte")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user with no such user, or no home directory to be found
            raise PolicyError(f"policy file {text!r}: cannot expand '~' on this host") from None
    elif "\0" not in text and text.isprintable() and (_SHIPPED_DIR / f"{text}.toml").is_file():
        path = _SHIPPED_DIR / f"{text}.toml"  # (a name has no '/': it cannot lead out of the directory)
    else:
        try:
            shipped = shipped_policies()
        except OSError as exc:  # e.g. no descriptor left to list the directory
            raise PolicyError(f"cannot list the shipped policies: {exc.strerror}") from None
        if text not in shipped:
            # A file of that name here is not what a bare name means (it would make a typo of a
            # shipped name load whatever file sits in the current directory): say how to name it.
            hint = f"; for the file {text!r} here, write './{text}'" if os.path.lexists(text) else ""
            raise PolicyError(
                f"no shipped policy named {text!r} (shipped: {', '.join(shipped) or 'none'}){hint}"
            )
        path = shipped[text]
    raw = _read_policy_file(path)
    key = (str(path), raw)
    known = _loaded.get(key)
    if known is not None:
        return known
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # arrays or inline tables nested past the parser's recursion limit
        raise PolicyError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    except ValueError as exc:  # an integer past Python's digit limit (int() of 4301+ digits)
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    policy = _validate(data, str(path))
    # Kept only when the file's bytes alone made it: a read_path is checked against the host's
    # filesystem as it is now, and '~' expands to the home of the moment.
    if not policy.isolation.read_paths and b"~" not in raw and len(raw) <= 65536:
        if len(_loaded) >= _LOADED_KEPT:
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):  # another thread: fine
                del _loaded[next(iter(_loaded))]
        _loaded[key] = policy
    return policy


#: Policies loaded, by path and the file's bytes: ``Sandbox()`` (policy "default") read, parsed
#: and validated the shipped file each time, about 1 ms of its start. A file changed since is
#: loaded anew (its bytes are read each time: a few microseconds).
_loaded: dict[tuple[str, bytes], Policy] = {}
_LOADED_KEPT = 32
