"""Core oracle: vLLM + plugin agrees token by token with vllm_sink.reference.

float32, small capacity (one 32-token sink block + 96-token window, C = 128), several
concurrent requests each streaming far past capacity. Log-probs of vLLM's sampled
tokens vs the reference teacher-forced on the same tokens in the same step sizes:
mean |diff| <= 0.01, max <= 0.1; free-running greedy generations must agree for at
least 300 tokens after each request's first eviction."""

import pytest
import torch

from tests.e2e.conftest import (
    check_against_reference,
    greedy_in_fresh_engine,
    greedy_with_logprobs,
)
from vllm_sink.core.policy import prefill_steps
from vllm_sink.reference import StreamingReference
from vllm_sink.tools.harness import make_llm, shutdown, worker_stats

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 96}  # S = 32, W = 96, C = 128 (B = 32)


@pytest.fixture(scope="module")
def reference_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.mark.slow
def test_concurrent_streams_match_reference(default_model_dir, reference_model, kjv):
    # Four prompts of different lengths, all <= C (no eviction inside the prompt,
    # so vLLM's choice of prefill chunks does not change any score).
    prompts = [kjv[100:105], kjv[2000:2040], kjv[3000:3077], kjv[4000:4120]]
    outs, stats = greedy_in_fresh_engine(default_model_dir, SINK, prompts, 450, dtype="float32")
    ref = StreamingReference(reference_model, block_size=32, **SINK)
    for prompt, (toks, lps) in zip(prompts, outs):
        mean, mx, agree = check_against_reference(ref, prompt, toks, lps, len(prompt))
        print(f"P={len(prompt)}: mean {mean:.1e} max {mx:.1e} greedy agree {agree}/450")
    # Each stream of P + 450 tokens evicted all but <= C of them, in whole blocks.
    assert stats["tokens_evicted"] >= sum(len(p) + 450 - 128 for p in prompts)
    assert stats["active_requests"] == 0


