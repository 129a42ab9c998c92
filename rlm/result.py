"""What a run returns: :class:`RLMResult` (a pydantic model that round-trips to JSON).

Text that is not valid Unicode (a lone surrogate, which models and programs emit: a server's
JSON may hold ``"\\ud800"``) cannot be written as UTF-8 or JSON. An :class:`RLMResult` never holds
any: every string in it (the answer, the error, the history, ``parsed``, ...) has its lone
surrogates written as backslash escapes (``\\ud800``, six characters) when the result is built,
as the sandbox does with what the code prints. So ``model_dump_json()`` never fails, the answer
prints to any UTF-8 terminal, pipe or file, and
``RLMResult.model_validate_json(result.model_dump_json()) == result`` holds for every result.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sandbox.protocol import clean_text

__all__ = ["ModelUsage", "RLMResult", "StopReason"]

StopReason = Literal[
    "final",  # the model gave FINAL / FINAL_VAR
    "max_iterations",  # out of turns (the answer, if any, is the closing call's reply)
    "max_sub_calls",
    "max_tokens",
    "max_cost_usd",
    "max_time_s",
    "max_errors",  # max_errors code blocks in a row raised
    "cancelled",  # a CancelToken passed as cancel= was cancelled
    "model_error",  # a root-model call failed mid-run (see ``error``)
    "error",  # the run could not start (CLI --json only; the library raises instead)
]


def _clean(value: Any) -> Any:
    """*value* with every string in it (dictionary keys included) made valid Unicode by
    :func:`sandbox.protocol.clean_text` (as the sandbox escapes what code prints); containers
    are copied only when something in them changed."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        items = [(_clean(k), _clean(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, (list, tuple)):
        cleaned = [_clean(v) for v in value]
        if all(c is v for c, v in zip(cleaned, value, strict=True)):
            return value
        return type(value)(cleaned) if type(value) in (list, tuple) else cleaned
    return value


class ModelUsage(BaseModel):
    """Usage of one model over a whole run tree."""

    model_config = ConfigDict(frozen=True)

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = Field(0.0, description="None when litellm has no price for the model.")
    retries: int = Field(0, description="Calls tried again after a rate limit, timeout or 5xx.")
    cache_read_tokens: int = Field(
        0, description="Input tokens read from the prompt cache (in input_tokens)."
    )
    cache_write_tokens: int = Field(
        0, description="Input tokens written to the prompt cache (in input_tokens)."
    )
    abandoned: int = Field(
        0,
        description=(
            "Calls given up in flight when the run stopped (out of time, or cancelled), or past the"
            " request timeout."
            " The provider may still bill them; their tokens are not known, so they are in neither"
            " the token nor the cost figures (nor in calls)."
        ),
    )


class RLMResult(BaseModel):
    """The outcome of one RLM run.

    Counters: ``iterations`` are root turns (at most ``max_iterations``);
    ``code_executions`` are the root's repl blocks run; ``sub_calls`` are all
    model calls other than the root's own calls, across the whole tree;
    ``tool_calls`` are calls of the caller's tools, across the whole tree.
    Tokens, cost and ``usage`` cover every call of the tree, the closing
    "best answer" call included, except calls given up in flight when the run
    stopped (counted in ``usage[model].abandoned``: their tokens are not
    known). ``cost_usd`` is None when a price is unknown. The result of a
    child RLM (its ``.result.json``) counts its own calls and its child runs'.

    Lone surrogates in any of its text are stored as backslash escapes (see the
    module docstring), so the result always serializes and round-trips to JSON.
    """

    answer: str | None = None
    stop_reason: StopReason = "final"
    iterations: int = 0
    code_executions: int = 0
    sub_calls: int = 0
    tool_calls: int = 0
    parsed: Any = Field(None, description="The answer validated against output_type (None without one).")
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    cost_usd: float | None = None
    priced_cost_usd: float = Field(
        0.0,
        description=(
            "The cost of the calls whose price is known, in USD: cost_usd when every price is "
            "known, else what max_cost_usd (and a batch's budget) counted."
        ),
    )
    execution_time: float = 0.0
    usage: dict[str, ModelUsage] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list)
    root_model: str = ""
    run_id: str = ""
    log_path: str | None = None
    audit_log_path: str | None = None
    error: str | None = None
    error_type: str | None = Field(
        None,
        description=(
            "The class of the error behind error (model_error: e.g. ModelUnreachable, a server that "
            "went away mid-run, which a batch treats as stopping it rather than as the item's failure)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return _clean(data) if isinstance(data, dict) else data

    @property
    def response(self) -> str:
        """The answer as text ("" when there is none), as the reference RLM names it."""
        return self.answer or ""
