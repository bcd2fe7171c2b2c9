"""patches/engine_core/sessions (SessionStore) and saved_kv (SavedKV), on vLLM's own
KVCacheManager and BlockPool with a stand-in for the rest of the scheduler.

Invariants: a claimed session is never dropped or replaced by another request; a
request that does not resume never carries the resume argument; parked sessions go
least recently parked first and only unclaimed ones; the parked block count is kept
exactly; every block returns to the pool."""

from types import SimpleNamespace

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request, RequestStatus

from vllm_sink.core.config import SinkConfig, SinkLayout
from vllm_sink.patches import _directives
from vllm_sink.patches.engine_core.kv_policy import SinkAttentionSpec, register_kv_policy
from vllm_sink.patches.engine_core.saved_kv import SavedKV, default_cap_bytes
from vllm_sink.patches.engine_core.sessions import SessionStore

pytestmark = pytest.mark.cpu

B = 4
LAYOUT = SinkLayout(B, 1, 3, 10_000, 5)  # 5 blocks per stream
FULL = FullAttentionSpec(block_size=B, num_kv_heads=2, head_size=8, dtype=torch.float32)


class Scheduler:
    """What SessionStore uses of vLLM's scheduler, around a real KVCacheManager."""

    def __init__(self, num_blocks: int, **config) -> None:
        register_kv_policy()
        spec = SinkAttentionSpec.from_full(FULL, LAYOUT, dense_max_model_len=64)
        kv = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)],
        )
        self.kv_cache_manager = KVCacheManager(
            kv,
            max_model_len=1 << 30,
            scheduler_block_size=B,
            hash_block_size=B,
            enable_caching=False,
        )
        self.sink_layouts: dict = {}
        self.requests: dict = {}
        self.finished_req_ids: set = set()
        single = self.kv_cache_manager.coordinator.single_type_managers[0]
        self.grids: dict = {}
        single.bind(self.sink_layouts, {}, None, self.grids)
        sink = SimpleNamespace(config=SinkConfig(**config), layout=LAYOUT)
        self.store = SessionStore(self, sink)
        single.on_adopt = self.store.adopted
        self._n = 0

    @property
    def free(self) -> int:
        return self.kv_cache_manager.block_pool.get_num_free_blocks()

    def request(self, prompt, session="S") -> Request:
        self._n += 1
        # (the frontend's admission puts the caller-bound id into request.session_id)
        req = Request(
            f"r{self._n}",
            list(prompt),
            SamplingParams(max_tokens=100),
            None,
            session_id=f"owner:{session}",
        )
        self.sink_layouts[req.request_id] = LAYOUT
        self.requests[req.request_id] = req
        return req

    def run(self, req, computed: int) -> None:
        """Admit ``req`` (resuming if it can) with room for ``computed`` tokens."""
        hit = self.store.try_resume(req)
        blocks, length = hit if hit is not None else ((), 0)
        self.grids[req.request_id] = (length, req.num_prompt_tokens)  # as the scheduler
        new = self.kv_cache_manager.create_kv_cache_blocks(blocks) if hit else None
        got = self.kv_cache_manager.allocate_slots(
            req, computed - length, num_new_computed_tokens=length, new_computed_blocks=new
        )
        assert got is not None
        req.num_computed_tokens = computed

    def finish(self, req) -> bool:
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        parked = self.store.on_finish(req)
        if not parked:
            self.kv_cache_manager.free(req)
        del self.requests[req.request_id]
        return parked

    def directives(self):
        _, ops = _directives.split(self.finished_req_ids)
        self.finished_req_ids.clear()
        return ops


def _blocks_walked(store) -> int:
    return sum(p.num_blocks for p in [*store.parked.values(), *store.claimed.values()])


def test_claimed_session_is_neither_replaced_nor_dropped():
    s = Scheduler(num_blocks=20)
    t1 = s.request(range(10))
    s.run(t1, 10)
    assert s.finish(t1)  # parked: 10 tokens, 3 blocks
    waiting = s.request(list(range(10)) + [50, 51])  # claims, not admitted yet
    assert s.store.try_resume(waiting) is not None
    assert waiting.sampling_params.extra_args[_directives.RESUME_ARG] == "owner:S"
    other = s.request(range(100, 107))  # same id, misses: in use
    s.run(other, 7)
    assert _directives.RESUME_ARG not in (other.sampling_params.extra_args or {})
    free = s.free
    assert not s.finish(other)  # not parked over the claim
    assert s.free == free + 2 and "owner:S" in s.store.claimed
    assert not s.store.make_room()  # a claim is not evictable
    s.run(waiting, 12)  # admitted: adopts the blocks
    assert not s.store.claimed and not s.store.parked and s.store.blocks_parked == 0
    c = s.store.counters
    assert (c["session_requests"], c["resumes"], c["miss_in_use"]) == (3, 1, 1)


