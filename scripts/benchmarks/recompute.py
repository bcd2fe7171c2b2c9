"""Against the paper's baseline: sliding window with re-computation (vanilla vLLM).

Baseline: for every new token, re-prefill the last W tokens from scratch (vanilla vLLM,
prefix caching off, one request of W prompt tokens and max_tokens=1); its per-token
latency is that request's latency. Plugin: an endless stream whose cache holds W
tokens (one 32-token sink block + W-32 window), one decode step per token. Same
engine settings otherwise; both measured in this run. The paper reports up to 22.2x.

    scripts/bench recompute                       # W = 256, 1024, 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import make_llm, save, shutdown, table


def recompute_latency(llm, kjv: list[int], W: int, repeats: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1)
    times = []
    for i in range(repeats + 1):
        window = kjv[5000 + i : 5000 + i + W]  # the window slides by one token
        t0 = time.monotonic()
        llm.generate([{"prompt_token_ids": window}], params, use_tqdm=False)
        if i:  # first one is warm-up
            times.append(time.monotonic() - t0)
    return statistics.median(times)


def plugin_latency(llm, kjv: list[int], W: int, decode: int) -> float:
    from vllm import SamplingParams

    engine = llm.llm_engine
    engine.add_request(
        "s",
        {"prompt_token_ids": kjv[5000 : 5000 + W]},
        SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True),
    )
    steps, produced = [], 0
    while engine.has_unfinished_requests():
        t0 = time.monotonic()
        outs = engine.step()
        dt = time.monotonic() - t0
        n = max((len(o.outputs[0].token_ids) for o in outs), default=produced)
        if produced and n > produced:
            steps.append(dt / (n - produced))
        produced = n
    return statistics.median(steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--decode", type=int, default=200)
    args = ap.parse_args()

    from vllm_sink import default_model
    from vllm_sink.tools.kjv import kjv_tokens

    model = default_model()
    kjv = kjv_tokens(model)
    rows = []
    for W in args.windows:
        base = make_llm(model, enable_prefix_caching=False, block_size=32)
        try:
            recompute = recompute_latency(base, kjv, W, args.repeats)
        finally:
            shutdown(base)
        sink = make_llm(model, {"sink_tokens": 4, "window_tokens": W - 32})
        try:
            plugin = plugin_latency(sink, kjv, W, args.decode)
        finally:
            shutdown(sink)
        rows.append(
            {
                "W (cached tokens)": W,
                "recompute ms/token": 1000 * recompute,
                "vllm_sink ms/token": 1000 * plugin,
                "speedup": recompute / plugin,
            }
        )
        print(rows[-1], flush=True)
    print("\nper-token latency, sliding window with re-computation vs vllm_sink:")
    print(table(rows, list(rows[0])))
    save("recompute", {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
