"""Helpers for e2e tests: the engine fixture, vanilla runs in a fresh process, greedy
comparisons and the reference check. Engines and servers come from
``vllm_sink.tools.harness`` (small fixed KV pool, eager), shared with the benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_sink.tools.harness import (
    KV_BYTES,
    engine_in_process,
    gpu_share,
    make_llm,
    shutdown,
    worker_stats,
)


@pytest.fixture
def engine_factory():
    engines = []

    def make(*args, **kw):
        llm = make_llm(*args, **kw)
        engines.append(llm)
        return llm

    yield make
    for llm in engines:
        shutdown(llm)


def generate_in_subprocess(
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    env: dict[str, str],
    top_logprobs: int | None = None,
    **engine_kw,
) -> list:
    """Greedy generations from a fresh Python process (e.g. with plugins disabled): the
    token ids per prompt, or with ``top_logprobs`` what ``greedy_top`` returns. Its
    engine core runs where ``make_llm``'s would (``engine_in_process``)."""
    script = os.path.join(os.path.dirname(__file__), "_generate.py")
    args = json.dumps(
        {
            "model": model,
            "prompts": prompts,
            "max_tokens": max_tokens,
            "top_logprobs": top_logprobs,
            "engine": {
                "kv_cache_memory_bytes": KV_BYTES,
                "enforce_eager": True,
                "seed": 0,
                **gpu_share(),
                **engine_kw,
            },
        }
    )
    out = subprocess.run(
        [sys.executable, script, args],
        env={
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if engine_in_process() else "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    if top_logprobs is None:
        return result
    return [
        (toks, [{int(t): lp for t, lp in top.items()} for top in tops]) for toks, tops in result
    ]


def greedy_top(llm, prompts, max_tokens: int, k: int = 5):
    """Greedy generations (ignore EOS): per prompt (token ids, per token the top-``k``
    log-probs as {token id: log-prob}, the sampled token always among them)."""
    from vllm import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=k, ignore_eos=True),
        use_tqdm=False,
    )
    return [
        (
            list(o.outputs[0].token_ids),
            [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
        )
        for o in outs
    ]


def assert_greedy_close(a, b, names=("a", "b"), tie=0.25, prefix_tol=0.1) -> int:
    """Two engines' greedy runs (``greedy_top`` results for the same prompts) are the
    same computation: token for token equal, or equal up to a near-tie and not compared
    after it (vLLM's own check_logprobs_close rule, with the tie bounded). Kernels that
    reduce in another order (thread counts, batch shapes) move log-probs in their last
    bits, and greedy decoding amplifies a flipped near-tie into a different continuation
    however exact everything else is. At the first differing token i: each engine's
    token is in the other's top-k, and each engine ranks the two within ``tie`` nats;
    before i, the sampled tokens' log-probs agree within ``prefix_tol``. Returns how
    many prompts diverged (at a near-tie)."""
    diverged = 0
    for n, ((ta, la), (tb, lb)) in enumerate(zip(a, b, strict=True)):
        assert len(ta) == len(tb), (n, len(ta), len(tb))
        i = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        for j in range(i):
            gap = abs(la[j][ta[j]] - lb[j][tb[j]])
            assert gap <= prefix_tol, (
                f"prompt {n} token {j}: log-prob {la[j][ta[j]]:.4f} "
                f"({names[0]}) vs {lb[j][tb[j]]:.4f} ({names[1]})"
            )
        if i == len(ta):
            continue
        diverged += 1
        x, y = ta[i], tb[i]
        where = f"prompt {n} token {i}: {names[0]} {x}, {names[1]} {y}"
        assert x in lb[i] and y in la[i], f"{where}: not in each other's top-k ({la[i]}; {lb[i]})"
        assert la[i][x] - la[i][y] <= tie and lb[i][y] - lb[i][x] <= tie, (
            f"{where}: not a near-tie ({la[i]}; {lb[i]})"
        )
    return diverged


def greedy_with_logprobs(llm, prompts, max_tokens):
    """Greedy generations (ignore EOS) and the log-prob of each sampled token."""
    import torch
    from vllm import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True),
        use_tqdm=False,
    )
    result = []
    for o in outs:
        toks = list(o.outputs[0].token_ids)
        lps = [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, toks)]
        result.append((toks, torch.tensor(lps)))
    return result


def greedy_in_fresh_engine(model: str, sink: dict, prompts, max_tokens: int, **engine_kw):
    """Start a sink engine, run ``greedy_with_logprobs``, read the worker's sink stats,
    shut the engine down; return (outputs, stats)."""
    llm = make_llm(model, sink, **engine_kw)
    try:
        outs = greedy_with_logprobs(llm, prompts, max_tokens)
        return outs, worker_stats(llm)
    finally:
        shutdown(llm)


def check_against_reference(ref, prompt, toks, lps, prefill_steps, min_agree_after_evict=300):
    """Compare one request against the ``StreamingReference`` ``ref`` (core oracle
    tolerances: mean |diff| <= 0.01, max <= 0.1; greedy agreement after the first
    eviction); return (mean, max, agreement).

    Greedy agreement: on the CPU the engine and the reference run the same float32
    kernels, so the free-running greedy continuations agree token by token (at least
    ``min_agree_after_evict`` tokens past the first eviction). On a GPU the engine's
    float32 kernels differ from the CPU reference's in the last bits, and a free-running
    comparison breaks at the first near-tie however exact the cache is; there the
    reference's top-1 on the engine's own tokens (teacher-forced) must agree on >= 98%
    of them, as in tests/e2e/test_cuda.py; the agreement returned is that count."""
    import torch

    steps = prefill_steps if isinstance(prefill_steps, list) else [len(prompt)]
    if torch.cuda.is_available():
        ref_lp, top1 = ref.stream().score(list(prompt) + list(toks), steps + [1] * len(toks))
        ref_lp, top1 = ref_lp[len(prompt) :], top1[len(prompt) :]
        agree = int((top1 == torch.tensor(toks)).sum())
        diff = (lps - ref_lp).abs()
        assert diff.mean() <= 0.01 and diff.max() <= 0.1, (float(diff.mean()), float(diff.max()))
        assert agree >= 0.98 * len(toks), (agree, len(toks))
        return float(diff.mean()), float(diff.max()), agree
    greedy, greedy_lp = ref.stream().greedy(prompt, len(toks), prefill_steps)
    agree = next((i for i, (a, b) in enumerate(zip(toks, greedy)) if a != b), len(toks))
    if agree == len(toks):
        ref_lp = torch.tensor(greedy_lp)
    else:
        stream = ref.stream()
        ref_lp = stream.teacher_force(list(prompt) + toks, steps + [1] * len(toks))[len(prompt) :]
    diff = (lps - ref_lp).abs()
    first_evict = max(0, ref.layout.capacity - len(prompt))  # tokens before eviction
    assert diff.mean() <= 0.01 and diff.max() <= 0.1, (float(diff.mean()), float(diff.max()))
    assert agree - first_evict >= min(min_agree_after_evict, len(toks) - first_evict), agree
    return float(diff.mean()), float(diff.max()), agree
