"""Overhead within capacity: vanilla vLLM vs the plugin on a workload that never evicts.

64 requests, 256-token prompts, 256-token outputs (ignore_eos), greedy. The plugin runs
with sink 4 + window 2048 (capacity 2080 > 512: no eviction). Vanilla runs twice: with
its CPU default block size (128) and with the plugin's (32), so the block-size effect
is visible separately. Engines alternate (A B C A B C) and the median of the rounds is
reported; target: plugin / vanilla >= 0.95.

Every engine gets the same KV pool, 4 GiB by default, so that all 64 sink requests are
admitted at once: a sink request reserves its whole capacity (65 blocks here) at
admission, a vanilla one only what its 512 tokens need (16 blocks). With a pool too small
for that (``--kv-gib 1``: 22 sink requests at a time) the plugin runs fewer requests per
step, which is the price of constant per-request memory, not per-step overhead.

    scripts/bench overhead               # 4 GiB pool: per-step overhead
    scripts/bench overhead --kv-gib 1    # admission-limited
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import make_llm, save, shutdown, table


def throughput(llm, prompts: list[list[int]], out_len: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8),
                 use_tqdm=False)  # warm-up
    t0 = time.monotonic()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.monotonic() - t0
    assert all(len(o.outputs[0].token_ids) == out_len for o in outs)
    return len(prompts) * out_len / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-gib", type=int, default=4,
                    help="KV pool for every engine (default 4: all 64 sink requests fit)")
    args = ap.parse_args()

    from vllm_sink import default_model
    from vllm_sink.kjv import kjv_tokens

    model = default_model()
    kjv = kjv_tokens(model)
    prompts = [kjv[i * 997:i * 997 + args.prompt_len] for i in range(args.requests)]
    engines = {
        "vanilla (block 128)": dict(),
        "vanilla (block 32)": dict(block_size=32),
        "vllm_sink (block 32)": dict(sink={"sink_tokens": 4, "window_tokens": 2048}),
    }
    results: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for name, kw in engines.items():
            kw = dict(kw)
            llm = make_llm(model, kw.pop("sink", None), max_num_seqs=args.requests,
                           max_num_batched_tokens=2048,
                           kv_cache_memory_bytes=args.kv_gib << 30, **kw)
            try:
                results[name].append(throughput(llm, prompts, args.output_len))
            finally:
                shutdown(llm)
            print(f"{name}: {results[name][-1]:.1f} output tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    rows = [{"engine": k, "output tok/s (median)": v,
             "rounds": ", ".join(f"{x:.1f}" for x in results[k]),
             "vs vanilla block 32": v / med["vanilla (block 32)"],
             "vs vanilla block 128": v / med["vanilla (block 128)"]} for k, v in med.items()]
    print(f"\n{args.requests} requests x ({args.prompt_len} prompt + {args.output_len} "
          "output) tokens, no eviction:")
    print(table(rows, list(rows[0])))
    save("overhead" if args.kv_gib == 4 else f"overhead-kv{args.kv_gib}gib",
         {"kv_gib": args.kv_gib, "requests": args.requests, "prompt_len": args.prompt_len,
                      "output_len": args.output_len, "rounds": results, "median": med})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
