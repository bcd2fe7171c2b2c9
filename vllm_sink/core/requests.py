"""Which requests of an engine are endless streams, and with what layout. Pure Python.

The engine's ``"sink"`` section is every request's default and maximum. A request may
bring its own ``"sink"`` field (``SamplingParams.extra_args["sink"]`` offline; on the
OpenAI server a top-level ``"sink"`` body field or ``vllm_xargs``)::

    absent, null                    the engine's "default": a stream with the engine's
                                    layout ("sink", the default) or dense ("dense")
    false, "dense"                  plain dense attention: vanilla vLLM, bounded by the
                                    model's context length, prefix caching as vLLM does
    true, "sink", {}                a stream with the engine's layout
    {"window_tokens": 1024, ...}    a stream with its own sink_tokens / window_tokens /
                                    prefill_chunk_tokens / pin / pin_prompt_tokens
                                    (unset keys: the engine's), holding at most as many
                                    KV blocks as the engine's layout does
    a JSON string of any of these   (vllm_xargs values are strings or numbers)

Every process (frontend, scheduler, workers) resolves the same field the same way from
the engine's resolved section and the KV block size; the frontend refuses a bad field
with an error naming it, so the others only ever see valid ones. Resolved layouts are
cached by the field's parsed numbers (never by its spelling: every client-chosen
spelling of one layout is one entry), at most ``MAX_CACHED`` of them, least recently
used dropped first.

Pinning (``pin_prompt_tokens: N``, or ``pin: "system"``, which the OpenAI chat endpoint
turns into the number of tokens its chat template renders before the first non-system
message, ``patches/frontend/chat_pin.py``) keeps the first N tokens forever: the sink
region grows to cover them and, unless the request sets its own ``window_tokens``, the
blocks it gains come out of the window (``config.pinned_region``), so the stream holds
the same KV blocks as without. An engine's ``pin`` / ``pin_prompt_tokens`` are its
requests' defaults; a request's ``"pin": "none"`` opts out.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_sink.core.config import (
    ENGINE,
    REQUEST_KEYS,
    RESOLVED,
    SinkConfig,
    SinkConfigError,
    SinkLayout,
    parse_keys,
    pinned_region,
    show,
)

FIELD = "sink"
WHERE = 'request field "sink"'
_DENSE, _STREAM = ("dense", False), ("sink", True)
MAX_CACHED = 256  # resolved layouts kept per engine (each a few hundred bytes)
MAX_TEXT = 4096  # longest JSON-string form of the field (a layout needs ~100)
ABSENT = object()  # a request without a "sink" field


@dataclass
class EngineSink:
    """An engine's resolved sink settings: default and maximum of its requests."""

    config: SinkConfig
    layout: SinkLayout
    dense_max_model_len: int  # context bound of dense requests (vanilla's max_model_len)

    def __post_init__(self) -> None:
        # (sinks, window rounded up to blocks, prefill_chunk_tokens or None) -> layout
        self._cache: OrderedDict[tuple, SinkLayout] = OrderedDict()
        # Most sink tokens one request may hold (each stream keeps a device snapshot of
        # its sink keys; the workers reserve memory for this many, model_runner.py).
        self.max_sink_tokens = self.config.request_sink_limit(self.layout)
        # A stream without its own layout keys: the engine's layout, pinned by the
        # engine's pin_prompt_tokens if it sets one (checked here, at startup).
        self.default_layout = self.layout
        if self.config.pin_prompt_tokens:
            self.default_layout = self._layout({}, f'{ENGINE}["pin_prompt_tokens"]')

    @classmethod
    def from_section(cls, section: Mapping, block_size: int) -> EngineSink:
        config = SinkConfig.from_section(section)
        resolved = section.get(RESOLVED) or {}
        layout = config.resolve(block_size, config.position_limit or 2**62)
        dense = int(resolved.get("dense_max_model_len", layout.position_limit))
        return cls(config, layout, dense)

    @property
    def default_is_dense(self) -> bool:
        return self.config.default == "dense"

    def layout_for(self, extra_args: Mapping | None) -> SinkLayout | None:
        """The layout of a request with these ``extra_args``; None for a dense one."""
        if not extra_args or FIELD not in extra_args:
            return None if self.default_is_dense else self.default_layout
        value = extra_args[FIELD]
        if isinstance(value, str):
            value = self._parse_text(value)
        if value is None:
            return None if self.default_is_dense else self.default_layout
        if value in _DENSE:
            return None
        if value in _STREAM:
            return self.default_layout
        values = parse_keys(value, REQUEST_KEYS, WHERE)
        if not values:
            return self.default_layout
        return self._layout(values, f"{WHERE} {show(value)}")

    def system_pin_field(self, value: Any = ABSENT) -> dict | None:
        """For a chat request whose ``"sink"`` field is ``value`` (``ABSENT``: none):
        the field to send once its system part is counted (add ``"pin_prompt_tokens"``),
        or None when it pins no system part (dense, its own count, ``"pin": "none"``, or
        neither it nor the engine asks for ``"pin": "system"``)."""
        if isinstance(value, str):
            value = self._parse_text(value)
        if value is ABSENT or value is None:
            if self.default_is_dense:
                return None
            value = {}
        elif value in _DENSE:
            return None
        elif value in _STREAM:
            value = {}
        values = parse_keys(value, REQUEST_KEYS, WHERE)
        if "pin_prompt_tokens" in values or values.get("pin", self.config.pin) != "system":
            return None
        return {k: v for k, v in values.items() if k != "pin"}

    def pin_tokens(self, values: Mapping) -> int:
        """Tokens a request with these parsed field values pins (0: its sinks only)."""
        if "pin" in values and "pin_prompt_tokens" in values:
            raise SinkConfigError('it sets both "pin" and "pin_prompt_tokens"; keep one.')
        if "pin_prompt_tokens" in values:
            return values["pin_prompt_tokens"]
        if values.get("pin") == "system":
            raise SinkConfigError(
                '"pin": "system" pins a chat request\'s system part: only the '
                "OpenAI chat endpoint (/v1/chat/completions) renders one. Elsewhere "
                '(LLM.generate, /v1/completions) give "pin_prompt_tokens": N, the number '
                "of prompt tokens to keep (vllm_sink.core.pin.system_part_tokens counts "
                "them for a conversation)."
            )
        if values.get("pin") == "none":
            return 0
        return self.config.pin_prompt_tokens

    def _layout(self, values: Mapping, where: str) -> SinkLayout:
        """The layout of a stream whose field parsed to ``values`` (``where`` names the
        field in errors)."""
        B = self.layout.block_size  # sinks and window count in whole blocks
        sink = -(-values.get("sink_tokens", self.config.sink_tokens) // B) * B
        try:
            pin = self.pin_tokens(values)
        except SinkConfigError as e:
            raise SinkConfigError(f"{where}: {e}") from None
        self._check_sinks(max(sink, -(-pin // B) * B), where)
        try:
            if "window_tokens" in values:
                window = -(-values["window_tokens"] // B) * B
                sink = max(sink, -(-pin // B) * B)
            else:
                sink, window = pinned_region(sink, self.layout.window_tokens, pin, B)
        except SinkConfigError as e:
            raise SinkConfigError(f"{where}: {e}") from None
        key = (sink, window, values.get("prefill_chunk_tokens"))
        layout = self._cache.get(key)
        # Each OrderedDict call is atomic under the GIL, but the frontend may admit on
        # several threads (vLLM's renderer pool): another may drop a key between two
        # calls here, which only costs a recomputation.
        try:
            if layout is None:
                layout = self._cache[key] = self._resolve(key, where)
                if len(self._cache) > MAX_CACHED:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        except KeyError:
            pass
        return layout

    def _check_sinks(self, sink_tokens: int, where: str) -> None:
        if sink_tokens > self.max_sink_tokens:
            raise SinkConfigError(
                f"{where} asks for {sink_tokens} sink tokens (sinks and pinned tokens, "
                f"whole KV blocks of {self.layout.block_size}); this engine allows at most "
                f"{self.max_sink_tokens} per request ({ENGINE}[\"max_request_sink_tokens\"] "
                "raises it). Ask for fewer sink_tokens or pin fewer tokens."
            )

    @staticmethod
    def _parse_text(value: str) -> Any:
        """The JSON-string form (vllm_xargs values are strings or numbers)."""
        text = value.strip()
        if text in _DENSE or text in _STREAM:
            return text
        try:
            if len(text) > MAX_TEXT:
                raise ValueError("too long")
            return json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            raise SinkConfigError(
                f'{WHERE} = {show(value)}: use true, false, "sink", "dense" or a JSON '
                f'object such as {{"window_tokens": 1024}} (at most {MAX_TEXT} '
                "characters)."
            ) from None

    def _resolve(self, key: tuple, where: str) -> SinkLayout:
        sink_tokens, window_tokens, chunk = key
        asked = SinkConfig(
            sink_tokens=sink_tokens,
            window_tokens=window_tokens,
            prefill_chunk_tokens=chunk,
            position_limit=self.layout.position_limit,
        )
        B, limit = self.layout.block_size, self.layout.position_limit
        try:
            layout = asked.resolve(B, limit)
            if chunk is None:  # the engine's chunk, if it fits
                chunk = min(layout.chunk_tokens, self.layout.chunk_tokens)
                layout = dataclasses.replace(asked, prefill_chunk_tokens=chunk).resolve(B, limit)
        except SinkConfigError as e:
            raise SinkConfigError(f"{where}: {e}") from None
        self._check_sinks(layout.sink_tokens, where)
        if layout.blocks_per_request > self.layout.blocks_per_request:
            raise SinkConfigError(
                f"{where} needs {layout.blocks_per_request} KV blocks "
                f"per request ({layout.describe()}); this engine allows at most "
                f"{self.layout.blocks_per_request} (its {ENGINE}: {self.layout.describe()}). "
                "Ask for a smaller window_tokens / sink_tokens / prefill_chunk_tokens, or "
                "start the engine with a larger window."
            )
        return layout
