"""Worker: a preempted stream's cached KV, saved before vLLM reuses its blocks and
written back when the stream resumes.

A stream cannot be recomputed (its evicted tokens are gone), so vLLM's recompute-on-
resume would be wrong: the scheduler keeps its computed count, and these functions
carry its cache (at most span tokens: sinks and window at their cache-relative
positions) through host memory. The copies are queued on the device stream, never
waited for (``SinkKeys.save`` / ``restore``, ``BlockStack`` in key_cache).

Between save and restore a stream holds no blocks (``rows`` are empty), its KV is in
``RequestSink.saved`` (host chunks per KV group) and its sink-key snapshot, if any, is
on the host too: the device reserve (``sink_memory_reserve``) covers live and parked
streams only.
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm_sink.core.key_cache import to_device, to_host
from vllm_sink.core.policy import cdiv
from vllm_sink.patches.worker.request_state import RequestSink
from vllm_sink.patches.worker.sink_keys import BlockSpan, SinkKeys


def save_preempted(
    streams: dict[str, RequestSink], preempted: Iterable[str], finished: set[str], keys: SinkKeys
) -> tuple[int, int]:
    """Save the cached KV of every stream in ``preempted`` (vLLM's preempted ids of this
    step) that is neither finished nor saved already, and take its blocks off its rows.

    vLLM reuses a preempted request's blocks in this very step: the copies are queued
    now, ahead of this step's forward that writes into them. The scheduler admitted
    every such save within its host budget; a stream it could not admit arrives
    finished as well and is not saved. Returns (streams saved, KV-group-0 blocks they
    no longer hold)."""
    saved = released = 0
    for req_id in preempted:
        rs = streams.get(req_id)
        if rs is None or req_id in finished or rs.saved is not None:
            continue
        # Everything computed so far: the last step it ran in included.
        cached = rs.stream.virtual(rs.step_start + rs.step_tokens)
        rs.saved_blocks = cdiv(cached, rs.layout.block_size)
        rs.saved = keys.save([BlockSpan(rs.rows, 0, rs.saved_blocks)])
        if rs.snapshot is not None:
            rs.snapshot = [to_host(t) for t in rs.snapshot]
        released += len(rs.rows[0]) if rs.rows else 0
        rs.rows = tuple([] for _ in rs.rows)
        saved += 1
    return saved, released


def restore(req_id: str, rs: RequestSink, new_block_ids, keys: SinkKeys, device) -> int:
    """Write stream ``rs``'s saved KV into the blocks it resumes with (``new_block_ids``,
    per KV group, which become its rows) and its snapshot back to ``device``. Returns
    the KV-group-0 blocks it holds again."""
    if rs.saved is None:  # the scheduler finishes streams whose KV was not saved
        raise RuntimeError(
            f"vllm_sink: stream {req_id} resumed from preemption but "
            "its KV was not saved; this is a bug"
        )
    rows = tuple(list(g) for g in new_block_ids)
    if any(len(g) < rs.saved_blocks for g in rows):
        raise RuntimeError(
            f"stream {req_id} resumed with {[len(g) for g in rows]} "
            f"blocks, {rs.saved_blocks} needed for its cache"
        )
    rs.rows = rows
    keys.restore([BlockSpan(rows, 0, rs.saved_blocks)], rs.saved)
    if rs.snapshot is not None:
        rs.snapshot = [to_device(t, device) for t in rs.snapshot]
    rs.saved = None
    return len(rows[0]) if rows else 0
