"""Typed answers: ``rlm.run(..., output_type=T)``.

``T`` is a pydantic model or any type pydantic can validate (``int``,
``list[str]``, ``dict[str, float]``, a ``TypedDict`` ...). Its JSON schema goes
into the system prompt; the final value (a Python value given to ``FINAL`` /
``FINAL_VAR``, or text holding JSON) is validated; a failure is shown to the
model, which tries again.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rlm.errors import ConfigurationError

__all__ = ["AnswerType", "AnswerTypeError"]

_INFO = re.compile(r"[\w-]*")


def _fenced_body(text: str) -> str | None:
    """The body of *text* (stripped) when it is one fenced block (a ```lang line, the body, a
    closing ``` line), else None. By hand, in linear time: the pattern it replaces took minutes
    on an answer of ``` and a few thousand newlines."""
    if not (text.startswith("```") and text.endswith("```")):
        return None
    head_end = text.find("\n")
    if head_end < 0 or not _INFO.fullmatch(text[3:head_end].rstrip()):
        return None
    body_end = len(text[:-3].rstrip())
    if body_end <= head_end or "\n" not in text[body_end:-3]:
        return None
    return text[head_end + 1 : body_end]


#: The core-schema types whose validation can stop at their first bad item (``fail_fast``):
#: sequences and mappings (a mapping stops at its first bad key or value).
_SEQUENCES = frozenset(
    {"list", "tuple", "set", "frozenset", "deque", "dict", "frozendict", "ordered-dict", "counter"}
)


def _failing_fast(schema: Any) -> Any:
    """A copy of the core *schema* where every sequence and mapping stops at its first bad item."""
    if isinstance(schema, dict):
        out = {key: _failing_fast(value) for key, value in schema.items()}
        if out.get("type") in _SEQUENCES:
            out["fail_fast"] = True
        return out
    if isinstance(schema, list):
        return [_failing_fast(value) for value in schema]
    return schema


def _validator(adapter: Any) -> Any:
    """The adapter's validation, stopping at the first bad item of each sequence and mapping:
    the same values pass, but a wrong list makes one error, not one per item. pydantic kept
    every error and the reason was built from all of them: ``FINAL(['a'] * 1_000_000)``
    against ``list[int]`` took 13 s of CPU holding the GIL and 2 GB of host memory (a reply of
    JSON text, with no element budget, more); a million wrong values against
    ``dict[str, int]`` 4 s and 1 GB. The adapter's own where a schema cannot be copied (a
    pydantic-core that does not know ``fail_fast`` on a type refuses the copy)."""
    from pydantic_core import SchemaValidator

    try:
        return SchemaValidator(_failing_fast(adapter.core_schema))
    except Exception:
        return adapter.validator


class AnswerTypeError(ValueError):
    """A final answer that does not validate against ``output_type`` (shown to the model, not raised)."""


class AnswerType:
    """Validation of final answers against one output type."""

    def __init__(self, output_type: Any) -> None:
        from pydantic import TypeAdapter

        try:
            self.adapter: Any = TypeAdapter(output_type)
            self.schema = self.adapter.json_schema()
        except Exception as exc:
            raise ConfigurationError(
                f"output_type {output_type!r} cannot be validated by pydantic: {exc}"
            ) from None
        self.name = getattr(output_type, "__name__", None) or repr(output_type)
        self.validator = _validator(self.adapter)

    def prompt(self) -> str:
        """The system prompt's section about the answer's type."""
        schema = json.dumps(self.schema, ensure_ascii=False, indent=1)
        return (
            "## Answer format\n\n"
            "Your final answer must match this JSON schema:\n\n"
            f"```json\n{schema}\n```\n\n"
            "Give it as a Python value (`FINAL(result)` with a dict, a list, a number ...) or as JSON text. "
            "It is checked: when it does not match you are told why, and you answer again."
        )

    def validate(self, value: Any) -> Any:
        """The validated value; raises :class:`AnswerTypeError` with a readable reason."""
        from pydantic import ValidationError

        if isinstance(value, str):
            text = value.strip()
            fenced = _fenced_body(text)
            if fenced is not None:
                text = fenced.strip()
            try:
                return self.validator.validate_json(text)
            except ValidationError as exc:
                json_error: ValidationError | None = exc
            try:
                return self.validator.validate_python(value)
            except ValidationError as exc:
                looks_json = text[:1] in ("{", "[", '"') or text[:1].isdigit()
                raise AnswerTypeError(_reason(json_error if looks_json and json_error else exc)) from None
        try:
            return self.validator.validate_python(value)
        except ValidationError as exc:
            raise AnswerTypeError(_reason(exc)) from None

    def dump(self, parsed: Any) -> str:
        """The JSON text of a validated value (what ``RLMResult.answer`` holds)."""
        return str(self.adapter.dump_json(parsed).decode("utf-8"))


def _reason(exc: Any) -> str:
    lines = []
    for error in exc.errors(include_url=False)[:10]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "value"
        lines.append(f"{where}: {error.get('msg')}")
    return "; ".join(lines) or str(exc)
