"""Worker: the model runner shows every request to vLLM as its *virtual sequence*.

``SinkRunnerMixin`` is mixed into vLLM's V1 model runner by the sink worker: the same
mixin over ``CPUModelRunner`` and over the CUDA ``GPUModelRunner``. It overrides seven
runner methods, each wrapping and delegating to vLLM's own:

``get_kv_cache_spec``   full-attention specs -> ``SinkAttentionSpec`` (others refused)
``load_model``          finds each attention layer's RoPE module, refuses unsupported
``initialize_kv_cache`` probes the backend's key layout (``sink_keys``, ``kv_keys``)
``_update_states``      before: absolute -> virtual token counts, long prompts trimmed
                        to what the step needs, blocks that arrived appended to the
                        rows, the cached KV of preempted streams saved (before vLLM
                        reuses their blocks) and restored on resume (``preemption``);
                        after: eviction (rows, block table), the step's key
                        re-rotations batched into a few device ops, and the next slice
                        of a streamed prompt
``_prepare_inputs``     adds each request's position offset O to vLLM's persistent
                        ``positions`` buffer on the device (CUDA graphs replay it);
                        CPU: remembers the generators of partial-prefill rows
``_bookkeeping_sync``   CPU only: rewinds those generators by state (CPU generators
                        have no offset to rewind; ``rng_rewind``)
``_get_prompt_logprobs_dict``  runs in absolute coordinates (full prompt)

Nothing here waits for the device: every host-to-device copy is pinned and
non-blocking, and the position-limit check runs on host-side counts.

Dense requests (no ``"sink"`` layout, ``vllm_sink.core.requests``) pass through untouched.
Invariants between steps, per stream (virtual = absolute - E for window tokens):
* ``req_state`` and the input-batch row hold the virtual sequence: cached tokens
  (<= span = C - 1 + K), then at most one not-yet-computed token (the sampled one, or
  the next prompt token when the prompt continues: that keeps vLLM from sampling a
  partial prefill); so a row never needs more than span + 1 slots, however long the
  stream or prompt;
* the block-table row is ``RequestSink.rows`` (virtual order, ``request_state``);
  stock kernels attend it as an ordinary dense sequence of length <= span;
* every cached key sits at position ``virtual index + O`` (see vllm_sink.core.policy).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import numpy as np
import torch

from vllm_sink.core.config import SinkConfigError
from vllm_sink.core.key_cache import scratch_bytes
from vllm_sink.core.policy import cdiv
from vllm_sink.core.requests import EngineSink
from vllm_sink.core.trace import StepRecord
from vllm_sink.patches import _directives
from vllm_sink.patches._patching import Target
from vllm_sink.patches.engine_core.kv_policy import SinkAttentionSpec
from vllm_sink.patches.worker import preemption
from vllm_sink.patches.worker.request_state import RequestSink, evict, resume_session, show_prompt
from vllm_sink.patches.worker.rng_rewind import RngRewind
from vllm_sink.patches.worker.rope_layers import find_layer_rotaries
from vllm_sink.patches.worker.sink_keys import BlockSpan, SinkKeys

logger = logging.getLogger("vllm.vllm_sink")

# The runner methods the mixin overrides (each delegating) or calls, and the runner and
# scheduler-output state it reads, as it expects them in every supported release.
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_BATCH = "vllm.v1.worker.gpu_input_batch:InputBatch"
_OUT = "vllm.v1.core.sched.output"
TARGETS = [
    Target(f"{_RUNNER}.{name}", signature)
    for name, signature in {
        "get_kv_cache_spec": "(self)",
        "load_model": "(self, load_dummy_weights=False, *, model=None)",
        "initialize_kv_cache": "(self, kv_cache_config, is_profiling=False, "
        "kv_cache_allocation_context=None)",
        "_update_states": "(self, scheduler_output)",
        "_prepare_inputs": "(self, scheduler_output, num_scheduled_tokens)",
        "_bookkeeping_sync": "(self, scheduler_output, sampler_output, logits, hidden_states, "
        "num_scheduled_tokens)",
        "_get_prompt_logprobs_dict": "(self, hidden_states, num_scheduled_tokens)",
        "_make_buffer": "(self, *size, dtype, numpy=True)",
        "get_model": "(self)",
        **dict.fromkeys(
            (
                "positions",
                "req_indices",
                "discard_request_mask",
                "input_batch",
                "requests",
                "num_prompt_logprobs",
                "max_num_reqs",
                "kv_caches",
                "compilation_config",
                "scheduler_config",
                "device",
            )
        ),
    }.items()
] + [
    Target(f"{_BATCH}.refresh_metadata", "(self)"),
    Target(f"{_BATCH}._make_sampling_metadata", "(self)"),
    *(
        Target(f"{_BATCH}.{name}", None)
        for name in (
            "num_computed_tokens_cpu",
            "generators",
            "no_penalties",
            "req_ids",
            "num_reqs",
            "sampling_metadata",
        )
    ),
    *(
        Target(f"{_OUT}:{name}", None)
        for name in (
            "CachedRequestData.num_computed_tokens",
            "CachedRequestData.num_output_tokens",
            "CachedRequestData.resumed_req_ids",
            "CachedRequestData.new_block_ids",
            "SchedulerOutput.preempted_req_ids",
            "SchedulerOutput.finished_req_ids",
            "SchedulerOutput.num_scheduled_tokens",
            "NewRequestData.prompt_is_token_ids",
        )
    ),
]


class SinkRunnerMixin:
    sink: EngineSink

    def sink_init(self, sink: EngineSink) -> None:
        self.sink = sink
        self.sink_requests: dict[str, RequestSink] = {}
        self.sink_parked: dict[str, RequestSink] = {}  # session key -> parked state
        self.sink_rotaries: dict[str, tuple[torch.Tensor, bool]] = {}
        self.sink_keys: SinkKeys | None = None
        self.sink_kv_groups = 1
        # Position offset O of each input-batch row, copied to the device each step.
        self.sink_row_offsets = self._make_buffer(self.max_num_reqs, dtype=torch.int64)
        # O of the streams whose offset is not 0, by id, not by row: a stream that is
        # not scheduled for a while (or preempted) leaves the batch rows but keeps its
        # offset. While empty, positions need no offset and the step skips that.
        self.sink_offsets: dict[str, int] = {}
        # Cumulative counters over the worker's life (exposed by the sink worker's sink_stats).
        self.sink_counters = {
            "evictions": 0,
            "tokens_evicted": 0,
            "rebases": 0,
            "sink_rewrites": 0,
            "requests": 0,
            "kv_saves": 0,
            "kv_restores": 0,
            "tokens_restored": 0,
        }
        self.sink_board = None  # StatsBoard on rank 0, read by the frontend's /metrics
        self._sink_board_last: tuple | None = None  # what was last written to the board
        # Blocks of KV group 0 held by the streams in sink_requests (the sum of their
        # rows' lengths), kept in step where rows grow or go (start, append, resume,
        # restore; save, finish) so the per-step board needs no walk over the streams.
        self.sink_blocks_held = 0
        # One StepRecord per step (bounded), read and cleared by tools through the
        # worker's sink_trace() (vllm_sink.core.trace).
        self.sink_trace: collections.deque[StepRecord] = collections.deque(maxlen=1 << 16)
        self._sink_keys_ns = 0  # this step's time in _sink_fix_keys
        self.sink_rng = RngRewind()  # CPU: seeded generators of discarded samples

    def _sink_board_values(self) -> dict[str, int]:
        """What rank 0 publishes (no walk over the streams)."""
        return {
            **self.sink_counters,
            "active_requests": len(self.sink_requests),
            "kv_blocks_reserved": self.sink_blocks_held * self.sink_kv_groups,
        }

    def sink_stats(self) -> dict[str, int]:
        """Counters for tests and tools; checks the kept block count against the rows."""
        held = sum(len(rs.rows[0]) for rs in self.sink_requests.values() if rs.rows)
        if held != self.sink_blocks_held:
            raise RuntimeError(
                f"vllm_sink: block count kept as {self.sink_blocks_held}, "
                f"the streams' rows hold {held}; this is a bug"
            )
        saved = [rs.saved for rs in self.sink_requests.values() if rs.saved is not None]
        return {
            **self._sink_board_values(),
            "parked_sessions": len(self.sink_parked),
            "max_offset": max((r.stream.offset for r in self.sink_requests.values()), default=0),
            "saved_streams": len(saved),
            "saved_bytes": sum(SinkKeys.saved_bytes(s) for s in saved),
        }

    def _sink_publish(self) -> None:
        """Write the board when a value changed (most decode steps change nothing)."""
        if self.sink_board is None:
            return
        key = (len(self.sink_requests), self.sink_blocks_held, *self.sink_counters.values())
        if key != self._sink_board_last:
            self._sink_board_last = key
            self.sink_board.write(self._sink_board_values())

    # ---- startup -------------------------------------------------------------------
    def sink_memory_reserve(self) -> int:
        """Device bytes the plugin may hold outside the KV pool: the pristine sink-key
        snapshot of every stream the engine may hold at once (running, up to
        max_num_seqs, and parked sessions) at the largest sink region a request may
        ask for, plus one rotation chunk's scratch (``key_cache.scratch_bytes``).
        Preempted streams keep theirs in host memory with their saved KV."""
        specs = list(self.get_kv_cache_spec().values())
        per_token = sum(s.num_kv_heads * s.head_size * s.dtype.itemsize for s in specs)
        config = self.sink.config
        streams = self.scheduler_config.max_num_seqs + (
            config.max_parked_sessions if config.sessions else 0
        )
        snapshots = streams * self.sink.max_sink_tokens * per_token
        return snapshots + scratch_bytes(max(s.dtype.itemsize for s in specs))

    def sink_snapshot_bytes(self) -> int:
        """Bytes the sink-key snapshots of live and parked streams hold now."""
        return sum(
            t.numel() * t.element_size()
            for group in (self.sink_requests, self.sink_parked)
            for rs in group.values()
            if rs.snapshot
            for t in rs.snapshot
            if t.device.type == self.device.type
        )

    def get_kv_cache_spec(self):
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        specs = super().get_kv_cache_spec()
        out = {}
        for name, spec in specs.items():
            if (
                type(spec) is not FullAttentionSpec
                or spec.sliding_window is not None
                or spec.attention_chunk_size is not None
            ):
                what = type(spec).__name__
                if getattr(spec, "sliding_window", None) is not None:
                    what = f"sliding-window attention ({spec.sliding_window} tokens)"
                raise SinkConfigError(
                    f"Layer {name} uses {what}; sink mode supports models whose "
                    "attention layers are all full (global) attention."
                )
            out[name] = SinkAttentionSpec.from_full(
                spec, self.sink.layout, self.sink.dense_max_model_len
            )
        if not out:
            raise SinkConfigError("The model has no KV-cache attention layers.")
        return out

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        from vllm.model_executor.layers.attention import Attention

        layers = {
            name: m
            for name, m in self.compilation_config.static_forward_context.items()
            if isinstance(m, Attention)
        }
        self.sink_rotaries = find_layer_rotaries(
            self.get_model(), layers, self.sink.layout.rotary_positions
        )

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        if kwargs.get("is_profiling") or (args and args[0] is True):
            return
        B = self.sink.layout.block_size
        for group in kv_cache_config.kv_cache_groups:
            if group.kv_cache_spec.block_size != B:
                raise SinkConfigError(
                    f"KV block size {group.kv_cache_spec.block_size} differs from the "
                    f"{B} the sink layout was resolved with; start vLLM with "
                    f"--block-size {group.kv_cache_spec.block_size}."
                )
        self.sink_kv_groups = len(kv_cache_config.kv_cache_groups)
        self.sink_keys = SinkKeys.build(
            kv_cache_config, self.compilation_config.static_forward_context, self.sink_rotaries
        )
        logger.info(
            "vllm_sink: worker ready, key layout probed (%s); default stream layout %s",
            self.sink_keys.describe(),
            self.sink.layout.describe(),
        )

    # ---- per step: before vLLM updates its batch ------------------------------------
    def _update_states(self, scheduler_output):
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        finished = self._sink_finish(scheduler_output)
        self._sink_save_preempted(scheduler_output, finished)
        new_reqs = [
            self._sink_new_request(nr, scheduler_output)
            for nr in scheduler_output.scheduled_new_reqs
        ]
        scheduled = scheduler_output.num_scheduled_tokens
        streams, requests = self.sink_requests, self.requests
        # Streams whose step is not quiet (it evicts or rebases, or a prompt slice is
        # still to show): the only ones _sink_after_update visits.
        busy: list[tuple[str, RequestSink, int]] = []
        for nr in scheduler_output.scheduled_new_reqs:
            rs = streams.get(nr.req_id)
            if rs is not None:
                n = rs.step_tokens = scheduled[nr.req_id]
                if rs.prompt is not None or not rs.stream.quiet(rs.step_start, n):
                    busy.append((nr.req_id, rs, n))
        cached = scheduler_output.scheduled_cached_reqs
        counts = list(cached.num_computed_tokens)
        outputs = list(cached.num_output_tokens)
        resumed, new_blocks = cached.resumed_req_ids, cached.new_block_ids
        for i, req_id in enumerate(cached.req_ids):  # hot: every stream, every step
            rs = streams.get(req_id)
            if rs is None:
                continue  # dense: vLLM's own
            start = rs.step_start = counts[i]
            n = rs.step_tokens = scheduled[req_id]
            if req_id in resumed:
                self._sink_restore(req_id, rs, new_blocks[i])
            elif new_blocks[i] is not None:
                rs.append_blocks(new_blocks[i])
                if new_blocks[i]:
                    self.sink_blocks_held += len(new_blocks[i][0])
            st = rs.stream
            counts[i] = start - st.evicted  # absolute -> virtual
            # The virtual output count: async scheduling re-reads a re-added row's
            # outputs as the last ``num_output_tokens`` of all its tokens (its sampled
            # ones are placeholders here); the virtual sequence keeps only its newest.
            outputs[i] = len(requests[req_id].output_token_ids)
            if rs.prompt is not None or not st.quiet(start, n):
                busy.append((req_id, rs, n))
        output = dataclasses.replace(
            scheduler_output,
            scheduled_new_reqs=new_reqs,
            finished_req_ids=finished,
            scheduled_cached_reqs=dataclasses.replace(
                cached, num_computed_tokens=counts, num_output_tokens=outputs
            ),
        )
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        result = super()._update_states(output)
        t2, c2 = time.perf_counter_ns(), time.thread_time_ns()
        before = self.sink_counters["evictions"], self.sink_counters["rebases"]
        self._sink_keys_ns = 0
        self._sink_after_update(busy)
        self._sink_publish()
        self.sink_trace.append(
            StepRecord(
                t0,
                len(scheduler_output.num_scheduled_tokens),
                scheduler_output.total_num_scheduled_tokens,
                self.sink_counters["evictions"] - before[0],
                self.sink_counters["rebases"] - before[1],
                (t1 - t0) + (time.perf_counter_ns() - t2),
                self._sink_keys_ns,
                (c1 - c0) + (time.thread_time_ns() - c2),
            )
        )
        return result

    def _sink_finish(self, scheduler_output) -> set[str]:
        """Real finished ids; parked sessions kept, dropped ones forgotten."""
        finished, session_ops = _directives.split(scheduler_output.finished_req_ids)
        parks = {}
        for op, req_id, key in session_ops:
            if op == "drop":
                parks = {r: k for r, k in parks.items() if k != key}
                self.sink_parked.pop(key, None)
            else:
                parks[req_id] = key
        for req_id in finished:
            self.sink_offsets.pop(req_id, None)
            rs = self.sink_requests.pop(req_id, None)
            if rs is not None and rs.rows:
                self.sink_blocks_held -= len(rs.rows[0])
            if rs is not None and req_id in parks:
                rs.prompt = None
                self.sink_parked[parks[req_id]] = rs
        return finished

    def _sink_new_request(self, nr, scheduler_output):
        extra = getattr(nr.sampling_params, "extra_args", None) or {}
        layout = self.sink.layout_for(extra) if nr.sampling_params is not None else None
        if layout is None:
            return nr  # dense: vLLM's own
        if nr.req_id in self.requests:
            raise NotImplementedError(
                "resumable streaming-input sessions are not supported for sink requests"
            )
        if nr.prompt_token_ids is None:
            raise NotImplementedError("prompt embeddings are not supported in sink mode")
        n = scheduler_output.num_scheduled_tokens[nr.req_id]
        self.sink_counters["requests"] += 1
        resume = extra.get(_directives.RESUME_ARG)
        if resume is not None:
            # The scheduler marks a request as a resume only while it holds its claim
            # on the parked session, which nothing else drops (SessionStore).
            rs = self.sink_parked.pop(resume, None)
            if rs is None:
                raise RuntimeError(
                    f"vllm_sink: no parked state for session {resume!r} "
                    f"that request {nr.req_id} resumes; this is a bug"
                )
            self.sink_requests[nr.req_id] = rs
            if rs.stream.offset:
                self.sink_offsets[nr.req_id] = rs.stream.offset
            resumed = resume_session(rs, nr, n)
            self.sink_blocks_held += len(rs.rows[0]) if rs.rows else 0
            return resumed
        if nr.num_computed_tokens:
            raise RuntimeError("sink mode requests start with no computed tokens")
        visible = min(len(nr.prompt_token_ids), n + 1)
        rs = self.sink_requests[nr.req_id] = RequestSink.start(
            layout, nr.prompt_token_ids, visible, nr.block_ids
        )
        self.sink_blocks_held += len(rs.rows[0]) if rs.rows else 0
        mask = nr.prompt_is_token_ids
        return dataclasses.replace(
            nr,
            prompt_token_ids=list(nr.prompt_token_ids[:visible]),
            prompt_is_token_ids=None if mask is None else list(mask[:visible]),
        )

    # ---- preemption: save the cached KV, restore it on resume (``preemption``) -------
    def _sink_save_preempted(self, scheduler_output, finished: set[str]) -> None:
        saved, released = preemption.save_preempted(
            self.sink_requests, scheduler_output.preempted_req_ids or (), finished, self.sink_keys
        )
        self.sink_blocks_held -= released
        self.sink_counters["kv_saves"] += saved

    def _sink_restore(self, req_id: str, rs: RequestSink, new_block_ids) -> None:
        held = preemption.restore(req_id, rs, new_block_ids, self.sink_keys, self.device)
        self.sink_blocks_held += held
        self.sink_counters["kv_restores"] += 1
        self.sink_counters["tokens_restored"] += rs.stream.virtual(rs.step_start)

    # ---- per step: after vLLM updated its batch -------------------------------------
    def _sink_after_update(self, busy: list[tuple[str, RequestSink, int]]) -> None:
        """Evictions, rebases and prompt slices of the streams whose step is not quiet."""
        evicted_any = refresh = False
        snap, rebase, rebase_by, sinks, offsets = [], [], [], [], []
        ib = self.input_batch
        for req_id, rs, n in busy:
            state = self.requests[req_id]  # every busy stream is scheduled this step
            plan = rs.stream.plan(rs.step_start, n)
            sb = rs.layout.sink_blocks
            if plan.evict_tokens:
                refresh |= evict(ib, state, rs, plan)
                evicted_any = True
                self.sink_counters["evictions"] += 1
                self.sink_counters["tokens_evicted"] += plan.evict_tokens
                if plan.offset:
                    self.sink_offsets[req_id] = plan.offset
                else:
                    self.sink_offsets.pop(req_id, None)
                if plan.first_eviction and sb:
                    snap.append(rs)
                if plan.rebase_by:
                    last = cdiv(plan.cached_after, rs.layout.block_size)
                    if last > sb:
                        rebase.append(BlockSpan(rs.rows, sb, last))
                        rebase_by.append(plan.rebase_by)
                    self.sink_counters["rebases"] += 1
                if sb and (rs.snapshot is not None or plan.first_eviction):
                    sinks.append((rs, BlockSpan(rs.rows, 0, sb)))
                    offsets.append(plan.offset)
            if rs.prompt is not None:
                upto = min(rs.prompt_len, rs.step_start + n + 1)
                show_prompt(ib, state, rs, upto, req_id in self.num_prompt_logprobs)
        if snap or rebase or sinks:
            t = time.perf_counter_ns()
            self._sink_fix_keys(snap, rebase, rebase_by, sinks, offsets)
            self._sink_keys_ns = time.perf_counter_ns() - t
        if refresh:
            ib.refresh_metadata()
        elif evicted_any and not ib.no_penalties:
            # Penalties read the (virtual) prompt from a tensor built at batch changes.
            ib.sampling_metadata = ib._make_sampling_metadata()

    def _sink_fix_keys(self, snap, rebase, rebase_by, sinks, offsets) -> None:
        """One step's key edits, each a batched op over all layers and requests:
        1. pristine sink keys of requests evicting for the first time (before any move);
        2. rebases: window keys moved by -O (each key at most once in its life);
        3. sink keys := pristine snapshot moved to positions v + O (one rotation, f32)."""
        keys = self.sink_keys
        assert keys is not None
        if snap:
            spans = [BlockSpan(rs.rows, 0, rs.layout.sink_blocks) for rs in snap]
            for rs, copy_ in zip(snap, keys.snapshot(spans)):
                rs.snapshot = copy_
        if rebase:
            keys.move(rebase, rebase_by)
        if sinks:
            keys.move(
                [span for _, span in sinks], offsets, sources=[rs.snapshot for rs, _ in sinks]
            )
            self.sink_counters["sink_rewrites"] += len(sinks)

    # ---- positions ----------------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray, *args, **kwargs):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        if self.device.type == "cpu":  # (discard_request_mask is this step's now)
            self.sink_rng.remember(self.input_batch, self.discard_request_mask.np)
        self._sink_offset_positions(num_scheduled_tokens)
        if self.sink_trace:  # this step's record (_update_states ran first)
            record = self.sink_trace[-1]
            record.host_ns += time.perf_counter_ns() - t0
            record.cpu_ns += time.thread_time_ns() - c0
        return result

    def _sink_offset_positions(self, num_scheduled_tokens: np.ndarray) -> None:
        ib = self.input_batch
        num_reqs = ib.num_reqs
        if not self.sink_offsets:
            # Every O is 0: positions are the virtual ones vLLM computed, all below
            # span <= position_limit (SinkLayout's invariant).
            return
        offsets = self.sink_row_offsets.np[:num_reqs]
        get = self.sink_offsets.get
        offsets[:] = [get(r, 0) for r in ib.req_ids]  # dense rows and O = 0: 0
        # Positions fed to a stream stay within the rotary tables (R rows, extended in
        # load_model when R passes the model's own). The largest position of row i is
        # computed_i + scheduled_i - 1 + O_i (host counts); rows with O = 0 need no
        # check (virtual positions < span, dense rows are bounded by vLLM).
        last = ib.num_computed_tokens_cpu[:num_reqs] + num_scheduled_tokens[:num_reqs] - 1 + offsets
        limit = self.sink.layout.rotary_positions
        if num_reqs and int(np.where(offsets > 0, last, 0).max()) >= limit:
            raise RuntimeError(
                f"vllm_sink: a position reached the rotary range {limit}; this is a bug"
            )
        if offsets.any():
            # positions[t] += O[row of t], on the device, in vLLM's persistent buffer
            # (slot mappings were computed from the virtual positions just before).
            total = int(num_scheduled_tokens[:num_reqs].sum())
            self.sink_row_offsets.copy_to_gpu(num_reqs)
            rows = self.req_indices.gpu[:total]
            self.positions[:total] += self.sink_row_offsets.gpu[rows]

    def _bookkeeping_sync(self, *args, **kwargs):
        with self.sink_rng.rewound(self.input_batch):
            return super()._bookkeeping_sync(*args, **kwargs)

    # ---- prompt logprobs in absolute coordinates ---------------------------------------
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        if not self.num_prompt_logprobs:  # (then no stream kept its prompt for them)
            return super()._get_prompt_logprobs_dict(hidden_states, num_scheduled_tokens)
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
                if (
                    rs.prompt is not None
                    and rs.visible == rs.prompt_len
                    and req_id not in self.num_prompt_logprobs
                ):
                    rs.prompt = None
