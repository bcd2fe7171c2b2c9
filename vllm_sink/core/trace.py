"""The worker's per-step record: what each engine step cost the plugin. No vLLM imports.

The sink worker appends one ``StepRecord`` per step to a bounded deque; tools read and
clear it through the worker's ``sink_trace()`` (``llm.collective_rpc("sink_trace")``):
step periods of evicting vs ordinary steps, and the plugin's share of each, without a
round trip per step. The RPC carries plain dicts (what vLLM's IPC serializes the same way
in and out of process); ``records`` turns them back into ``StepRecord``s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class StepRecord:
    start_ns: int  # perf_counter ns when the worker began the step's update
    requests: int  # requests scheduled in the step
    tokens: int  # tokens scheduled in the step
    evictions: int  # eviction events the step ran
    rebases: int  # rebases the step ran
    host_ns: int  # wall time in the plugin's own code (includes waits for the GIL,
    # which every torch call releases to vLLM's other threads)
    keys_ns: int  # ... of which in the batched key edits
    cpu_ns: int  # the plugin's thread CPU time (no GIL waits)

    def to_dict(self) -> dict:
        return asdict(self)


def records(rows) -> list[StepRecord]:
    """``StepRecord``s from what ``sink_trace()`` returned (dicts, or records in process)."""
    return [r if isinstance(r, StepRecord) else StepRecord(**r) for r in rows]
