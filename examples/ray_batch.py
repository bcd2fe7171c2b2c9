"""Ray Data batch inference with vLLM + vllm_sink inside Ray workers.

    .venv/bin/pip install "ray[data]==2.60.0"
    .venv/bin/python examples/ray_batch.py --out ray_batch_out     # JSONL + Parquet

A dataset of prompts flows through ``map_batches`` into an actor that owns an ``LLM``
with sink mode on; every prompt generates a stream longer than the model's trained
context (a copy of the default model with max_position_embeddings 512, same weights:
4 x 512 + 100 tokens per prompt by default). Results are written as JSONL and Parquet.
With ``--compare`` the same job also runs through a plain ``LLM.generate`` in this
process and both throughputs are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Describe a journey across an endless desert.",
    "Explain how a city grows over centuries.",
    "Tell the history of a river, from spring to sea.",
]


def engine_kwargs(model: str, context: int) -> dict:
    return dict(
        model=model,
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        additional_config={"sink": {"sink_tokens": 4, "window_tokens": context - 32}},
    )


class SinkGenerator:
    """Ray Data callable class: one LLM per actor, reused across batches."""

    def __init__(self, model: str, context: int, tokens: int) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(**engine_kwargs(model, context))
        self.params = SamplingParams(
            temperature=0.8, top_p=0.95, max_tokens=tokens, ignore_eos=True, seed=0
        )

    def __call__(self, batch: dict) -> dict:
        outs = self.llm.generate(list(batch["prompt"]), self.params, use_tqdm=False)
        return {
            "prompt": [o.prompt for o in outs],
            "text": [o.outputs[0].text for o in outs],
            "tokens": [len(o.outputs[0].token_ids) for o in outs],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", default="ray_batch_out", help="output directory (jsonl/ and parquet/ inside)"
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--context", type=int, default=512, help="trained context of the copy")
    ap.add_argument("--tokens", type=int, default=None, help="default: 4 x context + 100")
    ap.add_argument("--actors", type=int, default=1, help="LLM actors (one engine each)")
    ap.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)",
    )
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args(argv)

    import ray

    from vllm_sink import default_model, model_variant

    model = model_variant(default_model(), max_position_embeddings=args.context)
    tokens = args.tokens or 4 * args.context + 100
    items = [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(args.prompts)]

    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1"}}
    if args.address or os.environ.get("RAY_ADDRESS"):  # an existing cluster
        ray.init(address=args.address, runtime_env=runtime_env)
    else:  # a local Ray on this machine
        ray.init(num_cpus=max(2, args.actors), include_dashboard=False, runtime_env=runtime_env)
    t0 = time.monotonic()
    ds = ray.data.from_items(items).map_batches(
        SinkGenerator,
        fn_constructor_args=(model, args.context, tokens),
        batch_size=max(1, len(items) // args.actors),
        concurrency=args.actors,
        num_cpus=1,
    )
    ds = ds.materialize()
    elapsed = time.monotonic() - t0
    out = os.path.abspath(args.out)  # Ray workers do not share our cwd
    ds.write_json(os.path.join(out, "jsonl"))
    ds.write_parquet(os.path.join(out, "parquet"))
    rows = ds.take_all()
    total = sum(r["tokens"] for r in rows)
    ray.shutdown()
    result = {
        "prompts": len(rows),
        "tokens_per_prompt": tokens,
        "trained_context": args.context,
        "ray_seconds": round(elapsed, 1),
        "ray_tokens_per_s": round(total / elapsed, 1),
        "out": out,
    }
    if args.compare:
        from vllm import LLM, SamplingParams

        t0 = time.monotonic()
        llm = LLM(**engine_kwargs(model, args.context))
        outs = llm.generate(
            [i["prompt"] for i in items],
            SamplingParams(temperature=0.8, top_p=0.95, max_tokens=tokens, ignore_eos=True, seed=0),
            use_tqdm=False,
        )
        plain = time.monotonic() - t0
        result["plain_seconds"] = round(plain, 1)
        result["plain_tokens_per_s"] = round(
            sum(len(o.outputs[0].token_ids) for o in outs) / plain, 1
        )
    print(json.dumps(result))
    return 0 if all(r["tokens"] == tokens for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
