"""Eviction rule, ring order and position offsets of one endless stream. Pure Python.

A request's KV cache is a *virtual sequence* of at most C tokens between chunks (at
most span = C - 1 + K while one runs, see Prompt chunks)::

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

Ring order. A stream's block-table row lists its blocks in virtual order: the sink
blocks, then the ring (window and headroom blocks), oldest first; blocks arrive on
demand and are appended, up to ``blocks_per_request``. Evicting e whole blocks moves
the e oldest ring blocks to the end of the row (``rotate_row``: they take the next
tokens); every surviving token keeps its physical slot, because its virtual block
index drops by exactly e. (After evicting a partial window the window is empty, so
nothing is left to keep in place.)

Prompt chunks. Once a cache is full, what a prompt token attends to depends on where
the step it ran in started (the step's eviction happens before its first token). So
that this is a function of the request alone, never of the engine's load, a prompt is
read in *chunks* on a grid fixed by the request: the request's first step (token
``start``: 0, or a resumed session's parked length) starts a chunk, which fills the
cache up to span (or adds K when ``start`` >= C), and the next ones follow every K
tokens; each decoded token is a chunk of its own. Eviction happens only when a chunk
starts. When the step budget is shared, the scheduler may split a chunk over several
steps (never across a chunk end); the later steps continue the chunk without evicting,
which fits because a chunk adds at most K tokens to <= C - 1 cached (the first, up to
span). ``prefill_steps`` lists a prompt's chunks.

Positions (the "offset" scheme). The model is fed position ``v + O`` for virtual index
``v``; O (``offset``) grows by t at each eviction, so every window key keeps the
position it was written with (v drops by t, O grows by t). Sink keys (v fixed) must be
re-rotated to ``v + O``: always from a pristine snapshot taken before the first
eviction, so rounding never accumulates. Scores depend only on position differences,
so attention equals that of a dense model over the cache at positions 0..L-1.
When ``O + span`` would pass the rotary range R (``SinkLayout.rotary_positions``), the
stream *rebases*: rotate the window keys by -O once, set O = 0, restore the sinks from
the snapshot. R >= 2 * span, so rebases are at least R - span >= span evicted tokens
apart, and a window key (evicted before span more tokens are evicted) is rotated at
most once in its life: bf16 rounding never accumulates. Distances between tokens stay
below span <= position_limit (the model's context); R may exceed the model's own table
(the worker extends it: RoPE scores depend only on distances).
"""

from __future__ import annotations

from typing import NamedTuple

from vllm_sink.core.config import SinkLayout


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def eviction_for_step(layout: SinkLayout, cached: int, new: int, chunk_start: bool = True) -> int:
    """Number of tokens to evict before adding ``new`` tokens to ``cached`` ones (none
    when the step continues a chunk, ``chunk_start`` False)."""
    if not 0 <= cached <= layout.span:
        raise ValueError(f"cached={cached} outside 0..{layout.span}")
    overflow = cached + 1 - layout.capacity
    t = 0
    if overflow > 0 and chunk_start:
        blocks = cdiv(overflow, layout.block_size)
        t = min(blocks * layout.block_size, max(0, cached - layout.sink_tokens))
    if cached - t + new > layout.span:
        raise ValueError(
            f"a step of {new} new tokens cannot fit: {cached - t} tokens stay cached and "
            f"at most {layout.span} (capacity {layout.capacity} - 1 + prefill chunk "
            f"{layout.chunk_tokens}) fit while a step runs; the step must not exceed "
            "prefill_chunk_tokens"
        )
    return t


def first_chunk_end(layout: SinkLayout, start: int) -> int:
    """End of the first chunk of a request whose first step starts at token ``start``:
    the cache fills up to span when nothing was evicted yet (``start`` < C), else the
    chunk is K tokens (it starts with <= C - 1 cached after its eviction)."""
    if start < layout.capacity:
        return layout.span
    return start + layout.chunk_tokens


def starts_chunk(layout: SinkLayout, absolute: int, start: int, prompt_end: int) -> bool:
    """Whether a step starting at token ``absolute`` of a request that started at
    ``start`` with ``prompt_end`` prompt tokens begins a chunk (and may evict)."""
    if absolute == start or absolute >= prompt_end:
        return True
    first = first_chunk_end(layout, start)
    return absolute >= first and (absolute - first) % layout.chunk_tokens == 0


def max_step_tokens(layout: SinkLayout, absolute: int, start: int, prompt_end: int) -> int:
    """The most new tokens a step starting at token ``absolute`` may add (the scheduler's
    view, from counts alone): up to the end of the prompt chunk it is in; a decode step
    is a chunk of its own (one token; K bounds it)."""
    if absolute >= prompt_end:
        return layout.chunk_tokens
    first = first_chunk_end(layout, start)
    end = (
        first
        if absolute < first
        else absolute + layout.chunk_tokens - (absolute - first) % layout.chunk_tokens
    )
    return min(end, prompt_end) - absolute


