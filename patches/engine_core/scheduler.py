"""EngineCore: the scheduler classes sink mode selects through ``scheduler_cls``.

``SinkSchedulerMixin`` over vLLM's own scheduler, the one vLLM itself would pick:
``SinkScheduler`` (over ``Scheduler``) without async scheduling, ``SinkAsyncScheduler``
(over ``AsyncScheduler``) with it (vLLM's CUDA default: the next step is scheduled
while the current one runs). The frontend picks the class once vLLM has settled
``async_scheduling`` (``frontend/engine_args.py``). The constructor first registers the
sink KV policy (so the KV-cache manager it builds uses ``SinkRingManager``) and
afterwards checks that every KV-cache group really is a sink group: the plugin never
runs half-applied. Scheduling is vLLM's; these overrides, each delegating, add what
streams need:

``add_request``          which layout the request has (``vllm_sink.core.requests``; dense
                         requests get none), strips client-supplied private arguments;
                         streams are never hashed for prefix caching; a dense request
                         is bounded by the model's context like vanilla vLLM
``_update_after_schedule``  a stream's step never crosses the end of the prompt chunk
                         it is in (``policy.max_step_tokens``: chunks on a grid fixed by
                         the request, so what each token attends to never depends on
                         the engine's load): larger grants are trimmed before vLLM
                         advances the request
``_preempt_request``     a preempted stream keeps its computed count: the workers save
                         its cached KV before the blocks are reused and restore it on
                         resume, so nothing is recomputed (vLLM would recompute the
                         whole history, possibly millions of tokens); a save that does
                         not fit the host budget (``SavedKV``) finishes the stream
                         with finish_reason "error" at once
``update_from_output``   emits the final output of the streams finished that way
``reset_prefix_cache``   drops every parked session and finishes the preempted streams
                         whose saved KV the reset invalidates (finish_reason "error":
                         after a weight update their history cannot be recomputed)
``_free_request_blocks`` / ``_free_blocks`` / ``schedule``, and the KV-cache manager's
``get_computed_blocks`` / ``allocate_slots`` (``kv_manager``)
                         persistent sessions (``SessionStore``): park instead of free,
                         expiry, a resume is a prefix hit, and parked sessions yield
                         their blocks whenever an allocation for a running or waiting
                         request fails

Async scheduling needs nothing more here: every count above is the scheduler's own
(advanced when a step is scheduled, as vLLM does), the workers run steps in order, and
a preempted stream's in-flight output arrives as vLLM's "stale" output, appended to
the request without touching its (kept) computed count. A session parks what the
scheduler counted as computed: with async scheduling that may include the step that
fed the final token, which then ran on the workers before the park reaches them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from vllm_sink.core.config import SinkConfigError
from vllm_sink.core.policy import max_step_tokens
from vllm_sink.core.stats_board import SESSION_FIELDS, StatsBoard, board_path
from vllm_sink.patches import _directives
from vllm_sink.patches._layout import engine_sink
from vllm_sink.patches._patching import Target
from vllm_sink.patches.engine_core.kv_manager import wrap_kv_cache_manager
from vllm_sink.patches.engine_core.kv_policy import (
    SinkAttentionSpec,
    SinkRingManager,
    register_kv_policy,
)
from vllm_sink.patches.engine_core.saved_kv import SavedKV
from vllm_sink.patches.engine_core.sessions import SessionStore

logger = logging.getLogger("vllm.vllm_sink")

# The Scheduler methods the mixin overrides (each delegating) or calls, as it expects
# them in every supported release; AsyncScheduler inherits all but one of them.
_SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
TARGETS = (
    [
        Target(f"{_SCHEDULER}.{name}", signature)
        for name, signature in {
            "__init__": "(self, vllm_config, kv_cache_config, structured_output_manager, "
            "block_size, hash_block_size=None, mm_registry=MULTIMODAL_REGISTRY, "
            "include_finished_set=False, log_stats=False)",
            "add_request": "(self, request)",
            "_update_after_schedule": "(self, scheduler_output)",
            "_preempt_request": "(self, request, timestamp, drop_stale_output=False)",
            "update_from_output": "(self, scheduler_output, model_runner_output)",
            "reset_prefix_cache": "(self, reset_running_requests=False, reset_connector=False)",
            "_free_request_blocks": "(self, request)",
            "_free_blocks": "(self, request)",
            "schedule": "(self, throttle_prefills=False)",
            "shutdown": "(self)",
            "finish_requests": "(self, request_ids, finished_status)",
        }.items()
    ]
    + [
        Target(
            "vllm.v1.core.sched.async_scheduler:AsyncScheduler._update_after_schedule",
            "(self, scheduler_output)",
        )
    ]
    + [  # the fields of the final output the mixin builds for the streams it failed
        Target(f"vllm.v1.engine:EngineCoreOutput.{field}", None)
        for field in ("request_id", "new_token_ids", "finish_reason", "events", "trace_headers")
    ]
)

# While steps run, the scheduler board is refreshed whenever the running, waiting or
# parked sets change size, and otherwise at least this often (a refresh is O(running)).
BOARD_PERIOD_S = 0.05


class SinkSchedulerMixin:
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs) -> None:
        self.sink = engine_sink(vllm_config)
        if self.sink is None:
            raise RuntimeError(f"{type(self).__name__} needs additional_config['sink']")
        register_kv_policy(vllm_config)
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        groups = kv_cache_config.kv_cache_groups
        bad = [
            g.layer_names[:1] for g in groups if not isinstance(g.kv_cache_spec, SinkAttentionSpec)
        ]
        if not groups or bad:
            raise RuntimeError(f"sink mode: KV-cache groups without the sink policy: {bad}")
        B = self.sink.layout.block_size
        for g in groups:  # vLLM may settle the block size after the frontend resolved it
            if g.kv_cache_spec.block_size != B:
                raise SinkConfigError(
                    f"vLLM chose KV block size {g.kv_cache_spec.block_size} after sink "
                    f"mode resolved its layout for {B}; start vLLM with "
                    f"--block-size {g.kv_cache_spec.block_size}."
                )
        self.sink_layouts: dict = {}  # request id -> layout, for streams only
        # Stream -> (its first token: 0, or a resumed session's length; prompt end):
        # the request's chunk grid (vllm_sink.core.policy), set at admission.
        self.sink_grids: dict[str, tuple[int, int]] = {}
        self.sink_restoring: dict[str, int] = {}  # preempted stream -> blocks it held
        self.sink_counts: Counter = Counter()
        self.sink_sessions = SessionStore(self, self.sink)
        self.sink_saved = SavedKV.for_engine(
            vllm_config, kv_cache_config, self.sink.config.max_saved_kv_gib
        )
        self._sink_failed: list = []  # finished with an error; output not yet emitted
        self._sink_resetting: list | None = None  # streams a running reset preempted
        for manager in self._sink_managers:
            assert isinstance(manager, SinkRingManager)
            manager.bind(
                self.sink_layouts, self.sink_restoring, self.sink_sessions.adopted, self.sink_grids
            )
        wrap_kv_cache_manager(self)
        self.sink_board = StatsBoard(board_path("scheduler"), create=True, fields=SESSION_FIELDS)
        self._sink_board_shape: tuple[int, ...] | None = None
        self._sink_board_at = 0.0
        per = self.sink.layout.blocks_per_request * len(groups)
        logger.info(
            "vllm_sink: scheduler ready, %d KV blocks in the pool; a stream takes "
            "up to %d as it grows (%d full streams fit); requests are %s unless "
            "they say otherwise",
            kv_cache_config.num_blocks,
            per,
            (kv_cache_config.num_blocks - 1) // per,
            "dense" if self.sink.default_is_dense else "streams",
        )

    @property
    def _sink_managers(self):
        return self.kv_cache_manager.coordinator.single_type_managers

    def add_request(self, request) -> None:
        params = request.sampling_params
        extra = getattr(params, "extra_args", None) if params is not None else None
        if isinstance(extra, dict) and any(
            k.startswith(_directives.PRIVATE_ARG_PREFIX) for k in extra
        ):
            params.extra_args = extra = {
                k: v for k, v in extra.items() if not k.startswith(_directives.PRIVATE_ARG_PREFIX)
            }
        layout = self.sink.layout_for(extra) if params is not None else None
        if layout is not None:
            self.sink_layouts[request.request_id] = layout
            request._block_hasher = None  # ring blocks are never prefix-cached
            request.block_hashes = []
            self.sink_counts["requests_sink"] += 1
        else:
            # Dense: vanilla vLLM's bound (the frontend refused longer prompts and
            # clamped max_tokens; this is the backstop for direct engine clients).
            pool = (
                self.kv_cache_manager.block_pool.num_gpu_blocks - 1
            ) * self.sink.layout.block_size
            room = min(self.sink.dense_max_model_len, pool) - request.num_prompt_tokens
            if params is not None and (request.max_tokens or 0) > room:
                request.max_tokens = max(room, 0)
            self.sink_counts["requests_dense"] += 1
        super().add_request(request)

    def _update_after_schedule(self, scheduler_output) -> None:
        self._sink_trim_steps(scheduler_output)
        if self.sink_saved.held:
            # Resumed streams get their KV copied back in this step: budget returned.
            for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
                self.sink_saved.release(req_id)
        super()._update_after_schedule(scheduler_output)

    def _sink_trim_steps(self, scheduler_output) -> None:
        """No step may add more tokens than a stream's cache can hold while it runs."""
        counts = scheduler_output.num_scheduled_tokens
        if scheduler_output.total_num_scheduled_tokens == len(counts):
            return  # one token per request: every stream has room for one (K >= 1)
        trimmed = 0
        for req_id, n in counts.items():
            layout = self.sink_layouts.get(req_id)
            if layout is None:
                continue
            request = self.requests[req_id]
            start, prompt_end = self.sink_grids.get(req_id, (0, request.num_prompt_tokens))
            cap = max_step_tokens(layout, request.num_computed_tokens, start, prompt_end)
            if n > cap:
                counts[req_id] = cap
                trimmed += n - cap
        scheduler_output.total_num_scheduled_tokens -= trimmed

    def _preempt_request(self, request, timestamp, *args, **kwargs) -> None:
        req_id = request.request_id
        computed = request.num_computed_tokens
        held = len(self._sink_managers[0].req_to_blocks.get(req_id, ()))
        super()._preempt_request(request, timestamp, *args, **kwargs)
        if req_id not in self.sink_layouts:
            self.sink_counts["preempted_dense"] += 1
            return
        self.sink_counts["preempted_sink"] += 1
        if self._sink_resetting is not None:
            if held:  # its KV predates the reset: lost, not saved
                self._sink_resetting.append(request)
            return
        # Its saved KV, plus the pristine sink-key snapshot the workers move to host
        # beside it (keys only: at most the bytes of its sink blocks).
        if held and not self.sink_saved.reserve(
            req_id, held + self.sink_layouts[req_id].sink_blocks
        ):
            # No host room for its KV: the stream cannot continue. Finished now (it is
            # in this step's preempted and finished sets: the workers drop its state
            # instead of saving it), before any later step could resume it.
            self.sink_counts["kv_saves_refused"] += 1
            self._sink_fail([request])
            return
        # Its cached KV survives on the workers (saved before the blocks are reused,
        # restored into as many new ones): resume where it was, recomputing nothing.
        request.num_computed_tokens = computed
        self.sink_restoring[req_id] = held

    def _sink_fail(self, requests) -> None:
        """Finish streams that cannot continue with FINISHED_ERROR, as vLLM finishes
        its own error requests; their final outputs go out with the next
        ``update_from_output``."""
        if requests:
            self._sink_failed += self.finish_requests(
                [r.request_id for r in requests], RequestStatus.FINISHED_ERROR
            )

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._sink_failed:
            from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

            failed, self._sink_failed = self._sink_failed, []
            for request in failed:
                eco = outputs.get(request.client_index)
                if eco is None:
                    eco = outputs[request.client_index] = EngineCoreOutputs()
                eco.outputs.append(
                    EngineCoreOutput(
                        request_id=request.request_id,
                        new_token_ids=[],
                        finish_reason=request.get_finished_reason(),
                        events=request.take_events(),
                        trace_headers=request.trace_headers,
                    )
                )
        return outputs

    def reset_prefix_cache(
        self, reset_running_requests: bool = False, reset_connector: bool = False
    ) -> bool:
        """Parked KV and saved KV were computed with the weights before the reset
        (usually a weight update): parked sessions are dropped (their next turns run
        fresh), and once the reset succeeded, preempted streams whose KV was saved
        are finished with an error (their history cannot be recomputed), those the
        reset itself preempts (``reset_running_requests``) included."""
        self.sink_sessions.drop_all("parked_reset")
        self._sink_resetting = lost = []
        ok = False
        try:
            ok = super().reset_prefix_cache(reset_running_requests, reset_connector)
        finally:  # (streams the reset preempted were not saved: lost even if it raised)
            self._sink_resetting = None
            if ok:
                lost += [self.requests[r] for r in self.sink_saved if r in self.requests]
            self.sink_counts["streams_lost_reset"] += len(lost)
            self._sink_fail(lost)
        return ok

    def _free_request_blocks(self, request) -> None:
        # Finished streams may park (a preempted one is not finished: vLLM frees it).
        if (
            request.request_id not in self.sink_layouts
            or not request.is_finished()
            or not self.sink_sessions.on_finish(request)
        ):
            super()._free_request_blocks(request)

    def _free_blocks(self, request) -> None:
        super()._free_blocks(request)
        self.sink_layouts.pop(request.request_id, None)
        self.sink_grids.pop(request.request_id, None)
        self.sink_restoring.pop(request.request_id, None)
        if self.sink_saved.held:
            self.sink_saved.release(request.request_id)

    def schedule(self, *args, **kwargs):
        self.sink_sessions.expire()
        output = super().schedule(*args, **kwargs)
        self._sink_publish()
        return output

    def _sink_publish(self) -> None:
        """Write the board (one consistent snapshot) when the request sets changed size,
        else at most every BOARD_PERIOD_S: block counts a scrape reads are that fresh."""
        now = time.monotonic()
        shape = (
            len(self.running),
            len(self.waiting),
            len(self.sink_sessions),
            self.sink_saved.total,
        )
        if shape != self._sink_board_shape or now - self._sink_board_at >= BOARD_PERIOD_S:
            self.sink_board.write(self.sink_stats())
            self._sink_board_shape, self._sink_board_at = shape, now

    def sink_stats(self) -> dict[str, int]:
        """The scheduler board: pool, running requests by kind, sessions (O(running))."""
        pool = self.kv_cache_manager.block_pool
        held = self._sink_managers[0].req_to_blocks
        groups = len(self._sink_managers)
        running_sink = blocks_sink = blocks_dense = 0
        for request in self.running:
            n = len(held.get(request.request_id, ())) * groups
            if request.request_id in self.sink_layouts:
                running_sink += 1
                blocks_sink += n
            else:
                blocks_dense += n
        return {
            **self.sink_sessions.stats(),
            **self.sink_counts,
            "running_requests": len(self.running),
            "running_sink": running_sink,
            "running_dense": len(self.running) - running_sink,
            "blocks_sink": blocks_sink,
            "blocks_dense": blocks_dense,
            "pool_blocks_in_use": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),
            "kv_saved_bytes": self.sink_saved.total,
            "kv_saved_cap_bytes": self.sink_saved.cap,
        }

    def shutdown(self) -> None:
        self.sink_board.unlink()
        super().shutdown()


class SinkScheduler(SinkSchedulerMixin, Scheduler):
    """Sink mode without async scheduling (vLLM's ``Scheduler``)."""


class SinkAsyncScheduler(SinkSchedulerMixin, AsyncScheduler):
    """Sink mode with async scheduling (vLLM's ``AsyncScheduler``)."""
