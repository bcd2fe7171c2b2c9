"""Concurrency: endless sessions against a real `vllm serve` with the plugin.

For 1, 8, 32 and 64 concurrent endless sessions (streamed completions, `vllm-sink
loadtest --mode generate`): aggregate tokens/s, TTFT and inter-token latency. Then the
maximum number of concurrent sessions for the KV budget: the plugin needs C/B blocks
per session whatever its length; vanilla vLLM needs L/B blocks for a conversation of L
tokens, so for equally long conversations (L = the model's 8192-token context, the
longest vanilla can serve at all) it fits far fewer. The plugin's maximum is measured
(more sessions than fit are started; the active count plateaus, the rest wait);
vanilla's is computed from the same pool and block size.

    scripts/bench concurrency
"""

from __future__ import annotations

import argparse
import asyncio

from common import save, table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--kv-gib", type=int, default=2)
    ap.add_argument(
        "--conversation",
        type=int,
        default=8192,
        help="conversation length for the vanilla comparison",
    )
    args = ap.parse_args()

    from vllm_sink import default_model
    from vllm_sink.tools.harness import Server
    from vllm_sink.tools.loadtest import LoadConfig, LoadTest

    server = Server(
        default_model(),
        {"sink_tokens": 4, "window_tokens": args.window},
        "--max-num-seqs",
        "256",
        kv_gib=args.kv_gib,
    )
    rows, runs = [], {}
    try:
        server.wait_ready()
        m = server.metrics()
        capacity, B = int(m["vllm_sink:capacity"]), int(m["vllm_sink:block_size"])
        for n in args.sessions:
            cfg = LoadConfig(
                url=server.url,
                sessions=n,
                duration=args.duration,
                mode="generate",
                quiet=True,
                metrics_interval=1.0,
            )
            s = asyncio.run(LoadTest(cfg).run())
            runs[n] = {k: v for k, v in s.items() if k not in ("samples", "turns")}
            rows.append(
                {
                    "sessions": n,
                    "tokens/s": s["tokens_per_s"],
                    "TTFT p50 ms": s["ttft_ms"]["p50"],
                    "ITL p50 ms": s["itl_ms"]["p50"],
                    "ITL p99 ms": s["itl_ms"]["p99"],
                    "errors": s["error_count"],
                    "KV blocks (all active)": s["kv_blocks_while_all_active"],
                }
            )
            print(rows[-1], flush=True)
        # Maximum concurrent sessions for this KV budget: oversubscribe and watch.
        info = server.metrics()
        pool = _pool_blocks(server)
        per_session = capacity // B
        fit = (pool - 1) // per_session
        cfg = LoadConfig(
            url=server.url,
            sessions=fit + 8,
            duration=40.0,
            mode="generate",
            quiet=True,
            metrics_interval=1.0,
        )
        s = asyncio.run(LoadTest(cfg).run())
        measured = max(int(x.get("vllm_sink:active_requests", 0)) for x in s["samples"])
        waiting = max(int(x.get("vllm:num_requests_waiting", 0)) for x in s["samples"])
        vanilla = (pool - 1) // (args.conversation // B)
        budget = {
            "pool_blocks": pool,
            "block_size": B,
            "capacity": capacity,
            "blocks_per_sink_session": per_session,
            "sink_sessions_computed": fit,
            "sink_sessions_measured": measured,
            "sessions_waiting_meanwhile": waiting,
            "errors": s["error_count"],
            "conversation_tokens": args.conversation,
            "vanilla_blocks_per_session": args.conversation // B,
            "vanilla_sessions_computed": vanilla,
            "ratio": measured / max(vanilla, 1),
        }
        del info
    finally:
        server.stop()
    print(
        f"\nsink 4 + window {args.window} (capacity {capacity}), {args.duration:.0f} s "
        "per row, endless streamed completions:"
    )
    print(table(rows, list(rows[0])))
    print("\nconcurrent sessions for the same KV pool:")
    print(table([budget], list(budget)))
    save(
        "concurrency",
        {
            "window": args.window,
            "kv_gib": args.kv_gib,
            "rows": rows,
            "runs": runs,
            "kv_budget": budget,
        },
    )
    return 0


def _pool_blocks(server) -> int:
    import re

    import requests

    text = requests.get(server.url + "/metrics", timeout=10).text
    m = re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text)
    if m:
        return int(m.group(1))
    log = server.tail(10_000)
    m = re.search(r"scheduler ready, (\d+) KV blocks in the pool", log)
    return int(m.group(1))


if __name__ == "__main__":
    raise SystemExit(main())
