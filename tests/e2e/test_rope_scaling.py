"""Core: the plugin re-rotates keys correctly for every supported RoPE scaling type.

The default model re-configured with linear, Llama 3 and YaRN RoPE scaling (a
different model numerically, but a valid one: the reference computes its rotary table
with Hugging Face's own implementation of each type, the plugin with vLLM's). float32,
C = 128 with a small ``max_position_embeddings`` where the scaling allows it, so keys
are moved by eviction *and* by rebases; log-probs of every sampled token must match the
reference within the core oracle tolerances, greedy tokens for 300 tokens after the
first eviction."""

import pytest
import torch

from tests.e2e.conftest import check_against_reference, greedy_in_fresh_engine
from vllm_sink.reference import StreamingReference

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 96}  # S = 32, W = 96, C = 128 (B = 32)
THETA = 100000.0

VARIANTS = {
    # max_position_embeddings 160: the position offset is rebased every few evictions.
    "linear": dict(
        max_position_embeddings=160,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": THETA},
    ),
    "llama3": dict(
        max_position_embeddings=160,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": THETA,
        },
    ),
    # YaRN: vLLM sizes its table original_max x factor; 64 x 4 = 256 positions.
    "yarn": dict(
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": THETA,
        },
    ),
}


# YaRN (per-frequency factors plus YaRN's attention scaling) in the default run; linear
# (every frequency divided by one factor) and llama3 (per-frequency factors) with --all.
@pytest.mark.parametrize(
    "kind", [k if k == "yarn" else pytest.param(k, marks=pytest.mark.slow) for k in VARIANTS]
)
def test_rope_scaling_matches_reference(kind, default_model_dir, kjv):
    from transformers import AutoModelForCausalLM

    from vllm_sink import model_variant

    overrides = VARIANTS[kind]
    model_dir = model_variant(default_model_dir, **overrides)
    prompts = [kjv[7000:7013], kjv[8000:8070]]
    outs, stats = greedy_in_fresh_engine(model_dir, SINK, prompts, 400, dtype="float32")
    assert stats["rebases"] >= 2, stats
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert hf.model.rotary_emb.rope_type == kind  # the variant really is scaled
    ref = StreamingReference(hf, block_size=32, **SINK)
    for prompt, (toks, lps) in zip(prompts, outs):
        mean, mx, agree = check_against_reference(ref, prompt, toks, lps, len(prompt))
        print(
            f"{kind} P={len(prompt)}: mean {mean:.1e} max {mx:.1e} agree {agree}/400; "
            f"{stats['rebases']} rebases"
        )
