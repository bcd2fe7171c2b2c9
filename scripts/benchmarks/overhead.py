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
    scripts/bench overhead --kv-gib 1    # a pool that holds all 64 only with blocks on demand
    scripts/bench overhead --kv-gib 1 --dense-fraction 0.9
        # mixed: 90% short dense requests (each ``"sink": false``), 10% streams of
        # --stream-tokens past a small window; vanilla runs the same requests dense

Streams take KV blocks on demand (up to C/B), so a 512-token stream holds what a
vanilla request of 512 tokens holds. Preemptions (``vllm:num_preemptions``) are
reported for every engine.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import make_llm, save, shutdown, table


def throughput(
    llm, prompts: list[list[int]], out_lens: list[int], extra: list[dict | None]
) -> tuple[float, int]:
    """Output tokens/s of one batch, and the preemptions it caused."""
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, extra_args=e)
        for n, e in zip(out_lens, extra)
    ]
    llm.generate(
        [{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8), use_tqdm=False
    )  # warm-up
    before = preemptions(llm)
    t0 = time.monotonic()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.monotonic() - t0
    assert [len(o.outputs[0].token_ids) for o in outs] == list(out_lens)
    return sum(out_lens) / elapsed, preemptions(llm) - before


def preemptions(llm) -> int:
    return int(
        sum(
            getattr(m, "value", 0)
            for m in llm.llm_engine.get_metrics()
            if m.name == "vllm:num_preemptions"
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-gib", type=int, default=4, help="KV pool for every engine (default 4)")
    ap.add_argument(
        "--dense-fraction",
        type=float,
        default=0.0,
        help="mixed workload: this share of requests is dense, the rest streams",
    )
    ap.add_argument(
        "--stream-tokens",
        type=int,
        default=1024,
        help="mixed workload: tokens each stream generates",
    )
    ap.add_argument(
        "--window",
        type=int,
        default=None,
        help="the streams' window (default 2048; mixed workload: 256, so they evict)",
    )
    args = ap.parse_args()
    mixed = args.dense_fraction > 0
    if args.window is None:
        args.window = 256 if mixed else 2048

    from vllm_sink import default_model
    from vllm_sink.tools.kjv import kjv_tokens

    model = default_model()
    kjv = kjv_tokens(model)
    prompts = [kjv[i * 997 : i * 997 + args.prompt_len] for i in range(args.requests)]
    engines = {
        "vanilla (block 128)": dict(),
        "vanilla (block 32)": dict(block_size=32),
        "vllm_sink (block 32)": dict(sink={"sink_tokens": 4, "window_tokens": args.window}),
    }
    n_dense = round(args.dense_fraction * args.requests)
    dense = [
        i * n_dense // args.requests != (i + 1) * n_dense // args.requests
        for i in range(args.requests)
    ]  # spread evenly
    out_lens = [args.output_len if d or not mixed else args.stream_tokens for d in dense]
    if mixed:
        del engines["vanilla (block 128)"]
    results: dict[str, list[float]] = {k: [] for k in engines}
    preempted: dict[str, list[int]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for name, kw in engines.items():
            kw = dict(kw)
            sink = kw.pop("sink", None)
            extra = [{"sink": False} if (d and mixed and sink) else None for d in dense]
            llm = make_llm(
                model,
                sink,
                max_num_seqs=args.requests,
                max_num_batched_tokens=2048,
                disable_log_stats=False,
                kv_cache_memory_bytes=args.kv_gib << 30,
                **kw,
            )
            try:
                rate, pre = throughput(llm, prompts, out_lens, extra)
            finally:
                shutdown(llm)
            results[name].append(rate)
            preempted[name].append(pre)
            print(f"{name}: {rate:.1f} output tok/s, {pre} preemptions", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    rows = [
        {
            "engine": k,
            "output tok/s (median)": v,
            "rounds": ", ".join(f"{x:.1f}" for x in results[k]),
            "preemptions": ", ".join(map(str, preempted[k])),
            "vs vanilla block 32": v / med["vanilla (block 32)"],
            **({} if mixed else {"vs vanilla block 128": v / med["vanilla (block 128)"]}),
        }
        for k, v in med.items()
    ]
    if mixed:
        print(
            f"\n{args.requests} requests, {args.kv_gib} GiB KV pool: {n_dense} dense x "
            f"({args.prompt_len} + {args.output_len}) tokens and {args.requests - n_dense} "
            f"streams x ({args.prompt_len} + {args.stream_tokens}) tokens, window "
            f"{args.window} (the plugin's streams evict; vanilla runs them dense):"
        )
    else:
        print(
            f"\n{args.requests} requests x ({args.prompt_len} prompt + {args.output_len} "
            f"output) tokens, {args.kv_gib} GiB KV pool, no eviction:"
        )
    print(table(rows, list(rows[0])))
    name = "overhead" if args.kv_gib == 4 else f"overhead-kv{args.kv_gib}gib"
    save(
        name + ("-mixed" if mixed else ""),
        {
            "kv_gib": args.kv_gib,
            "requests": args.requests,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "dense_requests": n_dense if mixed else None,
            "stream_tokens": args.stream_tokens if mixed else None,
            "window": args.window,
            "rounds": results,
            "preemptions": preempted,
            "median": med,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
