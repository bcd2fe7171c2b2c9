"""vllm_sink: StreamingLLM for vLLM: endless requests with constant KV memory.

Enable it per engine with ``additional_config={"sink": {...}}`` (``LLM(...)``) or
``--additional-config '{"sink": {...}}'`` (``vllm serve``). Without a ``"sink"``
section the plugin leaves vLLM exactly as it is.
"""

from vllm_sink._version import __version__
from vllm_sink.config import SinkConfig, SinkConfigError, SinkLayout
from vllm_sink.model import default_model, model_variant

__all__ = [
    "__version__",
    "SinkConfig",
    "SinkConfigError",
    "SinkLayout",
    "default_model",
    "model_variant",
    "register",
]


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins``), run in every process.

    Idempotent. On an unsupported vLLM version it logs one line and does nothing.
    Otherwise it installs a single pass-through hook on engine-config creation that
    acts only when ``additional_config`` has a ``"sink"`` section; everything else
    the plugin does is reached from there (see patches/README.md).
    """
    from vllm_sink.patches import register_plugin

    register_plugin()
