"""vllm_sink.core.requests: a request's own "sink" field against the engine's default and
maximum; every refusal names the field and the limit."""

import pytest

from vllm_sink.core.config import SinkConfig, SinkConfigError
from vllm_sink.core.requests import EngineSink

pytestmark = pytest.mark.cpu


def _engine(**section) -> EngineSink:
    section = {"sink_tokens": 4, "window_tokens": 1024, **section}
    layout = SinkConfig.from_section(section).resolve(32, 8192)
    resolved = {
        **SinkConfig.from_section(section).resolved_section(layout),
        "_resolved": {"dense_max_model_len": 8192},
    }
    return EngineSink.from_section(resolved, 32)


def test_defaults_and_opt_outs():
    eng = _engine()
    assert eng.layout_for(None) == eng.layout == eng.layout_for({"sink": True})
    assert eng.layout_for({"sink": "sink"}) == eng.layout_for({"sink": {}}) == eng.layout
    for dense in (False, "dense", 0, " dense "):
        assert eng.layout_for({"sink": dense}) is None
    assert eng.dense_max_model_len == 8192
    dense_first = _engine(default="dense")
    assert dense_first.layout_for({}) is None and dense_first.layout_for({"sink": None}) is None
    assert dense_first.layout_for({"sink": True}) == dense_first.layout


def test_own_layouts_within_the_engine_maximum():
    eng = _engine()
    small = eng.layout_for({"sink": {"window_tokens": 256}})
    assert (small.sink_tokens, small.window_tokens, small.chunk_tokens) == (32, 256, 256)
    tiny = eng.layout_for({"sink": {"window_tokens": 64}})
    assert tiny.chunk_tokens == 64  # min(engine's 256, its window)
    # Same capacity without sinks: the engine's chunk, so it fits the engine's blocks.
    narrow = _engine(window_tokens=96)
    assert (
        narrow.layout_for({"sink": {"sink_tokens": 0, "window_tokens": 128}}).blocks_per_request
        == narrow.layout.blocks_per_request
    )
    only_window = eng.layout_for({"sink": '{"sink_tokens": 0, "window_tokens": 512}'})
    assert only_window.sink_tokens == 0 and only_window.window_tokens == 512
    assert eng.layout_for({"sink": {"prefill_chunk_tokens": 64}}).chunk_tokens == 64
    # Same field, same layout object (resolved once).
    assert eng.layout_for({"sink": {"window_tokens": 256}}) is small


@pytest.mark.parametrize(
    "value, words",
    [
        ({"window_tokens": 4096}, ["window_tokens", "at most", "KV blocks"]),
        ({"prefill_chunk_tokens": 1024}, ["prefill_chunk_tokens", "at most"]),
        ({"window": 10}, ["Unknown key", "window", "window_tokens"]),
        ({"sessions": False}, ["Unknown key", "sessions"]),
        ({"window_tokens": "big"}, ["window_tokens", "number"]),
        ({"window_tokens": 0}, ["window_tokens", ">= 1"]),
        ("maybe", ['"sink"', "dense"]),
        (3.5, ['"sink"', "JSON object"]),
        ([1, 2], ['"sink"', "JSON object"]),
    ],
)
def test_bad_fields_name_the_field(value, words):
    with pytest.raises(SinkConfigError) as e:
        _engine().layout_for({"sink": value})
    assert 'request field "sink"' in str(e.value)
    for word in words:
        assert word in str(e.value), str(e.value)


def test_layout_cache_keyed_by_values_and_bounded():
    """The cache is keyed by the resolved numbers, not the client's spelling, and holds
    at most a fixed number of layouts whatever clients send."""
    eng = _engine()
    want = eng.layout_for({"sink": {"window_tokens": 256}})
    for i in range(10_000):  # 10,000 spellings of the same request field
        spelling = (
            '{"window_tokens": 256'
            + " " * (i % 100)
            + ', "sink_tokens": 4'
            + " " * (i // 100)
            + "}"
        )
        assert eng.layout_for({"sink": spelling}) == want
    assert len(eng._cache) <= 1
    for chunk in range(1, 257):  # 768 distinct valid layouts
        for window in (64, 512, 1000):
            layout = eng.layout_for(
                {"sink": {"window_tokens": window, "prefill_chunk_tokens": chunk}}
            )
            assert (layout.window_tokens, layout.chunk_tokens) == (-(-window // 32) * 32, chunk)
    assert len(eng._cache) <= 256
    assert eng.layout_for({"sink": {"window_tokens": 256.0}}) == want


@pytest.mark.parametrize(
    "value",
    [
        {"window_tokens": 10**400},
        {"window_tokens": 1e308},
        "[" * 100_000 + "]" * 100_000,
        '{"window_tokens": ' + "[" * 5000 + "]" * 5000 + "}",
        "x" * 1_000_000,
        {"window_tokens": "y" * 1_000_000},
    ],
)
def test_hostile_fields_are_short_errors(value):
    with pytest.raises(SinkConfigError) as e:
        _engine().layout_for({"sink": value})
    assert 'request field "sink"' in str(e.value) and len(str(e.value)) < 800, str(e.value)[:2000]


def test_deeply_nested_field_is_refused():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for value in (deep, {"window_tokens": deep}):
        with pytest.raises(SinkConfigError) as e:
            _engine().layout_for({"sink": value})
        assert 'request field "sink"' in str(e.value) and len(str(e.value)) < 800
