"""What a token attends to is a function of its request alone, never of the engine's load.

A long prompt (~5x the capacity) is read in chunks on a grid fixed by the request
(vllm_sink.core.policy): eviction happens only where a chunk starts, and the scheduler
never lets a step cross a chunk's end. Alone in the engine the step budget cuts the
chunks one way; among 16 other requests (prompts being read, streams decoding) it cuts
them another way. float32 CPU: the prompt log-probs must agree within 1e-4 (before the
grid, a step's eviction depended on where the shared budget cut the prompt, and the
same request attended different tokens under load)."""

import pytest
import torch

from vllm_sink.tools.harness import make_llm, shutdown, worker_stats

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 96}  # C = 128 (B = 32), K = 96, span 223


def _prompt_logprobs(out, prompt) -> torch.Tensor:
    return torch.tensor(
        [out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(prompt) if i > 0]
    )


def test_prompt_logprobs_alone_equal_under_load(default_model_dir, kjv):
    from vllm import SamplingParams

    # A small step budget, so chunks are split into several steps alone too.
    llm = make_llm(
        default_model_dir, SINK, dtype="float32", max_num_batched_tokens=80, max_num_seqs=24
    )
    target = kjv[60000:60650]
    scored = SamplingParams(max_tokens=1, prompt_logprobs=0)
    others = [kjv[61000 + 700 * i : 61000 + 700 * i + 40 + 37 * i] for i in range(16)]
    busy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    try:
        (alone,) = llm.generate([{"prompt_token_ids": target}], scored, use_tqdm=False)
        # The target in the middle of the batch, so the budget is shared while it reads.
        batch = (
            [{"prompt_token_ids": p} for p in others[:8]]
            + [{"prompt_token_ids": target}]
            + [{"prompt_token_ids": p} for p in others[8:]]
        )
        params = [busy] * 8 + [scored] + [busy] * 8
        outs = llm.generate(batch, params, use_tqdm=False)
        stats = worker_stats(llm)
    finally:
        shutdown(llm)
    a, b = _prompt_logprobs(alone, target), _prompt_logprobs(outs[8], target)
    diff = (a - b).abs()
    print(
        f"650-token prompt alone vs among 16: max |dlogp| {diff.max():.2e}, "
        f"{stats['evictions']} evictions"
    )
    assert stats["evictions"] > 16  # the target and the others streamed through
    assert diff.max() <= 1e-4, f"first differing token {int((diff > 1e-4).nonzero()[0])}"
