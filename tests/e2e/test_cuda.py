"""CUDA: the plugin on vLLM's CUDA backend agrees with ``vllm_sink.reference`` on every
attention backend it supports, with CUDA graphs replaying the decode steps.

Run on a GPU machine: ``VLLM_SINK_PYTHON=python3 scripts/test -m gpu -s``
(``scripts/gpu-verify`` runs it with the GPU benchmarks and keeps the logs).

Real weights (the default model), vLLM's default CUDA block size (16): one 16-token
sink block + a 48-token window (C = 64), a copy of the model with a 160-position limit
so the position offset is rebased every few evictions. Four concurrent requests with
different prompt lengths each stream > 10x the capacity. The reference (float32, on
the GPU) is teacher-forced on vLLM's own tokens; the bf16 tolerance is the backend's
noise floor: vanilla vLLM on the same backend and settings against the same reference,
every stream within capacity.

Time on an H200: about 1 min per engine start with torch.compile (FlashInfer's
sampling module is JIT-built by the first one, ~2 min), seconds without, and ~80 s of
float32 reference per backend (2,800 tokens, every key re-rotated every step): give the
whole module ~12 minutes.

Engine settings (``MODES``): ``default`` is vLLM's own (torch.compile +
FULL_AND_PIECEWISE CUDA graphs); ``graphs`` skips torch.compile but keeps full CUDA
graphs for decode steps (what every decode of these streams replays, offsets and
rebased block tables included; engine start in seconds instead of minutes); ``eager``
is ``enforce_eager=True``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.e2e.conftest import greedy_in_fresh_engine, greedy_with_logprobs
from vllm_sink.reference import StreamingReference
from vllm_sink.tools.harness import make_llm, shutdown

pytestmark = pytest.mark.gpu

B = 16  # vLLM's default CUDA block size
SINK = {"sink_tokens": 4, "window_tokens": 48}  # S = 16, W = 48, C = 64
C = 64
LIMIT = 160  # K = 48, span 111: rebase when O > 49
STREAM = 700  # generated tokens per request (> 10 C)
SIZES = [1, 2, 4, 8]  # CUDA graph sizes (4-request decodes)
MODES = {
    "default": {"enforce_eager": False, "compilation_config": {"cudagraph_capture_sizes": SIZES}},
    "graphs": {
        "enforce_eager": False,
        "compilation_config": {
            "mode": 0,
            "cudagraph_mode": "FULL_DECODE_ONLY",
            "cudagraph_capture_sizes": SIZES,
        },
    },
    "eager": {"enforce_eager": True},
}
POOL = {"kv_cache_memory_bytes": 1 << 30}
_FLOORS: dict[tuple, float] = {}
_REFERENCE: dict[tuple, tuple] = {}


def record(name: str, payload: dict) -> None:
    """Append a result line to $VLLM_SINK_RESULTS_DIR/gpu_tests.jsonl (closing notes)."""
    out = os.environ.get("VLLM_SINK_RESULTS_DIR")
    print(f"\n[gpu] {name}: {json.dumps(payload)}", flush=True)
    if out:
        with open(os.path.join(out, "gpu_tests.jsonl"), "a") as fh:
            fh.write(json.dumps({"test": name, **payload}) + "\n")


@pytest.fixture(scope="module")
def small_model(default_model_dir):
    from vllm_sink import model_variant

    return model_variant(default_model_dir, max_position_embeddings=LIMIT)


@pytest.fixture(scope="module")
def reference_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False  # the oracle is plain float32
    torch.backends.cudnn.allow_tf32 = False
    return (
        AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
        .eval()
        .to("cuda")
    )


@pytest.fixture(scope="module")
def prompts(kjv):
    return [kjv[100:110], kjv[2000:2025], kjv[3000:3040], kjv[4000:4060]]


def score(ref_model, prompt, toks, lps):
    """(mean |diff|, max |diff|, top-1 agreement) of one request vs the reference
    teacher-forced on the same tokens (prompt as one step, then token by token)."""
    key = (tuple(prompt), tuple(toks))
    if key not in _REFERENCE:
        ref = StreamingReference(ref_model, block_size=B, position_limit=LIMIT, **SINK)
        _REFERENCE[key] = ref.stream().score(
            list(prompt) + list(toks), [len(prompt)] + [1] * len(toks)
        )
    lp_ref, top1 = _REFERENCE[key]
    diff = (lps - lp_ref[len(prompt) :]).abs()
    agree = (top1[len(prompt) :] == torch.tensor(toks)).float().mean()
    return float(diff.mean()), float(diff.max()), float(agree)


def vanilla(model, prompts, n, mode, **kw):
    """Vanilla vLLM (no sink section at all, vLLM's default runner)."""
    os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)  # set by an earlier sink engine
    llm = make_llm(model, None, **{**MODES[mode], **POOL, **kw})
    try:
        return greedy_with_logprobs(llm, prompts, n)
    finally:
        shutdown(llm)


