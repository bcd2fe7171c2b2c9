"""patches/engine_core/kv_policy: through vLLM's own KVCacheManager and BlockPool.

Invariant: a sink request holds exactly C/B blocks from its first allocation to its
end, never more, so running requests never need blocks (no preemption), a request
that cannot get its full set waits, and freeing returns every block."""

import pytest
import torch

pytestmark = pytest.mark.cpu

vllm = pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,  # noqa: E402
                                        KVCacheGroupSpec)
from vllm.v1.request import Request  # noqa: E402

from vllm_sink.config import SinkLayout  # noqa: E402
from vllm_sink.patches.engine_core.kv_policy import (SinkAttentionSpec,  # noqa: E402
                                                     SinkRingManager, register_kv_policy)

B = 4
LAYOUT = SinkLayout(B, 1, 3, 10_000)  # 4 blocks per request


def _manager(num_blocks: int) -> KVCacheManager:
    register_kv_policy()
    full = FullAttentionSpec(block_size=B, num_kv_heads=2, head_size=8, dtype=torch.float32)
    spec = SinkAttentionSpec.from_full(full, LAYOUT)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return KVCacheManager(config, max_model_len=1 << 30, scheduler_block_size=B,
                          hash_block_size=B, enable_caching=False)


def _request(i: int, prompt_len: int) -> Request:
    return Request(f"r{i}", list(range(prompt_len)), SamplingParams(max_tokens=10**6), None)


def test_spec_sizes_by_capacity_not_model_len():
    full = FullAttentionSpec(block_size=B, num_kv_heads=2, head_size=8, dtype=torch.float32)
    spec = SinkAttentionSpec.from_full(full, LAYOUT)
    assert spec.max_num_blocks_per_req(None, 1 << 30) == 4
    assert spec.max_memory_usage_bytes(None) == 4 * spec.page_size_bytes
    assert SinkAttentionSpec.merge([spec, spec]) == spec
    assert not spec.prefix_cacheable


def test_reserve_once_never_grow_free_all():
    mgr = _manager(num_blocks=1 + 2 * 4)   # null block + room for two requests
    assert isinstance(mgr.coordinator.single_type_managers[0], SinkRingManager)
    free0 = mgr.block_pool.get_num_free_blocks()
    a = _request(0, 3)
    blocks = mgr.allocate_slots(a, 3)       # 3 tokens need 1 block; the set is 4
    assert blocks is not None and len(blocks.get_block_ids()[0]) == 4
    assert mgr.block_pool.get_num_free_blocks() == free0 - 4
    # A stream far past capacity: each step allocates nothing.
    for step in range(100):
        a.num_computed_tokens += 3 if step == 0 else 1
        assert mgr.allocate_slots(a, 1).get_block_ids() == ([],)
    assert mgr.block_pool.get_num_free_blocks() == free0 - 4
    b, c = _request(1, 50), _request(2, 5)
    assert mgr.allocate_slots(b, 8) is not None
    assert mgr.allocate_slots(c, 5) is None  # pool full: c waits, nothing taken
    assert mgr.block_pool.get_num_free_blocks() == 0
    mgr.free(a)
    assert mgr.allocate_slots(c, 5) is not None
    mgr.free(b)
    mgr.free(c)
    assert mgr.block_pool.get_num_free_blocks() == free0
