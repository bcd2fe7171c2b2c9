"""Per-token decode cost vs stream length (plugin): flat in time, KV blocks and memory.

One endless stream is brought to positions 1k, 10k, 100k and 1M by streaming a long
KJV prompt through chunked prefill (decoding a million tokens one by one would take
days on this CPU), then a few hundred tokens are decoded and each decode step timed.
Reports the median decode step per position, the KV blocks held, and the resident
memory of the engine processes; target: last/first position ratio <= 1.10.

    scripts/bench cost                          # 1k, 10k, 100k, 1M (about 20 minutes)
    scripts/bench cost --positions 1000 10000   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import engine_rss_bytes, make_llm, save, shutdown, table


def run_position(engine, tokens: list[int], decode: int, request_id: str) -> dict:
    from vllm import SamplingParams

    engine.add_request(
        request_id,
        {"prompt_token_ids": tokens},
        SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True),
    )
    t_start = time.monotonic()
    step_times, produced, prefill_s = [], 0, None
    blocks = rss = None
    while engine.has_unfinished_requests():
        t0 = time.monotonic()
        outs = engine.step()
        dt = time.monotonic() - t0
        n = max((len(o.outputs[0].token_ids) for o in outs), default=produced)
        if produced == 0 and n >= 1:
            prefill_s = time.monotonic() - t_start
        elif n > produced:
            step_times.append(dt / (n - produced))
        produced = n
        if produced == decode // 2:
            stats = engine.collective_rpc("sink_stats")[0]
            blocks, rss = stats["kv_blocks_reserved"], engine_rss_bytes()
    return {
        "position": len(tokens),
        "prefill_s": prefill_s,
        "decode_ms_per_token": 1000 * statistics.median(step_times),
        "decode_ms_p90": 1000 * sorted(step_times)[int(0.9 * len(step_times))],
        "kv_blocks": blocks,
        "rss_mib": rss / 2**20 if rss else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--decode", type=int, default=300)
    ap.add_argument("--window", type=int, default=2048)
    args = ap.parse_args()

    from vllm_sink import default_model
    from vllm_sink.tools.kjv import kjv_tokens

    model = default_model()
    kjv = kjv_tokens(model)
    llm = make_llm(model, {"sink_tokens": 4, "window_tokens": args.window})
    engine = llm.llm_engine
    rows = []
    try:
        # Warm-up (first-touch allocations) so position 1k is not penalised.
        run_position(engine, kjv[:600], 60, "warmup")
        for i, p in enumerate(args.positions):
            tokens = (kjv * (p // len(kjv) + 1))[:p]
            row = run_position(engine, tokens, args.decode, f"pos{i}")
            rows.append(row)
            print(
                f"position {p}: {row['decode_ms_per_token']:.2f} ms/token, "
                f"{row['kv_blocks']} blocks, {row['rss_mib']:.0f} MiB",
                flush=True,
            )
    finally:
        shutdown(llm)
    first, last = rows[0], rows[-1]
    ratios = {
        "decode_time": last["decode_ms_per_token"] / first["decode_ms_per_token"],
        "kv_blocks": last["kv_blocks"] / first["kv_blocks"],
        "rss": last["rss_mib"] / first["rss_mib"],
    }
    print(f"\nsink 4 + window {args.window}; median decode step after reaching each position:")
    print(table(rows, list(rows[0])))
    print("last/first position ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    save(
        "cost",
        {
            "window": args.window,
            "decode_tokens": args.decode,
            "rows": rows,
            "last_over_first": ratios,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
