"""vllm_sink.core.policy: eviction rule, ring order, offsets, against hand-traced tables and
an independent naive model of the cache (logical blocks, a FIFO of free ring blocks)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_sink.core.config import SinkLayout
from vllm_sink.core.policy import (
    SinkStream,
    eviction_for_step,
    max_cached_after,
    max_step_tokens,
    prefill_steps,
    rotate_row,
    starts_chunk,
)

pytestmark = pytest.mark.cpu


def test_hand_traced_decode_table():
    # B = 4, S = 4 (1 block), W = 8 (2 blocks), C = 12; prefill 12 tokens, then decode.
    s = SinkStream(SinkLayout(4, 1, 2, 1000))
    assert s.plan(0, 12).evict_tokens == 0  # fills the cache exactly
    # Step 1 (absolute 12 computed, L = 12): 12+1 > 12 -> evict one block (abs 4..7).
    p = s.plan(12, 1)
    assert (p.evict_tokens, p.cached_after, p.offset, p.evict_blocks) == (4, 8, 4, 1)
    assert p.first_eviction
    # Next three decodes fit: L = 9, 10, 11.
    for a in (13, 14, 15):
        assert s.plan(a, 1).evict_tokens == 0
    # L = 12 again: evict abs 8..11; E = 8, O = 8, shift = 2.
    p = s.plan(16, 1)
    assert (p.evict_tokens, p.cached_before, s.evicted, s.offset) == (4, 12, 8, 8)
    assert not p.first_eviction


def test_prompt_chunks_run_with_headroom():
    # B = 4, S = 4, W = 8 (C = 12), K = 5: span = C - 1 + K = 16, 2 headroom blocks.
    layout = SinkLayout(4, 1, 2, 1000, 5)
    assert (layout.span, layout.headroom_blocks, layout.blocks_per_request) == (16, 1, 4)
    assert eviction_for_step(layout, 11, 5) == 0  # L + 1 <= C: the chunk runs at 16
    assert eviction_for_step(layout, 16, 1) == 8  # back to <= C - 1: 2 blocks go
    assert eviction_for_step(layout, 16, 5) == 8
    assert eviction_for_step(layout, 12, 5) == 4  # 12 + 1 > 12: one block
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        eviction_for_step(layout, 4, 13)  # 4 + 13 > 16


def test_step_limits_and_prefill_steps():
    layout = SinkLayout(4, 1, 2, 1000, 5)  # C = 12, span 16, K = 5
    # A fresh prompt of 100: chunks [0, 16), [16, 21), [21, 26) ...; a step never
    # crosses a chunk end, a step inside a chunk continues it.
    assert [max_step_tokens(layout, a, 0, 100) for a in (0, 3, 11, 12, 16, 18, 21)] == [
        16,
        13,
        5,
        4,
        5,
        3,
        5,
    ]
    assert max_step_tokens(layout, 98, 0, 100) == 2 and max_step_tokens(layout, 100, 0, 100) == 5
    assert [starts_chunk(layout, a, 0, 30) for a in (0, 12, 16, 18, 21, 30, 31)] == [
        True,
        False,
        True,
        False,
        True,
        True,
        True,
    ]
    assert prefill_steps(layout, 30) == [16, 5, 5, 4]
    assert prefill_steps(layout, 12, start=5) == [11, 1]  # resumed before C: fill to span
    assert prefill_steps(layout, 12, start=20) == [5, 5, 2]  # resumed after C: K a chunk
    # Whatever the steps, the eviction rule always fits them.
    s, done = SinkStream(layout, 200), 0
    for n in prefill_steps(layout, 200) + [1] * 20:
        s.plan(done, n)
        done += n


def test_continuation_steps_do_not_evict():
    # The first chunk [0, 16) read in steps of 6, 6, 4 (a shared step budget): the step
    # at 12 has L = 12 >= C but continues the chunk, so it evicts nothing; the chunk
    # starting at 16 evicts down to <= C - 1.
    layout = SinkLayout(4, 1, 2, 1000, 5)
    s = SinkStream(layout, prompt_end=40)
    assert [s.plan(a, n).evict_tokens for a, n in ((0, 6), (6, 6), (12, 4))] == [0, 0, 0]
    p = s.plan(16, 2)
    assert p.evict_tokens == 8 and p.cached_after == 8
    assert s.plan(18, 3).evict_tokens == 0  # [16, 21) continued
    assert s.plan(21, 5).evict_tokens == 4  # L = 13 at the next chunk start
    assert max_cached_after(layout, 18, 3, 0, 40) == 16 >= 8 + 2 + 3


def test_rebase_when_offset_would_pass_the_rotary_range():
    # C = 12 = span, position_limit = 20: the rotary range is 2 * 12 blocks' tokens = 24,
    # so positions up to O + 11 must stay < 24: O <= 12.
    layout = SinkLayout(4, 1, 2, 20)
    assert layout.rotary_positions == 24
    s = SinkStream(layout)
    s.plan(0, 12)
    for eviction in (4, 8, 12):  # one block evicted every 4 decode steps
        a = 8 + eviction
        assert s.plan(a, 1).rebase_by == 0 and s.offset == eviction
        for b in range(a + 1, a + 4):
            s.plan(b, 1)
    p = s.plan(24, 1)  # O would be 16 > 12: rotate window by -16, O = 0
    assert (p.rebase_by, p.offset, s.rebases) == (-16, 0, 1)


def test_rotate_row():
    row = [7, 1, 2, 3]
    rotate_row(row, 1, 0)
    assert row == [7, 1, 2, 3]
    rotate_row(row, 1, 1)
    assert row == [7, 2, 3, 1]
    rotate_row(row, 1, 2)
    assert row == [7, 1, 2, 3]
    no_sinks = [5, 6]
    rotate_row(no_sinks, 0, 1)
    assert no_sinks == [6, 5]


class NaiveCache:
    """Literal reading of the contract, sharing no arithmetic with vllm_sink.core.policy:
    evict at a chunk's start until the chunk's first token finds room within C, one
    whole oldest window block at a time; keys at stored positions, rebased when the
    offset would carry a position past the rotary range."""

    def __init__(self, layout: SinkLayout):
        self.B, self.layout = layout.block_size, layout
        self.sinks: list[list[int]] = []  # logical sink blocks of absolute ids
        self.window: list[tuple[int, list[int]]] = []  # (physical ring block, ids)
        self.free_ring = list(range(layout.ring_blocks))  # FIFO of free ring blocks
        self.next_abs = 0
        self.offset = 0
        self.limit_ok = True
        self.span = layout.capacity - 1 + layout.chunk_tokens
        bpr = -(-self.span // self.B)
        self.rotary = max(layout.position_limit, 2 * bpr * self.B)
        self.rebases_seen: dict[int, int] = {}  # window token -> rebases while cached
        self.first_window: dict[int, int] = {}  # token -> oldest window token it sees

    def cached(self) -> list[int]:
        return [a for b in self.sinks for a in b] + [a for _, b in self.window for a in b]

    def step(self, n: int, chunk_start: bool) -> None:
        L, C = len(self.cached()), self.layout.capacity
        if chunk_start and L + 1 > C:
            e = -(-(L + 1 - C) // self.B)
            for _ in range(min(e, len(self.window))):
                phys, ids = self.window.pop(0)
                self.free_ring.append(phys)
                self.offset += len(ids)
            if self.offset + self.span > self.rotary:
                self.offset = 0  # rebase: every window key moves once
                for _, ids in self.window:
                    for a in ids:
                        self.rebases_seen[a] += 1
        assert len(self.cached()) + n <= self.span
        for _ in range(n):
            a = self.next_abs
            self.next_abs += 1
            if len(self.sinks) < self.layout.sink_blocks or (
                self.sinks and len(self.sinks[-1]) < self.B and not self.window
            ):
                if not self.sinks or len(self.sinks[-1]) == self.B:
                    self.sinks.append([])
                self.sinks[-1].append(a)
            else:
                if not self.window or len(self.window[-1][1]) == self.B:
                    self.window.append((self.free_ring.pop(0), []))
                self.window[-1][1].append(a)
                self.rebases_seen[a] = 0
            self.first_window[a] = self.window[0][1][0] if self.window else a + 1
            v = len(self.cached()) - 1
            self.limit_ok &= v + self.offset < self.rotary


def literal_chunks(layout: SinkLayout, start: int, prompt_len: int) -> list[int]:
    """A prompt's chunks, read off the contract: the first fills the cache to span
    (or adds K once C tokens came before), then K each, never past the prompt."""
    span, K, C = layout.span, layout.chunk_tokens, layout.capacity
    sizes, done, end = [], start, start + prompt_len
    first = span - start if start < C else K
    while done < end:
        n = min(first if not sizes else K, end - done)
        sizes.append(n)
        done += n
    return sizes


def run_requests(layout, requests, splits):
    """Feed ``requests`` [(prompt_len, decode_steps)] as one session (each request
    continues the stream); ``splits[i]`` cuts prompt chunk i into engine steps. Checks
    SinkStream against NaiveCache on every step and returns the naive model."""
    naive, stream = NaiveCache(layout), SinkStream(layout)
    computed, chunk_no = 0, 0
    sb = layout.sink_blocks  # the worker's row: sink blocks, then ring blocks in order
    row = list(range(-sb, 0)) + list(range(layout.ring_blocks))
    for prompt_len, decode in requests:
        stream.begin_request(computed, computed + prompt_len)
        steps = []
        for size in literal_chunks(layout, computed, prompt_len):
            cut = splits[chunk_no % len(splits)]
            chunk_no += 1
            parts = [min(cut, size - i) for i in range(0, size, cut)]
            steps += [(p, i == 0) for i, p in enumerate(parts)]
        steps += [(1, True)] * decode
        for n, chunk_start in steps:
            assert n <= max_step_tokens(layout, computed, stream.start, stream.prompt_end)
            quiet = stream.quiet(computed, n)  # the worker's per-step fast path
            before = (stream.evicted, stream.offset)
            plan = stream.plan(computed, n)
            rotate_row(row, sb, plan.evict_blocks)
            if quiet:
                assert (stream.evicted, stream.offset) == before
                assert plan.evict_tokens == 0 and plan.rebase_by == 0
            naive.step(n, chunk_start)
            computed += n
            cached = naive.cached()
            assert plan.cached_after + n == len(cached)
            assert len(cached) <= max_cached_after(
                layout, computed - n, n, stream.start, stream.prompt_end
            )
            assert stream.evicted == computed - len(cached)
            # Ring order: virtual block j holds the naive model's physical ring block.
            assert [p for p, _ in naive.window] == row[sb : sb + len(naive.window)]
            # Every window token's virtual index is absolute - E.
            for v, a in enumerate(cached):
                if v >= layout.sink_tokens:
                    assert stream.virtual(a) == v
            assert stream.offset == naive.offset
    assert naive.limit_ok
    return naive


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([1, 2, 4]),
    st.integers(0, 2),
    st.integers(1, 4),
    st.integers(0, 3),
    st.integers(1, 9),
    st.data(),
)
def test_policy_matches_naive_cache(B, sink_blocks, window_blocks, slack, K, data):
    C = (sink_blocks + window_blocks) * B
    layout = SinkLayout(B, sink_blocks, window_blocks, C - 1 + K + slack * B, K)
    requests = data.draw(
        st.lists(st.tuples(st.integers(1, 4 * C), st.integers(0, 2 * C)), min_size=1, max_size=3)
    )
    split = data.draw(st.lists(st.integers(1, layout.span), min_size=1, max_size=5))
    naive = run_requests(layout, requests, split)
    # Rebases are at least span evicted tokens apart: no window key moves twice, so a
    # bf16 key is rounded by at most one rebase rotation in its life.
    assert max(naive.rebases_seen.values(), default=0) <= 1


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([1, 2, 4]), st.integers(0, 2), st.integers(1, 4), st.integers(1, 9), st.data()
)
def test_attention_is_a_function_of_the_request_alone(B, sink_blocks, window_blocks, K, data):
    """However the engine's step budget cuts the chunks (alone, or among others), every
    token attends to the same cached tokens."""
    C = (sink_blocks + window_blocks) * B
    layout = SinkLayout(B, sink_blocks, window_blocks, C - 1 + K, K)  # capacity at the limit
    requests = data.draw(
        st.lists(st.tuples(st.integers(1, 4 * C), st.integers(0, C)), min_size=1, max_size=3)
    )
    alone = run_requests(layout, requests, [layout.span])
    busy = run_requests(
        layout, requests, data.draw(st.lists(st.integers(1, K + 2), min_size=1, max_size=6))
    )
    assert alone.first_window == busy.first_window
