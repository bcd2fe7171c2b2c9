"""The resolved sink settings of an engine, read back from its VllmConfig (any process)."""

from __future__ import annotations

from vllm_sink.core.requests import EngineSink


def sink_section(vllm_config) -> dict | None:
    """The section the frontend resolved into ``additional_config["sink"]``, or None."""
    extra = getattr(vllm_config, "additional_config", None)
    section = extra.get("sink") if isinstance(extra, dict) else None
    if section is None:
        return None
    if "position_limit" not in section:
        raise RuntimeError(
            "additional_config['sink'] was not resolved by the vllm_sink "
            "frontend hook; is the plugin installed in this process?"
        )
    return section


def engine_sink(vllm_config) -> EngineSink | None:
    """Default and maximum layout of the engine's requests, and the dense bound."""
    section = sink_section(vllm_config)
    if section is None:
        return None
    return EngineSink.from_section(section, vllm_config.cache_config.block_size)