def max_cached_after(
    layout: SinkLayout, absolute: int, new: int, start: int, prompt_end: int
) -> int:
    """An upper bound on the tokens a stream caches while a step of ``new`` tokens
    starting at token ``absolute`` runs, from counts alone (the scheduler sizes blocks
    on demand with it): a chunk starts with <= C - 1 cached (or all its tokens, while
    nothing was evicted) and a step continuing a chunk adds to what it added so far."""
    a, C, K = absolute, layout.capacity, layout.chunk_tokens
    first = first_chunk_end(layout, start)
    if a >= prompt_end:
        cached = min(a, C - 1)
    elif a < first:
        cached = a if start < C else C - 1 + (a - start)
    else:
        cached = C - 1 + (a - first) % K
    return min(cached + new, layout.span)


def prefill_steps(layout: SinkLayout, prompt_len: int, start: int = 0) -> list[int]:
    """The chunks a prompt of ``prompt_len`` tokens, fed from token ``start`` on, is read
    in: the step sizes of a stream alone in the engine with budget to spare, and the
    attention of every prompt token, however the engine splits them into steps."""
    steps, done, end = [], start, start + prompt_len
    while done < end:
        n = max_step_tokens(layout, done, start, end)
        steps.append(n)
        done += n
    return steps


def rotate_row(row: list[int], sink_blocks: int, blocks: int) -> None:
    """Evict ``blocks`` ring blocks from a block-table row in virtual order, in place: the
    oldest ``blocks`` blocks after the sinks become the newest (they take the next
    tokens); every surviving token keeps its physical slot (its virtual block index
    drops by exactly ``blocks``).

    >>> row = [7, 1, 2, 3]; rotate_row(row, 1, 1); row   # ring block 1 was the oldest
    [7, 2, 3, 1]
    """
    row[sink_blocks:] = row[sink_blocks + blocks :] + row[sink_blocks : sink_blocks + blocks]


class StepPlan(NamedTuple):
    """What must happen to one request's cache before a step runs (a tuple: one is
    made per stream and step, on the worker's hot path)."""

    cached_before: int  # L: virtual tokens cached when the step was scheduled
    evict_tokens: int  # t: oldest window tokens dropped before the step
    evict_blocks: int  # ring blocks rotated: ceil(t / B)
    first_eviction: bool  # take the pristine sink snapshot before touching anything
    offset: int  # O after this step's eviction (and rebase, if any)
    rebase_by: int  # if != 0: rotate window keys by this (= -O before the reset)

    @property
    def cached_after(self) -> int:
        return self.cached_before - self.evict_tokens


class SinkStream:
    """The eviction state of one stream: evicted count E, offset O, its request's grid.

    Both the worker (to drive its caches) and tests/metrics (to mirror it) run it on
    the sequence of (absolute computed tokens, scheduled tokens) the scheduler emits.
    """

    __slots__ = (
        "layout",
        "evicted",
        "offset",
        "evictions",
        "rebases",
        "evict_from",
        "fill_to",
        "start",
        "prompt_end",
    )

    def __init__(self, layout: SinkLayout, prompt_end: int = 0) -> None:
        self.layout = layout
        # The current request's first token and prompt end (absolute): its chunk grid.
        self.start = 0
        self.prompt_end = prompt_end
        self.evicted = 0  # E: window tokens evicted so far
        self.offset = 0  # O: added to virtual indices to form positions
        self.evictions = 0  # eviction events
        self.rebases = 0  # rebase events
        # The quiet-step bounds, absolute counts kept in step with E: a step adding n
        # tokens to a absolute computed ones evicts nothing and fits iff
        # a < evict_from (L = a - E < C) and a + n <= fill_to (L + n <= span).
        # ``quiet`` reads them: the worker's per-step test and ``plan``'s fast path.
        self.evict_from = layout.capacity
        self.fill_to = layout.span

    def begin_request(self, start: int, prompt_end: int) -> None:
        """A new request continues this stream (a resumed session) at token ``start``
        with ``prompt_end`` prompt tokens: its first step starts a chunk."""
        self.start, self.prompt_end = start, prompt_end

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
        t = eviction_for_step(
            self.layout,
            L,
            new,
            starts_chunk(self.layout, absolute_computed, self.start, self.prompt_end),
        )
        first = t > 0 and self.evicted == 0
        rebase_by = 0
        if t:
            self.evicted += t
            self.evict_from = self.evicted + self.layout.capacity
            self.fill_to = self.evicted + self.layout.span
            self.offset += t
            self.evictions += 1
            # Largest position fed this step is O + span - 1 at most (L - t + n <= span).
            if self.offset + self.layout.span > self.layout.rotary_positions:
                rebase_by = -self.offset
                self.offset = 0
                self.rebases += 1
        return StepPlan(L, t, cdiv(t, self.layout.block_size), first, self.offset, rebase_by)
