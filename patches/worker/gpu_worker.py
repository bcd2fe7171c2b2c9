"""Worker (CUDA): the worker class sink mode selects through ``worker_cls`` on vLLM's CUDA
backend. vLLM's ``Worker`` builds its runner in ``_make_model_runner`` ("subclasses
override this"): the sink worker builds vLLM's V1 ``GPUModelRunner`` with
``SinkRunnerMixin`` in front. The frontend has already selected the V1 runner
(``VLLM_USE_V2_MODEL_RUNNER=0``) for every process."""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_sink.patches._patching import Target
from vllm_sink.patches.worker.model_runner import SinkRunnerMixin
from vllm_sink.patches.worker.worker import SinkWorkerMixin

TARGETS = [
    Target("vllm.v1.worker.gpu_worker:Worker._make_model_runner", "(self)"),
    Target("vllm.v1.worker.gpu_worker:Worker.vllm_config", None),
    Target("vllm.v1.worker.gpu_worker:Worker.device", None),
    Target(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__", "(self, vllm_config, device)"
    ),
]


class SinkGPUModelRunner(SinkRunnerMixin, GPUModelRunner):
    pass


class SinkGPUWorker(SinkWorkerMixin, Worker):
    def _make_model_runner(self) -> GPUModelRunner:
        if self.vllm_config.use_v2_model_runner:
            raise RuntimeError(
                "sink mode needs vLLM's V1 model runner; unset "
                "VLLM_USE_V2_MODEL_RUNNER (the plugin sets it to 0)"
            )
        runner = SinkGPUModelRunner(self.vllm_config, self.device)
        self._sink_start_runner(runner)
        return runner