def noise_floor(small_model, reference_model, prompts, mode, **kw) -> float:
    """Vanilla vLLM with these settings vs the reference, every stream within capacity
    (16 prompt + 47 generated = 63 < C tokens): the backend's own error."""
    key = (mode, json.dumps(kw, sort_keys=True))
    if key not in _FLOORS:
        outs = vanilla(small_model, [p[:16] for p in prompts], C - 1 - 16, mode, **kw)
        _FLOORS[key] = max(
            score(reference_model, p[:16], t, lp)[0] for p, (t, lp) in zip(prompts, outs)
        )
    return _FLOORS[key]


def stream(small_model, reference_model, prompts, mode, **kw):
    """The plugin streaming every prompt; (outputs, stats, per-request scores)."""
    outs, stats = greedy_in_fresh_engine(
        small_model, SINK, prompts, STREAM, **{**MODES[mode], **POOL, **kw}
    )
    rows = [score(reference_model, p, t, lp) for p, (t, lp) in zip(prompts, outs)]
    return outs, stats, rows


def check(name, mode, floor, outs, stats, rows, **kw):
    mean = sum(r[0] for r in rows) / len(rows)
    agree = min(r[2] for r in rows)
    record(
        name,
        {
            "mode": mode,
            **kw,
            "noise_floor": floor,
            "mean_abs_dlogp": mean,
            "max_abs_dlogp": max(r[1] for r in rows),
            "top1_agreement_min": agree,
            "evictions": stats["evictions"],
            "rebases": stats["rebases"],
            "sink_rewrites": stats["sink_rewrites"],
            "tokens": STREAM * len(rows),
        },
    )
    assert stats["rebases"] >= 5 and stats["active_requests"] == 0
    assert all(len(t) == STREAM for t, _ in outs)
    assert mean <= 1.5 * floor, (mean, floor)
    assert agree >= 0.98


def check_backend(backend, small_model, reference_model, prompts, mode="graphs"):
    """bf16 on ``backend`` (named with vLLM's --attention-backend) vs the reference,
    within 1.5x of vanilla vLLM's noise floor on the same backend."""
    floor = noise_floor(small_model, reference_model, prompts, "graphs", attention_backend=backend)
    outs, stats, rows = stream(
        small_model, reference_model, prompts, mode, attention_backend=backend
    )
    check(f"bf16 {backend}", mode, floor, outs, stats, rows, attention_backend=backend)


def test_flash_attn_with_vllm_defaults_matches_reference(small_model, reference_model, prompts):
    """vLLM's own defaults on Hopper: FLASH_ATTN (chosen by vLLM, not named here),
    torch.compile, FULL_AND_PIECEWISE CUDA graphs, async scheduling. The floor is vanilla
    FLASH_ATTN's."""
    from vllm.config import CompilationMode, CUDAGraphMode

    llm = make_llm(small_model, SINK, **{**MODES["default"], **POOL})
    try:
        cc = llm.llm_engine.vllm_config.compilation_config
        assert cc.mode == CompilationMode.VLLM_COMPILE, cc.mode
        assert cc.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE, cc.cudagraph_mode
        sc = llm.llm_engine.vllm_config.scheduler_config  # vLLM's CUDA default: async
        assert sc.async_scheduling and sc.scheduler_cls.endswith("SinkAsyncScheduler")
        outs = greedy_with_logprobs(llm, prompts, STREAM)
        stats = llm.collective_rpc("sink_stats")[0]
    finally:
        shutdown(llm)
    floor = noise_floor(
        small_model, reference_model, prompts, "graphs", attention_backend="FLASH_ATTN"
    )
    rows = [score(reference_model, p, t, lp) for p, (t, lp) in zip(prompts, outs)]
    check(
        "bf16 FLASH_ATTN, vLLM defaults (torch.compile + FULL_AND_PIECEWISE)",
        "default",
        floor,
        outs,
        stats,
        rows,
    )


def test_float32_graphs_vs_eager_and_reference(small_model, reference_model, prompts):
    """float32 (TRITON_ATTN; FLASH_ATTN has no float32): within 0.01 of the reference,
    and CUDA graphs on give exactly the tokens of enforce_eager, async scheduling (on in
    both, vLLM's default) exactly those of scheduling step by step."""
    f32 = {"dtype": "float32", "attention_backend": "TRITON_ATTN"}
    graphs, stats, rows = stream(small_model, reference_model, prompts, "graphs", **f32)
    eager, _ = greedy_in_fresh_engine(
        small_model, SINK, prompts, STREAM, **{**MODES["eager"], **POOL, **f32}
    )
    in_step, _ = greedy_in_fresh_engine(
        small_model,
        SINK,
        prompts,
        STREAM,
        **{**MODES["graphs"], **POOL, **f32},
        async_scheduling=False,
    )
    same = [t == e for (t, _), (e, _) in zip(graphs, eager)]
    same_sync = [t == e for (t, _), (e, _) in zip(graphs, in_step)]
    record(
        "float32 TRITON_ATTN graphs vs eager, async vs not",
        {
            "mean_abs_dlogp": max(r[0] for r in rows),
            "max_abs_dlogp": max(r[1] for r in rows),
            "top1_agreement_min": min(r[2] for r in rows),
            "rebases": stats["rebases"],
            "graphs_equal_eager": same,
            "async_equal_sync": same_sync,
        },
    )
    assert stats["rebases"] >= 5
    assert max(r[0] for r in rows) <= 0.01 and min(r[2] for r in rows) >= 0.98
    assert all(same) and all(same_sync)


