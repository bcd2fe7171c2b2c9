"""vllm_sink.core.pin and pinned layouts: which tokens a stream keeps with its sinks.

The system part is counted with the default model's real chat template (SmolLM2's, which
adds a default system prompt when a conversation has none)."""

import pytest

from vllm_sink.core.config import SinkConfig, SinkConfigError, pinned_region
from vllm_sink.core.pin import common_prefix, probe_conversations, system_part_tokens
from vllm_sink.core.requests import ABSENT, EngineSink

pytestmark = pytest.mark.cpu


def _engine(**section) -> EngineSink:
    section = {"sink_tokens": 4, "window_tokens": 1024, **section}
    config = SinkConfig.from_section(section)
    layout = config.resolve(32, 8192)
    resolved = {**config.resolved_section(layout), "_resolved": {"dense_max_model_len": 8192}}
    return EngineSink.from_section(resolved, 32)


def test_pinned_region_takes_its_blocks_from_the_window():
    assert pinned_region(4, 1024, 0, 32) == (32, 1024)  # nothing beyond the sinks
    assert pinned_region(4, 1024, 32, 32) == (32, 1024)  # within the sink block
    assert pinned_region(4, 1024, 33, 32) == (64, 992)
    S, W = pinned_region(70, 100, 130, 64)  # sinks 128, window 128 -> pinned 192, window 64
    assert (S, W) == (192, 64)
    with pytest.raises(SinkConfigError, match="leaves no window block"):
        pinned_region(4, 96, 128, 32)  # 128 pinned: the 96-token window loses all 3 blocks


def test_a_request_pin_keeps_the_engine_capacity_and_blocks():
    eng = _engine(max_request_sink_tokens=512)
    pinned = eng.layout_for({"sink": {"pin_prompt_tokens": 300}})
    assert (pinned.sink_tokens, pinned.window_tokens) == (320, 736)
    assert pinned.capacity == eng.layout.capacity
    assert pinned.blocks_per_request == eng.layout.blocks_per_request
    # Its own window: no deduction, so it must fit the engine's blocks itself.
    own = eng.layout_for({"sink": {"pin_prompt_tokens": 300, "window_tokens": 512}})
    assert (own.sink_tokens, own.window_tokens) == (320, 512)
    with pytest.raises(SinkConfigError, match="KV blocks"):
        eng.layout_for({"sink": {"pin_prompt_tokens": 300, "window_tokens": 1024}})
    # The same layout however it is spelled (sinks or pin), so one cache entry.
    assert eng.layout_for({"sink": '{"pin_prompt_tokens": 300.0}'}) == pinned
    assert eng.layout_for({"sink": {"pin_prompt_tokens": 0}}) == eng.layout
    assert eng.layout_for({"sink": {"pin": "none"}}) == eng.layout


def test_pins_are_bounded_by_max_request_sink_tokens():
    eng = _engine()  # default: only the engine's own sink block
    with pytest.raises(SinkConfigError, match="max_request_sink_tokens"):
        eng.layout_for({"sink": {"pin_prompt_tokens": 33}})
    assert eng.layout_for({"sink": {"pin_prompt_tokens": 32}}) == eng.layout
    with pytest.raises(SinkConfigError, match="leaves no window block"):
        _engine(max_request_sink_tokens=2048).layout_for({"sink": {"pin_prompt_tokens": 1100}})


def test_bad_pin_fields_are_refused_by_name():
    eng = _engine(max_request_sink_tokens=512)
    with pytest.raises(SinkConfigError, match="both"):
        eng.layout_for({"sink": {"pin": "system", "pin_prompt_tokens": 3}})
    with pytest.raises(SinkConfigError, match="pin_prompt_tokens"):
        eng.layout_for({"sink": {"pin": "system"}})  # only the chat endpoint counts it
    with pytest.raises(SinkConfigError, match="must be one of"):
        eng.layout_for({"sink": {"pin": "everything"}})
    with pytest.raises(SinkConfigError, match=">= 0"):
        eng.layout_for({"sink": {"pin_prompt_tokens": -1}})


def test_engine_pin_defaults():
    eng = _engine(pin_prompt_tokens=100)
    # The limit follows the engine's pin; every stream without its own field is pinned.
    assert eng.max_sink_tokens == 128
    assert (eng.default_layout.sink_tokens, eng.default_layout.window_tokens) == (128, 928)
    assert eng.layout_for(None) == eng.layout_for({"sink": True}) == eng.default_layout
    assert eng.layout_for({"sink": {"pin": "none"}}) == eng.layout
    assert eng.layout_for({"sink": False}) is None
    with pytest.raises(SinkConfigError, match="max_request_sink_tokens"):
        _engine(pin="system")  # would refuse every chat request's pin
    with pytest.raises(SinkConfigError, match="keep one"):
        _engine(pin="system", pin_prompt_tokens=64, max_request_sink_tokens=512)
    with pytest.raises(SinkConfigError, match="pin_prompt_tokens"):
        _engine(window_tokens=64, pin_prompt_tokens=96)  # no window left


def test_which_chat_requests_pin_their_system_part():
    plain = _engine(max_request_sink_tokens=512)
    system = _engine(pin="system", max_request_sink_tokens=512)
    assert plain.system_pin_field(ABSENT) is None and plain.system_pin_field(True) is None
    assert plain.system_pin_field({"pin": "system", "window_tokens": 512}) == {"window_tokens": 512}
    assert plain.system_pin_field('{"pin": "system"}') == {}
    assert system.system_pin_field(ABSENT) == {} == system.system_pin_field(None)
    assert system.system_pin_field("sink") == {} == system.system_pin_field({})
    for none in (False, "dense", {"pin": "none"}, {"pin_prompt_tokens": 7}):
        assert system.system_pin_field(none) is None, none
    assert (
        _engine(pin="system", default="dense", max_request_sink_tokens=64).system_pin_field(ABSENT)
        is None
    )
    # A system-pinned completion request (no chat template) is not pinned by the engine's
    # default; a request that asks for it itself is refused (test above).
    assert system.layout_for(None) == system.layout


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4], [1, 2]) == 2
    assert common_prefix([1, 2], [1, 2]) == 2 and common_prefix([5], [6]) == 0
    assert common_prefix() == 0


def test_system_part_with_a_real_chat_template(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)

    def render(conversation):
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return ids["input_ids"] if hasattr(ids, "keys") else ids

    system = "You keep the lighthouse on the Isle of Brenn. The keeper's name is Ada."
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Anything new today?"},  # starts like the probe "A"
        {"role": "assistant", "content": "Nothing."},
        {"role": "user", "content": "And now?"},
    ]
    n = system_part_tokens(render, messages)
    prompt = render(messages)
    head = tok.decode(prompt[:n])
    # The system text and the next turn's header, none of the user's own text.
    assert system in head and head.rstrip().endswith("user"), head
    assert "Anything" not in head
    # A later turn of the conversation counts the same tokens (a session resumes).
    assert system_part_tokens(render, messages[:2]) == n
    # Without a system message SmolLM2's template renders its own default one.
    bare = system_part_tokens(render, messages[1:])
    assert "SmolLM" in tok.decode(render(messages[1:])[:bare])
    assert [m["role"] for m in probe_conversations(messages)[0]] == ["system", "user"]
