"""EngineCore: the KV-cache policy of a sink engine, through vLLM's KV-spec registry.

``SinkAttentionSpec`` is a ``FullAttentionSpec`` (the worker and attention backends
treat it exactly as full attention) that also carries the largest block set a request
can hold: a stream's sink + ring blocks, or a dense request's blocks up to its context
bound, whichever is larger; vLLM sizes the worker's block table by it instead of the
(lifted) ``max_model_len``. vLLM's startup check that the pool holds one request of
maximal size counts a full stream only: dense requests are additionally bounded by
the pool's size (``frontend/request_sink.py``), so small pools serve streams as before.

``SinkRingManager`` serves two kinds of request in one pool:

* dense requests (absent from ``sink_layouts``) get vLLM's full-attention behaviour
  untouched: blocks on demand, prefix caching when the engine enables it;
* sink requests take blocks on demand too, as their cache grows, up to their layout's
  block set (sinks + window + prefill headroom) and never more: from then on the worker
  recycles them in a ring. Their blocks are never hashed (ring blocks are overwritten
  in place), and nothing is ever skipped or freed while the request runs. If the pool
  runs dry, vLLM may preempt a sink request like any other; the scheduler keeps its
  computed count and the worker restores its cached KV on resume
  (``patches/engine_core/scheduler.py``), so the resumed request needs as many blocks
  as it held when preempted (``restoring``).

How many blocks a step of ``n`` new tokens needs, for a stream with ``a`` tokens so far:
``policy.max_cached_after`` bounds what its cache holds while the step runs, from the
counts and the request's chunk grid (its first token and prompt end), at most ``span``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sink.core.config import SinkLayout
from vllm_sink.core.policy import cdiv, max_cached_after
from vllm_sink.patches._patching import Target

# What SinkRingManager and SinkAttentionSpec override (each delegating for dense
# requests) or call, as they expect it in every supported release.
_MANAGER = "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager"
_SPEC = "vllm.v1.kv_cache_interface:FullAttentionSpec"
TARGETS = [
    Target(f"{_MANAGER}.{name}", signature)
    for name, signature in {
        "__init__": "(self, kv_cache_spec, block_pool, enable_caching, kv_cache_group_id, "
        "scheduler_block_size, dcp_world_size=1, pcp_world_size=1, "
        "needs_kv_cache_zeroing=False, max_admission_blocks_per_request=None)",
        "get_num_blocks_to_allocate": "(self, request_id, num_tokens, new_computed_blocks, "
        "total_computed_tokens, num_local_computed_tokens, num_tokens_main_model, "
        "apply_admission_cap=False, prefill_end=0)",
        "allocate_new_blocks": "(self, request_id, num_tokens, num_tokens_main_model)",
        "allocate_external_computed_blocks": "(self, request_id, num_local_computed_tokens, "
        "num_external_computed_tokens, record_for_zeroing=True)",
        "cache_blocks": "(self, request, num_tokens, retention_interval=None, *, "
        "replay_boundaries)",
        "add_local_computed_blocks": "(self, request_id, new_computed_blocks, "
        "num_local_computed_tokens, num_external_computed_tokens)",
        "remove_skipped_blocks": "(self, request_id, processed_computed_tokens, "
        "num_prompt_tokens=None)",
        "free": "(self, request_id)",
        "req_to_blocks": None,
        "num_cached_block": None,
        "new_block_ids": None,
        "_record_new_block_ids": None,
        "block_pool": None,
    }.items()
] + [
    Target(f"{_SPEC}.merge", "(cls, specs)"),
    Target(f"{_SPEC}.max_memory_usage_bytes", "(self, vllm_config)"),
    Target(f"{_SPEC}.max_num_blocks_per_req", "(self, vllm_config, max_len)"),
    Target("vllm.v1.core.block_pool:BlockPool.get_new_blocks", "(self, num_blocks)"),
    Target("vllm.v1.core.block_pool:BlockPool.free_blocks", "(self, ordered_blocks)"),
    Target("vllm.v1.core.block_pool:BlockPool.get_num_free_blocks", "(self)"),
    Target(
        "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register",
        "(cls, kvcache_spec_cls, manager_class=None, uniform_type_base_spec=None)",
    ),
    Target(
        "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered",
        "(cls, vllm_config=None)",
    ),
]


@dataclass(frozen=True, kw_only=True)
class SinkAttentionSpec(FullAttentionSpec):
    stream_blocks: int  # the engine layout's block set: the most a stream may hold
    dense_blocks: int  # blocks of a dense request at its context bound

    @property
    def max_blocks_per_request(self) -> int:
        return max(self.stream_blocks, self.dense_blocks)

    @classmethod
    def from_full(
        cls, spec: FullAttentionSpec, layout: SinkLayout, dense_max_model_len: int
    ) -> SinkAttentionSpec:
        values = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec) if f.init}
        return cls(
            **values,
            stream_blocks=layout.blocks_per_request,
            dense_blocks=cdiv(dense_max_model_len, spec.block_size),
        )

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return self.stream_blocks * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return self.max_blocks_per_request

    @classmethod
    def merge(cls, specs: list[SinkAttentionSpec]) -> SinkAttentionSpec:
        shapes = {(s.stream_blocks, s.dense_blocks) for s in specs}
        assert len(shapes) == 1, f"layers disagree on the sink layout: {shapes}"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        stream_blocks, dense_blocks = shapes.pop()
        values = {f.name: getattr(base, f.name) for f in fields(FullAttentionSpec) if f.init}
        return cls(**values, stream_blocks=stream_blocks, dense_blocks=dense_blocks)


def stream_blocks_needed(
    layout: SinkLayout, computed: int, new: int, grid: tuple[int, int] | None
) -> int:
    """Blocks a stream with ``computed`` tokens so far needs for a step of ``new``;
    ``grid`` = (first token, prompt end) of its request (None: assume the most)."""
    if grid is None:
        return layout.blocks_per_request
    cached = max_cached_after(layout, computed, new, *grid)
    return min(cdiv(cached, layout.block_size), layout.blocks_per_request)


class SinkRingManager(FullAttentionManager):
    """Dense requests: vLLM's full attention. Sink requests: on-demand ring blocks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Shared with the sink scheduler (``bind``), which fills them:
        self.sink_layouts: dict[str, SinkLayout] = {}  # request id -> layout (streams)
        self.sink_grids: dict[str, tuple[int, int]] = {}  # -> (first token, prompt end)
        self.restoring: dict[str, int] = {}  # preempted stream -> blocks it held
        self.on_adopt = None  # callback(request_id): session adopted
        self._need: dict[str, int] = {}  # blocks a stream needs, for allocate_new_blocks

    def bind(self, sink_layouts: dict, restoring: dict, on_adopt, sink_grids: dict) -> None:
        self.sink_layouts, self.restoring, self.on_adopt = sink_layouts, restoring, on_adopt
        self.sink_grids = sink_grids

    def get_num_blocks_to_allocate(
        self, request_id, num_tokens, new_computed_blocks, total_computed_tokens, *args, **kwargs
    ) -> int:
        layout = self.sink_layouts.get(request_id)
        if layout is None:
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens, *args, **kwargs
            )
        held = len(self.req_to_blocks.get(request_id, ()))
        if new_computed_blocks:
            held += len(new_computed_blocks)
        need = held
        if held < layout.blocks_per_request:  # else: its whole set, recycled as a ring
            need = max(
                held,
                stream_blocks_needed(
                    layout,
                    total_computed_tokens,
                    num_tokens - total_computed_tokens,
                    self.sink_grids.get(request_id),
                ),
            )
            if self.restoring:  # a preempted stream's cache comes back into as many blocks
                need = max(need, self.restoring.get(request_id, 0))
        self._need[request_id] = need
        return need - held

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        if request_id not in self.sink_layouts:
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        if self.restoring:
            self.restoring.pop(request_id, None)
        blocks = self.req_to_blocks[request_id]
        n = self._need.pop(request_id, len(blocks)) - len(blocks)
        if n <= 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(n)
        blocks.extend(new_blocks)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new_blocks)
        return new_blocks

    def allocate_external_computed_blocks(self, request_id, *args, **kwargs) -> None:
        raise RuntimeError("KV connectors are not supported in sink mode")

    def cache_blocks(self, request, *args, **kwargs) -> None:
        if request.request_id not in self.sink_layouts:
            super().cache_blocks(request, *args, **kwargs)

    def add_local_computed_blocks(self, request_id, new_computed_blocks, *args, **kwargs) -> None:
        if request_id not in self.sink_layouts:
            super().add_local_computed_blocks(request_id, new_computed_blocks, *args, **kwargs)
            return
        if not new_computed_blocks:
            return
        # A parked session's blocks, adopted on resume (patches/engine_core/sessions.py).
        blocks = self.req_to_blocks[request_id]
        assert not blocks, "a resumed session is adopted before any allocation"
        blocks.extend(new_computed_blocks)
        if self.on_adopt is not None:
            self.on_adopt(request_id)

    def remove_skipped_blocks(self, request_id, *args, **kwargs) -> None:
        if request_id not in self.sink_layouts:
            super().remove_skipped_blocks(request_id, *args, **kwargs)

    def free(self, request_id: str) -> None:
        self._need.pop(request_id, None)
        super().free(request_id)


def register_kv_policy(vllm_config=None) -> None:
    """Register spec -> manager; idempotent. Built-ins first (the registry is lazy and
    would otherwise never register them once it is non-empty)."""
    KVCacheSpecRegistry._ensure_registered(vllm_config)
    KVCacheSpecRegistry.register(
        SinkAttentionSpec, SinkRingManager, uniform_type_base_spec=FullAttentionSpec
    )
