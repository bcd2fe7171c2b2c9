"""Worker: what the sink workers (CPU and CUDA) add to vLLM's, shared by both.

``SinkWorkerMixin`` goes in front of vLLM's worker class (``CPUWorker`` or the CUDA
``Worker``, see ``cpu_worker.py`` / ``gpu_worker.py``). Two differences, both at startup:

* the worker's private copy of the config has ``max_model_len`` = the larger of a dense
  request's bound (the model's context) and a stream's row (span + B: a row needs at
  most span + 1 slots, span = C - 1 + prefill chunk), instead of the ~1e9-token stream
  cap the scheduler uses, so every worker buffer is sized as for vanilla vLLM;
* its model runner is vLLM's V1 runner with ``SinkRunnerMixin`` mixed in (nothing of
  vLLM's is copied);
* the device memory the plugin holds outside the KV pool (sink-key snapshots, rotation
  scratch: ``SinkRunnerMixin.sink_memory_reserve``) is taken from what vLLM's memory
  profile leaves for the KV cache, so the pool vLLM sizes and the plugin fit together
  in the budget (``gpu_memory_utilization``). An explicit KV size
  (``kv_cache_memory_bytes``) is the pool's size as in vLLM; the reserve then comes on
  top of it and is logged.

Rank 0 also publishes the sink counters on a ``StatsBoard`` for the frontend's /metrics.
"""

from __future__ import annotations

import copy
import logging

from vllm_sink.core.config import SinkConfigError
from vllm_sink.core.stats_board import StatsBoard, board_path
from vllm_sink.patches._layout import engine_sink
from vllm_sink.patches._patching import Target

logger = logging.getLogger("vllm.vllm_sink")

# What the mixin overrides (each delegating) or reads in vLLM's workers, as it expects
# it in every release each worker runs on.
_CUDA = "vllm.v1.worker.gpu_worker:Worker"
_CPU = "vllm.v1.worker.cpu_worker:CPUWorker"
_INIT = "(self, vllm_config, local_rank, rank, distributed_init_method, is_driver_worker=False)"
TARGETS = [
    Target(f"{worker}.{name}", signature, releases)
    for worker, releases in ((_CUDA, ("0.32.0", "0.33.0")), (_CPU, ("0.32.0",)))
    for name, signature in {
        "__init__": _INIT,
        "determine_available_memory": "(self)",
        "shutdown": "(self)",
        "rank": None,
        "cache_config": None,
        "model_runner": None,
        "use_v2_model_runner": None,
    }.items()
]


class SinkWorkerMixin:
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        sink = engine_sink(vllm_config)
        if sink is None:
            raise RuntimeError(f"{type(self).__name__} needs additional_config['sink']")
        layout = sink.layout
        vllm_config = copy.deepcopy(vllm_config)  # never shrink the scheduler's copy
        vllm_config.model_config.max_model_len = max(
            sink.dense_max_model_len, layout.span + layout.block_size
        )
        self.sink = sink
        super().__init__(vllm_config, *args, **kwargs)
        self.use_v2_model_runner = False  # virtual rows live in the V1 input batch

    def _sink_start_runner(self, runner) -> None:
        """Called once the runner exists: its sink state, and rank 0's counter board."""
        runner.sink_init(self.sink)
        if self.rank == 0:  # counters for the frontend's /metrics (same host)
            layout = self.sink.layout
            runner.sink_board = StatsBoard(board_path("worker"), create=True)
            runner.sink_board.write(
                {
                    "sink_tokens": layout.sink_tokens,
                    "window_tokens": layout.window_tokens,
                    "capacity": layout.capacity,
                    "block_size": layout.block_size,
                    "position_limit": layout.position_limit,
                    "prefill_chunk_tokens": layout.chunk_tokens,
                    "blocks_per_request": layout.blocks_per_request,
                }
            )

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        reserve = self.model_runner.sink_memory_reserve()
        gib = 1 << 30
        if self.cache_config.kv_cache_memory_bytes:
            logger.info(
                "vllm_sink: %.2f GiB of sink-key snapshots and rotation scratch "
                "at most, on top of the KV pool (kv_cache_memory_bytes)",
                reserve / gib,
            )
            return available
        if reserve >= available:
            raise SinkConfigError(
                f"The plugin needs up to {reserve / gib:.2f} GiB outside the KV pool (sink-"
                "key snapshots of max_num_seqs + max_parked_sessions streams at "
                f"{self.sink.max_sink_tokens} sink tokens, and rotation scratch), more "
                f"than the {available / gib:.2f} GiB vLLM's profile left for the KV cache. "
                "Lower --max-num-seqs, max_parked_sessions or max_request_sink_tokens, or "
                "raise --gpu-memory-utilization."
            )
        logger.info(
            "vllm_sink: %.2f GiB of the %.2f GiB left for the KV cache reserved "
            "for sink-key snapshots and rotation scratch",
            reserve / gib,
            available / gib,
        )
        return available - reserve

    def shutdown(self) -> None:
        board = getattr(getattr(self, "model_runner", None), "sink_board", None)
        if board is not None:
            board.unlink()
        super().shutdown()

    def sink_stats(self) -> dict[str, int]:
        """Counters for tests and tools: ``llm.collective_rpc("sink_stats")``."""
        return self.model_runner.sink_stats()

    def sink_memory(self) -> dict[str, int]:
        """Device memory figures for tools (``llm.collective_rpc("sink_memory")``): the
        plugin's reserve, what its snapshots hold now, the allocator's peak since
        start, the KV pool, and the budget vLLM planned (gpu_memory_utilization)."""
        import torch

        runner = self.model_runner
        out = {
            "reserve": runner.sink_memory_reserve(),
            "snapshots_now": runner.sink_snapshot_bytes(),
            "kv_cache_bytes": sum(
                t.numel() * t.element_size() for t in {id(t): t for t in runner.kv_caches}.values()
            ),
            "gpu_memory_utilization_budget": 0,
            "max_reserved": 0,
            "total": 0,
        }
        if runner.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(runner.device)
            out.update(
                max_reserved=torch.cuda.max_memory_reserved(runner.device),
                max_allocated=torch.cuda.max_memory_allocated(runner.device),
                free=free,
                total=total,
                gpu_memory_utilization_budget=int(self.cache_config.gpu_memory_utilization * total),
            )
        return out

    def sink_trace(self) -> list[dict]:
        """The runner's per-step records since the last call (then cleared), as dicts:
        ``vllm_sink.core.trace.records`` reads them back as ``StepRecord``s."""
        trace = [r.to_dict() for r in self.model_runner.sink_trace]
        self.model_runner.sink_trace.clear()
        return trace
