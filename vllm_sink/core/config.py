"""The ``"sink"`` section of vLLM's ``additional_config``: parsing, validation, rounding.

Owns the user-facing keys, their defaults, and the *effective layout* every other part
works from (sink and window rounded up to whole KV blocks, the fixed per-request
capacity, the position limit). Imports nothing from vLLM.

Semantics (docs/architecture.md), with B the KV block size in effect::

    S = ceil(sink_tokens / B) * B        sink tokens kept forever (0 = window-only)
    W = ceil(window_tokens / B) * B      most recent tokens kept
    C = S + W                            the capacity: a chunk starts with <= C - 1 cached
    K = prefill_chunk_tokens             most new tokens one chunk adds to a full cache
    span = C - 1 + K                     most tokens cached while a step runs
    blocks per request = ceil(span / B)  = C / B + ceil((K - 1) / B) headroom blocks

Worked example (B = 32): ``{"sink_tokens": 4, "window_tokens": 2000}`` gives
S = 32 (one block), W = 2016 (63 blocks), C = 2048, K = 256 (the default), span = 2303,
72 blocks per request (64 + 8 headroom).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

DEFAULT_SINK_TOKENS = 4
DEFAULT_WINDOW_TOKENS = 2048
DEFAULT_PREFILL_CHUNK_TOKENS = 256  # capped at the window by default

_EXAMPLE = '{"sink": {"sink_tokens": 4, "window_tokens": 2048}}'
ENGINE = 'additional_config["sink"]'

# key -> (type, minimum value or allowed values, meaning) for every accepted key.
_KEYS: dict[str, tuple[type, Any, str]] = {
    "sink_tokens": (int, 0, "initial tokens kept forever as attention sinks (0 = window-only)"),
    "window_tokens": (int, 1, "most recent tokens kept in the rolling window"),
    "prefill_chunk_tokens": (
        int,
        1,
        "most prompt tokens one request reads in one step "
        "once its cache is full; each request reserves that "
        "much KV headroom (default min(256, window))",
    ),
    "default": (
        str,
        ("sink", "dense"),
        "what a request without its own \"sink\" field "
        "is: an endless stream (\"sink\", default) or "
        "plain dense attention (\"dense\")",
    ),
    "position_limit": (
        int,
        2,
        "most positions a stream spans: C - 1 + "
        "prefill_chunk_tokens must fit (default: the model's "
        "context length)",
    ),
    "sessions": (
        bool,
        0,
        "park a finished request's KV under its session_id and resume "
        "it on the next turn (default true)",
    ),
    "max_request_sink_tokens": (
        int,
        0,
        "most sink tokens a request's own \"sink\" "
        "field may ask for (default: the engine's "
        "sink_tokens); each stream keeps a device copy "
        "of its sink keys, reserved in vLLM's memory "
        "profile for this many",
    ),
    "pin": (
        str,
        ("none", "system"),
        "what a stream keeps forever beside its sinks by default: nothing "
        "(\"none\", default) or, for a chat request, the tokens its chat template renders "
        "before the first non-system message (\"system\"); pinned blocks come out of the "
        "window unless the request sets window_tokens",
    ),
    "pin_prompt_tokens": (
        int,
        0,
        "first tokens of the prompt a stream keeps forever with its sinks by default "
        "(0 = sinks only); pinned blocks come out of the window unless the request sets "
        "window_tokens",
    ),
    "max_parked_sessions": (int, 0, "parked sessions kept at most (default 256, at most 65536)"),
    "session_idle_timeout": (float, 0.001, "seconds a parked session may stay idle (default 600)"),
    "max_saved_kv_gib": (
        float,
        0.0,
        "GiB of host memory each worker may hold for the "
        "KV of preempted streams (default: the size of "
        "the KV pool, at most a quarter of the host's "
        "memory per worker); a stream whose save does "
        "not fit is finished with finish_reason "
        "\"error\"",
    ),
}
# Upper bounds of keys that have one (a parked session costs host-side state in the
# scheduler and every worker, and each holds at least one KV block).
_MAXIMA: dict[str, int] = {"max_parked_sessions": 65536}
# Keys a single request may set in its own "sink" field (the engine's are its maximum).
REQUEST_KEYS = ("sink_tokens", "window_tokens", "prefill_chunk_tokens", "pin", "pin_prompt_tokens")
# Written by the frontend into the resolved section, never by users.
RESOLVED = "_resolved"


class SinkConfigError(ValueError):
    """A ``"sink"`` section (or an engine setting next to it) that cannot be honoured."""


# Every number a section or a request field may hold lies within +-MAX_NUMBER: far past
# any token count or timeout, small enough that the block arithmetic stays exact.
MAX_NUMBER = 2**62
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 3, 60, 60, 40
_SHOW.maxdict = _SHOW.maxlist = _SHOW.maxtuple = 6


def show(value: Any) -> str:
    """A short, safe rendering of a client-supplied value for an error message: at most
    a few nesting levels and dozens of characters, whatever its size or depth."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"{'-' if value < 0 else ''}<integer of {abs(value).bit_length()} bits>"
    try:
        return _SHOW.repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"


