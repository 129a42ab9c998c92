"""The outcome of one ``Sandbox.execute`` call."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExecResult", "LimitName"]

LimitName = Literal["cpu", "wall", "memory", "output", "processes", "files", "disk"]


class ExecResult(BaseModel):
    """What happened when a block of code ran in the sandbox.

    ``ok`` is true when the code ran to its end without an exception and
    without hitting a limit. Resource figures are measured by the host from
    the kernel's accounting, never reported by the child.
    """

    model_config = ConfigDict(frozen=True)

    ok: bool = Field(description="The code ran to completion: no exception, no limit, no crash.")
    stdout: str = Field(
        "",
        description="What the code printed (printing past max_output_bytes stops the cell: cut, with a marker).",
    )
    stderr: str = Field("", description="What the code wrote to stderr (shares the output cap).")
    error_type: str | None = Field(None, description="Exception class name, or a sandbox condition.")
    error_message: str | None = Field(None, description="Exception message.")
    traceback: str | None = Field(None, description="Traceback trimmed to the executed code's own frames.")
    limit: LimitName | None = Field(
        None,
        description=(
            "The limit that stopped the code, if one did: 'cpu' (cpu_seconds), 'wall' (wall_seconds), "
            "'memory' (memory_mb), 'output' (max_output_bytes), 'processes' (max_processes), 'files' "
            "(max_open_files), 'disk' (a file past max_file_mb, or the scratch directory past disk_mb)."
        ),
    )
    crashed: bool = Field(False, description="The child died of a signal that was not a limit.")
    state_lost: bool = Field(
        False, description="The child had to be restarted before this run: variables set earlier are gone."
    )
    output_truncated: bool = Field(False, description="Output went over max_output_bytes and was cut.")
    duration_s: float = Field(0.0, description="Wall time of the execute, in seconds, measured by the host.")
    cpu_s: float = Field(
        0.0, description="CPU time the child used during it, in seconds (kernel accounting)."
    )
    max_rss_bytes: int = Field(0, description="Peak resident memory of the child during it, in bytes.")
    policy_name: str = Field("", description="Name of the policy enforced.")
    policy_sha256: str = Field("", description="sha256 of the canonical JSON of the policy enforced.")
    layers: dict[str, str] = Field(
        default_factory=dict,
        description="Each protection layer -> 'active', 'off' or 'unavailable: <reason>'.",
    )
