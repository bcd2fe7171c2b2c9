"""Worker: the worker class sink mode selects through ``worker_cls``.

``SinkCPUWorker`` is vLLM's ``CPUWorker`` with two differences, both at startup:

* its private copy of the config has ``max_model_len`` = C + B (one block of headroom
  over the capacity; a row needs at most C + 1 slots) instead of the ~1e9-token stream
  cap the scheduler uses, so every worker buffer is sized by the capacity;
* its model runner is vLLM's ``CPUModelRunner`` with ``SinkRunnerMixin`` mixed in (the
  runner is built by vLLM and then re-classed, so nothing of vLLM's is copied).

Rank 0 also publishes the sink counters on a ``StatsBoard`` for the frontend's /metrics.
"""

from __future__ import annotations

import copy

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_sink.patches._layout import sink_layout
from vllm_sink.patches.worker.model_runner import SinkRunnerMixin
from vllm_sink.stats_board import StatsBoard, board_path


class SinkCPUModelRunner(SinkRunnerMixin, CPUModelRunner):
    pass


class SinkCPUWorker(CPUWorker):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        layout = sink_layout(vllm_config)
        if layout is None:
            raise RuntimeError("SinkCPUWorker needs additional_config['sink']")
        vllm_config = copy.deepcopy(vllm_config)  # never shrink the scheduler's copy
        vllm_config.model_config.max_model_len = layout.capacity + layout.block_size
        self.sink_layout = layout
        super().__init__(vllm_config, *args, **kwargs)

    def init_device(self) -> None:
        self.use_v2_model_runner = False  # virtual rows live in the V1 input batch
        super().init_device()
        runner = self.model_runner
        if type(runner) is not CPUModelRunner:
            raise RuntimeError(f"sink mode expects vLLM's CPUModelRunner, got "
                               f"{type(runner).__name__}")
        runner.__class__ = SinkCPUModelRunner
        runner.sink_init(self.sink_layout)
        if self.rank == 0:  # counters for the frontend's /metrics (same host)
            layout = self.sink_layout
            runner.sink_board = StatsBoard(board_path(self.vllm_config.instance_id),
                                           create=True)
            runner.sink_board.write({
                "sink_tokens": layout.sink_tokens, "window_tokens": layout.window_tokens,
                "capacity": layout.capacity, "block_size": layout.block_size,
                "position_limit": layout.position_limit})

    def shutdown(self) -> None:
        board = getattr(getattr(self, "model_runner", None), "sink_board", None)
        if board is not None:
            board.unlink()
        super().shutdown()

    def sink_stats(self) -> dict[str, int]:
        """Counters for tests and tools: ``llm.collective_rpc("sink_stats")``."""
        return self.model_runner.sink_stats()
