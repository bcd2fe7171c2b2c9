"""Offline batch: every request generates past 4x the model's trained context.

    .venv/bin/python examples/offline_endless.py                  # ~2 minutes on 2 cores
    .venv/bin/python examples/offline_endless.py --trained-context 8192 --tokens 40000

By default the model is the default SmolLM2-135M-Instruct with max_position_embeddings
cut to 512 (same weights), so "4x the trained context" is 2048 tokens per request and
the run takes minutes; pass --trained-context 8192 for the real model (hours on a CPU).
Prints, as it goes, each request's tokens, the KV blocks held and the throughput.
"""

from __future__ import annotations

import argparse
import sys
import time

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain, step by step and in great detail, how a city grows over centuries.",
    "Describe a journey across an endless desert.",
    "List and describe, one by one, every kind of tree you know.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--trained-context",
        type=int,
        default=512,
        help="max_position_embeddings of the model copy (default 512)",
    )
    ap.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens per request (default: 4x trained context + 100)",
    )
    ap.add_argument("--requests", type=int, default=len(PROMPTS))
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument(
        "--window-tokens",
        type=int,
        default=None,
        help="default: the trained context minus one sink block",
    )
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_sink import default_model, model_variant

    model = default_model()
    if args.trained_context != 8192:
        model = model_variant(model, max_position_embeddings=args.trained_context)
    window = args.window_tokens or args.trained_context - 32
    tokens = args.tokens or 4 * args.trained_context + 100
    llm = LLM(
        model,
        enforce_eager=True,
        kv_cache_memory_bytes=512 << 20,
        disable_log_stats=False,
        additional_config={"sink": {"sink_tokens": args.sink_tokens, "window_tokens": window}},
    )
    engine = llm.llm_engine
    total_blocks = engine.vllm_config.cache_config.num_gpu_blocks - 1
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=tokens, ignore_eos=True)
    for i in range(args.requests):
        chat = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        engine.add_request(f"req{i}", {"prompt": text}, params)

    done: dict[str, int] = {}
    counts = {f"req{i}": 0 for i in range(args.requests)}
    start, last_print = time.monotonic(), 0.0
    while engine.has_unfinished_requests():
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                done[out.request_id] = counts[out.request_id]
        now = time.monotonic()
        if now - last_print > 1.0 or not engine.has_unfinished_requests():
            last_print = now
            usage = {m.name: getattr(m, "value", 0) for m in engine.get_metrics()}
            blocks = round(usage.get("vllm:kv_cache_usage_perc", 0) * total_blocks)
            rate = sum(counts.values()) / max(now - start, 1e-9)
            bar = " ".join(f"{r}:{n:>6}" for r, n in counts.items())
            sys.stderr.write(f"\r{bar} | KV blocks held {blocks:>4} | {rate:6.1f} tok/s")
            sys.stderr.flush()
    sys.stderr.write("\n")
    elapsed = time.monotonic() - start
    print(
        f"{len(done)} requests x {tokens} tokens ({tokens / args.trained_context:.1f}x the "
        f"trained context of {args.trained_context}) in {elapsed:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
