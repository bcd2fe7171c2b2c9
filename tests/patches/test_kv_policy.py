"""patches/engine_core/kv_policy: through vLLM's own KVCacheManager and BlockPool.

Invariants: a stream takes blocks as its cache grows, never more than its layout's
block set, and from then on allocates nothing however long it runs; a dense request
behaves exactly as vLLM's full attention (blocks per token, prefix cache hits); a
preempted stream resumes with room for everything it had cached; freeing returns
every block."""

import pytest
import torch

pytestmark = pytest.mark.cpu

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from vllm_sink.core.config import SinkLayout  # noqa: E402
from vllm_sink.patches.engine_core.kv_policy import (  # noqa: E402
    SinkAttentionSpec,
    SinkRingManager,
    register_kv_policy,
    stream_blocks_needed,
)

B = 4
LAYOUT = SinkLayout(B, 1, 3, 10_000, 5)  # C = 16, K = 5: span 20, 5 blocks per stream
FULL = FullAttentionSpec(block_size=B, num_kv_heads=2, head_size=8, dtype=torch.float32)


def _manager(num_blocks: int, caching: bool = False):
    register_kv_policy()
    spec = SinkAttentionSpec.from_full(FULL, LAYOUT, dense_max_model_len=64)
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)],
    )
    mgr = KVCacheManager(
        config,
        max_model_len=1 << 30,
        scheduler_block_size=B,
        hash_block_size=B,
        enable_caching=caching,
    )
    layouts, restoring, grids = {}, {}, {}
    single = mgr.coordinator.single_type_managers[0]
    assert isinstance(single, SinkRingManager)
    single.bind(layouts, restoring, None, grids)
    return mgr, layouts, restoring, grids


def _request(i: int, prompt: list[int], hasher=None) -> Request:
    return Request(f"r{i}", prompt, SamplingParams(max_tokens=10**6), None, block_hasher=hasher)


def _held(mgr, req) -> int:
    return len(mgr.get_blocks(req.request_id).get_block_ids()[0])


def test_spec_sizes_block_table_for_both_kinds():
    spec = SinkAttentionSpec.from_full(FULL, LAYOUT, dense_max_model_len=64)
    assert spec.max_num_blocks_per_req(None, 1 << 30) == 16  # dense: 64 / 4
    assert spec.max_memory_usage_bytes(None) == 5 * spec.page_size_bytes  # one stream
    assert SinkAttentionSpec.merge([spec, spec]) == spec


def test_blocks_needed_by_a_stream():
    # Reading a long prompt (grid from token 0): the first chunk fills to span = 20, so
    # up to a + n tokens; later chunks start at 20 + 5j with <= C - 1 cached, a step
    # inside one adds to what the chunk added; never past the block set.
    prompt = (0, 10_000)
    assert [
        stream_blocks_needed(LAYOUT, a, n, prompt)
        for a, n in [
            (0, 3),
            (0, 20),
            (8, 1),
            (15, 1),
            (16, 1),
            (1000, 1),
            (1000, 5),
            (1002, 3),
            (1000, 50),
        ]
    ] == [1, 5, 3, 4, 5, 4, 5, 5, 5]
    # Decoding (a >= prompt end): each token is a chunk, <= C - 1 cached before it.
    decode = (0, 3)
    assert [stream_blocks_needed(LAYOUT, a, 1, decode) for a in (8, 15, 16, 1000)] == [3, 4, 4, 4]
    assert stream_blocks_needed(LAYOUT, 8, 1, None) == 5  # grid unknown: the most


def test_stream_grows_on_demand_then_never_allocates():
    mgr, layouts, _, grids = _manager(num_blocks=1 + 12)
    free0 = mgr.block_pool.get_num_free_blocks()
    a = _request(0, list(range(3)))
    layouts[a.request_id], grids[a.request_id] = LAYOUT, (0, 3)
    assert mgr.allocate_slots(a, 3) is not None and _held(mgr, a) == 1  # 3 tokens
    a.num_computed_tokens = 3
    grown = []
    for _ in range(200):  # decode far past the capacity
        assert mgr.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
        grown.append(_held(mgr, a))
    assert grown[:14] == [1] * 1 + [2] * 4 + [3] * 4 + [4] * 4 + [4]  # C = 16 tokens
    assert set(grown[13:]) == {4}  # full at C / B: decode never needs more
    assert mgr.allocate_slots(a, 5) is not None and _held(mgr, a) == 5  # a prompt chunk
    assert mgr.block_pool.get_num_free_blocks() == free0 - 5
    mgr.free(a)
    assert mgr.block_pool.get_num_free_blocks() == free0


def test_preempted_stream_resumes_with_room_for_its_cache():
    mgr, layouts, restoring, grids = _manager(num_blocks=1 + 12)
    a = _request(0, list(range(40)))
    layouts[a.request_id], grids[a.request_id] = LAYOUT, (0, 40)
    assert mgr.allocate_slots(a, 20) is not None and _held(mgr, a) == 5  # a full chunk
    a.num_computed_tokens = 20  # then preempted: freed, 5 blocks recorded
    mgr.free(a)
    restoring[a.request_id] = 5
    # Resumed with its computed count kept: room for everything it had cached, even if
    # its next step alone would need less (20 + 1 tokens -> 4 blocks).
    assert mgr.allocate_slots(a, 1) is not None and _held(mgr, a) == 5
    assert a.request_id not in restoring


def test_dense_requests_are_plain_full_attention_with_prefix_cache():
    init_none_hash(lambda x: repr(x).encode())
    hasher = get_request_block_hasher(B, lambda x: repr(x).encode())
    mgr, layouts, _, grids = _manager(num_blocks=1 + 20, caching=True)
    prompt = list(range(30))
    d = _request(0, prompt, hasher)
    assert mgr.allocate_slots(d, 30) is not None and _held(mgr, d) == 8  # cdiv(30, 4)
    d.num_computed_tokens = 30
    mgr.free(d)
    e = _request(1, prompt, hasher)  # same prompt: vLLM's prefix-cache hit
    _, hit, _ = mgr.get_computed_blocks(e)
    assert hit == 28
    # A stream with the same prompt is never hashed into (or served from) the cache.
    s = _request(2, prompt)
    layouts[s.request_id], grids[s.request_id] = LAYOUT, (0, 30)
    assert mgr.allocate_slots(s, 20) is not None and _held(mgr, s) == 5
