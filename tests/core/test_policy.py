"""vllm_sink.core.policy: eviction rule, ring order, offsets, against hand-traced tables and
an independent naive model of the cache (logical blocks, a FIFO of free ring blocks)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_sink.core.config import SinkLayout
from vllm_sink.core.policy import (SinkStream, eviction_for_step, max_step_tokens, prefill_steps,
                              ring_row)

pytestmark = pytest.mark.cpu


def test_hand_traced_decode_table():
    # B = 4, S = 4 (1 block), W = 8 (2 blocks), C = 12; prefill 12 tokens, then decode.
    s = SinkStream(SinkLayout(4, 1, 2, 1000))
    assert s.plan(0, 12).evict_tokens == 0          # fills the cache exactly
    # Step 1 (absolute 12 computed, L = 12): 12+1 > 12 -> evict one block (abs 4..7).
    p = s.plan(12, 1)
    assert (p.evict_tokens, p.cached_after, p.offset, s.shift) == (4, 8, 4, 1)
    assert p.first_eviction and p.sinks_move
    # Next three decodes fit: L = 9, 10, 11.
    for a in (13, 14, 15):
        assert s.plan(a, 1).evict_tokens == 0
    # L = 12 again: evict abs 8..11; E = 8, O = 8, shift = 2.
    p = s.plan(16, 1)
    assert (p.evict_tokens, p.cached_before, s.evicted, s.offset, s.shift) == (4, 12, 8, 8, 2)
    assert not p.first_eviction


def test_prompt_chunks_run_with_headroom():
    # B = 4, S = 4, W = 8 (C = 12), K = 5: span = C - 1 + K = 16, 2 headroom blocks.
    layout = SinkLayout(4, 1, 2, 1000, 5)
    assert (layout.span, layout.headroom_blocks, layout.blocks_per_request) == (16, 1, 4)
    assert eviction_for_step(layout, 11, 5) == 0     # L + 1 <= C: the chunk runs at 16
    assert eviction_for_step(layout, 16, 1) == 8     # back to <= C - 1: 2 blocks go
    assert eviction_for_step(layout, 16, 5) == 8
    assert eviction_for_step(layout, 12, 5) == 4     # 12 + 1 > 12: one block
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        eviction_for_step(layout, 4, 13)             # 4 + 13 > 16


def test_step_limits_and_prefill_steps():
    layout = SinkLayout(4, 1, 2, 1000, 5)            # C = 12, span 16
    assert [max_step_tokens(layout, a) for a in (0, 3, 11, 12, 40)] == [16, 13, 5, 5, 5]
    assert prefill_steps(layout, 30) == [16, 5, 5, 4]
    assert prefill_steps(layout, 3, start=20) == [3]
    # Whatever the steps, the eviction rule always fits them.
    s, done = SinkStream(layout), 0
    for n in prefill_steps(layout, 200) + [1] * 20:
        s.plan(done, n)
        done += n


def test_rebase_when_offset_would_pass_the_limit():
    # C = 12, position_limit = 20: positions up to O + 11 must stay < 20, so O <= 8.
    s = SinkStream(SinkLayout(4, 1, 2, 20))
    s.plan(0, 12)
    assert s.plan(12, 1).rebase_by == 0 and s.offset == 4
    for a in (13, 14, 15):
        s.plan(a, 1)
    assert s.plan(16, 1).rebase_by == 0 and s.offset == 8
    for a in (17, 18, 19):
        s.plan(a, 1)
    p = s.plan(20, 1)  # O would be 12 > 8: rotate window by -12, O = 0
    assert (p.rebase_by, p.offset, s.rebases) == (-12, 0, 1)


def test_ring_row():
    assert ring_row([7], [1, 2, 3], 0) == [7, 1, 2, 3]
    assert ring_row([7], [1, 2, 3], 4) == [7, 2, 3, 1]
    assert ring_row([], [5, 6], 1) == [6, 5]


class NaiveCache:
    """Literal reading of the contract, sharing no arithmetic with vllm_sink.core.policy."""

    def __init__(self, layout: SinkLayout):
        self.B, self.layout = layout.block_size, layout
        self.sinks: list[list[int]] = []          # logical sink blocks of absolute ids
        self.window: list[tuple[int, list[int]]] = []  # (physical ring block, ids)
        self.free_ring = list(range(layout.ring_blocks))  # FIFO of free ring blocks
        self.next_abs = 0
        self.pos: dict[int, int] = {}             # stored key position per absolute id
        self.offset = 0
        self.limit_ok = True
        self.span = layout.capacity - 1 + layout.chunk_tokens

    def cached(self) -> list[int]:
        return [a for b in self.sinks for a in b] + [a for _, b in self.window for a in b]

    def step(self, n: int) -> None:
        L, C = len(self.cached()), self.layout.capacity
        if L + 1 > C:      # the step's first token must find room within C
            e = -(-(L + 1 - C) // self.B)
            for _ in range(min(e, len(self.window))):
                phys, ids = self.window.pop(0)
                self.free_ring.append(phys)
                self.offset += len(ids)
            if self.offset + self.span > self.layout.position_limit:
                self.offset = 0                     # rebase
        assert len(self.cached()) + n <= self.span
        for _ in range(n):
            a = self.next_abs
            self.next_abs += 1
            if len(self.sinks) < self.layout.sink_blocks or (
                    self.sinks and len(self.sinks[-1]) < self.B and not self.window):
                if not self.sinks or len(self.sinks[-1]) == self.B:
                    self.sinks.append([])
                self.sinks[-1].append(a)
            else:
                if not self.window or len(self.window[-1][1]) == self.B:
                    self.window.append((self.free_ring.pop(0), []))
                self.window[-1][1].append(a)
            v = len(self.cached()) - 1
            self.limit_ok &= v + self.offset < self.layout.position_limit


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(0, 2), st.integers(1, 4), st.integers(0, 3),
       st.integers(1, 9), st.data())
def test_policy_matches_naive_cache(B, sink_blocks, window_blocks, slack, K, data):
    C = (sink_blocks + window_blocks) * B
    layout = SinkLayout(B, sink_blocks, window_blocks, C - 1 + K + slack * B, K)
    naive, stream = NaiveCache(layout), SinkStream(layout)
    first = data.draw(st.integers(1, layout.span))   # an empty cache takes up to span
    steps = [first] + data.draw(st.lists(st.integers(1, K), max_size=12)) + [1] * 3 * C
    computed = 0
    for n in steps:
        quiet = stream.quiet(computed, n)     # the worker's per-step fast path
        before = (stream.evicted, stream.offset, stream.shift)
        plan = stream.plan(computed, n)
        assert quiet == (plan.evict_tokens == 0 and plan.rebase_by == 0)
        if quiet:
            assert (stream.evicted, stream.offset, stream.shift) == before
        naive.step(n)
        computed += n
        cached = naive.cached()
        assert plan.cached_after + n == len(cached)
        assert stream.evicted == computed - len(cached)
        # Ring order: virtual block j holds the naive model's physical ring block.
        row = ring_row(list(range(-sink_blocks, 0)), list(range(layout.ring_blocks)),
                       stream.shift)
        assert [p for p, _ in naive.window] == row[sink_blocks:sink_blocks + len(naive.window)]
        # Every window token's virtual index is absolute - E.
        for v, a in enumerate(cached):
            if v >= layout.sink_tokens:
                assert stream.virtual(a) == v
        assert stream.offset == naive.offset
        assert naive.limit_ok
