"""The Python-level guard, run inside the child.

It gives the model readable errors ("import of 'os' is not allowed by policy
'default'") instead of letting it learn the boundary from EPERMs. It is NOT
the security boundary: the kernel layers in :mod:`sandbox.isolation` are, and
they hold with ``guard = "none"``.

Three modes, chosen by the policy's ``python.guard``:

``allowlist``
    Imports limited to ``python.allowed_imports`` (a package allows its
    submodules); ``open`` limited to the scratch directory (and, for reading, to
    ``isolation.read_paths``); interactive and
    host-reaching builtins replaced by stubs that explain themselves; names
    and attributes that lead to interpreter internals (``__subclasses__``,
    ``__globals__``, ``f_back`` ...) refused at compile time and in
    ``getattr``/``setattr``/``delattr``.
``restricted``
    Compiled with RestrictedPython, with every guard it calls supplied.
``none``
    Plain ``exec``: only the kernel layers stand between the code and the host.

This module runs in the child: stdlib only (plus RestrictedPython, imported
only in restricted mode).
"""

from __future__ import annotations

import ast
import builtins
import operator
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["FORBIDDEN_NAMES", "GuardError", "Runtime", "make_runtime"]

#: Names that reach interpreter internals; refused in allowlist mode.
FORBIDDEN_NAMES = frozenset(
    {
        "__class__", "__bases__", "__base__", "__mro__", "__subclasses__", "__globals__",
        "__code__", "__closure__", "__builtins__", "__dict__", "__getattribute__",
        "__reduce__", "__reduce_ex__", "__self__", "__func__", "__import__", "__loader__",
        "__spec__", "__traceback__", "__defaults__", "__kwdefaults__", "__set_name__",
        "__init_subclass__", "__class_getitem__", "__getstate__", "__setstate__",
        "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await",
        "ag_frame", "ag_code", "f_back", "f_globals", "f_locals", "f_builtins", "f_code",
        "tb_frame", "tb_next", "co_code", "mro",
    }
)  # fmt: skip

_REMOVED_BUILTINS = ("breakpoint", "input", "exit", "quit", "help", "copyright", "credits", "license")


class GuardError(Exception):
    """Code refused by the guard before it ran (reported to the model as such)."""


class Runtime:
    """How the child compiles and runs code under one guard mode."""

    def __init__(
        self,
        guard: str,
        builtins_ns: dict[str, Any],
        compile_exec: Callable[[ast.Module, str], types.CodeType],
        compile_eval: Callable[[ast.Expression, str], types.CodeType],
        extra_globals: dict[str, Any],
        check: Callable[[ast.Module, str], None] | None = None,
    ) -> None:
        self.guard = guard
        #: Called with the parsed cell and its source before it is compiled.
        self.check = check
        self.builtins = builtins_ns
        self.compile_exec = compile_exec
        self.compile_eval = compile_eval
        self.extra_globals = extra_globals


