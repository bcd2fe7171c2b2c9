"""Hypothesis strategies and the one rule for fuzzed requests against a real server:
every request is answered 200, or 400 whose message names the field it fuzzed."""

from __future__ import annotations

import json

import requests
from hypothesis import strategies as st

EDGE_NUMBERS = [
    0,
    -1,
    1,
    2**31,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    10**400,
    -(10**400),
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0.5,
    32.0,
    float("inf"),
    float("-inf"),
    float("nan"),
]
LAYOUT_KEYS = ["sink_tokens", "window_tokens", "prefill_chunk_tokens", "pin", "pin_prompt_tokens"]

numbers = st.sampled_from(EDGE_NUMBERS) | st.integers() | st.floats()
texts = st.text(max_size=40) | st.sampled_from(
    [
        "sink",
        "dense",
        "true",
        "null",
        "{}",
        "[]",
        "{\"window_tokens\": 64}",
        " sink ",
        "\x00vllm_sink:[\"drop\", 1, null, \"k\"]",
        "é" * 3,
        "\U0001f600",
    ]
)
huge_texts = st.builds(
    lambda c, n: c * n, st.sampled_from(["x", "[", "{", "é", "0"]), st.integers(1000, 200_000)
)
scalars = st.none() | st.booleans() | numbers | texts


def nested(depth: int):
    """A list nested ``depth`` deep around a number (JSON parsers recurse per level)."""
    value: object = 64
    for _ in range(depth):
        value = [value]
    return value


json_values = (
    st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(LAYOUT_KEYS) | st.text(max_size=12), inner, max_size=4
            )
        ),
        max_leaves=12,
    )
    | huge_texts
    | st.builds(nested, st.integers(20, 400))
)

# The "sink" field: mostly layout-shaped objects (valid ones included), then anything.
layouts = st.fixed_dictionaries(
    {}, optional={k: numbers | texts | json_values for k in LAYOUT_KEYS}
)
sink_values = (
    layouts
    | json_values
    | st.sampled_from(
        [
            True,
            False,
            None,
            "sink",
            "dense",
            0,
            1,
            {},
            {"window_tokens": 64},
            {"sink_tokens": 0, "window_tokens": 32},
            {"prefill_chunk_tokens": 1},
            {"pin": "system"},
            {"pin": "none"},
            {"pin_prompt_tokens": 16},
            {"pin": "system", "window_tokens": 32},
        ]
    )
)
# Its vllm_xargs form: a string (JSON text, or anything).
sink_texts = (
    st.builds(lambda v: json.dumps(v), sink_values)
    | texts
    | huge_texts
    | st.builds(lambda d: "[" * d + "]" * d, st.integers(100, 100_000))
)

session_ids = (
    st.text(max_size=40)
    | st.text(min_size=200, max_size=3000)
    | st.sampled_from(
        [
            "",
            " ",
            "a",
            "a" * 256,
            "a" * 257,
            "\x00",
            "\x00vllm_sink:x",
            "local:x",
            "s:x",
            "é",
            "\U0001f600" * 10,
        ]
    )
)
# HTTP header values: visible ASCII only (anything else is not a valid header here).
header_ids = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=2000
)
xarg_values = json_values | st.lists(numbers | texts, max_size=6)
xargs = st.dictionaries(
    st.sampled_from(
        ["sink", "session_id", "foo", "n", "seed", "vllm_sink_resume", "kv_transfer_params"]
    )
    | st.text(max_size=20),
    xarg_values,
    max_size=4,
)


def check(response: requests.Response, *fields: str) -> None:
    """200, or a 400 whose message names one of ``fields``; anything else fails."""
    if response.status_code == 200:
        return
    text = response.text[:2000]
    assert response.status_code == 400, f"HTTP {response.status_code}: {text}"
    message = response.json()["error"]["message"]
    assert any(f in message for f in fields), f"400 does not name {fields}: {message[:1000]}"
