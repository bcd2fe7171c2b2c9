"""CUDA: the plugin on vLLM's CUDA backend agrees with ``vllm_sink.reference``, on every
attention backend it supports, with torch.compile and CUDA graphs on (vLLM's defaults).

Run on a GPU machine: ``VLLM_SINK_PYTHON=python3 scripts/test -m gpu -s``.

Real weights (the default model), vLLM's default CUDA block size (16): one 16-token
sink block + a 112-token window (C = 128), a copy of the model with a 200-position
limit so the position offset is rebased every few evictions. Four concurrent requests
with different prompt lengths each stream 10x the capacity. The reference (float32, on
the GPU) is teacher-forced on vLLM's own tokens; the tolerance is the backend's noise
floor: vanilla vLLM on the same backend against the same reference within capacity."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.conftest import greedy_in_fresh_engine, greedy_with_logprobs, make_llm, shutdown
from vllm_sink.reference import StreamingReference

pytestmark = pytest.mark.gpu

B = 16                                             # vLLM's default CUDA block size
SINK = {"sink_tokens": 4, "window_tokens": 48}     # S = 16, W = 48, C = 64
LIMIT = 100                                        # positions: rebase when O + C > 100
STREAM = 650                                       # generated tokens per request (> 10 C)
# Fewer CUDA graph sizes than vLLM's default keeps engine start short; the four-request
# decode batches of these tests replay the size-4 graph (FULL_AND_PIECEWISE).
GRAPHS = {"cudagraph_capture_sizes": [1, 2, 4, 8]}
CUDA = {"enforce_eager": False, "compilation_config": GRAPHS, "kv_cache_memory_bytes": 1 << 30}


@pytest.fixture(scope="module")
def small_model(default_model_dir):
    from vllm_sink import model_variant

    return model_variant(default_model_dir, max_position_embeddings=LIMIT)


@pytest.fixture(scope="module")
def reference_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32).eval().to("cuda")


@pytest.fixture(scope="module")
def prompts(kjv):
    return [kjv[100:110], kjv[2000:2025], kjv[3000:3040], kjv[4000:4060]]


def score(ref_model, prompt, toks, lps):
    """(mean |diff|, max |diff|, top-1 agreement) of one request vs the reference
    teacher-forced on the same tokens (prompt as one step, then token by token)."""
    ref = StreamingReference(ref_model, block_size=B, position_limit=LIMIT, **SINK)
    lp_ref, top1 = ref.stream().score(list(prompt) + list(toks), [len(prompt)] + [1] * len(toks))
    diff = (lps - lp_ref[len(prompt):]).abs()
    agree = (top1[len(prompt):] == torch.tensor(toks)).float().mean()
    return float(diff.mean()), float(diff.max()), float(agree)


def run(model, sink, prompts, n, **kw):
    if sink is None:  # vanilla vLLM: no sink section at all, vLLM's default runner
        import os

        os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)  # set by an earlier sink engine
        llm = make_llm(model, None, **{**CUDA, "max_num_batched_tokens": 512, **kw})
        try:
            return greedy_with_logprobs(llm, prompts, n), {}
        finally:
            shutdown(llm)
    return greedy_in_fresh_engine(model, sink, prompts, n, **{**CUDA, **kw})


def noise_floor(small_model, reference_model, prompts, **kw) -> float:
    """Vanilla vLLM on this backend vs the reference, every stream within capacity."""
    budget = 64 - 1
    outs, _ = run(small_model, None, [p[:16] for p in prompts], budget - 16, **kw)
    return max(score(reference_model, p[:16], t, lp)[0] for p, (t, lp) in zip(prompts, outs))


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"])
def test_backend_matches_reference_bf16(backend, small_model, reference_model, prompts):
    floor = noise_floor(small_model, reference_model, prompts, attention_backend=backend)
    outs, stats = run(small_model, SINK, prompts, STREAM, attention_backend=backend)
    rows = [score(reference_model, p, t, lp) for p, (t, lp) in zip(prompts, outs)]
    mean = sum(r[0] for r in rows) / len(rows)
    agree = min(r[2] for r in rows)
    print(f"\n{backend} bf16: noise floor {floor:.4f}; plugin mean |dlogp| {mean:.4f} "
          f"(max {max(r[1] for r in rows):.3f}), top-1 agreement >= {agree:.4f}; "
          f"{stats['evictions']} evictions, {stats['rebases']} rebases")
    assert stats["rebases"] >= 5 and stats["active_requests"] == 0
    assert mean <= 1.5 * floor, (mean, floor)
    assert agree >= 0.98


def test_float32_triton_matches_reference(small_model, reference_model, prompts):
    outs, stats = run(small_model, SINK, prompts, STREAM, dtype="float32",
                      attention_backend="TRITON_ATTN")
    rows = [score(reference_model, p, t, lp) for p, (t, lp) in zip(prompts, outs)]
    print(f"\nTRITON_ATTN float32: mean |dlogp| {max(r[0] for r in rows):.2e} "
          f"(max {max(r[1] for r in rows):.2e}), top-1 >= {min(r[2] for r in rows):.4f}; "
          f"{stats['rebases']} rebases")
    assert max(r[0] for r in rows) <= 0.01 and min(r[2] for r in rows) >= 0.98


def test_cuda_graphs_replay_the_same_stream(small_model, prompts):
    """Captured CUDA graphs read positions (with their offsets) and block tables from
    vLLM's persistent buffers: a stream with evictions and rebases gives the same greedy
    tokens with graphs on and off (bf16, same compiled model), and with graphs on vs
    enforce_eager (float32, where compilation does not move the argmax)."""
    n = 400
    graphs, _ = run(small_model, SINK, prompts, n, attention_backend="FLASH_ATTN")
    plain, stats = run(small_model, SINK, prompts, n, attention_backend="FLASH_ATTN",
                       compilation_config={**GRAPHS, "cudagraph_mode": "NONE"})
    assert stats["rebases"] >= 5
    assert [t for t, _ in graphs] == [t for t, _ in plain]
    f32 = {"dtype": "float32", "attention_backend": "TRITON_ATTN"}
    graphs, _ = run(small_model, SINK, prompts, n, **f32)
    eager, _ = run(small_model, SINK, prompts, n, **{**f32, "enforce_eager": True})
    assert [t for t, _ in graphs] == [t for t, _ in eager]
