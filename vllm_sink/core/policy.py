"""Eviction rule, ring order and position offsets of one endless stream. Pure Python.

A request's KV cache is a *virtual sequence* of at most C tokens::

    virtual index:  0 .. S-1   | S .. L-1
    contents:       sink tokens | the most recent L-S tokens (the window)

Absolute token ``a`` of the stream (0-based, counting every token ever fed) sits at
virtual index ``a`` if it is a sink, else ``a - E`` where E (``evicted``) is the number
of window tokens evicted so far. Eviction only ever removes the oldest window tokens.

Eviction rule (before a step that adds n tokens to L cached ones)::

    if L + 1 > C:  e = ceil((L + 1 - C) / B) blocks;  t = min(e * B, L - S) tokens go

so every step starts with at most C - 1 cached tokens: its first token attends to the
sinks and at least the W - B most recent tokens, like a decoded token. The step's n
tokens are then all added (n <= K = prefill_chunk_tokens once the cache is full; at
most span - L while it fills), so a prompt read K tokens at a time is attended exactly
as well as one read token by token; the K - 1 headroom tokens beyond C are what make
that possible. t < e*B only when the window holds fewer than e blocks' worth of tokens
(its newest block partly filled): then the whole window goes.

Worked example, B = 4, S = 4, W = 8 (C = 12), one token per decode step:
  L = 12, n = 1  ->  e = ceil(1/4) = 1, t = 4: virtual 4..7 (absolute 4..7) are evicted,
  E = 4, L = 8; the new token (absolute 12) goes to virtual 8.  The next three decode
  steps fit (L = 9, 10, 11); the fifth evicts absolute 8..11, and so on: the cache
  oscillates between C - B + 1 and C tokens, one block evicted every B tokens.
  With K = 5 a prompt chunk of 5 tokens at L = 11 (nothing evicted: L + 1 <= C) runs
  with 16 = C - 1 + K tokens cached; the next step first evicts 2 blocks (L = 8).

Ring order. The request owns ``sink_blocks + K`` physical blocks for its whole life
(K = window blocks). Virtual block ``j >= sink_blocks`` lives in ring block
``(shift + j - sink_blocks) % K`` where ``shift`` counts ring blocks rotated away by
evictions. Evicting e whole blocks advances shift by e; every surviving token keeps its
physical slot, because its virtual block index drops by exactly e. (After evicting a
partial window the window is empty, so nothing is left to keep in place.)

Positions (the "offset" scheme). The model is fed position ``v + O`` for virtual index
``v``; O (``offset``) grows by t at each eviction, so every window key keeps the
position it was written with (v drops by t, O grows by t). Sink keys (v fixed) must be
re-rotated to ``v + O``: always from a pristine snapshot taken before the first
eviction, so rounding never accumulates. Scores depend only on position differences,
so attention equals that of a dense model over the cache at positions 0..L-1.
When ``O + span`` would pass the position limit (span = C - 1 + K, the most tokens
cached during a step), *rebase*: rotate the window keys by -O once, set O = 0, restore
the sinks from the snapshot.
"""

from __future__ import annotations

from typing import NamedTuple

from vllm_sink.core.config import SinkLayout


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def eviction_for_step(layout: SinkLayout, cached: int, new: int) -> int:
    """Number of tokens to evict before adding ``new`` tokens to ``cached`` ones."""
    if not 0 <= cached <= layout.span:
        raise ValueError(f"cached={cached} outside 0..{layout.span}")
    overflow = cached + 1 - layout.capacity
    t = 0
    if overflow > 0:
        blocks = cdiv(overflow, layout.block_size)
        t = min(blocks * layout.block_size, max(0, cached - layout.sink_tokens))
    if cached - t + new > layout.span:
        raise ValueError(
            f"a step of {new} new tokens cannot fit: {cached - t} tokens stay cached and "
            f"at most {layout.span} (capacity {layout.capacity} - 1 + prefill chunk "
            f"{layout.chunk_tokens}) fit while a step runs; the step must not exceed "
            "prefill_chunk_tokens")
    return t


def max_step_tokens(layout: SinkLayout, absolute_computed: int) -> int:
    """The most new tokens a step may add to a stream with ``absolute_computed`` tokens
    so far, knowing only that count (the scheduler's view): while nothing was evicted
    yet (fewer than C tokens) the cache holds all of them, else it holds at most C - 1
    after the step's eviction."""
    if absolute_computed < layout.capacity:
        return layout.span - absolute_computed
    return layout.chunk_tokens


