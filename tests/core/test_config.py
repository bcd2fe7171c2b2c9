"""vllm_sink.core.config: keys, rounding to blocks, errors that name the key and the fix."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_sink.core.config import SinkConfig, SinkConfigError, SinkLayout

pytestmark = pytest.mark.cpu


def test_rounds_up_to_whole_blocks():
    layout = SinkConfig.from_section({"sink_tokens": 4, "window_tokens": 2000}).resolve(32, 8192)
    # 4 -> one block of 32; 2000 -> 63 blocks = 2016; C = 2048 = 64 blocks; the default
    # prefill chunk of 256 tokens needs ceil(255 / 32) = 8 headroom blocks.
    assert (layout.sink_tokens, layout.window_tokens, layout.capacity) == (32, 2016, 2048)
    assert (layout.chunk_tokens, layout.span, layout.blocks_per_request) == (256, 2303, 72)


def test_window_only_ablation_allowed():
    layout = SinkConfig.from_section({"sink_tokens": 0, "window_tokens": 64}).resolve(32, 512)
    assert layout.sink_tokens == 0 and layout.capacity == 64


def test_default_window_fits_small_models():
    # No window given: 2048 shrunk until window and default chunk (min(256, W)) fit the
    # positions: 32 + W - 1 + min(256, W) <= 512 -> W = 224 (7 blocks of 32).
    layout = SinkConfig.from_section({}).resolve(32, 512)
    assert layout.span <= 512 and layout.sink_tokens == 32
    assert (layout.window_tokens, layout.chunk_tokens) == (224, 224)
    assert SinkConfig.from_section({}).resolve(32, 8192).window_tokens == 2048


def test_prefill_chunk_default_and_limits():
    # An explicit window close to the limit keeps its size; the default chunk shrinks.
    layout = SinkConfig.from_section({"window_tokens": 96}).resolve(32, 160)
    assert (layout.capacity, layout.chunk_tokens, layout.span) == (128, 33, 160)
    layout = SinkConfig.from_section({"window_tokens": 96, "prefill_chunk_tokens": 1}).resolve(
        32, 8192
    )
    assert (layout.headroom_blocks, layout.blocks_per_request) == (0, 4)
    with pytest.raises(SinkConfigError) as e:
        SinkConfig.from_section({"window_tokens": 96, "prefill_chunk_tokens": 40}).resolve(32, 160)
    assert "prefill_chunk_tokens" in str(e.value) and "at most 33" in str(e.value)


@pytest.mark.parametrize(
    "section, words",
    [
        ({"sink_tokenz": 4}, ["sink_tokenz", "Valid keys", "sink_tokens"]),
        ({"window_tokens": "2048"}, ["window_tokens", "number"]),
        ({"window_tokens": True}, ["window_tokens", "number"]),
        ({"window_tokens": 100.5}, ["window_tokens", "integer"]),
        ({"sessions": "yes"}, ["sessions", "true or false"]),
        ({"session_idle_timeout": 0}, ["session_idle_timeout", ">= 0.001"]),
        ({"max_parked_sessions": -1}, ["max_parked_sessions", ">= 0"]),
        ({"max_parked_sessions": 65537}, ["max_parked_sessions", "<= 65536", "Lower it"]),
        ({"max_saved_kv_gib": -0.5}, ["max_saved_kv_gib", ">= 0.0"]),
        ({"max_saved_kv_gib": "4"}, ["max_saved_kv_gib", "number"]),
        ({"max_saved_kv_gib": float("inf")}, ["max_saved_kv_gib", "finite"]),
        ({"window_tokens": 0}, ["window_tokens", ">= 1"]),
        ({"prefill_chunk_tokens": 0}, ["prefill_chunk_tokens", ">= 1"]),
        ({"sink_tokens": -1}, ["sink_tokens", ">= 0"]),
        ([4, 2048], ["JSON object"]),
        ("sink", ["JSON object"]),
    ],
)
def test_bad_sections_name_the_key(section, words):
    with pytest.raises(SinkConfigError) as e:
        SinkConfig.from_section(section)
    for word in words:
        assert word in str(e.value)


def test_session_keys_and_resolved_section_round_trip():
    cfg = SinkConfig.from_section(
        {"sessions": False, "max_parked_sessions": 3, "session_idle_timeout": 2}
    )
    layout = cfg.resolve(32, 8192)
    again = SinkConfig.from_section(cfg.resolved_section(layout))
    assert again == cfg.__class__(
        **{**cfg.__dict__, **layout.to_section(), "max_request_sink_tokens": 32}
    )
    assert (again.sessions, again.max_parked_sessions, again.session_idle_timeout) == (
        False,
        3,
        2.0,
    )
    assert again.max_saved_kv_gib is None and "max_saved_kv_gib" not in cfg.resolved_section(layout)


def test_saved_kv_cap_and_parked_bound_accepted():
    cfg = SinkConfig.from_section({"max_saved_kv_gib": 0, "max_parked_sessions": 65536})
    assert (cfg.max_saved_kv_gib, cfg.max_parked_sessions) == (0.0, 65536)
    again = SinkConfig.from_section(cfg.resolved_section(cfg.resolve(32, 8192)))
    assert again.max_saved_kv_gib == 0.0


def test_capacity_beyond_model_positions_refused_with_fix():
    with pytest.raises(SinkConfigError) as e:
        SinkConfig.from_section({"sink_tokens": 4, "window_tokens": 600}).resolve(32, 512)
    msg = str(e.value)
    assert "512" in msg and '"window_tokens" to at most 480' in msg


def test_position_limit_cannot_exceed_model():
    with pytest.raises(SinkConfigError, match="position_limit"):
        SinkConfig.from_section({"position_limit": 9000}).resolve(32, 8192)
    layout = SinkConfig.from_section({"window_tokens": 64, "position_limit": 200}).resolve(32, 8192)
    assert layout.position_limit == 200


@given(
    st.integers(0, 5000),
    st.integers(1, 5000),
    st.sampled_from([1, 16, 32, 128]),
    st.integers(2, 20000),
)
def test_resolve_is_a_fixed_point(sink, window, block, limit):
    """Either a clear SinkConfigError, or a layout that round-trips through to_section."""
    try:
        layout = SinkConfig(sink, window).resolve(block, limit)
    except SinkConfigError:
        assert -(-sink // block) * block + -(-window // block) * block > limit
        return
    assert layout.sink_tokens >= sink and layout.sink_tokens - sink < block
    assert layout.window_tokens >= window and layout.window_tokens - window < block
    again = SinkConfig.from_section(layout.to_section()).resolve(block, limit)
    assert again == layout


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=8,
)


@settings(max_examples=300)
@given(
    st.one_of(
        _json,
        st.dictionaries(
            st.sampled_from(["sink_tokens", "window_tokens", "position_limit", "x"]),
            _json,
            max_size=3,
        ),
    )
)
def test_parser_never_crashes_on_arbitrary_json(section):
    """Fuzz: any JSON value parses into a config or raises SinkConfigError, nothing else."""
    try:
        config = SinkConfig.from_section(section)
    except SinkConfigError:
        return
    try:
        assert isinstance(config.resolve(32, 8192), SinkLayout)
    except SinkConfigError:
        pass


def test_request_sink_limit_defaults_to_the_engine_sinks_and_rounds_up():
    cfg = SinkConfig.from_section({"sink_tokens": 4, "window_tokens": 256})
    layout = cfg.resolve(32, 8192)
    assert cfg.request_sink_limit(layout) == 32  # the engine's one block
    more = SinkConfig.from_section({"sink_tokens": 4, "max_request_sink_tokens": 100})
    assert more.request_sink_limit(more.resolve(32, 8192)) == 128
    low = SinkConfig.from_section({"sink_tokens": 64, "max_request_sink_tokens": 8})
    with pytest.raises(SinkConfigError, match="max_request_sink_tokens"):
        low.request_sink_limit(low.resolve(32, 8192))


def test_rotary_positions_leave_a_window_of_margin():
    # Capacity at the position limit (the StreamingLLM paper's 4 + 4092 on 4096): the
    # rotary range doubles what a stream holds, so rebases are >= span tokens apart.
    tight = SinkConfig.from_section(
        {"sink_tokens": 4, "window_tokens": 4092, "prefill_chunk_tokens": 1}
    ).resolve(4, 4096)
    assert tight.span == 4096 and tight.rotary_positions == 2 * 4096
    roomy = SinkConfig.from_section({"window_tokens": 2048}).resolve(32, 8192)
    assert roomy.rotary_positions == 8192  # the model's own table


@pytest.mark.parametrize(
    "section, key",
    [
        ({"window_tokens": 10**400}, "window_tokens"),
        ({"window_tokens": 1e308}, "window_tokens"),
        ({"sink_tokens": -(10**400)}, "sink_tokens"),
        ({"prefill_chunk_tokens": 2**70}, "prefill_chunk_tokens"),
        ({"session_idle_timeout": 1e308}, "session_idle_timeout"),
        ({"window_tokens": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}, "window_tokens"),
    ],
)
def test_numbers_at_the_edges_are_refused_by_name(section, key):
    """Out-of-range numbers are a SinkConfigError naming the key (never an
    OverflowError while rounding to blocks), with a short message (no 400 digits)."""
    with pytest.raises(SinkConfigError) as e:
        SinkConfig.from_section(section).resolve(32, 8192)
    assert key in str(e.value) and len(str(e.value)) < 600, str(e.value)


def test_deeply_nested_values_give_a_short_error():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(SinkConfigError) as e:
        SinkConfig.from_section({"window_tokens": deep})
    assert "window_tokens" in str(e.value) and len(str(e.value)) < 600
    with pytest.raises(SinkConfigError) as e:
        SinkConfig.from_section({f"key{i}": i for i in range(10_000)})
    assert "Unknown key" in str(e.value) and len(str(e.value)) < 2000
