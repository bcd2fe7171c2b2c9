"""EngineCore: two methods of the sink scheduler's own ``KVCacheManager`` *instance*.

vLLM has no class option for the scheduler's KV-cache manager, so the sink scheduler
replaces two bound methods on its instance (instance attributes set in ``__init__``,
not class patches), each wrapping and delegating:

``get_computed_blocks``  a stream's "prefix-cache hit" is its parked session (a resume)
                         or nothing (streams are never hashed); dense requests get
                         vLLM's own lookup. vLLM 0.33 added ``max_cache_hit_length``
                         (a cap on prefix-cache hits, set only by the routed-experts
                         auxiliary-output connector): one adapter per release, chosen
                         by the exact version; on 0.33 the cap reaches vLLM's lookup
                         for dense requests, and a resume (the session's whole ring,
                         not a prefix-cache hit) is answered as on 0.32.
``allocate_slots``       while an allocation for a running or waiting request fails,
                         drop the least recently parked session and try again.
"""

from __future__ import annotations

from vllm.v1.request import RequestStatus

from vllm_sink.patches._patching import Target, for_release

_MANAGER = "vllm.v1.core.kv_cache_manager:KVCacheManager"
_ALLOCATE_SLOTS = (
    "(self, request, num_new_tokens, num_new_computed_tokens=0, new_computed_blocks=None, "
    "num_lookahead_tokens=0, num_external_computed_tokens=0, delay_cache_blocks=False, "
    "num_encoder_tokens=0, full_sequence_must_fit=False, reserved_blocks=0, "
    "has_scheduled_reqs=True, skip_zeroing_group_ids=())"
)
TARGETS = [
    Target(
        f"{_MANAGER}.get_computed_blocks",
        {"0.32.0": "(self, request)", "0.33.0": "(self, request, max_cache_hit_length=None)"},
    ),
    Target(f"{_MANAGER}.allocate_slots", _ALLOCATE_SLOTS),
    Target(f"{_MANAGER}.create_kv_cache_blocks", "(self, blocks)"),
]


def _computed_blocks_032(original, stream_hit):
    def get_computed_blocks(request):
        hit = stream_hit(request)
        return original(request) if hit is None else hit

    return get_computed_blocks


def _computed_blocks_033(original, stream_hit):
    def get_computed_blocks(request, max_cache_hit_length=None):
        hit = stream_hit(request)
        return original(request, max_cache_hit_length) if hit is None else hit

    return get_computed_blocks


COMPUTED_BLOCKS = {"0.32.0": _computed_blocks_032, "0.33.0": _computed_blocks_033}


def wrap_kv_cache_manager(scheduler) -> None:
    """Replace the two methods on ``scheduler.kv_cache_manager``."""
    manager = scheduler.kv_cache_manager
    empty, sessions = manager.empty_kv_cache_blocks, scheduler.sink_sessions
    allocate = manager.allocate_slots

    def stream_hit(request):
        """(blocks, computed tokens, 0) for a stream; None for a dense request."""
        if request.request_id not in scheduler.sink_layouts:
            return None
        hit = sessions.try_resume(request)
        if hit is None:
            scheduler.sink_grids[request.request_id] = (0, request.num_prompt_tokens)
            return empty, 0, 0
        blocks, length = hit
        scheduler.sink_grids[request.request_id] = (length, request.num_prompt_tokens)
        return manager.create_kv_cache_blocks(blocks), length, 0

    def allocate_slots(request, *args, **kwargs):
        # Parked sessions yield to requests, running and waiting alike: while the
        # allocation fails, drop the least recently parked unclaimed session (for a
        # running request, then also sessions that waiting requests claimed) and
        # try again. Retrying is safe in vLLM 0.32 and 0.33: allocate_slots returns
        # None before it changes anything but (a) remove_skipped_blocks, which frees
        # blocks that fell out of an attention window (idempotent; a no-op for full
        # attention and streams) and (b) get_num_blocks_to_allocate, which only
        # computes (SinkRingManager keeps the answer, recomputed on retry). A waiting
        # resume's own claimed blocks are never dropped here.
        running = request.status == RequestStatus.RUNNING
        while True:
            blocks = allocate(request, *args, **kwargs)
            if blocks is not None or not sessions.make_room(claimed_too=running):
                return blocks

    adapter = for_release(COMPUTED_BLOCKS, f"{_MANAGER}.get_computed_blocks")
    manager.get_computed_blocks = adapter(manager.get_computed_blocks, stream_hit)
    manager.allocate_slots = allocate_slots
