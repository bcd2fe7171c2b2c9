"""GPU benchmarks on the Llama-3.1-8B shape (dummy weights): plugin vs vanilla vLLM,
side by side on one machine, the same engine settings and the same KV pool.

    python gpu.py vanilla --out DIR     vanilla vLLM: decode cost at 1k..130k context,
                                        the refusal past the context, throughput with
                                        64 / 256 sessions, re-computation latency
    python gpu.py plugin --out DIR      the plugin: decode cost at 1k / 10k / 100k / 1M
                                        stream positions (KV blocks, rebases), the same
                                        throughput, eviction/rebase step cost, per-step
                                        host bookkeeping at batch 1 / 64 / 256,
                                        StreamingLLM decode at windows 1k / 2k / 4k
    python gpu.py vanilla-v1 --out DIR  vanilla on vLLM's V1 model runner (the one sink
                                        mode runs): decode cost and throughput only
    python gpu.py report --out DIR      tables + results/gpu.json from the above

Each phase runs in its own process (``scripts/gpu-verify`` runs all three). Engines use
full CUDA graphs for decode without torch.compile (``--graphs full``; vLLM's default
compile would add minutes per engine start here), the same for both sides. Prompts are
random token ids, fresh for every request (no prefix-cache hits), greedy, ignore EOS.
The plugin engine's section is sink 4 + window 4096; each request asks for its window
(2048 unless stated) through its own ``"sink"`` field.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from vllm_sink.core.trace import records

HERE = Path(__file__).resolve().parent
SHAPE = HERE / "shapes" / "llama-3.1-8b"
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
ARGS: argparse.Namespace
VOCAB = 32000
WINDOW = 2048


def engine(sink: dict | None, graphs: str):
    from vllm import LLM

    kw = dict(
        load_format="dummy",
        skip_tokenizer_init=True,
        seed=0,
        max_num_seqs=256,
        kv_cache_memory_bytes=int(ARGS.pool_gib * 2**30),
    )
    if graphs == "full":
        kw["compilation_config"] = {
            "mode": 0,
            "cudagraph_mode": "FULL_DECODE_ONLY",
            "cudagraph_capture_sizes": SIZES,
        }
    elif graphs == "default":
        kw["compilation_config"] = {"cudagraph_capture_sizes": SIZES}
    else:
        kw["enforce_eager"] = True
    if sink is not None:
        kw["additional_config"] = {"sink": sink}
    if ARGS.async_scheduling == "off":
        kw["async_scheduling"] = False
    t = time.monotonic()
    try:
        llm = LLM(ARGS.model, **kw)
    except Exception as e:
        if graphs == "eager":
            raise
        print(
            f"[gpu] engine with --graphs {graphs} failed ({type(e).__name__}: {e}); "
            "retrying with enforce_eager",
            flush=True,
        )
        return engine(sink, "eager")
    return llm, time.monotonic() - t


def _graph_mode(llm) -> str:
    cc = llm.llm_engine.vllm_config.compilation_config
    return f"{cc.mode!s} / {cc.cudagraph_mode!s}"


def _engine_info(llm) -> dict:
    """What the engine really ran with: compilation / graphs, scheduling, model runner."""
    cfg = llm.llm_engine.vllm_config
    return {
        "cudagraph_mode": _graph_mode(llm),
        "async_scheduling": bool(cfg.scheduler_config.async_scheduling),
        "model_runner": "V2" if cfg.use_v2_model_runner else "V1",
    }


def params(n: int, window: int | None = None, **kw):
    from vllm import SamplingParams

    extra = {"sink": {"window_tokens": window}} if window else None
    return SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True, detokenize=False, extra_args=extra, **kw
    )


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, VOCAB) for _ in range(n)]


def run_single(llm, prompt, decode, window=None, sink=False):
    """One request alone: prefill time and the median / p90 decode time per token (the
    time between token arrivals: ``LLMEngine.step`` waits for the next output). With
    ``sink``: KV blocks held mid-decode, and from the worker's step trace the
    evictions, rebases and step periods of prefill steps that evicted / rebased."""
    eng = llm.llm_engine
    if sink:
        llm.collective_rpc("sink_trace")  # start a fresh trace
    eng.add_request(f"r{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params(decode, window))
    t0 = time.monotonic()
    per_token, produced, prefill, mid = [], 0, None, None
    last = t0
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.monotonic()
        n = max((len(o.outputs[0].token_ids) for o in outs), default=produced)
        if produced == 0 and n >= 1:
            prefill = now - t0
        elif n > produced:
            per_token.append((now - last) / (n - produced))
        if n > produced:
            last = now
        produced = n
        if sink and mid is None and produced >= decode // 2:
            mid = llm.collective_rpc("sink_stats")[0]  # one step's interval perturbed
            last = time.monotonic()
    per_token.sort()
    row = {
        "tokens": len(prompt),
        "prefill_s": prefill,
        "decode_ms": 1000 * statistics.median(per_token),
        "decode_ms_p90": 1000 * per_token[int(0.9 * (len(per_token) - 1))],
    }
    if sink:
        trace = steps_of(llm.collective_rpc("sink_trace")[0])
        pre = [t for t in trace if t["tokens"] > t["reqs"]]
        reb = [t["ms"] for t in pre if t["rebases"]]
        evi = [t["ms"] for t in pre if t["evictions"] and not t["rebases"]]
        row.update(
            kv_blocks=mid["kv_blocks_reserved"],
            max_offset=mid["max_offset"],
            evictions=sum(t["evictions"] for t in trace),
            rebases=sum(t["rebases"] for t in trace),
        )
        if reb and evi:
            row.update(
                prefill_step_ms=statistics.median(evi),
                prefill_rebase_step_ms=statistics.median(reb),
            )
    return row


def steps_of(trace) -> list[dict]:
    """The worker's step records as dicts; ``ms`` is the step's period (start to the
    next step's start: the whole engine step, scheduler and IPC included)."""
    trace = records(trace)
    return [
        {
            "ms": (b.start_ns - a.start_ns) / 1e6,
            "reqs": a.requests,
            "tokens": a.tokens,
            "evictions": a.evictions,
            "rebases": a.rebases,
            "host_ms": a.host_ns / 1e6,
            "keys_ms": a.keys_ns / 1e6,
            "cpu_ms": a.cpu_ns / 1e6,
        }
        for a, b in zip(trace, trace[1:])
    ]


def throughput(llm, rng, sessions, prompt_len=256, decode=256, window=None):
    prompts = [{"prompt_token_ids": tokens(rng, prompt_len)} for _ in range(sessions)]
    t = time.monotonic()
    outs = llm.generate(prompts, params(decode, window), use_tqdm=False)
    dt = time.monotonic() - t
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "sessions": sessions,
        "prompt": prompt_len,
        "decode": decode,
        "seconds": dt,
        "output_tok_s": out_tokens / dt,
        "total_tok_s": (out_tokens + sessions * prompt_len) / dt,
    }


