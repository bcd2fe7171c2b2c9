"""EngineCore: the host-memory budget for the cached KV of preempted streams.

When vLLM preempts a stream, each worker copies the stream's cached KV to host memory
before the blocks are reused, and copies it back on resume (an endless stream's history
cannot be recomputed). Without a bound, an oversubscribed pool would pile preempted
streams up in host memory. The scheduler decides every save before the workers see it:
``reserve`` admits a save only while the total stays within the cap; a stream whose
save is refused cannot continue and is finished with finish_reason "error"
(``patches/engine_core/scheduler.py``).

Accounting is per worker (each worker holds its own share of the KV) and in whole
blocks: a save is counted at the blocks the stream held when it was preempted, an upper
bound of what the workers copy (the blocks its cached tokens fill), plus its sink blocks
for the pristine sink-key snapshot that moves to host with it. A reservation lasts
until the stream resumes (its KV is then copied back) or finishes.

Default cap (``max_saved_kv_gib`` unset): the size of one worker's KV pool (saved KV
then never outgrows the pool it came from: preempted streams hold at most as much as
the running ones), and at most a quarter of the host's physical memory per worker on
the host (pinned host memory cannot be swapped out; on the CPU backend the pool itself
already lives in host memory).
"""

from __future__ import annotations

import os

GIB = 1 << 30


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_cap_bytes(pool_bytes: int, workers_on_host: int, host_bytes: int) -> int:
    """The pool's size, at most a quarter of the host's memory per worker on it."""
    if host_bytes <= 0:
        return pool_bytes
    return min(pool_bytes, host_bytes // 4 // max(1, workers_on_host))


class SavedKV:
    def __init__(self, cap_bytes: int, block_bytes: int) -> None:
        self.cap = int(cap_bytes)
        self.block_bytes = int(block_bytes)
        self.held: dict[str, int] = {}  # preempted stream -> bytes reserved
        self.total = 0

    @classmethod
    def for_engine(cls, vllm_config, kv_cache_config, cap_gib: float | None) -> SavedKV:
        pool = sum(t.size for t in kv_cache_config.kv_cache_tensors)
        block = pool // max(1, kv_cache_config.num_blocks)
        if cap_gib is None:
            par = vllm_config.parallel_config
            workers = par.world_size // max(1, getattr(par, "nnodes", 1) or 1)
            cap = default_cap_bytes(pool, workers, host_memory_bytes())
        else:
            cap = int(cap_gib * GIB)
        return cls(cap, block)

    def reserve(self, request_id: str, blocks: int) -> bool:
        """Admit the save of ``blocks`` blocks for ``request_id``; False if over the cap."""
        n = blocks * self.block_bytes
        if self.total + n > self.cap:
            return False
        self.held[request_id] = n
        self.total += n
        return True

    def release(self, request_id: str) -> None:
        self.total -= self.held.pop(request_id, 0)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.held

    def __iter__(self):
        return iter(list(self.held))