def test_retries_are_answered_alike_and_counted_once():
    s = Scheduler(num_blocks=20)
    t1 = s.request(range(8))
    s.run(t1, 8)
    s.finish(t1)
    r = s.request(list(range(8)) + [9])
    first = s.store.try_resume(r)
    assert s.store.try_resume(r) == first  # vLLM asks every waiting step
    miss = s.request([7, 7, 7])
    for _ in range(3):
        assert s.store.try_resume(miss) is None
    assert s.store.counters["session_requests"] == 3  # t1, r, miss: once each
    assert s.store.counters["miss_in_use"] == 1


def test_reset_drops_claimed_sessions_and_unmarks_their_claimants():
    s = Scheduler(num_blocks=30)
    for sid in ("a", "b"):
        t = s.request(range(9), session=sid)
        s.run(t, 9)
        s.finish(t)
    s.directives()
    claimant = s.request(list(range(9)) + [1], session="a")
    assert s.store.try_resume(claimant) is not None
    s.store.drop_all("parked_reset")
    assert s.free == 29 and len(s.store) == 0 and s.store.blocks_parked == 0
    assert _directives.RESUME_ARG not in (claimant.sampling_params.extra_args or {})
    assert sorted(k for op, _, k in s.directives() if op == "drop") == ["owner:a", "owner:b"]
    assert s.store.try_resume(claimant) is None  # runs as a fresh stream
    assert s.store.counters["parked_reset"] == 2


def test_room_is_made_oldest_first_and_the_count_is_kept():
    s = Scheduler(num_blocks=40, max_parked_sessions=3)
    keys = []
    for i in range(4):  # the cap drops the first
        t = s.request(range(4 * (i + 1)), session=f"s{i}")
        s.run(t, 4 * (i + 1))
        s.finish(t)
        keys.append(f"owner:s{i}")
        assert s.store.blocks_parked == _blocks_walked(s.store)
    assert list(s.store.parked) == keys[1:]
    claimant = s.request(list(range(8)) + [0], session="s1")
    assert s.store.try_resume(claimant) is not None  # s1 claimed: s2, s3 go first
    assert s.store.make_room() and s.store.make_room() and not s.store.make_room()
    assert list(s.store.claimed) == ["owner:s1"]
    assert s.store.blocks_parked == _blocks_walked(s.store) == 2
    claimant.status = RequestStatus.FINISHED_ABORTED  # gave up while waiting
    assert not s.store.on_finish(claimant)
    assert list(s.store.parked) == ["owner:s1"] and not s.store.claimed


def test_room_for_a_running_request_takes_claimed_sessions_last():
    s = Scheduler(num_blocks=40)
    for sid in ("x", "y"):
        t = s.request(range(8), session=sid)
        s.run(t, 8)
        s.finish(t)
    claimant = s.request(list(range(8)) + [3], session="x")
    assert s.store.try_resume(claimant) is not None
    assert s.store.make_room(claimed_too=True)  # the unclaimed "y" first
    assert list(s.store.claimed) == ["owner:x"] and not s.store.parked
    assert not s.store.make_room()  # for a waiting request: no
    assert s.store.make_room(claimed_too=True)  # for a running one: the claim
    assert not s.store.claimed and s.store.blocks_parked == 0 and s.free == 39
    assert _directives.RESUME_ARG not in (claimant.sampling_params.extra_args or {})
    assert s.store.try_resume(claimant) is None  # the claimant runs fresh


def test_expiry_stops_at_the_first_fresh_session(monkeypatch):
    import vllm_sink.patches.engine_core.sessions as sessions

    now = [100.0]
    monkeypatch.setattr(sessions.time, "monotonic", lambda: now[0])
    s = Scheduler(num_blocks=40, session_idle_timeout=10)
    for i in range(3):
        t = s.request(range(4), session=f"e{i}")
        s.run(t, 4)
        s.finish(t)
        now[0] += 4  # parked at 100, 104, 108
    now[0] = 115  # idle 15, 11, 7 s
    s.store.expire()
    assert list(s.store.parked) == ["owner:e2"]
    assert s.store.counters["parked_expired"] == 2 and s.free == 39 - 1


def test_saved_kv_budget():
    saved = SavedKV(cap_bytes=10 * 100, block_bytes=100)
    assert saved.reserve("a", 6) and not saved.reserve("b", 5) and saved.reserve("c", 4)
    assert saved.total == 1000 and "b" not in saved
    saved.release("a")
    saved.release("b")  # never reserved: no effect
    assert saved.total == 400 and list(saved) == ["c"]
    assert SavedKV(0, 100).reserve("x", 0) and not SavedKV(0, 100).reserve("x", 1)
    # Default: the pool, at most a quarter of the host's memory per worker on it.
    assert default_cap_bytes(8 << 30, 1, 256 << 30) == 8 << 30
    assert default_cap_bytes(80 << 30, 8, 256 << 30) == 8 << 30
    assert default_cap_bytes(8 << 30, 1, 0) == 8 << 30  # host size unknown
