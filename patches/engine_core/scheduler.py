"""EngineCore: the scheduler class sink mode selects through ``scheduler_cls``.

A plain vLLM ``Scheduler`` whose constructor first registers the sink + ring KV policy
(so the KV-cache manager it builds uses ``SinkRingManager``) and afterwards checks that
every KV-cache group really is a sink group: the plugin never runs half-applied.
Scheduling itself is vLLM's: the manager guarantees a running sink request never needs
a new block, so it is never preempted, and admission waits for a free block set.

A sink request adds at most ``policy.max_step_tokens`` tokens per step (the prefill
chunk K once its cache is full): ``_update_after_schedule`` trims larger grants before
vLLM advances the request, which vLLM's long-prefill threshold cannot do alone (it
does not apply while a request is the only one eligible).

It also runs persistent sessions (``SessionStore``) through four small overrides:
``add_request`` (strips client-supplied private arguments), ``_free_request_blocks``
(park instead of free), ``schedule`` (bounds on parked sessions first) and the KV
manager's ``get_computed_blocks`` (a resume is a prefix hit of the parked tokens).
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_sink.config import SinkConfigError
from vllm_sink.patches import _directives
from vllm_sink.patches._layout import sink_config, sink_layout
from vllm_sink.patches.engine_core.kv_policy import (SinkAttentionSpec, SinkRingManager,
                                                     register_kv_policy)
from vllm_sink.patches.engine_core.sessions import SessionStore
from vllm_sink.policy import max_step_tokens
from vllm_sink.stats_board import SESSION_FIELDS, StatsBoard, board_path

logger = logging.getLogger("vllm.vllm_sink")


class SinkScheduler(Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs) -> None:
        self.sink_layout = sink_layout(vllm_config)
        if self.sink_layout is None:
            raise RuntimeError("SinkScheduler needs additional_config['sink']")
        register_kv_policy(vllm_config)
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        groups = kv_cache_config.kv_cache_groups
        bad = [g.layer_names[:1] for g in groups
               if not isinstance(g.kv_cache_spec, SinkAttentionSpec)]
        if not groups or bad:
            raise RuntimeError(f"sink mode: KV-cache groups without the sink policy: {bad}")
        for g in groups:  # vLLM may settle the block size after the frontend resolved it
            if g.kv_cache_spec.block_size != self.sink_layout.block_size:
                raise SinkConfigError(
                    f"vLLM chose KV block size {g.kv_cache_spec.block_size} after sink "
                    f"mode resolved its layout for {self.sink_layout.block_size}; start "
                    f"vLLM with --block-size {g.kv_cache_spec.block_size}.")
        self.sink_blocks_per_request = self.sink_layout.blocks_per_request * len(groups)
        self.sink_sessions = SessionStore(self, sink_config(vllm_config),
                                          self.sink_layout.blocks_per_request)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            assert isinstance(manager, SinkRingManager)
            manager.on_adopt = self.sink_sessions.adopted
        original = self.kv_cache_manager.get_computed_blocks

        def get_computed_blocks(request):
            hit = self.sink_sessions.try_resume(request)
            if hit is None:
                return original(request)
            blocks, length = hit
            return self.kv_cache_manager.create_kv_cache_blocks(blocks), length, 0

        self.kv_cache_manager.get_computed_blocks = get_computed_blocks
        self.sink_board = StatsBoard(board_path(vllm_config.instance_id, "scheduler"),
                                     create=True, fields=SESSION_FIELDS)
        logger.info("vllm_sink: scheduler ready, %d KV blocks in the pool, %d per sink "
                    "request (%d concurrent requests fit)", kv_cache_config.num_blocks,
                    self.sink_blocks_per_request,
                    (kv_cache_config.num_blocks - 1) // self.sink_blocks_per_request)

    def add_request(self, request) -> None:
        params = request.sampling_params
        extra = getattr(params, "extra_args", None) if params is not None else None
        if isinstance(extra, dict) and any(k.startswith(_directives.PRIVATE_ARG_PREFIX)
                                           for k in extra):
            params.extra_args = {k: v for k, v in extra.items()
                                 if not k.startswith(_directives.PRIVATE_ARG_PREFIX)}
        super().add_request(request)

    def _update_after_schedule(self, scheduler_output) -> None:
        self._sink_trim_steps(scheduler_output)
        super()._update_after_schedule(scheduler_output)

    def _sink_trim_steps(self, scheduler_output) -> None:
        """No step may add more tokens than the request's cache can hold while it runs."""
        trimmed = 0
        counts = scheduler_output.num_scheduled_tokens
        for req_id, n in counts.items():
            cap = max_step_tokens(self.sink_layout, self.requests[req_id].num_computed_tokens)
            if n > cap:
                counts[req_id] = cap
                trimmed += n - cap
        scheduler_output.total_num_scheduled_tokens -= trimmed

    def _free_request_blocks(self, request) -> None:
        if not self.sink_sessions.on_finish(request):
            super()._free_request_blocks(request)

    def schedule(self, *args, **kwargs):
        self.sink_sessions.before_schedule()
        output = super().schedule(*args, **kwargs)
        pool = self.kv_cache_manager.block_pool
        self.sink_board.write({**self.sink_sessions.stats(),
                               "running_requests": len(self.running),
                               "pool_blocks_in_use": pool.num_gpu_blocks - 1
                               - pool.get_num_free_blocks()})
        return output

    def shutdown(self) -> None:
        self.sink_board.unlink()
        super().shutdown()
