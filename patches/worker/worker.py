"""Worker: what the sink workers (CPU and CUDA) add to vLLM's, shared by both.

``SinkWorkerMixin`` goes in front of vLLM's worker class (``CPUWorker`` or the CUDA
``Worker``, see ``cpu_worker.py`` / ``gpu_worker.py``). Two differences, both at startup:

* the worker's private copy of the config has ``max_model_len`` = the larger of a dense
  request's bound (the model's context) and a stream's row (span + B: a row needs at
  most span + 1 slots, span = C - 1 + prefill chunk), instead of the ~1e9-token stream
  cap the scheduler uses, so every worker buffer is sized as for vanilla vLLM;
* its model runner is vLLM's V1 runner with ``SinkRunnerMixin`` mixed in (nothing of
  vLLM's is copied).

Rank 0 also publishes the sink counters on a ``StatsBoard`` for the frontend's /metrics.
"""

from __future__ import annotations

import copy

from vllm_sink.patches._layout import engine_sink
from vllm_sink.core.stats_board import StatsBoard, board_path


class SinkWorkerMixin:
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        sink = engine_sink(vllm_config)
        if sink is None:
            raise RuntimeError(f"{type(self).__name__} needs additional_config['sink']")
        layout = sink.layout
        vllm_config = copy.deepcopy(vllm_config)  # never shrink the scheduler's copy
        vllm_config.model_config.max_model_len = max(sink.dense_max_model_len,
                                                     layout.span + layout.block_size)
        self.sink = sink
        super().__init__(vllm_config, *args, **kwargs)
        self.use_v2_model_runner = False  # virtual rows live in the V1 input batch

    def _sink_start_runner(self, runner) -> None:
        """Called once the runner exists: its sink state, and rank 0's counter board."""
        runner.sink_init(self.sink)
        if self.rank == 0:  # counters for the frontend's /metrics (same host)
            layout = self.sink.layout
            runner.sink_board = StatsBoard(board_path("worker"),
                                           create=True)
            runner.sink_board.write({
                "sink_tokens": layout.sink_tokens, "window_tokens": layout.window_tokens,
                "capacity": layout.capacity, "block_size": layout.block_size,
                "position_limit": layout.position_limit,
                "prefill_chunk_tokens": layout.chunk_tokens,
                "blocks_per_request": layout.blocks_per_request})

    def shutdown(self) -> None:
        board = getattr(getattr(self, "model_runner", None), "sink_board", None)
        if board is not None:
            board.unlink()
        super().shutdown()

    def sink_stats(self) -> dict[str, int]:
        """Counters for tests and tools: ``llm.collective_rpc("sink_stats")``."""
        return self.model_runner.sink_stats()

    def sink_trace(self) -> list[list[int]]:
        """The runner's per-step records since the last call (then cleared): [start of
        the step (perf_counter ns), requests and tokens scheduled, evictions, rebases,
        host ns spent in the plugin's own code, of which in the batched key ops]."""
        trace = list(self.model_runner.sink_trace)
        self.model_runner.sink_trace.clear()
        return trace
