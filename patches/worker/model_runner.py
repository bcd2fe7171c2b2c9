"""Worker: the model runner shows every request to vLLM as its *virtual sequence*.

``SinkRunnerMixin`` is mixed into vLLM's V1 model runner by the sink worker: the same
mixin over ``CPUModelRunner`` and over the CUDA ``GPUModelRunner``. It overrides seven
runner methods, each wrapping and delegating to vLLM's own:

``get_kv_cache_spec``   full-attention specs -> ``SinkAttentionSpec`` (others refused)
``load_model``          finds each attention layer's RoPE module, refuses unsupported
``initialize_kv_cache`` probes the backend's key layout (``sink_keys``, ``kv_keys``)
``_update_states``      before: absolute -> virtual token counts, long prompts trimmed
                        to what the step needs; after: eviction (rows, block table),
                        the step's key re-rotations batched into a few device ops, and
                        the next slice of a streamed prompt
``_prepare_inputs``     adds each request's position offset O to vLLM's persistent
                        ``positions`` buffer on the device (CUDA graphs replay it)
``_bookkeeping_sync``   CPU only: rewinds seeded generators of partial-prefill rows by
                        state (CPU generators have no offset to rewind)
``_get_prompt_logprobs_dict``  runs in absolute coordinates (full prompt)

Nothing here waits for the device: every host-to-device copy is pinned and
non-blocking, and the position-limit check runs on host-side counts.

Invariants between steps, per request (virtual = absolute - E for window tokens):
* ``req_state`` and the input-batch row hold the virtual sequence: cached tokens
  (<= span = C - 1 + K), then at most one not-yet-computed token (the sampled one, or
  the next prompt token when the prompt continues: that keeps vLLM from sampling a
  partial prefill); so a row never needs more than span + 1 slots, however long the
  stream or prompt;
* the block-table row is ``ring_row(sinks, ring, shift)``; stock kernels attend it as
  an ordinary dense sequence of length <= span;
* every cached key sits at position ``virtual index + O`` (see vllm_sink.policy).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np
import torch

from vllm_sink.config import SinkConfigError, SinkLayout
from vllm_sink.patches import _directives
from vllm_sink.patches.engine_core.kv_policy import SinkAttentionSpec
from vllm_sink.patches.worker.rope_layers import find_layer_rotaries
from vllm_sink.patches.worker.sink_keys import BlockSpan, SinkKeys
from vllm_sink.policy import SinkStream, StepPlan, cdiv, ring_row

logger = logging.getLogger("vllm.vllm_sink")


@dataclasses.dataclass
class RequestSink:
    """Worker-side state of one sink request."""

    stream: SinkStream
    prompt: list[int] | None          # full prompt (absolute), until fully visible
    prompt_len: int                   # P
    visible: int                      # prompt tokens shown to vLLM so far (absolute)
    blocks: tuple[list[int], ...]     # physical blocks per KV group, allocation order
    snapshot: list[torch.Tensor] | None = None  # pristine sink keys, one per key cache
    step_start: int = 0               # absolute computed tokens at the current step

    def rows(self, sink_blocks: int) -> tuple[list[int], ...]:
        """Block-table row per KV group: sinks, then the ring in virtual order."""
        return tuple(ring_row(g[:sink_blocks], g[sink_blocks:], self.stream.shift)
                     for g in self.blocks)


class SinkRunnerMixin:
    sink_layout: SinkLayout

    def sink_init(self, layout: SinkLayout) -> None:
        self.sink_layout = layout
        self.sink_requests: dict[str, RequestSink] = {}
        self.sink_parked: dict[str, RequestSink] = {}   # session key -> parked state
        self.sink_rotaries: dict[str, tuple[torch.Tensor, bool]] = {}
        self.sink_keys: SinkKeys | None = None
        self.sink_kv_groups = 1
        # Position offset O of each input-batch row, copied to the device each step.
        self.sink_row_offsets = self._make_buffer(self.max_num_reqs, dtype=torch.int64)
        # Cumulative counters over the worker's life (exposed by the sink worker's sink_stats).
        self.sink_counters = {"evictions": 0, "tokens_evicted": 0, "rebases": 0,
                              "sink_rewrites": 0, "requests": 0}

        self.sink_board = None  # StatsBoard on rank 0, read by the frontend's /metrics

    def _sink_board_values(self) -> dict[str, int]:
        """What rank 0 publishes every step: O(1), no walk over the requests. Every
        request holds exactly one full block set (checked at admission and resume)."""
        n = len(self.sink_requests)
        return {**self.sink_counters, "active_requests": n,
                "kv_blocks_reserved": n * self.sink_layout.blocks_per_request
                * self.sink_kv_groups}

    def sink_stats(self) -> dict[str, int]:
        return {**self._sink_board_values(), "parked_sessions": len(self.sink_parked),
                "max_offset": max((r.stream.offset for r in self.sink_requests.values()),
                                  default=0)}

    def _sink_publish(self) -> None:
        if self.sink_board is not None:
            self.sink_board.write(self._sink_board_values())

    # ---- startup -------------------------------------------------------------------
    def get_kv_cache_spec(self):
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        specs = super().get_kv_cache_spec()
        out = {}
        for name, spec in specs.items():
            if (type(spec) is not FullAttentionSpec or spec.sliding_window is not None
                    or spec.attention_chunk_size is not None):
                what = type(spec).__name__
                if getattr(spec, "sliding_window", None) is not None:
                    what = f"sliding-window attention ({spec.sliding_window} tokens)"
                raise SinkConfigError(
                    f"Layer {name} uses {what}; sink mode supports models whose "
                    "attention layers are all full (global) attention.")
            out[name] = SinkAttentionSpec.from_full(spec, self.sink_layout)
        if not out:
            raise SinkConfigError("The model has no KV-cache attention layers.")
        return out

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        from vllm.model_executor.layers.attention import Attention

        layers = {name: m for name, m in
                  self.compilation_config.static_forward_context.items()
                  if isinstance(m, Attention)}
        self.sink_rotaries = find_layer_rotaries(self.get_model(), layers,
                                                 self.sink_layout.position_limit)

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        if kwargs.get("is_profiling") or (args and args[0] is True):
            return
        for group in kv_cache_config.kv_cache_groups:
            if group.kv_cache_spec.block_size != self.sink_layout.block_size:
                raise SinkConfigError(
                    f"KV block size {group.kv_cache_spec.block_size} differs from the "
                    f"{self.sink_layout.block_size} the sink layout was resolved with; "
                    f"start vLLM with --block-size {group.kv_cache_spec.block_size}.")
        self.sink_kv_groups = len(kv_cache_config.kv_cache_groups)
        self.sink_keys = SinkKeys.build(kv_cache_config,
                                        self.compilation_config.static_forward_context,
                                        self.sink_rotaries)
        logger.info("vllm_sink: worker ready, key layout probed (%s); %s",
                    self.sink_keys.describe(), self.sink_layout.describe())

    # ---- per step: before vLLM updates its batch ------------------------------------
    def _update_states(self, scheduler_output):
        finished, session_ops = _directives.split(scheduler_output.finished_req_ids)
        parks = {}
        for op, req_id, key in session_ops:
            if op == "drop":
                parks = {r: k for r, k in parks.items() if k != key}
                self.sink_parked.pop(key, None)
            else:
                parks[req_id] = key
        for req_id in finished:
            rs = self.sink_requests.pop(req_id, None)
            if rs is not None and req_id in parks:
                rs.prompt = None
                self.sink_parked[parks[req_id]] = rs
        layout = self.sink_layout
        new_reqs = []
        for nr in scheduler_output.scheduled_new_reqs:
            if nr.req_id in self.requests:
                raise NotImplementedError(
                    "resumable streaming-input sessions are not supported in sink mode")
            if nr.prompt_token_ids is None:
                raise NotImplementedError("prompt embeddings are not supported in sink mode")
            n = scheduler_output.num_scheduled_tokens[nr.req_id]
            extra = getattr(nr.sampling_params, "extra_args", None) or {}
            resume = extra.get(_directives.RESUME_ARG)
            if resume is not None:
                new_reqs.append(self._sink_resume(nr, n, resume))
                continue
            if nr.num_computed_tokens:
                raise RuntimeError("sink mode requests start with no computed tokens")
            blocks = tuple(list(g) for g in nr.block_ids)
            if any(len(g) != layout.blocks_per_request for g in blocks):
                raise RuntimeError(f"request {nr.req_id} got {[len(g) for g in blocks]} "
                                   f"blocks, expected {layout.blocks_per_request}")
            P = len(nr.prompt_token_ids)
            visible = min(P, n + 1)
            self.sink_counters["requests"] += 1
            self.sink_requests[nr.req_id] = RequestSink(
                SinkStream(layout), nr.prompt_token_ids if visible < P else None, P,
                visible, blocks)
            mask = nr.prompt_is_token_ids
            new_reqs.append(dataclasses.replace(
                nr, prompt_token_ids=list(nr.prompt_token_ids[:visible]),
                prompt_is_token_ids=None if mask is None else list(mask[:visible])))
        cached = scheduler_output.scheduled_cached_reqs
        virtual = []
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids:
                raise RuntimeError(f"sink request {req_id} was preempted; sink mode "
                                   "reserves every block at admission so this must not "
                                   "happen")
            rs = self.sink_requests[req_id]
            rs.step_start = cached.num_computed_tokens[i]
            virtual.append(rs.stream.virtual(rs.step_start))
        output = dataclasses.replace(
            scheduler_output, scheduled_new_reqs=new_reqs, finished_req_ids=finished,
            scheduled_cached_reqs=dataclasses.replace(cached, num_computed_tokens=virtual))
        result = super()._update_states(output)
        self._sink_after_update(scheduler_output)
        self._sink_publish()
        return result

    def _sink_resume(self, nr, n: int, key: str):
        """A request resuming parked session ``key``: its first A prompt tokens are the
        parked stream, cached in the parked blocks. Show vLLM the virtual sequence:
        sinks + the window's tokens (absolute S+E .. A-1) + the next prompt slice."""
        rs = self.sink_parked.pop(key, None)
        if rs is None:
            raise RuntimeError(f"sink worker has no parked state for session {key!r}")
        if any(sorted(a) != sorted(b) for a, b in zip(rs.blocks, nr.block_ids)):
            raise RuntimeError(f"resumed session {key!r} got other blocks than it parked")
        A, P = nr.num_computed_tokens, list(nr.prompt_token_ids)
        S, E = self.sink_layout.sink_tokens, rs.stream.evicted
        cached = P[:min(S, A)] + (P[S + E:A] if A > S else [])
        assert len(cached) == rs.stream.virtual(A) <= self.sink_layout.span
        visible = min(len(P), A + n + 1)
        rs.prompt = P if visible < len(P) else None
        rs.prompt_len, rs.visible, rs.step_start = len(P), visible, A
        self.sink_requests[nr.req_id] = rs
        self.sink_counters["requests"] += 1
        rows = rs.rows(self.sink_layout.sink_blocks)
        return dataclasses.replace(nr, prompt_token_ids=cached + P[A:visible],
                                   prompt_is_token_ids=None, num_computed_tokens=len(cached),
                                   block_ids=rows)

    # ---- per step: after vLLM updated its batch -------------------------------------
    def _sink_after_update(self, scheduler_output) -> None:
        evicted_any = refresh = False
        sb = self.sink_layout.sink_blocks
        snap, rebase, rebase_by, sinks, offsets = [], [], [], [], []
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            rs = self.sink_requests[req_id]
            plan = rs.stream.plan(rs.step_start, n)
            if plan.evict_tokens:
                refresh |= self._sink_evict(req_id, rs, plan)
                evicted_any = True
                self.sink_counters["evictions"] += 1
                self.sink_counters["tokens_evicted"] += plan.evict_tokens
                rows = rs.rows(sb)
                if plan.first_eviction and sb:
                    snap.append(rs)
                if plan.rebase_by:
                    last = cdiv(plan.cached_after, self.sink_layout.block_size)
                    if last > sb:
                        rebase.append(BlockSpan(rows, sb, last))
                        rebase_by.append(plan.rebase_by)
                    self.sink_counters["rebases"] += 1
                if sb and (rs.snapshot is not None or plan.first_eviction):
                    sinks.append((rs, BlockSpan(rows, 0, sb)))
                    offsets.append(plan.offset)
            if rs.prompt is not None:
                self._sink_show_prompt(req_id, rs, min(rs.prompt_len, rs.step_start + n + 1))
        if snap or rebase or sinks:
            self._sink_fix_keys(snap, rebase, rebase_by, sinks, offsets)
        if refresh:
            self.input_batch.refresh_metadata()
        elif evicted_any and not self.input_batch.no_penalties:
            # Penalties read the (virtual) prompt from a tensor built at batch changes.
            self.input_batch.sampling_metadata = self.input_batch._make_sampling_metadata()

    def _sink_fix_keys(self, snap, rebase, rebase_by, sinks, offsets) -> None:
        """One step's key edits, each a batched op over all layers and requests:
        1. pristine sink keys of requests evicting for the first time (before any move);
        2. rebases: window keys moved by -O (each key at most once in its life);
        3. sink keys := pristine snapshot moved to positions v + O (one rotation, f32)."""
        keys = self.sink_keys
        assert keys is not None
        if snap:
            sb = self.sink_layout.sink_blocks
            for rs, copy_ in zip(snap, keys.snapshot([BlockSpan(r.rows(sb), 0, sb)
                                                      for r in snap])):
                rs.snapshot = copy_
        if rebase:
            keys.move(rebase, rebase_by)
        if sinks:
            keys.move([span for _, span in sinks], offsets,
                      sources=[rs.snapshot for rs, _ in sinks])
            self.sink_counters["sink_rewrites"] += len(sinks)

    def _sink_evict(self, req_id: str, rs: RequestSink, plan: StepPlan) -> bool:
        """Drop virtual tokens S .. S+t-1 from req_state, batch row and block table.

        Returns True when logits processors must re-read the request (min_tokens)."""
        S, t = self.sink_layout.sink_tokens, plan.evict_tokens
        ib, state = self.input_batch, self.requests[req_id]
        row = ib.req_id_to_index[req_id]
        total = int(ib.num_tokens_no_spec[row])
        ib.token_ids_cpu[row, S:total - t] = ib.token_ids_cpu[row, S + t:total].copy()
        ib.is_token_ids[row, S:total - t] = ib.is_token_ids[row, S + t:total].copy()
        t_prompt = min(t, max(0, len(state.prompt_token_ids) - S))
        del state.prompt_token_ids[S:S + t_prompt]
        if t > t_prompt:  # in place: the batch and logits processors share this list
            del state.output_token_ids[:t - t_prompt]
        state.num_prompt_tokens -= t_prompt
        state.num_computed_tokens -= t
        ib.num_prompt_tokens[row] -= t_prompt
        ib.num_tokens_no_spec[row] -= t
        ib.num_computed_tokens_cpu[row] -= t
        rows = rs.rows(self.sink_layout.sink_blocks)
        state.block_ids = rows
        ib.block_table.add_row(rows, row)
        # min_tokens counts the (virtual) output list: lower it by the outputs evicted,
        # and re-register the row so logits processors see the new value.
        evicted_outputs = t - t_prompt
        params = state.sampling_params
        if evicted_outputs and params is not None and params.min_tokens:
            params = copy.copy(params)
            params.min_tokens = max(0, params.min_tokens - evicted_outputs)
            state.sampling_params = params
            ib.batch_update_builder.added.append(
                (row, params, state.prompt_token_ids, state.output_token_ids))
            return True
        return False

    def _sink_show_prompt(self, req_id: str, rs: RequestSink, upto: int) -> None:
        """Append prompt tokens [visible, upto) to the request's virtual prompt."""
        if upto <= rs.visible:
            return
        assert rs.prompt is not None
        new = rs.prompt[rs.visible:upto]
        ib, state = self.input_batch, self.requests[req_id]
        assert not state.output_token_ids
        row = ib.req_id_to_index[req_id]
        start, k = state.num_tokens, len(new)
        state.prompt_token_ids.extend(new)
        state.num_prompt_tokens += k
        ib.token_ids_cpu[row, start:start + k] = new
        ib.is_token_ids[row, start:start + k] = True
        ib.num_prompt_tokens[row] += k
        ib.num_tokens_no_spec[row] += k
        rs.visible = upto
        if upto == rs.prompt_len and req_id not in self.num_prompt_logprobs:
            rs.prompt = None  # fully shown: the worker no longer needs its own copy

    # ---- positions ----------------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray, *args, **kwargs):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        ib = self.input_batch
        num_reqs = ib.num_reqs
        if self.device.type == "cpu":
            self._sink_remember_rng()
        offsets = self.sink_row_offsets.np[:num_reqs]
        offsets[:] = [self.sink_requests[r].stream.offset for r in ib.req_ids]
        # The contract: positions fed to the model stay below the position limit. The
        # largest position of row i is computed_i + scheduled_i - 1 + O_i (host counts).
        last = ib.num_computed_tokens_cpu[:num_reqs] + num_scheduled_tokens[:num_reqs] \
            - 1 + offsets
        if num_reqs and int(last.max()) >= self.sink_layout.position_limit:
            raise RuntimeError("vllm_sink: a position reached the position limit "
                               f"{self.sink_layout.position_limit}; this is a bug")
        if offsets.any():
            # positions[t] += O[row of t], on the device, in vLLM's persistent buffer
            # (slot mappings were computed from the virtual positions just before).
            total = int(num_scheduled_tokens[:num_reqs].sum())
            self.sink_row_offsets.copy_to_gpu(num_reqs)
            rows = self.req_indices.gpu[:total]
            self.positions[:total] += self.sink_row_offsets.gpu[rows]
        return result

    def _sink_remember_rng(self) -> None:
        """Seeded requests in a partial prefill step: vLLM rewinds their generator after
        the discarded sample with set_offset, which CPU generators do not support. Sink
        mode chunks prompts often (chunk <= window), so remember each such generator's
        state here and restore it in _bookkeeping_sync instead."""
        ib = self.input_batch
        self._sink_rng_rewind = {}
        if ib.generators:
            mask = self.discard_request_mask.np[:ib.num_reqs]
            for i in np.nonzero(mask)[0]:
                gen = ib.generators.get(int(i))
                if gen is not None:
                    self._sink_rng_rewind[int(i)] = (gen, gen.get_state())

    def _bookkeeping_sync(self, *args, **kwargs):
        rewind = getattr(self, "_sink_rng_rewind", {})
        hidden = {}
        for i, (gen, state) in rewind.items():
            gen.set_state(state)                      # undo the discarded draw
            hidden[i] = self.input_batch.generators.pop(i)
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            self.input_batch.generators.update(hidden)
            self._sink_rng_rewind = {}

    # ---- prompt logprobs in absolute coordinates ---------------------------------------
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        swapped = []
        for req_id in self.num_prompt_logprobs:
            rs, state = self.sink_requests.get(req_id), self.requests.get(req_id)
            if rs is None or state is None or rs.prompt is None:
                continue
            swapped.append((state, state.prompt_token_ids, state.num_computed_tokens))
            state.prompt_token_ids = rs.prompt
            state.num_computed_tokens = rs.step_start
        try:
            return super()._get_prompt_logprobs_dict(hidden_states, num_scheduled_tokens)
        finally:
            for state, prompt, computed in swapped:
                state.prompt_token_ids, state.num_computed_tokens = prompt, computed
            for req_id, rs in self.sink_requests.items():
                if rs.prompt is not None and rs.visible == rs.prompt_len and \
                        req_id not in self.num_prompt_logprobs:
                    rs.prompt = None