def prefill_steps(layout: SinkLayout, prompt_len: int, start: int = 0,
                  budget: int | None = None) -> list[int]:
    """Step sizes the sink scheduler uses to read a prompt alone in the engine: as much
    as fits (``max_step_tokens``), at most ``budget`` (the step token budget) a step."""
    steps, done = [], start
    while done < start + prompt_len:
        n = min(max_step_tokens(layout, done), start + prompt_len - done,
                budget or prompt_len)
        steps.append(n)
        done += n
    return steps


def ring_row(sink_ids: list[int], ring_ids: list[int], shift: int) -> list[int]:
    """Block-table row in virtual order: sinks, then the ring starting at ``shift``.

    >>> ring_row([7], [1, 2, 3], shift=4)   # 4 % 3 = 1: ring block 2 is now the oldest
    [7, 2, 3, 1]
    """
    if not ring_ids:
        return list(sink_ids)
    k = shift % len(ring_ids)
    return list(sink_ids) + list(ring_ids[k:]) + list(ring_ids[:k])


class StepPlan(NamedTuple):
    """What must happen to one request's cache before a step runs (a tuple: one is
    made per stream and step, on the worker's hot path)."""

    cached_before: int      # L: virtual tokens cached when the step was scheduled
    evict_tokens: int       # t: oldest window tokens dropped before the step
    evict_blocks: int       # ring blocks rotated: ceil(t / B)
    first_eviction: bool    # take the pristine sink snapshot before touching anything
    offset: int             # O after this step's eviction (and rebase, if any)
    rebase_by: int          # if != 0: rotate window keys by this (= -O before the reset)

    @property
    def cached_after(self) -> int:
        return self.cached_before - self.evict_tokens

    @property
    def sinks_move(self) -> bool:
        """Whether sink keys must be rewritten (from the snapshot, rotated by offset)."""
        return self.evict_tokens > 0 or self.rebase_by != 0


class SinkStream:
    """The eviction state of one request: evicted count E, offset O, ring shift.

    Both the worker (to drive its caches) and tests/metrics (to mirror it) run it on
    the sequence of (absolute computed tokens, scheduled tokens) the scheduler emits.
    """

    __slots__ = ("layout", "evicted", "offset", "shift", "evictions", "rebases",
                 "evict_from", "fill_to")

    def __init__(self, layout: SinkLayout) -> None:
        self.layout = layout
        self.evicted = 0    # E: window tokens evicted so far
        self.offset = 0     # O: added to virtual indices to form positions
        self.shift = 0      # ring blocks rotated so far
        self.evictions = 0  # eviction events
        self.rebases = 0    # rebase events
        # The quiet-step bounds, absolute counts kept in step with E: a step adding n
        # tokens to a absolute computed ones evicts nothing and fits iff
        # a < evict_from (L = a - E < C) and a + n <= fill_to (L + n <= span).
        # ``quiet`` reads them; the worker inlines that test on its per-step hot path.
        self.evict_from = layout.capacity
        self.fill_to = layout.span

    def quiet(self, absolute_computed: int, new: int) -> bool:
        """Whether a step of ``new`` tokens leaves this stream's state untouched (no
        eviction, no rebase: ``plan`` would return evict_tokens == 0)."""
        return absolute_computed < self.evict_from and absolute_computed + new <= self.fill_to

    def virtual(self, absolute: int) -> int:
        """Virtual index of absolute token count ``absolute`` (>= every evicted token)."""
        return absolute - self.evicted

    def plan(self, absolute_computed: int, new: int) -> StepPlan:
        """Advance the state for a step adding ``new`` tokens; return what to do."""
        L = absolute_computed - self.evicted
        if L >= 0 and self.quiet(absolute_computed, new):
            # eviction_for_step's no-overflow case (most steps): nothing to evict.
            return StepPlan(L, 0, 0, False, self.offset, 0)
        t = eviction_for_step(self.layout, L, new)
        first = t > 0 and self.evicted == 0
        rebase_by = 0
        if t:
            self.evicted += t
            self.evict_from = self.evicted + self.layout.capacity
            self.fill_to = self.evicted + self.layout.span
            self.offset += t
            self.shift += cdiv(t, self.layout.block_size)
            self.evictions += 1
            # Largest position fed this step is O + span - 1 at most (L - t + n <= span).
            if self.offset + self.layout.span > self.layout.position_limit:
                rebase_by = -self.offset
                self.offset = 0
                self.rebases += 1
        return StepPlan(L, t, cdiv(t, self.layout.block_size), first, self.offset,
                        rebase_by)

    def position(self, virtual_index: int) -> int:
        return virtual_index + self.offset
