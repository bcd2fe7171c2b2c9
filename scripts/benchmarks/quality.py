"""Stream quality (StreamingLLM Fig. 3/5 in miniature): perplexity along a long KJV
stream, measured inside vLLM (prompt log-probs of one long streamed prompt).

The stream is fed in steps of ``--chunk`` tokens (default 128; each step evicts for
room first, so a token sees between W - chunk and W recent tokens; a step as large as
the window would start every step with an empty window).

Configurations (block size 32): sink+window with 4 sinks (one 32-token block) and
windows 1024 and 2048; window-only (0 sinks) of the same capacities; dense vanilla
vLLM up to its context limit, and what vLLM does past it. Perplexity is reported per
segment of the stream; the target is a flat sink+window curve (last segment <= 1.10x
the first segment after the first eviction) and a clearly worse window-only curve.

    scripts/bench quality                 # 200k tokens (about 20-30 minutes on 2 cores)
    scripts/bench quality --tokens 20000  # quick look
"""

from __future__ import annotations

import argparse
import math

from common import RESULTS, make_llm, save, shutdown, table

SEGMENT = 8192


def stream_logprobs(llm, tokens: list[int]) -> list[float]:
    from vllm import SamplingParams

    (out,) = llm.generate(
        [{"prompt_token_ids": tokens}],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    return [out.prompt_logprobs[i][t].logprob for i, t in enumerate(tokens) if i > 0]


def segment_ppl(lps: list[float], start: int, segment: int) -> list[dict]:
    """lps[i] scores token i+1 of the stream; segments are [k*segment, (k+1)*segment)."""
    rows = []
    for k in range(0, len(lps) + 1, segment):
        chunk = lps[max(k - 1, 0) : k - 1 + segment] if k else lps[: segment - 1]
        if not chunk:
            break
        rows.append(
            {
                "start": start + k,
                "end": start + k + len(chunk) + (0 if k else 1),
                "ppl": math.exp(-sum(chunk) / len(chunk)),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--offset", type=int, default=0, help="where in the KJV stream to start")
    ap.add_argument("--segment", type=int, default=SEGMENT)
    ap.add_argument(
        "--chunk",
        type=int,
        default=128,
        help="tokens per streaming step (prefill chunk); each step first evicts "
        "for room, so a step of n tokens starts with about W - n cached",
    )
    args = ap.parse_args()

    from vllm_sink import default_model
    from vllm_sink.tools.kjv import kjv_tokens

    model = default_model()
    tokens = kjv_tokens(model)[args.offset : args.offset + args.tokens]
    configs = [
        ("sink 4 + window 1024", {"sink_tokens": 4, "window_tokens": 1024}),
        ("window-only 1056", {"sink_tokens": 0, "window_tokens": 1056}),
        ("sink 4 + window 2048", {"sink_tokens": 4, "window_tokens": 2048}),
        ("window-only 2080", {"sink_tokens": 0, "window_tokens": 2080}),
    ]
    results = {}
    for name, sink in configs:
        llm = make_llm(model, sink, max_num_batched_tokens=args.chunk)
        try:
            capacity = sink["window_tokens"] + (32 if sink["sink_tokens"] else 0)
            lps = stream_logprobs(llm, tokens)
        finally:
            shutdown(llm)
        segs = segment_ppl(lps, 0, args.segment)
        first_post = next(s for s in segs if s["start"] >= capacity)
        results[name] = {
            "sink": sink,
            "capacity": capacity,
            "segments": segs,
            "overall_ppl": math.exp(-sum(lps[capacity:]) / len(lps[capacity:])),
            "first_post_eviction_ppl": first_post["ppl"],
            "last_ppl": segs[-1]["ppl"],
            "last_over_first": segs[-1]["ppl"] / first_post["ppl"],
        }
        print(
            f"{name}: overall ppl {results[name]['overall_ppl']:.2f}, "
            f"last/first-post-eviction {results[name]['last_over_first']:.3f}",
            flush=True,
        )

    # Dense vanilla vLLM: the first context-length tokens, then past the limit; and,
    # as a content-difficulty baseline, every segment scored on its own (dense, with
    # its context restarted at the segment start): the KJV is not uniformly hard.
    llm = make_llm(model)
    try:
        limit = llm.llm_engine.vllm_config.model_config.max_model_len
        dense_lps = stream_logprobs(llm, tokens[: limit - 1])
        try:
            stream_logprobs(llm, tokens[: limit + 1000])
            past = "accepted"
        except Exception as e:  # vLLM refuses prompts past max_model_len
            past = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        restart = []
        for k in range(0, len(tokens), args.segment):
            seg = tokens[k : k + min(args.segment, limit - 1)]
            if len(seg) > 1:
                lp = stream_logprobs(llm, seg)
                restart.append(
                    {"start": k, "end": k + len(seg), "ppl": math.exp(-sum(lp) / len(lp))}
                )
    finally:
        shutdown(llm)
    dense_segs = segment_ppl(dense_lps, 0, args.segment)
    results["dense vanilla vLLM"] = {
        "context_limit": limit,
        "segments": dense_segs,
        "overall_ppl": math.exp(-sum(dense_lps) / len(dense_lps)),
        "past_limit": past,
    }
    results["dense, restarted per segment"] = {
        "segments": restart,
        "overall_ppl": math.exp(sum(math.log(r["ppl"]) for r in restart) / len(restart)),
    }
    # Flatness relative to content difficulty: ratio to the restarted dense baseline.
    for r in results.values():
        if "capacity" in r:
            rel = [s["ppl"] / b["ppl"] for s, b in zip(r["segments"], restart)]
            r["relative_to_restart"] = rel
            first = next(i for i, s in enumerate(r["segments"]) if s["start"] >= r["capacity"])
            r["relative_last_over_first"] = rel[-1] / rel[first]
    rows = []
    for name, r in results.items():
        rows.append(
            {
                "config": name,
                "capacity": r.get("capacity", r.get("context_limit")),
                "ppl (after first eviction)": r["overall_ppl"],
                "first post-eviction segment": r.get("first_post_eviction_ppl"),
                "last segment": r["segments"][-1]["ppl"],
                "last / first": r.get("last_over_first"),
                "last / first vs restarted dense": r.get("relative_last_over_first"),
            }
        )
    print(f"\nKJV stream of {len(tokens)} tokens, segments of {args.segment}:")
    print(table(rows, list(rows[0])))
    print(f"dense vanilla vLLM past its {limit}-token limit: {past}")
    # Per-segment side by side.
    seg_rows = []
    for i, s in enumerate(results["sink 4 + window 2048"]["segments"]):
        row = {"segment start": s["start"]}
        for name, r in results.items():
            row[name] = r["segments"][i]["ppl"] if i < len(r["segments"]) else None
        seg_rows.append(row)
    print(table(seg_rows, list(seg_rows[0])))
    save(
        "quality",
        {"tokens": len(tokens), "segment": args.segment, "chunk": args.chunk, "results": results},
    )
    _plot(results, args.segment)
    return 0


def _plot(results: dict, segment: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        xs = [s["start"] + segment / 2 for s in r["segments"]]
        ax.plot(xs, [s["ppl"] for s in r["segments"]], marker=".", label=name)
    ax.set_xlabel("stream position (tokens)")
    ax.set_ylabel(f"perplexity per {segment}-token segment")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M-Instruct on the KJV Bible, inside vLLM")
    ax.legend()
    fig.tight_layout()
    path = RESULTS / "quality.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