def fixup_steps(llm, rng, batch, window=None, decode=160):
    """``batch`` streams from a prompt just under the capacity, decoding through several
    evictions: periods of decode steps that evict (sink keys re-rotated) vs ordinary
    ones, and the plugin's own host time per decode step (from the worker's trace)."""
    window = window or WINDOW
    llm.collective_rpc("sink_trace")
    prompts = [{"prompt_token_ids": tokens(rng, window - 48)} for _ in range(batch)]
    llm.generate(prompts, params(decode, window), use_tqdm=False)
    trace = steps_of(llm.collective_rpc("sink_trace")[0])
    # Decode steps of the fullest batch seen (all requests at once, if the pool holds
    # them: the worker's trace says how many were scheduled).
    decoding = [t for t in trace if t["tokens"] == t["reqs"]]
    held = max((t["reqs"] for t in decoding), default=0)
    dec = [t for t in decoding if t["reqs"] == held]
    if not dec:
        return {"batch": batch, "held": 0, "error": "no decode step recorded"}
    ordinary = [t["ms"] for t in dec if not t["evictions"]]
    evicting = [t["ms"] for t in dec if t["evictions"]]
    step_ms = statistics.median([t["ms"] for t in dec])
    host_ms = statistics.mean([t["host_ms"] for t in dec])
    cpu_ms = statistics.mean([t["cpu_ms"] for t in dec])
    ev = [t for t in dec if t["evictions"]]
    return {
        "batch": batch,
        "held": held,
        "evictions_per_evicting_step": (statistics.mean([t["evictions"] for t in ev]) if ev else 0),
        "host_ms_evicting": statistics.mean([t["host_ms"] for t in ev]) if ev else None,
        "host_ms_ordinary": (
            statistics.mean([t["host_ms"] for t in dec if not t["evictions"]])
            if len(ev) < len(dec)
            else None
        ),
        "keys_ms_evicting": statistics.mean([t["keys_ms"] for t in ev]) if ev else None,
        "ordinary_steps": len(ordinary),
        "evicting_steps": len(evicting),
        "ordinary_ms": statistics.median(ordinary) if ordinary else None,
        "evicting_ms": statistics.median(evicting) if evicting else None,
        "step_ms": step_ms,
        "host_ms_per_step": host_ms,
        "host_share": host_ms / step_ms,
        # the plugin's thread CPU time (its wall time less waits for the GIL)
        "cpu_ms_per_step": cpu_ms,
        "cpu_share": cpu_ms / step_ms,
        # medians beside the means (a few slow steps, e.g. an allocator's first
        # request of a size, weigh on a mean of ~10-60 evicting steps), and the steps
        # themselves: [period ms, evictions, plugin host ms, of which key op ms,
        # plugin CPU ms]
        "host_ms_evicting_median": (statistics.median([t["host_ms"] for t in ev]) if ev else None),
        "keys_ms_evicting_median": (statistics.median([t["keys_ms"] for t in ev]) if ev else None),
        "steps": [
            [
                round(t["ms"], 3),
                t["evictions"],
                round(t["host_ms"], 3),
                round(t["keys_ms"], 3),
                round(t["cpu_ms"], 3),
            ]
            for t in dec
        ],
    }


