"""The default model in vLLM; the plugin inert without a "sink" section; sink mode
within capacity equal to vanilla vLLM."""

import pytest

from tests.e2e.conftest import assert_greedy_close, generate_in_subprocess, greedy_top

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def vanilla(default_model_dir):
    from vllm_sink.tools.harness import make_llm, shutdown

    llm = make_llm(default_model_dir, block_size=32)
    yield llm
    shutdown(llm)


def test_default_model_says_paris(vanilla):
    from vllm import SamplingParams

    out = vanilla.generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False
    )
    assert out[0].outputs[0].text.startswith(" Paris.")


def test_plugin_inert_without_sink_section(vanilla, default_model_dir):
    """Same outputs with the plugin loaded (no sink section) as with it disabled (two
    engines: equal up to a near-tie, see assert_greedy_close)."""
    tok = vanilla.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    with_plugin = greedy_top(vanilla, prompts, 48)
    without = generate_in_subprocess(
        default_model_dir,
        prompts,
        48,
        {"VLLM_PLUGINS": "no_such_plugin"},
        top_logprobs=5,
        block_size=32,
    )
    assert_greedy_close(with_plugin, without, ("plugin loaded", "plugins disabled"))
    assert vanilla.llm_engine.vllm_config.model_config.max_model_len == 8192


def test_within_capacity_equals_vanilla(vanilla, default_model_dir, engine_factory):
    """No eviction (prompt + output <= C): the same computation as vanilla vLLM, token
    for token (up to a near-tie between two engines, see assert_greedy_close)."""
    tok = vanilla.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    expected = greedy_top(vanilla, prompts, 80)
    sink = engine_factory(default_model_dir, {"sink_tokens": 4, "window_tokens": 224})
    assert_greedy_close(greedy_top(sink, prompts, 80), expected, ("sink", "vanilla"))
    from vllm_sink.tools.harness import worker_stats

    stats = worker_stats(sink)
    assert stats["evictions"] == 0 and stats["requests"] == len(PROMPTS)