def _as_type(where: str, key: str, kind: type, value: Any):
    name = f'{where}["{key}"]'
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise SinkConfigError(
            f"{name} must be true or false, got {show(value)} ({type(value).__name__})."
        )
    if kind is str:
        if isinstance(value, str):
            return value
        raise SinkConfigError(
            f"{name} must be a string, got {show(value)} ({type(value).__name__})."
        )
    # bool is an int subclass; "true" for a token count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SinkConfigError(
            f"{name} must be a number, got "
            f"{show(value)} ({type(value).__name__}). Example: {_EXAMPLE}"
        )
    if value != value or value in (float("inf"), float("-inf")):
        raise SinkConfigError(f"{name} must be finite, got {value!r}")
    if abs(value) > MAX_NUMBER:
        raise SinkConfigError(
            f"{name} = {show(value)} is out of range: at most 2**62 in magnitude."
        )
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise SinkConfigError(
                    f"{name} must be an integer, got {value!r}. Example: {_EXAMPLE}"
                )
            value = int(value)
        return value
    return float(value)


def parse_keys(section: Any, keys, where: str = ENGINE) -> dict[str, Any]:
    """Validated values of ``section`` (a JSON object) restricted to ``keys``."""
    if not isinstance(section, Mapping):
        raise SinkConfigError(
            f"{where} must be a JSON object, got "
            f"{show(section)} ({type(section).__name__}). Example: {_EXAMPLE}"
        )
    unknown = [k for k in section if k not in keys and k != RESOLVED]
    if unknown:
        valid = ", ".join(f"{k} ({_KEYS[k][2]})" for k in keys)
        named = ", ".join(show(k) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise SinkConfigError(f"Unknown key(s) in {where}: {named}{more}. Valid keys: {valid}.")
    values: dict[str, Any] = {}
    for key in keys:
        kind, limit, meaning = _KEYS[key]
        raw = section.get(key)
        if raw is None:
            continue
        value = _as_type(where, key, kind, raw)
        if kind is str and value not in limit:
            raise SinkConfigError(
                f'{where}["{key}"] = {show(value)} must be one of '
                f"{', '.join(map(repr, limit))}: {meaning}."
            )
        if kind not in (bool, str) and value < limit:
            raise SinkConfigError(
                f'{where}["{key}"] = {value} is out of range: '
                f"it is the number of {meaning} and must be >= {limit}."
            )
        if key in _MAXIMA and value > _MAXIMA[key]:
            raise SinkConfigError(
                f'{where}["{key}"] = {value} is out of range: it is the number of '
                f"{meaning} and must be <= {_MAXIMA[key]}. Lower it."
            )
        values[key] = value
    return values


@dataclass(frozen=True)
class SinkConfig:
    """What the user asked for, validated but not yet rounded to blocks."""

    sink_tokens: int = DEFAULT_SINK_TOKENS
    window_tokens: int | None = None
    prefill_chunk_tokens: int | None = None
    default: str = "sink"
    position_limit: int | None = None
    max_request_sink_tokens: int | None = None
    pin: str = "none"
    pin_prompt_tokens: int = 0
    sessions: bool = True
    max_parked_sessions: int = 256
    session_idle_timeout: float = 600.0
    max_saved_kv_gib: float | None = None  # None: derived from the pool and the host

    @classmethod
    def from_section(cls, section: Any) -> SinkConfig:
        """Parse ``additional_config["sink"]``; raise SinkConfigError naming key and fix."""
        return cls(**parse_keys(section, _KEYS))

    def resolved_section(self, layout: SinkLayout) -> dict[str, Any]:
        """The section every process re-parses: geometry resolved, policies explicit."""
        section = {
            **layout.to_section(),
            "default": self.default,
            "sessions": self.sessions,
            "max_request_sink_tokens": self.request_sink_limit(layout),
            "pin": self.pin,
            "pin_prompt_tokens": self.pin_prompt_tokens,
            "max_parked_sessions": self.max_parked_sessions,
            "session_idle_timeout": self.session_idle_timeout,
        }
        if self.max_saved_kv_gib is not None:
            section["max_saved_kv_gib"] = self.max_saved_kv_gib
        return section

    def request_sink_limit(self, layout: SinkLayout) -> int:
        """Most sink tokens (whole blocks) one request may ask for: the engine's own
        sinks unless ``max_request_sink_tokens`` allows more."""
        asked = self.max_request_sink_tokens
        if asked is not None and asked < self.sink_tokens:
            raise SinkConfigError(
                f'{ENGINE}["max_request_sink_tokens"] = {asked} is below the engine\'s '
                f'own sink_tokens = {self.sink_tokens}, which every request may use. '
                "Raise it or remove it."
            )
        if self.pin == "system" and self.pin_prompt_tokens:
            raise SinkConfigError(
                f'{ENGINE} sets both "pin": "system" and "pin_prompt_tokens"; keep one.'
            )
        B = layout.block_size
        limit = max(
            layout.sink_tokens,
            math.ceil((asked or 0) / B) * B,
            math.ceil(self.pin_prompt_tokens / B) * B,
        )
        if self.pin == "system" and limit <= layout.sink_tokens:
            raise SinkConfigError(
                f'{ENGINE}["pin"] = "system" pins each chat request\'s system part with its '
                f"sinks, but max_request_sink_tokens allows no more than the engine's own "
                f"{layout.sink_tokens} sink tokens, so every such request would be refused. "
                'Set "max_request_sink_tokens" to the longest system part to pin (e.g. 1024).'
            )
        return limit

    def resolve(self, block_size: int, model_position_limit: int) -> SinkLayout:
        """Round to whole blocks of ``block_size`` and check against the model."""
        B = int(block_size)
        if B < 1:
            raise SinkConfigError(f"KV block size must be >= 1, got {block_size}.")
        limit = int(model_position_limit)
        if self.position_limit is not None:
            if self.position_limit > limit:
                raise SinkConfigError(
                    f'additional_config["sink"]["position_limit"] = {self.position_limit} '
                    f"exceeds the model's context length {limit}; positions past it are "
                    f"untrained. Remove the key or set it to at most {limit}."
                )
            limit = self.position_limit
        sink_blocks = math.ceil(self.sink_tokens / B)
        S = sink_blocks * B
        if self.window_tokens is None:
            # Default window: 2048 tokens, shrunk until it and its default prefill chunk
            # fit the model's positions.
            window_blocks = math.ceil(DEFAULT_WINDOW_TOKENS / B)
            while (
                window_blocks >= 1
                and S
                + window_blocks * B
                - 1
                + min(self.prefill_chunk_tokens or DEFAULT_PREFILL_CHUNK_TOKENS, window_blocks * B)
                > limit
            ):
                window_blocks -= 1
            if window_blocks < 1:
                raise SinkConfigError(
                    f"No room for a window: the sinks take {S} positions "
                    f"(sink_tokens={self.sink_tokens} rounded up to blocks of {B}) "
                    f"and the model has only {limit}. Lower sink_tokens"
                    + (" or prefill_chunk_tokens." if self.prefill_chunk_tokens else ".")
                )
        else:
            window_blocks = math.ceil(self.window_tokens / B)
        W = window_blocks * B
        C = S + W
        if C > limit:
            fit = (limit - S) // B * B
            raise SinkConfigError(
                f"Capacity {C} tokens (sinks {S} + window {W}, rounded up to KV blocks of "
                f"{B}) exceeds the model's position limit {limit}: cached tokens are "
                "attended at positions 0..capacity-1. Set "
                f'"window_tokens" to at most {fit}'
                + (" or lower sink_tokens." if fit <= 0 else ".")
            )
        if self.prefill_chunk_tokens is None:
            # The default chunk shrinks to what the positions leave (1 = token by token).
            K = min(DEFAULT_PREFILL_CHUNK_TOKENS, W, limit - C + 1)
        else:
            K = self.prefill_chunk_tokens
            if C - 1 + K > limit:
                raise SinkConfigError(
                    f'additional_config["sink"]["prefill_chunk_tokens"] = {K} does not fit: '
                    f"a step runs with up to C - 1 + prefill_chunk_tokens = {C - 1 + K} "
                    f"tokens cached (capacity C = {C}), attended at positions up to "
                    f"{C + K - 2}, past the model's position limit {limit}. Set it to at "
                    f'most {limit - C + 1}, or lower "window_tokens".'
                )
        return SinkLayout(B, sink_blocks, window_blocks, limit, K)


def pinned_region(
    sink_tokens: int, window_tokens: int, pin_tokens: int, block_size: int
) -> tuple[int, int]:
    """Sink and window tokens once the first ``pin_tokens`` tokens are kept forever.

    The sink region grows to cover them, ``S' = max(ceil(sink/B), ceil(pin/B)) * B``, and
    the blocks it gains come out of the window, ``W' = ceil(window/B) * B - (S' - S)``, so
    the capacity and the KV blocks per request stay what they were. Raises when no whole
    window block would be left."""
    B = block_size
    S = -(-sink_tokens // B) * B
    pinned = max(S, -(-pin_tokens // B) * B)
    W = -(-window_tokens // B) * B
    if W - (pinned - S) < B:
        raise SinkConfigError(
            f"pinning {pin_tokens} tokens takes the sink region from {S} to {pinned} tokens "
            f"(whole KV blocks of {B}); out of a window of {W} that leaves no window block. "
            "Pin fewer tokens, or set a larger window_tokens."
        )
    return pinned, W - (pinned - S)


@dataclass(frozen=True)
class SinkLayout:
    """The effective, block-rounded geometry shared by scheduler, worker and reference."""

    block_size: int
    sink_blocks: int
    window_blocks: int
    position_limit: int
    chunk_tokens: int = 1  # K; 1 = no headroom (steps of one token once full)

    def __post_init__(self) -> None:
        assert self.block_size >= 1 and self.sink_blocks >= 0 and self.window_blocks >= 1
        assert self.chunk_tokens >= 1 and self.span <= self.position_limit

    # Derived sizes: computed once per layout (the worker reads them per request and
    # step); cached_property stores them in the instance dict, outside the frozen fields.
    @cached_property
    def sink_tokens(self) -> int:
        return self.sink_blocks * self.block_size

    @cached_property
    def window_tokens(self) -> int:
        return self.window_blocks * self.block_size

    @cached_property
    def capacity(self) -> int:
        return self.sink_tokens + self.window_tokens

    @cached_property
    def span(self) -> int:
        """Most tokens cached while a step runs: <= C - 1 before it, plus <= K new."""
        return self.capacity - 1 + self.chunk_tokens

    @cached_property
    def rotary_positions(self) -> int:
        """Positions the worker's rotary tables cover (R, ``vllm_sink.core.policy``):
        the position limit, or twice the most a stream of this many blocks caches if
        that is more, so a window key is rebased at most once in its life."""
        return max(self.position_limit, 2 * self.blocks_per_request * self.block_size)

    @cached_property
    def headroom_blocks(self) -> int:
        return -(-(self.chunk_tokens - 1) // self.block_size)

    @cached_property
    def ring_blocks(self) -> int:
        """Blocks after the sinks, recycled in a ring: window plus headroom."""
        return self.window_blocks + self.headroom_blocks

    @cached_property
    def blocks_per_request(self) -> int:
        return self.sink_blocks + self.ring_blocks

    def to_section(self) -> dict[str, int]:
        """The resolved section: re-parsing and resolving it gives this layout again."""
        return {
            "sink_tokens": self.sink_tokens,
            "window_tokens": self.window_tokens,
            "prefill_chunk_tokens": self.chunk_tokens,
            "position_limit": self.position_limit,
        }

    def describe(self) -> str:
        return (
            f"sink={self.sink_tokens} tokens ({self.sink_blocks} blocks), "
            f"window={self.window_tokens} tokens ({self.window_blocks} blocks), "
            f"capacity={self.capacity} tokens, prefill chunk={self.chunk_tokens} tokens "
            f"({self.headroom_blocks} headroom blocks); {self.blocks_per_request} blocks of "
            f"{self.block_size} per request, position_limit={self.position_limit}"
        )