def _module_allowed(name: str, allowed: frozenset[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def _make_import(allowed: frozenset[str], policy: str) -> Callable[..., Any]:
    real_import = builtins.__import__

    def guarded_import(
        name: str,
        globals: Any = None,
        locals: Any = None,
        fromlist: Sequence[str] | None = (),
        level: int = 0,
    ) -> Any:
        if level:
            raise ImportError("relative imports are not available in the sandbox")
        if not _module_allowed(name, allowed):
            raise ImportError(f"import of {name!r} is not allowed by policy {policy!r}")
        module = real_import(name, globals, locals, fromlist, 0)
        for item in fromlist or ():
            sub = f"{name}.{item}"
            if sub in sys.modules and not _module_allowed(sub, allowed):
                raise ImportError(f"import of {sub!r} is not allowed by policy {policy!r}")
        return module

    return guarded_import


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _make_open(scratch: str, policy: str, read_paths: Iterable[str] = ()) -> Callable[..., Any]:
    """``open`` for files under the scratch directory, and for reading under *read_paths*."""
    real_open = builtins.open
    root = os.path.realpath(scratch)
    readable = tuple(os.path.realpath(p) for p in read_paths)
    allowed = "the current directory" + (" (and, to read, the policy's read_paths)" if readable else "")

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, int):
            raise PermissionError(f"opening file descriptors is not allowed by policy {policy!r}")
        path = os.path.realpath(os.fspath(file))
        reading = isinstance(mode, str) and not any(c in mode for c in "wax+")
        if not _under(path, root) and not (reading and any(_under(path, r) for r in readable)):
            raise PermissionError(
                f"open({os.fspath(file)!r}, {mode!r}) is outside the scratch directory; policy {policy!r} "
                f"allows only files under {allowed}"
            )
        return real_open(path, mode, *args, **kwargs)

    return guarded_open


def _stub(name: str, policy: str) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(f"{name}() is not available in the sandbox (policy {policy!r})")

    unavailable.__name__ = name
    return unavailable


_FORBIDDEN_RE = re.compile(r"\b(?:" + "|".join(sorted(FORBIDDEN_NAMES)) + r")\b")


def _check_names(tree: ast.AST, source: str, policy: str) -> None:
    if not _FORBIDDEN_RE.search(source):  # the common case: skip the tree walk
        return
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        if name is not None and name in FORBIDDEN_NAMES:
            raise GuardError(
                f"line {getattr(node, 'lineno', '?')}: access to {name!r} is not allowed by policy {policy!r}"
            )


def _allowlist(policy: str, allowed: frozenset[str], scratch: str, read_paths: Iterable[str]) -> Runtime:
    ns = dict(vars(builtins))
    ns["__import__"] = _make_import(allowed, policy)
    ns["open"] = _make_open(scratch, policy, read_paths)
    for name in _REMOVED_BUILTINS:
        ns[name] = _stub(name, policy)
    real_getattr, real_setattr, real_delattr = getattr, setattr, delattr

    def _refuse(name: Any) -> None:
        if isinstance(name, str) and name in FORBIDDEN_NAMES:
            raise AttributeError(f"access to {name!r} is not allowed by policy {policy!r}")

    def guarded_getattr(obj: Any, name: str, *default: Any) -> Any:
        _refuse(name)
        return real_getattr(obj, name, *default)

    def guarded_setattr(obj: Any, name: str, value: Any) -> None:
        _refuse(name)
        real_setattr(obj, name, value)

    def guarded_delattr(obj: Any, name: str) -> None:
        _refuse(name)
        real_delattr(obj, name)

    ns["getattr"], ns["setattr"], ns["delattr"] = guarded_getattr, guarded_setattr, guarded_delattr
    ns["vars"] = _stub("vars", policy)

    def check(tree: ast.Module, source: str) -> None:
        _check_names(tree, source, policy)

    return Runtime("allowlist", ns, _compile_exec, _compile_eval, {}, check)


def _compile_exec(tree: ast.Module, filename: str) -> types.CodeType:
    return compile(tree, filename, "exec", dont_inherit=True)


def _compile_eval(tree: ast.Expression, filename: str) -> types.CodeType:
    return compile(tree, filename, "eval", dont_inherit=True)


def _plain(policy: str) -> Runtime:
    return Runtime("none", dict(vars(builtins)), _compile_exec, _compile_eval, {})


_INPLACE_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
    ">>=": operator.irshift, "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor,
    "@=": operator.imatmul,
}  # fmt: skip

_UNSUBSCRIPTABLE = (types.ModuleType, types.FrameType, types.CodeType, types.TracebackType)


