"""vllm_sink.reference.recall: recalled blocks sit between the sinks and the window at
cache-relative positions, chosen as the top k of the memory by score.

Oracles: recalling nothing is StreamingLLM (the plain reference); recalling every
evicted block puts every token back at its own position, which is dense attention
over the whole stream (the HF model)."""

import pytest
import torch

from tests.reference.test_streaming import _dense_logprobs
from vllm_sink.reference import StreamingReference
from vllm_sink.reference.recall import RecallReference

pytestmark = pytest.mark.e2e

LAYOUT = {"sink_tokens": 4, "window_tokens": 64, "block_size": 16}  # S 16, W 64, C 80


def test_recalling_nothing_is_streaming_llm(hf_model, kjv):
    tokens = kjv[7000:7300]
    steps = [40, 40] + [1] * 220
    plain = StreamingReference(hf_model, **LAYOUT).stream().teacher_force(tokens, steps)
    stream = RecallReference(hf_model, recall_blocks=0, **LAYOUT).stream()
    got = stream.teacher_force(tokens, steps)
    assert stream.evicted_blocks >= 13 and stream.selected == []
    assert torch.allclose(got[1:], plain[1:], atol=1e-5)


def test_recalling_every_block_is_dense_attention(hf_model, kjv):
    """300 tokens through a C = 80 cache: 14 blocks evicted, all 14 recalled (k = 16),
    so each step attends to the whole stream at its own positions."""
    tokens = kjv[8000:8300]
    stream = RecallReference(hf_model, recall_blocks=16, **LAYOUT).stream()
    lp = stream.teacher_force(tokens, [48, 48] + [1] * 204)
    assert stream.evicted_blocks >= 13 and stream.selected == list(range(stream.evicted_blocks))
    diff = (lp[1:] - _dense_logprobs(hf_model, tokens)).abs()
    print(f"recall of every block vs dense: max |dlogprob| {diff.max():.1e}")
    assert diff.max() <= 1e-3


@pytest.mark.parametrize("score", ["max", "mean"])
def test_selection_is_the_top_k_of_a_bounded_memory(hf_model, kjv, score):
    ref = RecallReference(hf_model, recall_blocks=3, memory_blocks=6, score=score, **LAYOUT)
    stream = ref.stream()
    tokens = kjv[9000:9300]
    stream.step(tokens[:80])
    for i, tok in enumerate(tokens[80:]):
        before = stream.scores()  # the previous step's queries: what selection uses
        memory = [b.index for b in stream.memory]
        stream.step([tok])
        assert len(stream.memory) <= 6
        if [b.index for b in stream.memory] != memory or not memory:
            continue  # the step evicted first: it scored the new memory
        order = sorted(range(len(memory)), key=lambda j: (-float(before[j]), j))[:3]
        assert stream.selected == sorted(memory[j] for j in order), i
    assert stream.evicted_blocks >= 13 and min(b.index for b in stream.memory) >= 7


def test_bad_settings_are_refused(hf_model):
    with pytest.raises(ValueError, match="refresh"):
        RecallReference(hf_model, recall_blocks=2, refresh=0, **LAYOUT)
    with pytest.raises(ValueError, match="score"):
        RecallReference(hf_model, score="best", **LAYOUT)
