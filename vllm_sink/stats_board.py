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
    "kv_blocks_reserved",   # blocks those requests hold (sum of their block sets)
    "requests",             # sink requests started (cumulative)
    "evictions",            # eviction events (cumulative)
    "tokens_evicted",       # window tokens evicted (cumulative)
    "rebases",              # position-offset rebases (cumulative)
    "sink_rewrites",        # sink-key rewrites from the pristine snapshot (cumulative)
    "sink_tokens",          # effective layout ...
    "window_tokens",
    "capacity",
    "block_size",
    "position_limit",
)


def board_path(instance_id: str) -> str:
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tempfile.gettempdir()
    safe = "".join(c for c in str(instance_id) if c.isalnum() or c in "-_") or "default"
    return os.path.join(root, f"vllm_sink-{safe}.stats")


class StatsBoard:
    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        if create:
            np.zeros(len(FIELDS), dtype=np.int64).tofile(path)
        self._array = np.memmap(path, dtype=np.int64, mode="r+" if create else "r",
                                shape=(len(FIELDS),))

    @classmethod
    def open(cls, path: str) -> StatsBoard | None:
        try:
            return cls(path)
        except (OSError, ValueError):
            return None

    def write(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            self._array[FIELDS.index(name)] = int(value)

    def read(self) -> dict[str, int]:
        return {name: int(v) for name, v in zip(FIELDS, np.array(self._array))}

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
