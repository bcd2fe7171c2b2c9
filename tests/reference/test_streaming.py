"""vllm_sink.reference against the dense HF model, and StreamingLLM's quality claim on KJV."""

import math

import pytest
import torch

from vllm_sink.reference import StreamingReference

pytestmark = pytest.mark.e2e


def _dense_logprobs(model, tokens):
    with torch.inference_mode():
        logits = model(torch.tensor([tokens])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return lp[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_no_eviction_equals_dense(hf_model, kjv):
    tokens = kjv[5000:5250]
    ref = StreamingReference(hf_model, sink_tokens=4, window_tokens=256, block_size=32)
    stream = ref.stream()
    lp = stream.teacher_force(tokens, [7, 50, 1, 1, 64, 127])  # uneven steps
    assert stream.evicted == 0
    diff = (lp[1:] - _dense_logprobs(hf_model, tokens)).abs()
    print(f"reference vs dense HF, no eviction: max |dlogprob| = {diff.max():.2e}")
    assert diff.max() <= 1e-3


def test_greedy_matches_teacher_forcing(hf_model):
    ref = StreamingReference(hf_model, sink_tokens=4, window_tokens=32, block_size=16)
    prompt = list(range(100, 140))
    gen, gen_lp = ref.stream().greedy(prompt, 60, prefill_steps=16)
    tf = ref.stream().teacher_force(prompt + gen, [16, 16, 8] + [1] * 60)
    assert torch.allclose(tf[40:], torch.tensor(gen_lp), atol=1e-4)


def test_sinks_keep_perplexity_close_to_dense(hf_model, kjv):
    """StreamingLLM on a stream ~5x the capacity: sink+window stays within 1.25x of
    dense perplexity on the same tokens; window-only is at least 1.5x worse."""
    N = 1536
    tokens = kjv[10000 : 10000 + N]
    dense = _dense_logprobs(hf_model, tokens)
    results = {}
    for name, sinks, window in [("sink+window", 4, 256), ("window-only", 0, 288)]:
        ref = StreamingReference(hf_model, sink_tokens=sinks, window_tokens=window, block_size=32)
        stream = ref.stream()
        lp = stream.teacher_force(tokens, 16)
        C = ref.layout.capacity
        assert C == 288 and stream.evicted > 3 * C
        results[name] = math.exp(-lp[C:].mean())
    dense_ppl = math.exp(-dense[287:].mean())
    print(
        f"KJV ppl over tokens {288}..{N}: dense {dense_ppl:.2f}, "
        f"sink+window {results['sink+window']:.2f}, window-only {results['window-only']:.2f}"
    )
    assert results["sink+window"] <= 1.25 * dense_ppl
    assert results["window-only"] >= 1.5 * results["sink+window"]
