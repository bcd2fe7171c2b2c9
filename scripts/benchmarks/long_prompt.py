"""Long prompts: a prompt far longer than the capacity, read at full StreamingLLM quality.

One long KJV prompt, scored with prompt log-probs inside vLLM, engine defaults (no
step-budget tuning): the plugin reads it ``prefill_chunk_tokens`` (K) tokens a step
into its headroom, so every prompt token sees the sinks and at least W - B recent
tokens. Reported side by side, on the same tokens:

* sink + window (defaults: K = min(256, W));
* window-only (0 sinks, same capacity): the ablation that must be clearly worse;
* the token-by-token reference: the same layout with K = 1 (every prompt token is its
  own step, as in the StreamingLLM paper's evaluation) over the first
  ``--reference-tokens`` tokens;
* dense vanilla vLLM restarted every 8000 tokens (within its 8192 limit): how hard the text
  is at each point;
* prefill throughput: prompt tokens per second for one ``--throughput-tokens`` prompt,
  with the defaults and with ``prefill_chunk_tokens`` = W (window-sized steps: the step
  size of the scheme before the headroom, which read prompts in chunks of up to W).

Targets (issue 15): sink + window within 5% of the token-by-token reference (or
better), window-only >= 1.5x sink + window.

    scripts/bench long-prompt                       # 50k-token prompt, 100k throughput
    scripts/bench long-prompt --tokens 20000 --throughput-tokens 20000 --reference-tokens 3000
"""

from __future__ import annotations

import argparse
import math
import time

from common import make_llm, save, shutdown, table

SEGMENT = 8000  # dense vanilla: a prompt must stay below its 8192-token limit


def prompt_logprobs(llm, tokens: list[int]) -> list[float]:
    """lp[i] = log p(tokens[i + 1] | tokens[:i + 1]) as the engine computed it."""
    from vllm import SamplingParams

    (out,) = llm.generate(
        [{"prompt_token_ids": tokens}],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    return [out.prompt_logprobs[i][t].logprob for i, t in enumerate(tokens) if i > 0]


def ppl(lps: list[float]) -> float:
    return math.exp(-sum(lps) / len(lps))


def prefill_rate(llm, tokens: list[int]) -> float:
    from vllm import SamplingParams

    t0 = time.monotonic()
    llm.generate([{"prompt_token_ids": tokens}], SamplingParams(max_tokens=1), use_tqdm=False)
    return len(tokens) / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=50_000, help="long prompt length")
    ap.add_argument("--offset", type=int, default=300_000, help="where in the KJV to start")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument(
        "--reference-tokens",
        type=int,
        default=8192,
        help="prompt prefix scored token by token (K = 1) as the reference",
    )
    ap.add_argument("--throughput-tokens", type=int, default=100_000)
    ap.add_argument(
        "--no-chunk-compare",
        action="store_true",
        help="skip the prefill rate with window-sized chunks",
    )
    args = ap.parse_args()

    from vllm_sink import default_model
    from vllm_sink.tools.kjv import kjv_tokens

    model = default_model()
    kjv = kjv_tokens(model)
    tokens = kjv[args.offset : args.offset + args.tokens]
    W = args.window
    configs = {
        "sink + window": {"sink_tokens": 4, "window_tokens": W},
        "window-only": {"sink_tokens": 0, "window_tokens": W + 32},
        "token-by-token reference": {
            "sink_tokens": 4,
            "window_tokens": W,
            "prefill_chunk_tokens": 1,
        },
    }
    long = (kjv * (args.throughput_tokens // len(kjv) + 1))[: args.throughput_tokens]
    results: dict[str, dict] = {}
    rate = None
    for name, sink in configs.items():
        llm = make_llm(model, sink)
        try:
            layout = llm.llm_engine.vllm_config.additional_config["sink"]
            n = args.reference_tokens if "reference" in name else len(tokens)
            t0 = time.monotonic()
            lps = prompt_logprobs(llm, tokens[:n])
            took = time.monotonic() - t0
            if name == "sink + window":
                rate = prefill_rate(llm, long)
        finally:
            shutdown(llm)
        results[name] = {"sink": layout, "lps": lps, "seconds": took}
        print(f"{name}: {n} prompt tokens scored in {took:.0f} s", flush=True)

    rate_w = None
    if not args.no_chunk_compare:
        llm = make_llm(model, {"sink_tokens": 4, "window_tokens": W, "prefill_chunk_tokens": W})
        try:
            rate_w = prefill_rate(llm, long)
        finally:
            shutdown(llm)

    llm = make_llm(model)  # dense vanilla vLLM, restarted every SEGMENT tokens
    try:
        dense = []
        for k in range(0, len(tokens), SEGMENT):
            seg = tokens[k : k + SEGMENT]
            if len(seg) > 1:
                dense += [float("nan")] + prompt_logprobs(llm, seg)  # segment start unscored
    finally:
        shutdown(llm)
    dense = dense[1:]  # align: dense[i] scores tokens[i + 1]

    C = results["sink + window"]["sink"]["sink_tokens"] + W
    M = args.reference_tokens - 1  # shared scored range [C, M)

    def window_ppl(lps, lo, hi):
        vals = [x for x in lps[lo:hi] if not math.isnan(x)]
        return ppl(vals)

    rows = []
    for name, r in list(results.items()) + [
        ("dense vanilla, restarted every 8000", {"lps": dense})
    ]:
        lps = r["lps"]
        rows.append(
            {
                "config": name,
                "ppl, tokens C..reference": window_ppl(lps, C, M),
                "ppl, whole prompt after C": (
                    window_ppl(lps, C, len(lps)) if len(lps) > M else None
                ),
            }
        )
    by = {r["config"]: r for r in rows}
    ref = by["token-by-token reference"]["ppl, tokens C..reference"]
    sw = by["sink + window"]
    ratios = {
        "sink_window_over_reference": sw["ppl, tokens C..reference"] / ref,
        "window_only_over_sink_window": by["window-only"]["ppl, whole prompt after C"]
        / sw["ppl, whole prompt after C"],
    }
    print(
        f"\nKJV prompt of {len(tokens)} tokens at offset {args.offset}; sink 4 + window {W}"
        f" (C = {C}, prefill chunk {results['sink + window']['sink']['prefill_chunk_tokens']});"
        f" reference over the first {args.reference_tokens} tokens:"
    )
    print(table(rows, list(rows[0])))
    print(
        f"sink + window / token-by-token reference: {ratios['sink_window_over_reference']:.3f}"
        f" (target <= 1.05); window-only / sink + window: "
        f"{ratios['window_only_over_sink_window']:.2f} (target >= 1.5)"
    )
    print(
        f"prefill throughput, one {args.throughput_tokens}-token prompt, sink + window: "
        f"{rate:.0f} prompt tokens/s"
        + (
            f"; with window-sized chunks (prefill_chunk_tokens = {W}): {rate_w:.0f} "
            f"({rate / rate_w:.2f}x)"
            if rate_w
            else ""
        )
    )
    save(
        "long_prompt",
        {
            "tokens": len(tokens),
            "offset": args.offset,
            "window": W,
            "reference_tokens": args.reference_tokens,
            "rows": rows,
            "ratios": ratios,
            "layouts": {k: v["sink"] for k, v in results.items()},
            "prefill_tokens_per_s": rate,
            "prefill_tokens_per_s_window_chunks": rate_w,
            "throughput_tokens": args.throughput_tokens,
            "seconds": {k: v["seconds"] for k, v in results.items()},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
