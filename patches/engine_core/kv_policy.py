"""EngineCore: the sink + ring KV-cache policy, through vLLM's KV-spec registry.

``SinkAttentionSpec`` is a ``FullAttentionSpec`` (the worker and attention backends
treat it exactly as full attention) that also carries the block counts. Its sizing
methods make vLLM size memory, admission and the worker's block table by the fixed
block set (capacity C plus the prefill headroom) instead of ``max_model_len``.

``SinkRingManager`` reserves a request's whole block set (sink blocks + ring blocks)
the first time the scheduler allocates for it and never allocates again, so a running
sink request never needs a block and is never preempted; a waiting request that
cannot get its full set simply waits. Ring blocks are overwritten in place, so nothing
is hashed for prefix caching (the CircularBufferManager precedent upstream).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sink.config import SinkLayout


@dataclass(frozen=True, kw_only=True)
class SinkAttentionSpec(FullAttentionSpec):
    sink_blocks: int
    ring_blocks: int      # window + prefill headroom, recycled in a ring

    @property
    def blocks_per_request(self) -> int:
        return self.sink_blocks + self.ring_blocks

    @classmethod
    def from_full(cls, spec: FullAttentionSpec, layout: SinkLayout) -> SinkAttentionSpec:
        values = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec) if f.init}
        return cls(**values, sink_blocks=layout.sink_blocks, ring_blocks=layout.ring_blocks)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return self.blocks_per_request * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return self.blocks_per_request

    @property
    def prefix_cacheable(self) -> bool:
        return False

    @classmethod
    def merge(cls, specs: list[SinkAttentionSpec]) -> SinkAttentionSpec:
        shapes = {(s.sink_blocks, s.ring_blocks) for s in specs}
        assert len(shapes) == 1, f"layers disagree on the sink layout: {shapes}"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        sink_blocks, ring_blocks = shapes.pop()
        values = {f.name: getattr(base, f.name) for f in fields(FullAttentionSpec) if f.init}
        return cls(**values, sink_blocks=sink_blocks, ring_blocks=ring_blocks)


class SinkRingManager(FullAttentionManager):
    """Whole block set at admission, never more; no prefix caching, no skipping.

    The only "computed blocks" it ever adopts are a parked session's full block set
    (patches/engine_core/sessions.py), handed over as a prefix hit on resume."""

    on_adopt = None  # callback(request_id) set by the sink scheduler

    def _missing(self, request_id: str, adopting: int = 0) -> int:
        spec = self.kv_cache_spec
        assert isinstance(spec, SinkAttentionSpec)
        held = len(self.req_to_blocks.get(request_id, ())) + adopting
        return max(0, spec.blocks_per_request - held)

    def get_num_blocks_to_allocate(self, request_id, num_tokens=0, new_computed_blocks=(),
                                   *args, **kwargs) -> int:
        return self._missing(request_id, len(new_computed_blocks or ()))

    def allocate_new_blocks(self, request_id, *args, **kwargs):
        n = self._missing(request_id)
        if n == 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(n)
        self.req_to_blocks[request_id].extend(new_blocks)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new_blocks)
        return new_blocks

    def allocate_external_computed_blocks(self, request_id, *args, **kwargs) -> None:
        raise RuntimeError("KV connectors are not supported in sink mode")

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids,
                               *args, **kwargs):
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, *args, **kwargs) -> None:
        return

    def add_local_computed_blocks(self, request_id, new_computed_blocks, *args, **kwargs) -> None:
        if not new_computed_blocks:
            return
        blocks = self.req_to_blocks[request_id]
        assert not blocks, "a resumed session is adopted before any allocation"
        blocks.extend(new_computed_blocks)
        if self.on_adopt is not None:
            self.on_adopt(request_id)

    def remove_skipped_blocks(self, *args, **kwargs) -> None:
        return

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0


def register_kv_policy(vllm_config=None) -> None:
    """Register spec -> manager; idempotent. Built-ins first (the registry is lazy and
    would otherwise never register them once it is non-empty)."""
    KVCacheSpecRegistry._ensure_registered(vllm_config)
    KVCacheSpecRegistry.register(SinkAttentionSpec, SinkRingManager,
                                 uniform_type_base_spec=FullAttentionSpec)
