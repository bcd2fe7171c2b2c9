"""Worker (CPU): the worker class sink mode selects through ``worker_cls`` on vLLM's CPU
backend. ``CPUWorker`` builds its runner inside ``init_device``; the freshly built
``CPUModelRunner`` is re-classed to include ``SinkRunnerMixin`` (nothing copied)."""

from __future__ import annotations

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_sink.patches.worker.model_runner import SinkRunnerMixin
from vllm_sink.patches.worker.worker import SinkWorkerMixin


class SinkCPUModelRunner(SinkRunnerMixin, CPUModelRunner):
    pass


class SinkCPUWorker(SinkWorkerMixin, CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        runner = self.model_runner
        if type(runner) is not CPUModelRunner:
            raise RuntimeError(
                f"sink mode expects vLLM's CPUModelRunner, got {type(runner).__name__}"
            )
        runner.__class__ = SinkCPUModelRunner
        self._sink_start_runner(runner)
