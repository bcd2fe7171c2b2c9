"""Worker: one stream's state, and the edits that keep vLLM's view of it virtual.

vLLM's input batch, ``CachedRequestState`` and block table hold each stream as its
*virtual sequence* (the cache contents, at most span = C - 1 + K tokens, then at most
one not-yet-computed token). These functions edit them in place when the worker evicts
window tokens, reveals the next slice of a long prompt, or resumes a parked session.

Block rows: ``RequestSink.rows[g]`` is the stream's block-table row of KV group g in
virtual order: its sink blocks, then its ring blocks from oldest to newest, then ring
blocks that hold nothing yet. Blocks arrive on demand and are appended (the next
tokens go after the newest); evicting e whole blocks moves the e oldest ring blocks to
the end (they take the next tokens), so every kept token stays in its physical slot.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from vllm_sink.core.config import SinkLayout
from vllm_sink.core.policy import SinkStream, StepPlan, rotate_row


@dataclasses.dataclass
class RequestSink:
    """Worker-side state of one stream (sink request)."""

    layout: SinkLayout
    stream: SinkStream
    prompt: list[int] | None  # full prompt (absolute), until fully visible
    prompt_len: int  # P
    visible: int  # prompt tokens shown to vLLM so far (absolute)
    rows: tuple[list[int], ...]  # block-table row per KV group, virtual order
    snapshot: list[torch.Tensor] | None = None  # pristine sink keys, one per key cache
    step_start: int = 0  # absolute computed tokens at the current step
    step_tokens: int = 0  # tokens the current (latest) step adds
    saved: list[list[torch.Tensor]] | None = None  # cached KV while preempted: host
    # chunks per group (SinkKeys.save)
    saved_blocks: int = 0

    @classmethod
    def start(cls, layout: SinkLayout, prompt: list[int], visible: int, block_ids) -> RequestSink:
        return cls(
            layout,
            SinkStream(layout, len(prompt)),
            prompt if visible < len(prompt) else None,
            len(prompt),
            visible,
            tuple(list(g) for g in block_ids),
        )

    def append_blocks(self, new_block_ids) -> None:
        if new_block_ids is not None:
            for row, new in zip(self.rows, new_block_ids):
                row.extend(new)

    def rotate(self, blocks: int) -> None:
        """e oldest ring blocks become the newest (their tokens were evicted)."""
        for row in self.rows:
            rotate_row(row, self.layout.sink_blocks, blocks)


def evict(ib, state, rs: RequestSink, plan: StepPlan) -> bool:
    """Drop virtual tokens S .. S+t-1 from the stream's ``CachedRequestState``
    ``state``, its row of the input batch ``ib`` and its block-table row.

    Returns True when logits processors must re-read the request (min_tokens)."""
    S, t = rs.layout.sink_tokens, plan.evict_tokens
    row = ib.req_id_to_index[state.req_id]
    total = int(ib.num_tokens_no_spec[row])
    ib.token_ids_cpu[row, S : total - t] = ib.token_ids_cpu[row, S + t : total].copy()
    ib.is_token_ids[row, S : total - t] = ib.is_token_ids[row, S + t : total].copy()
    t_prompt = min(t, max(0, len(state.prompt_token_ids) - S))
    del state.prompt_token_ids[S : S + t_prompt]
    if t > t_prompt:  # in place: the batch and logits processors share this list
        del state.output_token_ids[: t - t_prompt]
    state.num_prompt_tokens -= t_prompt
    state.num_computed_tokens -= t
    ib.num_prompt_tokens[row] -= t_prompt
    ib.num_tokens_no_spec[row] -= t
    ib.num_computed_tokens_cpu[row] -= t
    rs.rotate(plan.evict_blocks)
    state.block_ids = tuple(list(r) for r in rs.rows)
    ib.block_table.add_row(state.block_ids, row)
    # min_tokens counts the (virtual) output list: lower it by the outputs evicted,
    # and re-register the row so logits processors see the new value.
    evicted_outputs = t - t_prompt
    params = state.sampling_params
    if evicted_outputs and params is not None and params.min_tokens:
        params = copy.copy(params)
        params.min_tokens = max(0, params.min_tokens - evicted_outputs)
        state.sampling_params = params
        ib.batch_update_builder.added.append(
            (row, params, state.prompt_token_ids, state.output_token_ids)
        )
        return True
    return False


def show_prompt(ib, state, rs: RequestSink, upto: int, prompt_logprobs: bool) -> None:
    """Append prompt tokens [visible, upto) to the virtual prompt of the stream's
    ``CachedRequestState`` ``state`` and of its row of the input batch ``ib``.
    ``prompt_logprobs``: the request wants them (its full prompt is then kept)."""
    if upto <= rs.visible:
        return
    assert rs.prompt is not None
    new = rs.prompt[rs.visible : upto]
    assert not state.output_token_ids
    row = ib.req_id_to_index[state.req_id]
    start, k = state.num_tokens, len(new)
    state.prompt_token_ids.extend(new)
    state.num_prompt_tokens += k
    ib.token_ids_cpu[row, start : start + k] = new
    ib.is_token_ids[row, start : start + k] = True
    ib.num_prompt_tokens[row] += k
    ib.num_tokens_no_spec[row] += k
    rs.visible = upto
    if upto == rs.prompt_len and not prompt_logprobs:
        rs.prompt = None  # fully shown: the worker no longer needs its own copy


def resume_session(rs: RequestSink, nr, n: int):
    """The new request ``nr`` resumes parked stream ``rs``: its first A prompt tokens are
    the parked stream, cached in the parked blocks (any blocks allocated beyond them are
    appended to the rows). Show vLLM the virtual sequence: sinks + the window's tokens
    (absolute S+E .. A-1) + the next prompt slice."""
    parked = [set(r) for r in rs.rows]
    if any(not p <= set(g) for p, g in zip(parked, nr.block_ids)):
        raise RuntimeError(f"resumed session {nr.req_id} got other blocks than it parked")
    rs.append_blocks([[b for b in g if b not in p] for p, g in zip(parked, nr.block_ids)])
    A, P = nr.num_computed_tokens, list(nr.prompt_token_ids)
    S, E = rs.layout.sink_tokens, rs.stream.evicted
    cached = P[: min(S, A)] + (P[S + E : A] if A > S else [])
    assert len(cached) == rs.stream.virtual(A) <= rs.layout.span
    visible = min(len(P), A + n + 1)
    rs.prompt = P if visible < len(P) else None
    rs.prompt_len, rs.visible, rs.step_start = len(P), visible, A
    rs.stream.begin_request(A, len(P))  # the new request's chunk grid
    return dataclasses.replace(
        nr,
        prompt_token_ids=cached + P[A:visible],
        prompt_is_token_ids=None,
        num_computed_tokens=len(cached),
        block_ids=tuple(list(r) for r in rs.rows),
    )
