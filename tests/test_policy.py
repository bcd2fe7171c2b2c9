"""vllm_sink.policy: eviction rule, ring order, offsets, against hand-traced tables and
an independent naive model of the cache (logical blocks, a FIFO of free ring blocks)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_sink.config import SinkLayout
from vllm_sink.policy import SinkStream, eviction_for_step, ring_row

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


def test_partial_window_evicted_whole():
    # B = 4, S = 4, W = 8. L = 11 (window holds 7 = one full block + 3), chunk of 8:
    # overflow 7 -> e = 2 blocks, but only 7 tokens exist: the whole window goes.
    layout = SinkLayout(4, 1, 2, 1000)
    assert eviction_for_step(layout, 11, 8) == 7
    assert eviction_for_step(layout, 12, 8) == 8
    assert eviction_for_step(layout, 12, 5) == 8
    with pytest.raises(ValueError, match="chunk size"):
        eviction_for_step(layout, 4, 9)


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
    """Literal reading of the contract, sharing no arithmetic with vllm_sink.policy."""

    def __init__(self, layout: SinkLayout):
        self.B, self.layout = layout.block_size, layout
        self.sinks: list[list[int]] = []          # logical sink blocks of absolute ids
        self.window: list[tuple[int, list[int]]] = []  # (physical ring block, ids)
        self.free_ring = list(range(layout.window_blocks))  # FIFO of free ring blocks
        self.next_abs = 0
        self.pos: dict[int, int] = {}             # stored key position per absolute id
        self.offset = 0
        self.limit_ok = True

    def cached(self) -> list[int]:
        return [a for b in self.sinks for a in b] + [a for _, b in self.window for a in b]

    def step(self, n: int) -> None:
        L, C = len(self.cached()), self.layout.capacity
        if L + n > C:
            e = -(-(L + n - C) // self.B)
            for _ in range(min(e, len(self.window))):
                phys, ids = self.window.pop(0)
                self.free_ring.append(phys)
                self.offset += len(ids)
            if self.offset + C > self.layout.position_limit:
                self.offset = 0                     # rebase
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
       st.data())
def test_policy_matches_naive_cache(B, sink_blocks, window_blocks, slack, data):
    C = (sink_blocks + window_blocks) * B
    layout = SinkLayout(B, sink_blocks, window_blocks, C + slack * B)
    W = window_blocks * B
    naive, stream = NaiveCache(layout), SinkStream(layout)
    steps = data.draw(st.lists(st.integers(1, W), min_size=1, max_size=12)) + [1] * 3 * C
    computed = 0
    for n in steps:
        plan = stream.plan(computed, n)
        naive.step(n)
        computed += n
        cached = naive.cached()
        assert plan.cached_after + n == len(cached)
        assert stream.evicted == computed - len(cached)
        # Ring order: virtual block j holds the naive model's physical ring block.
        row = ring_row(list(range(-sink_blocks, 0)), list(range(window_blocks)),
                       stream.shift)
        assert [p for p, _ in naive.window] == row[sink_blocks:sink_blocks + len(naive.window)]
        # Every window token's virtual index is absolute - E.
        for v, a in enumerate(cached):
            if v >= layout.sink_tokens:
                assert stream.virtual(a) == v
        assert stream.offset == naive.offset
        assert naive.limit_ok
