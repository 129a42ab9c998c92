"""The ``ray`` engine: each item of a batch is a Ray task that runs the RLM and its sandbox on a worker node.

This is the only module that imports Ray (the optional extra ``rlm[ray]``).

- **Where things run.** The task gets the item's id, query and context text
  (read by the driver) and the run settings; it starts the sandbox, calls the
  models and returns the output record, all on the node Ray chose. A sandbox
  never crosses a node boundary. Before its run, every task starts one sandbox
  with the batch's policy: a node that lacks a layer the policy requires fails
  closed, and the batch stops with an error naming the node and the layer.
- **Keys.** Provider keys (environment variables ending in ``_API_KEY``, and
  ``*_API_BASE``, ``*_BASE_URL``, ``*_API_VERSION``) and an explicit
  ``api_key`` reach the workers only through the job's runtime environment,
  as its ``worker_process_setup_hook``: a small function, holding them, that
  Ray stores in the cluster's internal key-value store and runs in each
  worker process of the job before its first task. They are never task
  arguments or results. (Not ``runtime_env={"env_vars": ...}``: Ray's
  runtime-env agent writes those values to its log file in clear.)
- **Cluster.** ``address=None`` starts a private local Ray instance (stopped
  when the batch ends), ``"auto"`` joins the cluster ``ray start`` runs on this
  machine, ``"ray://host:10001"`` or ``"host:6379"`` a remote one. When Ray is
  already initialized in this process, that connection is used as it is: the
  job's runtime environment is the caller's, so no key is forwarded, and an
  explicit ``api_key`` is refused.
- **Concurrency.** Each task asks Ray for one CPU; at most *workers* tasks are
  in flight (default: the cluster's CPUs).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from rlm.batching.items import BatchItem
from rlm.batching.worker import RunSettings, check_sandbox, error_record, run_item
from rlm.errors import ConfigurationError, SandboxFailure

__all__ = ["API_KEY_VARIABLE", "RayEngine", "forwarded_environment"]

#: The variable an explicit ``api_key`` travels in to the workers.
API_KEY_VARIABLE = "RLM_BATCH_API_KEY"

_FORWARDED_SUFFIXES = ("_API_KEY", "_API_BASE", "_BASE_URL", "_API_VERSION")


def forwarded_environment(api_key: str | None) -> dict[str, str]:
    """The variables the workers get through the runtime environment: provider settings and keys."""
    env = {k: v for k, v in os.environ.items() if k.endswith(_FORWARDED_SUFFIXES) and k.isupper()}
    if api_key:
        env[API_KEY_VARIABLE] = api_key
    return env


def _environment_hook(env: dict[str, str]) -> Any:
    """The job's ``worker_process_setup_hook``: puts *env* into each worker process's environment."""

    def rlm_batch_environment() -> None:
        os.environ.update(env)

    return rlm_batch_environment


def _run_on_node(
    item_id: str,
    query: str,
    context: str,
    settings: RunSettings,
    cost_cap: float | None,
    question_sha256: str | None = None,
) -> dict[str, Any]:
    """The Ray task: check this node's sandbox layers, then run the item here."""
    try:
        check_sandbox(settings.policy, where=f"Ray node {ray.util.get_node_ip_address()}")  # type: ignore[no-untyped-call, unused-ignore]
    except SandboxFailure as exc:
        return {"record": error_record(item_id, "error", str(exc)), "fatal": ["SandboxFailure", str(exc)]}
    api_key = os.environ.get(API_KEY_VARIABLE)
    return run_item(
        item_id,
        query,
        context,
        settings,
        api_key=api_key,
        cost_cap_usd=cost_cap,
        question_sha256=question_sha256,
    )


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


class RayEngine:
    """Runs items as Ray tasks; see the module docstring."""

    def __init__(
        self,
        settings: RunSettings,
        *,
        address: str | None = None,
        workers: int | None = None,
        api_key: str | None = None,
    ) -> None:
        options: dict[str, Any] = {"max_retries": 1, "num_cpus": 1}
        self._owns_ray = False
        if ray.is_initialized():
            if api_key:
                raise ConfigurationError(
                    "Ray is already initialized in this process: give the workers their key through your "
                    "job's runtime environment instead of api_key"
                )
        else:
            init: dict[str, Any] = {
                "address": address or "local",
                "runtime_env": {
                    "worker_process_setup_hook": _environment_hook(forwarded_environment(api_key))
                },
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
            }
            if address is None:
                # A private instance stays on loopback (Ray would otherwise bind its services
                # to the machine's own address, reachable from the network).
                init["_node_ip_address"] = "127.0.0.1"
                if workers is not None:
                    init["num_cpus"] = workers
            try:
                ray.init(**init)
            except Exception as exc:  # ConnectionError, a start-up timeout (a bare Exception in Ray) ...
                ray.shutdown()
                where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
                raise ConfigurationError(f"cannot {where}: {exc}") from None
            self._owns_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 1) or 1)  # type: ignore[no-untyped-call, unused-ignore]
        self.capacity = workers or max(1, cpus)
        self._task = ray.remote(_run_on_node).options(**options)
        self._settings = ray.put(settings)
        self._pending: dict[Any, BatchItem] = {}
        self._ready: list[tuple[BatchItem, dict[str, Any]]] = []

    def submit(self, item: BatchItem, cost_cap_usd: float | None) -> None:
        try:
            context, question = item.load()
        except ConfigurationError as exc:
            self._ready.append((item, {"record": error_record(item.id, "error", str(exc)), "fatal": None}))
            return
        ref = self._task.remote(item.id, item.query, context, self._settings, cost_cap_usd, question)
        self._pending[ref] = item

    def wait(self, timeout: float) -> list[tuple[BatchItem, dict[str, Any]]]:
        finished, self._ready = self._ready, []
        if not self._pending:
            return finished
        refs = list(self._pending)
        ready, rest = ray.wait(refs, num_returns=1, timeout=0 if finished else timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            item = self._pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker died, the node was lost ...
                outcome = {"record": error_record(item.id, "error", f"ray: {_one_line(exc)}"), "fatal": None}
            finished.append((item, outcome))
        return finished

    def close(self, *, cancel: bool) -> None:
        if cancel:
            for ref in list(self._pending):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished, or the cluster is gone
                    pass
        self._pending.clear()
        if self._owns_ray:
            ray.shutdown()