def _restricted(policy: str, allowed: frozenset[str], scratch: str, read_paths: Iterable[str]) -> Runtime:
    from RestrictedPython.compile import compile_restricted  # only in restricted mode
    from RestrictedPython.Guards import (
        full_write_guard,
        guarded_iter_unpack_sequence,
        guarded_unpack_sequence,
        safe_builtins,
        safer_getattr,
    )

    ns = dict(safe_builtins)
    ns["__import__"] = _make_import(allowed, policy)
    ns["open"] = _make_open(scratch, policy, read_paths)
    # RestrictedPython's safe set is minimal; these are pure and reach nothing outside.
    for name in (
        "all", "any", "enumerate", "filter", "map", "max", "min", "sum", "reversed", "list", "dict",
        "set", "frozenset", "iter", "next", "print", "type", "object", "bytearray", "Exception",
    ):  # fmt: skip
        ns.setdefault(name, getattr(builtins, name))

    def guarded_getitem(obj: Any, key: Any) -> Any:
        if isinstance(obj, _UNSUBSCRIPTABLE):
            raise TypeError(f"indexing a {type(obj).__name__} is not allowed by policy {policy!r}")
        if isinstance(key, str) and key.startswith("_") and isinstance(obj, types.MappingProxyType):
            raise KeyError(f"access to {key!r} is not allowed by policy {policy!r}")
        return obj[key]

    def guarded_iter(obj: Any) -> Any:
        if isinstance(obj, _UNSUBSCRIPTABLE):
            raise TypeError(f"iterating a {type(obj).__name__} is not allowed by policy {policy!r}")
        return iter(obj)

    def guarded_apply(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    def guarded_inplacevar(op: str, target: Any, value: Any) -> Any:
        fn = _INPLACE_OPS.get(op)
        if fn is None:
            raise SyntaxError(f"in-place operator {op!r} is not supported")
        return fn(target, value)

    class StdoutPrint:
        """``print`` for restricted code: writes to the captured stdout."""

        def __init__(self, _getattr_: Any = None) -> None:
            pass

        def _call_print(self, *objects: Any, **kwargs: Any) -> None:
            if kwargs.get("file") is not None:
                raise PermissionError(f"print(file=...) is not allowed by policy {policy!r}")
            kwargs.pop("file", None)
            print(*objects, **kwargs)

        def __call__(self) -> str:
            return ""

    extra = {
        "_getattr_": safer_getattr,
        "_write_": full_write_guard,
        "_getitem_": guarded_getitem,
        "_getiter_": guarded_iter,
        "_print_": StdoutPrint,
        # RestrictedPython binds ``_print`` at the top of a module or function that prints;
        # the trailing expression of a cell is compiled on its own (eval mode, no binding), and
        # lambdas and class bodies have none either, so they find this one.
        "_print": StdoutPrint(),
        "_apply_": guarded_apply,
        "_inplacevar_": guarded_inplacevar,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "__metaclass__": type,
        "__name__": "__main__",
    }

    def _restricted_compile(tree: ast.Module | ast.Expression, filename: str, mode: str) -> types.CodeType:
        try:
            # RestrictedPython warns ("Prints, but never reads 'printed' variable") with its own
            # install path as the location; that text would land in the code's stderr.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return compile_restricted(tree, filename, mode)  # type: ignore[arg-type]
        except SyntaxError as exc:
            # RestrictedPython raises SyntaxError(tuple of messages): one readable line each.
            found = exc.args[0] if exc.args and isinstance(exc.args[0], (tuple, list)) else (exc,)
            raise GuardError("\n".join(str(x) for x in found)) from None

    def compile_exec(tree: ast.Module, filename: str) -> types.CodeType:
        return _restricted_compile(tree, filename, "exec")

    def compile_eval(tree: ast.Expression, filename: str) -> types.CodeType:
        return _restricted_compile(tree, filename, "eval")

    return Runtime("restricted", ns, compile_exec, compile_eval, extra)


def make_runtime(
    guard: str, allowed_imports: Iterable[str], policy: str, scratch: str, read_paths: Iterable[str] = ()
) -> Runtime:
    """Build the builtins and compilers for one guard mode (*read_paths*: what ``open`` may read
    outside *scratch*, the policy's ``isolation.read_paths``)."""
    allowed = frozenset(allowed_imports)
    if guard == "allowlist":
        return _allowlist(policy, allowed, scratch, read_paths)
    if guard == "restricted":
        return _restricted(policy, allowed, scratch, read_paths)
    if guard == "none":
        return _plain(policy)
    raise ValueError(f"unknown guard {guard!r}")
