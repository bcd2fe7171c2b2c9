"""A tiny shared counter board: the worker writes sink counters, the frontend reads them.

vLLM has no channel for plugin-defined engine statistics, and the evictions happen in
the worker process while ``/metrics`` is served by the API server. The worker (rank 0)
keeps its counters in a small memory-mapped file (``/dev/shm`` where available) named
after the engine's ``instance_id``; the frontend's Prometheus collector reads it at
scrape time. Fixed layout: one int64 per field, in ``FIELDS`` order. No vLLM imports.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

FIELDS = (
    "active_requests",      # sink requests the worker currently holds
    "kv_blocks_reserved",   # blocks those requests hold (they grow up to their block set)
    "requests",             # sink requests started (cumulative)
    "evictions",            # eviction events (cumulative)
    "tokens_evicted",       # window tokens evicted (cumulative)
    "rebases",              # position-offset rebases (cumulative)
    "sink_rewrites",        # sink-key rewrites from the pristine snapshot (cumulative)
    "kv_saves",             # preempted streams whose cached KV was saved (cumulative)
    "kv_restores",          # ... and restored on resume (cumulative)
    "tokens_restored",      # cached tokens restored instead of recomputed (cumulative)
    "sink_tokens",          # effective layout ...
    "window_tokens",
    "capacity",
    "block_size",
    "position_limit",
    "prefill_chunk_tokens",
    "blocks_per_request",   # the most blocks one stream of the default layout holds
)

# Written by the scheduler (EngineCore) after every schedule(): its pool and sessions.
SESSION_FIELDS = (
    "running_requests",     # requests the scheduler is running, dense and sink
    "running_sink",         # ... of which endless streams
    "running_dense",        # ... of which plain dense requests
    "blocks_sink",          # KV blocks held by running streams
    "blocks_dense",         # KV blocks held by running dense requests
    "requests_sink",        # stream requests received (cumulative)
    "requests_dense",       # dense requests received (cumulative)
    "preempted_sink",       # stream preemptions (cumulative; resumed without recompute)
    "preempted_dense",      # dense preemptions (cumulative; vLLM recomputes them)
    "pool_blocks_in_use",   # blocks taken from the KV pool (running + parked)
    "parked_sessions",      # sessions whose KV is parked
    "blocks_parked",        # KV blocks they hold
    "session_requests",     # requests that carried a session id (cumulative)
    "resumes",              # requests that resumed a parked session (cumulative)
    "miss_none_parked",     # no parked KV for the id (first turn, evicted, expired)
    "miss_prefix",          # the prompt does not start with the parked tokens
    "miss_no_new_tokens",   # the prompt is exactly the parked tokens
    "miss_in_use",          # the session is already running in another request
    "miss_prompt_logprobs", # prompt log-probs need the whole prompt recomputed
    "miss_layout",          # the request asks for another sink layout than the parked one
    "parked_evictions",     # parked sessions dropped to make room (LRU) or over the cap
    "parked_expired",       # parked sessions dropped after the idle timeout
    "parked_reset",         # parked sessions dropped by a prefix-cache reset
    "kv_saved_bytes",       # host bytes (per worker) reserved for preempted streams' KV
    "kv_saved_cap_bytes",   # ... and its cap (max_saved_kv_gib)
    "kv_saves_refused",     # preempted streams finished: their KV did not fit the cap
    "streams_lost_reset",   # preempted streams finished: a reset invalidated their KV
)


def board_path(instance_id: str, role: str = "worker") -> str:
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tempfile.gettempdir()
    safe = "".join(c for c in str(instance_id) if c.isalnum() or c in "-_") or "default"
    return os.path.join(root, f"vllm_sink-{safe}-{role}.stats")


class StatsBoard:
    def __init__(self, path: str, create: bool = False,
                 fields: tuple[str, ...] = FIELDS) -> None:
        self.path = path
        self.fields = fields
        self._index = {name: i for i, name in enumerate(fields)}
        if create:
            np.zeros(len(fields), dtype=np.int64).tofile(path)
        self._array = np.memmap(path, dtype=np.int64, mode="r+" if create else "r",
                                shape=(len(fields),))

    @classmethod
    def open(cls, path: str, fields: tuple[str, ...] = FIELDS) -> StatsBoard | None:
        try:
            return cls(path, fields=fields)
        except (OSError, ValueError):
            return None

    def write(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            self._array[self._index[name]] = int(value)

    def read(self) -> dict[str, int]:
        return {name: int(v) for name, v in zip(self.fields, np.array(self._array))}

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
