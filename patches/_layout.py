"""The resolved sink settings of an engine, read back from its VllmConfig (any process)."""

from __future__ import annotations

from vllm_sink.config import SinkConfig, SinkLayout


def sink_config(vllm_config) -> SinkConfig | None:
    """The section the frontend resolved into ``additional_config["sink"]``, or None."""
    extra = getattr(vllm_config, "additional_config", None)
    section = extra.get("sink") if isinstance(extra, dict) else None
    if section is None:
        return None
    if "position_limit" not in section:
        raise RuntimeError("additional_config['sink'] was not resolved by the vllm_sink "
                           "frontend hook; is the plugin installed in this process?")
    return SinkConfig.from_section(section)


def sink_layout(vllm_config) -> SinkLayout | None:
    config = sink_config(vllm_config)
    if config is None:
        return None
    return config.resolve(vllm_config.cache_config.block_size, config.position_limit)
