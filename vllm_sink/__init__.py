"""vllm_sink: StreamingLLM for vLLM: endless requests with constant KV memory.

Enable it per engine with ``additional_config={"sink": {...}}`` (``LLM(...)``) or
``--additional-config '{"sink": {...}}'`` (``vllm serve``). Without a ``"sink"``
section the plugin leaves vLLM exactly as it is.
"""

import os as _os

# ``vllm_sink.patches`` is the top-level ``patches/`` folder of a source checkout, mapped
# by setup.cfg when installed. When this package is imported straight from a checkout
# (tests run from the repository root next to a non-editable install), let the
# checkout's root stand in for that mapping.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "patches")) and _os.path.isfile(
    _os.path.join(_root, "patches", "__init__.py")
):
    __path__.append(_root)

from vllm_sink._version import __version__  # noqa: E402
from vllm_sink.core.config import SinkConfig, SinkConfigError, SinkLayout  # noqa: E402
from vllm_sink.tools.model import default_model, model_variant  # noqa: E402

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
