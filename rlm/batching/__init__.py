"""Many RLM runs at once: ``rlm batch`` and :func:`rlm.batch`.

- :mod:`rlm.batching.items`: the input (:class:`BatchItem`, JSONL lines with line numbers);
- :mod:`rlm.batching.outfile`: the output file (whole lines, one writer, repaired on reopening);
- :mod:`rlm.batching.engine`: the scheduler, the batch budget and the ``local`` engine;
- :mod:`rlm.batching.ray_engine`: the ``ray`` engine (imports Ray; the ``rlm[ray]`` extra);
- :mod:`rlm.batching.worker`: one item's run, wherever an engine runs it;
- :mod:`rlm.batching.progress` and :mod:`rlm.batching.command`: the command line's side.

(The package is not called ``rlm.batch`` because that name is the function.)
"""

from __future__ import annotations

from rlm.batching.engine import BatchResult, batch
from rlm.batching.items import BatchItem
from rlm.batching.outfile import RECORD_FIELDS

__all__ = ["RECORD_FIELDS", "BatchItem", "BatchResult", "batch"]
