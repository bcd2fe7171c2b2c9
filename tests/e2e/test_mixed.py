"""Per-request streaming: dense requests and streams of different layouts in one batch,
blocks taken on demand, and streams preempted under a tiny pool that continue exactly.

float32, block size 32. The engine's section (4 sinks + a 96-token window, C = 128) is
the default and the maximum; each request may choose dense attention or a smaller
layout through ``SamplingParams.extra_args["sink"]``."""

import pytest
import torch

from tests.e2e.conftest import check_against_reference
from vllm_sink.reference import StreamingReference
from vllm_sink.tools.harness import make_llm, shutdown, worker_stats

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 96}  # C = 128, K = 96: 7 blocks max
BLOCK_BYTES = 2 * 30 * 3 * 32 * 64 * 4  # K+V, 30 layers, 3 heads, fp32


@pytest.fixture(scope="module")
def reference_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def _run(llm, requests, max_tokens):
    """requests: [(prompt, extra_args)]; greedy, ignore EOS; (tokens, log-probs) each."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True, extra_args=extra
        )
        for _, extra in requests
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], params, use_tqdm=False)
    result = []
    for o in outs:
        toks = list(o.outputs[0].token_ids)
        result.append(
            (toks, torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, toks)]))
        )
    return result


def test_mixed_batch_each_matches_its_own_reference(default_model_dir, reference_model, kjv):
    """Two dense requests, two streams with different windows and a window-only stream,
    all in one continuous batch: dense ones equal vanilla vLLM, streams their reference."""
    dense = [(kjv[100:120], {"sink": False}), (kjv[900:960], {"sink": "dense"})]
    streams = [
        (kjv[2000:2030], None, SINK),
        (kjv[3000:3050], {"sink": {"window_tokens": 64}}, {"sink_tokens": 4, "window_tokens": 64}),
        (
            kjv[4000:4040],
            {"sink": '{"sink_tokens": 0, "window_tokens": 128}'},
            {"sink_tokens": 0, "window_tokens": 128},
        ),
    ]
    llm = make_llm(default_model_dir, SINK, dtype="float32", disable_log_stats=False)
    try:
        outs = _run(llm, dense + [(p, extra) for p, extra, _ in streams], 300)
        stats = worker_stats(llm)
    finally:
        shutdown(llm)
    vanilla = make_llm(default_model_dir, dtype="float32", block_size=32, max_model_len=1024)
    try:
        expected = _run(vanilla, dense, 300)
    finally:
        shutdown(vanilla)
    for (toks, lps), (want, want_lps) in zip(outs[:2], expected):
        n = next((i for i, (a, b) in enumerate(zip(toks, want)) if a != b), len(want))
        print(
            f"dense: greedy equal for {n}/300, mean |dlogp| "
            f"{(lps[:n] - want_lps[:n]).abs().mean():.1e}"
        )
        assert n >= 280 and (lps[:n] - want_lps[:n]).abs().mean() <= 0.01
    for (prompt, _, layout), (toks, lps) in zip(streams, outs[2:]):
        ref = StreamingReference(reference_model, block_size=32, **layout)
        mean, mx, agree = check_against_reference(
            ref, prompt, toks, lps, len(prompt), min_agree_after_evict=150
        )
        print(f"stream {layout}: mean {mean:.1e} max {mx:.1e} agree {agree}/300")
    assert stats["requests"] == 3 and stats["evictions"] > 0 and stats["active_requests"] == 0


# slow: tests/e2e/test_pin.py's oracle preempts streams (pinned ones among them) in a
# tiny pool and holds each to its reference in the default run.
@pytest.mark.slow
def test_preempted_streams_continue_exactly(default_model_dir, reference_model, kjv):
    """A pool of 10 blocks for three streams that each grow to 4: vLLM preempts streams
    to let others run; each preempted stream's cached KV is saved and restored on resume
    (nothing recomputed), so every stream still agrees with its reference token by
    token, and the pool is whole again afterwards."""
    prompts = [kjv[6000:6030], kjv[7000:7040], kjv[8000:8020]]
    llm = make_llm(
        default_model_dir,
        SINK,
        dtype="float32",
        disable_log_stats=False,
        kv_cache_memory_bytes=10 * BLOCK_BYTES,
    )
    try:
        assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == 10
        outs = _run(llm, [(p, None) for p in prompts], 400)
        stats = worker_stats(llm)
        metrics = {m.name: getattr(m, "value", None) for m in llm.llm_engine.get_metrics()}
    finally:
        shutdown(llm)
    print(
        f"preemptions {metrics['vllm:num_preemptions']}, KV saved {stats['kv_saves']}, "
        f"restored {stats['kv_restores']} ({stats['tokens_restored']} tokens)"
    )
    assert metrics["vllm:num_preemptions"] >= 1
    assert stats["kv_saves"] == stats["kv_restores"] >= 1 and stats["tokens_restored"] > 0
    assert metrics["vllm:kv_cache_usage_perc"] == 0 and stats["active_requests"] == 0
    ref = StreamingReference(reference_model, block_size=32, **SINK)
    for prompt, (toks, lps) in zip(prompts, outs):
        assert len(toks) == 400
        mean, mx, agree = check_against_reference(ref, prompt, toks, lps, len(prompt))
        print(f"preempted stream: mean {mean:.1e} max {mx:.1e} agree {agree}/400")