def checkpoint(args, res: dict) -> None:
    """Write what was measured so far (a later failure keeps the earlier figures)."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res["graphs"] = args.graphs
    (Path(args.out) / f"gpu_{args.phase}.json").write_text(json.dumps(res, indent=1))


def vanilla(args) -> dict:
    rng = random.Random(1)
    llm, start_s = engine(None, args.graphs)
    res = {
        "engine_start_s": start_s,
        "cost": [],
        "throughput": [],
        "recompute": [],
        **_engine_info(llm),
    }
    run_single(llm, tokens(rng, 500), 32)  # warm-up
    for n in args.contexts:
        row = run_single(llm, tokens(rng, n), 256)
        res["cost"].append(row)
        print(args.phase, row, flush=True)
        checkpoint(args, res)
    if args.phase == "vanilla-v1":  # the runner comparison: cost and throughput
        for s in args.sessions:
            res["throughput"].append(throughput(llm, rng, s))
            print("vanilla-v1", res["throughput"][-1], flush=True)
            checkpoint(args, res)
        return res
    try:
        llm.generate(
            [{"prompt_token_ids": tokens(rng, args.past_context)}], params(1), use_tqdm=False
        )
        res["past_context"] = "accepted"
    except Exception as e:  # the wall the plugin removes
        res["past_context"] = f"{type(e).__name__}: {str(e)[:200]}"
    res["past_context_tokens"] = args.past_context
    print(f"vanilla {args.past_context}-token prompt:", res["past_context"], flush=True)
    throughput(llm, rng, 16, decode=32)  # warm-up
    for s in args.sessions:
        res["throughput"].append(throughput(llm, rng, s))
        print("vanilla", res["throughput"][-1], flush=True)
        checkpoint(args, res)
    for w in args.windows:  # sliding window with re-computation: a W-token
        lat = []  # prefill for every generated token
        for _ in range(5):
            t = time.monotonic()
            llm.generate([{"prompt_token_ids": tokens(rng, w)}], params(1), use_tqdm=False)
            lat.append(time.monotonic() - t)
        res["recompute"].append({"window": w, "ms_per_token": 1000 * statistics.median(lat)})
        print("vanilla recompute", res["recompute"][-1], flush=True)
    return res


def plugin(args) -> dict:
    rng = random.Random(2)
    llm, start_s = engine(
        {"sink_tokens": 4, "window_tokens": max(args.windows + [WINDOW])}, args.graphs
    )
    res = {
        "engine_start_s": start_s,
        "cost": [],
        "throughput": [],
        "fixup": [],
        "streaming": [],
        **_engine_info(llm),
    }
    run_single(llm, tokens(rng, 500), 32, WINDOW)  # warm-up
    for n in args.positions:
        row = run_single(llm, tokens(rng, n), 256, WINDOW, sink=True)
        res["cost"].append(row)
        print("plugin", row, flush=True)
        checkpoint(args, res)
    throughput(llm, rng, 16, decode=32, window=WINDOW)  # warm-up
    for s in args.sessions:
        res["throughput"].append(throughput(llm, rng, s, window=WINDOW))
        print("plugin", res["throughput"][-1], flush=True)
        checkpoint(args, res)
    # Warm the eviction path (the key op's kernels, allocator sizes, pinned buffers) so
    # no fix-up row pays first-use costs, whatever --positions ran before: 8 streams
    # decoding through a few evictions each.
    throughput(llm, rng, 8, prompt_len=WINDOW - 40, decode=96, window=WINDOW)
    for b in args.batches:
        res["fixup"].append(fixup_steps(llm, rng, b))
        print(
            "plugin fixup", {k: v for k, v in res["fixup"][-1].items() if k != "steps"}, flush=True
        )
        checkpoint(args, res)
    for w in args.windows:
        row = run_single(llm, tokens(rng, 2 * w + 500), 128, w)
        res["streaming"].append({"window": w, "ms_per_token": row["decode_ms"]})
        print("plugin streaming", res["streaming"][-1], flush=True)
    res["stats"] = llm.collective_rpc("sink_stats")[0]
    return res


def report(args) -> int:
    sys.path.insert(0, str(HERE))
    from common import RESULTS, hardware, table

    out = Path(args.out)
    van = json.loads((out / "gpu_vanilla.json").read_text())
    plg = json.loads((out / "gpu_plugin.json").read_text())
    v1_path = out / "gpu_vanilla-v1.json"
    v1 = json.loads(v1_path.read_text()) if v1_path.exists() else None
    sides = [("vanilla", van), *([("vanilla-v1", v1)] if v1 else []), ("plugin", plg)]
    for name, side in sides:
        print(
            f"{name}: {side.get('model_runner', '?')} runner, async scheduling "
            f"{side.get('async_scheduling', '?')}, {side.get('cudagraph_mode', '?')}"
        )
    base = van["cost"][0]["decode_ms"]
    print("decode ms/token, batch 1 (vanilla: context; plugin: stream position, window 2048)")
    rows = [
        {"side": name, **r, "vs_vanilla_1k": r["decode_ms"] / base}
        for name, side in sides
        for r in side["cost"]
    ]
    print(
        table(
            rows,
            [
                "side",
                "tokens",
                "prefill_s",
                "decode_ms",
                "decode_ms_p90",
                "vs_vanilla_1k",
                "kv_blocks",
                "rebases",
            ],
        )
    )
    print(f"vanilla, a {van['past_context_tokens']}-token prompt: {van['past_context']}")
    thr = [
        {
            "sessions": v["sessions"],
            "vanilla_tok_s": v["output_tok_s"],
            "plugin_tok_s": p["output_tok_s"],
            "ratio": p["output_tok_s"] / v["output_tok_s"],
        }
        for v, p in zip(van["throughput"], plg["throughput"])
    ]
    if v1:
        for row, w in zip(thr, v1["throughput"]):
            row.update(
                vanilla_v1_tok_s=w["output_tok_s"],
                ratio_vs_v1=row["plugin_tok_s"] / w["output_tok_s"],
            )
    print("\nthroughput within capacity (256 prompt + 256 output tokens each)")
    print(table(thr, list(thr[0])))
    rec = [
        {
            "window": v["window"],
            "recompute_ms": v["ms_per_token"],
            "streaming_ms": p["ms_per_token"],
            "speedup": v["ms_per_token"] / p["ms_per_token"],
        }
        for v, p in zip(van.get("recompute", []), plg.get("streaming", []))
    ]
    if rec:
        print("\nper-token latency: sliding window with re-computation vs StreamingLLM")
        print(table(rec, list(rec[0])))
    fix = plg.get("fixup", [])
    if fix:
        print("\neviction fix-up and per-step host bookkeeping (decode steps)")
        print(table(fix, [k for k in dict.fromkeys(k for r in fix for k in r) if k != "steps"]))
    payload = {
        "benchmark": "gpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": hardware(),
        "shape": "Llama-3.1-8B (dummy weights), bf16",
        "graphs": args.graphs,
        "vanilla": van,
        "vanilla_v1": v1,
        "plugin": plg,
        "cost_rows": rows,
        "throughput": thr,
        "recompute": rec,
    }
    text = json.dumps(payload, indent=1)
    (out / "gpu.json").write_text(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu.json").write_text(text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=["vanilla", "vanilla-v1", "plugin", "report"])
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    ap.add_argument("--graphs", choices=["full", "default", "eager"], default="full")
    ap.add_argument("--positions", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 130000])
    ap.add_argument("--past-context", type=int, default=131073)
    ap.add_argument("--sessions", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--windows", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--model", default=str(SHAPE))
    ap.add_argument(
        "--pool-gib",
        type=float,
        default=80.0,
        help="KV pool, both sides (80 GiB: 256 full 2048-window streams fit)",
    )
    ap.add_argument(
        "--async-scheduling",
        choices=["default", "off"],
        default="default",
        help="off: schedule step by step (vLLM's default on CUDA is async)",
    )
    ap.add_argument(
        "--window", type=int, default=2048, help="window of the cost, throughput and fix-up streams"
    )
    global ARGS, VOCAB, WINDOW
    args = ARGS = ap.parse_args()
    WINDOW = args.window
    VOCAB = min(json.loads((Path(args.model) / "config.json").read_text())["vocab_size"], 120000)
    if args.phase == "report":
        return report(args)
    if args.phase == "vanilla-v1":
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    checkpoint(args, (plugin if args.phase == "plugin" else vanilla)(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