def test_rebase_and_streamed_prompt_match_reference(default_model_dir, reference_model, kjv):
    """max_position_embeddings = 160 (C = 128, so the default prefill chunk shrinks to
    33 tokens): the rotary range is 2 x 160 (the model's table is extended), so the
    position offset is rebased every ~160 evicted tokens; a 500-token prompt (~4x C) is
    read in chunks of 160 then 33 tokens, which the step budget of 64 splits into
    several steps each (what every token attends to is the chunks', not the steps');
    total stream 700 tokens > 4x the model's trained context."""
    from vllm_sink import model_variant

    small = model_variant(default_model_dir, max_position_embeddings=160)
    llm = make_llm(small, SINK, dtype="float32", max_num_batched_tokens=64)
    try:
        long_prompt = kjv[20000:20500]
        ((toks, lps),) = greedy_with_logprobs(llm, [long_prompt], 200)
        batch = greedy_with_logprobs(llm, [kjv[30000:30010], kjv[31000:31050]], 300)
        from vllm import SamplingParams

        (scored,) = llm.generate(
            [{"prompt_token_ids": long_prompt}],
            SamplingParams(max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
        )
        stats = worker_stats(llm)
    finally:
        shutdown(llm)
    assert stats["rebases"] >= 3, stats
    ref = StreamingReference(reference_model, block_size=32, position_limit=160, **SINK)
    steps = prefill_steps(ref.layout, len(long_prompt))
    assert steps[:3] == [160, 33, 33] and ref.layout.chunk_tokens == 33
    assert ref.layout.rotary_positions == 320
    mean, mx, agree = check_against_reference(ref, long_prompt, toks, lps, steps)
    print(
        f"streamed 500-token prompt: mean {mean:.1e} max {mx:.1e} agree {agree}/200; "
        f"{stats['rebases']} rebases"
    )
    for prompt, (t, lp) in zip([kjv[30000:30010], kjv[31000:31050]], batch):
        check_against_reference(ref, prompt, t, lp, len(prompt))
    # Prompt log-probs of the streamed prompt, in absolute positions.
    got = torch.tensor(
        [scored.prompt_logprobs[i][tok].logprob for i, tok in enumerate(long_prompt) if i > 0]
    )
    want = ref.stream().teacher_force(long_prompt, steps)[1:]
    assert (got - want).abs().max() <= 0.1 and (got - want).abs().mean() <= 0.01


# slow: the default run checks a window-only stream against its reference in
# test_mixed.py (in a mixed batch); this one, alone and with a longer prompt, in --all.
@pytest.mark.slow
def test_window_only_matches_reference(default_model_dir, reference_model, kjv):
    sink = {"sink_tokens": 0, "window_tokens": 128}
    prompts = [kjv[500:520], kjv[600:690]]
    outs, _ = greedy_in_fresh_engine(default_model_dir, sink, prompts, 300, dtype="float32")
    ref = StreamingReference(reference_model, block_size=32, **sink)
    for prompt, (toks, lps) in zip(prompts, outs):
        check_against_reference(ref, prompt, toks, lps, len(prompt), min_agree_after_evict=150)


@pytest.mark.slow
def test_several_sink_blocks_and_block_64_match_reference(default_model_dir, reference_model, kjv):
    """Block size 64, sink_tokens 70 -> 2 sink blocks (128 tokens), window 100 -> 2 blocks
    (128), C = 256, max_position_embeddings 320: the rotary range is then two rows of five
    64-token blocks (640 positions), so the 200-token prompt's stream rebases too."""
    from vllm_sink import model_variant

    sink = {"sink_tokens": 70, "window_tokens": 100}
    small = model_variant(default_model_dir, max_position_embeddings=320)
    prompts = [kjv[40000:40030], kjv[41000:41200]]
    outs, stats = greedy_in_fresh_engine(small, sink, prompts, 500, dtype="float32", block_size=64)
    assert stats["rebases"] >= 1, stats
    ref = StreamingReference(reference_model, block_size=64, position_limit=320, **sink)
    assert (ref.layout.sink_tokens, ref.layout.capacity) == (128, 256)
    for prompt, (toks, lps) in zip(prompts, outs):
        mean, mx, agree = check_against_reference(ref, prompt, toks, lps, len(prompt))
        print(
            f"2 sink blocks, B=64, P={len(prompt)}: mean {mean:.1e} max {mx:.1e} "
            f"agree {agree}/500; {stats['rebases']} rebases"
        )


def test_long_prompt_read_at_full_window(default_model_dir, reference_model, kjv):
    """A prompt of 10x the capacity with vLLM's own step budget (no tuning): after the
    first step, read K = 96 tokens a step into the headroom beyond C, so each prompt
    token sees the sinks and at least W - B recent tokens. Its prompt log-probs equal
    the reference reading it the same way, and the continuation matches too."""
    prompt = kjv[50000:51300]
    llm = make_llm(default_model_dir, SINK, dtype="float32")
    try:
        from vllm import SamplingParams

        (out,) = llm.generate(
            [{"prompt_token_ids": prompt}],
            SamplingParams(
                max_tokens=100, temperature=0, ignore_eos=True, prompt_logprobs=0, logprobs=0
            ),
            use_tqdm=False,
        )
        stats = worker_stats(llm)
    finally:
        shutdown(llm)
    ref = StreamingReference(reference_model, block_size=32, **SINK)
    steps = prefill_steps(ref.layout, len(prompt))
    assert steps[0] == ref.layout.span and set(steps[1:-1]) == {96}
    got = torch.tensor(
        [out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(prompt) if i > 0]
    )
    want = ref.stream().teacher_force(prompt, steps)[1:]
    diff = (got - want).abs()
    print(
        f"1300-token prompt, C = 128, K = 96: prompt mean |dlogp| {diff.mean():.1e} "
        f"max {diff.max():.1e}; {stats['evictions']} evictions"
    )
    assert diff.mean() <= 0.01 and diff.max() <= 0.1
    toks = list(out.outputs[0].token_ids)
    lps = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, toks)])
    check_against_reference(ref, prompt, toks, lps, steps, min_agree_after_evict=100)