def test_capacity_at_the_position_limit_bf16(default_model_dir, reference_model, kjv):
    """The StreamingLLM paper's setting scaled down: capacity = the model's position
    limit (16 sinks + 240 window on a 256-position copy, so K = 1), two streams of 20x
    the capacity. Every eviction needs new positions; with the rotary range doubled
    (``SinkLayout.rotary_positions``) the offset is rebased only every ~256 evicted
    tokens, so a bf16 window key is rotated at most once in its life instead of up to
    15 times. bf16 FLASH_ATTN with full decode graphs, within 1.5x vanilla's floor."""
    from vllm_sink import model_variant

    sink, limit, n = {"sink_tokens": 16, "window_tokens": 240}, 256, 20 * 256
    model = model_variant(default_model_dir, max_position_embeddings=limit)
    prompts = [kjv[5000:5030], kjv[6000:6050]]
    outs, stats = greedy_in_fresh_engine(model, sink, prompts, n, **{**MODES["graphs"], **POOL})
    floor_outs = vanilla(model, [p[:30] for p in prompts], limit - 31, "graphs")
    ref = StreamingReference(reference_model, block_size=B, position_limit=limit, **sink)
    assert ref.layout.capacity == limit and ref.layout.rotary_positions == 2 * limit

    def err(prompt, toks, lps):
        lp_ref, top1 = ref.stream().score(
            list(prompt) + list(toks), [len(prompt)] + [1] * len(toks)
        )
        diff = (lps - lp_ref[len(prompt) :]).abs()
        return float(diff.mean()), float((top1[len(prompt) :] == torch.tensor(toks)).float().mean())

    floor = max(err(p[:30], t, lp)[0] for p, (t, lp) in zip(prompts, floor_outs))
    rows = [err(p, t, lp) for p, (t, lp) in zip(prompts, outs)]
    mean = sum(r[0] for r in rows) / len(rows)
    record(
        "bf16 capacity = position limit",
        {
            "capacity": limit,
            "tokens_per_stream": n,
            "noise_floor": floor,
            "mean_abs_dlogp": mean,
            "top1_agreement_min": min(r[1] for r in rows),
            "evictions": stats["evictions"],
            "rebases": stats["rebases"],
        },
    )
    assert all(len(t) == n for t, _ in outs)
    # ~ (n + 30 - 256) / 16 = 306 evictions per stream, a rebase every 17 of them
    # (when O passes 512 - 256); with the range at the limit, every one would rebase.
    assert 2 * 12 <= stats["rebases"] <= 2 * 24, stats
    assert mean <= 1.5 * floor, (mean, floor)
    assert min(r[1] for r in rows) >= 0.98


def test_unverified_backends_are_refused(small_model, monkeypatch):
    """A backend the plugin was not verified on is refused by name at startup, even
    when named in the opt-in list (the opt-in covers only listed unverified ones)."""
    from vllm_sink.core import backends
    from vllm_sink.core.config import SinkConfigError

    monkeypatch.setenv(backends.ENV, "FLEX_ATTENTION")
    with pytest.raises(SinkConfigError, match="FLEX_ATTENTION.*FLASH_ATTN, TRITON_ATTN"):
        make_llm(small_model, SINK, attention_backend="FLEX_ATTENTION")


# These oracles are what verifies a backend on a vLLM release, so each opts its backend
# in (VLLM_SINK_UNVERIFIED_BACKENDS; a no-op where it is verified already).
def test_triton_attn_matches_reference_bf16(small_model, reference_model, prompts, monkeypatch):
    monkeypatch.setenv("VLLM_SINK_UNVERIFIED_BACKENDS", "TRITON_ATTN")
    check_backend("TRITON_ATTN", small_model, reference_model, prompts)


def test_flashinfer_matches_reference_bf16(small_model, reference_model, prompts, monkeypatch):
    """Last: FlashInfer may compile its kernels at first use."""
    monkeypatch.setenv("VLLM_SINK_UNVERIFIED_BACKENDS", "FLASHINFER")
    check_backend("FLASHINFER", small_model, reference_model, prompts)
