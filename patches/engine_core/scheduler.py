"""EngineCore: the scheduler class sink mode selects through ``scheduler_cls``.

A plain vLLM ``Scheduler`` whose constructor first registers the sink + ring KV policy
(so the KV-cache manager it builds uses ``SinkRingManager``) and afterwards checks that
every KV-cache group really is a sink group: the plugin never runs half-applied.
Scheduling itself is vLLM's: the manager guarantees a running sink request never needs
a new block, so it is never preempted, and admission waits for a free block set.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_sink.patches._layout import sink_layout
from vllm_sink.patches.engine_core.kv_policy import SinkAttentionSpec, register_kv_policy

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
        self.sink_blocks_per_request = self.sink_layout.blocks_per_request * len(groups)
        logger.info("vllm_sink: scheduler ready, %d KV blocks in the pool, %d per sink "
                    "request (%d concurrent requests fit)", kv_cache_config.num_blocks,
                    self.sink_blocks_per_request,
                    (kv_cache_config.num_blocks - 1) // self.sink_blocks_per_request)
