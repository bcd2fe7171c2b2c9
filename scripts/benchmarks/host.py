"""Host time per engine step, plugin vs vanilla: what sink mode adds on the CPU side.

At many concurrent sessions a GPU engine is host-bound (the GPU waits for Python), so
every microsecond the plugin adds to a step is lost throughput there. This benchmark
isolates that cost on any machine: a tiny Llama shape (``shapes/tiny-llama``, dummy
weights) whose forward is cheap, run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
with the engine's hot methods timed in thread CPU time (waits excluded):

    schedule            the scheduler (plugin: + trim, KV policy, board)
    _update_states      the runner's batch update (plugin: + virtual rows, evictions)
    _prepare_inputs     inputs and positions (plugin: + position offsets)
    execute_model       the whole worker step (forward included)

Two workloads per side, each ``--sessions`` requests at once, greedy, ignore EOS:
``within`` (256-token prompts + 256 tokens, window 2048: nothing evicted) and ``evicting``
(prompts just under a ``--evict-window`` window, 160 tokens decoded through evictions;
plugin only, with the worker's own per-step host time for evicting vs ordinary steps).
Sides alternate in fresh processes, ``--rounds`` times. Per round each figure is the
median over steps; across rounds the best one is reported (the least time, the most
tokens/s, as ``timeit`` does): interference from the rest of a shared machine only
ever adds time, and it can hit one process of a round and not the other.

    scripts/bench host                    # 256 sessions, 3 rounds (~8 min on 2 cores)
    scripts/bench host --profile 30       # where the plugin's host time goes: the
                                          # evicting workload alone, under cProfile

On a CUDA machine the same script times the CUDA runner (``--block-size 16``, vLLM's
CUDA default): the tiny forward leaves the step to the host, launches included.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save, table

from vllm_sink.core.trace import records

HERE = Path(__file__).resolve().parent
SHAPE = HERE / "shapes" / "tiny-llama"
TIMED = {
    "scheduler": ("schedule",),
    "runner": ("_update_states", "_prepare_inputs", "execute_model"),
}


def _time_methods(objects: dict, spent: dict) -> None:
    """Wrap the hot methods of each object's class with a thread-CPU-time recorder."""
    for kind, obj in objects.items():
        cls = type(obj)
        for name in TIMED[kind]:
            orig = getattr(cls, name)

            def wrapper(self, *a, _orig=orig, _name=name, **k):
                t = time.thread_time_ns()
                try:
                    return _orig(self, *a, **k)
                finally:
                    spent[_name].append(time.thread_time_ns() - t)

            setattr(cls, name, wrapper)


def side(args) -> dict:
    """One engine (``args.side``): the workloads, timed. Runs in its own process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    plugin = args.side == "plugin"
    kw = dict(
        load_format="dummy",
        skip_tokenizer_init=True,
        seed=0,
        max_num_seqs=args.sessions,
        kv_cache_memory_bytes=2 << 30,
        block_size=args.block_size,
        enforce_eager=True,
        dtype="bfloat16",
    )
    if plugin:
        kw["additional_config"] = {"sink": {"sink_tokens": 4, "window_tokens": 2048}}
    llm = LLM(str(SHAPE), **kw)
    core = llm.llm_engine.engine_core.engine_core
    spent: dict[str, list[int]] = {n: [] for names in TIMED.values() for n in names}
    _time_methods(
        {
            "scheduler": core.scheduler,
            "runner": core.model_executor.driver_worker.worker.model_runner,
        },
        spent,
    )
    rng = random.Random(args.seed)
    vocab = json.loads((SHAPE / "config.json").read_text())["vocab_size"]

    def generate(prompt_len, decode, window=None):
        extra = {"sink": {"window_tokens": window}} if window else None
        prompts = [
            {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(prompt_len)]}
            for _ in range(args.sessions)
        ]
        params = SamplingParams(
            temperature=0, max_tokens=decode, ignore_eos=True, detokenize=False, extra_args=extra
        )
        t = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.monotonic() - t)

    def decode_steps():  # the worker's trace: full decode steps since the last call
        trace = records(llm.collective_rpc("sink_trace")[0])
        return [t for t in trace if t.requests == t.tokens == args.sessions]

    generate(16, 16)  # warm-up
    if args.profile:
        return profile(llm, generate, args)
    for v in spent.values():
        v.clear()
    if plugin:
        llm.collective_rpc("sink_trace")
    tok_s = generate(256, 256)
    out = {
        "side": args.side,
        "output_tok_s": tok_s,
        **{f"{n}_us": statistics.median(v) / 1e3 for n, v in spent.items()},
    }
    if plugin:
        # The plugin's own code per step, timed inside the worker (vllm_sink's trace).
        out["plugin_host_us_within"] = statistics.median(t.host_ns for t in decode_steps()) / 1e3
        generate(args.evict_window - 48, 160, window=args.evict_window)
        decode = decode_steps()
        for key, rows in (
            ("evicting", [t for t in decode if t.evictions]),
            ("ordinary", [t for t in decode if not t.evictions]),
        ):
            out[f"plugin_host_us_{key}"] = (
                statistics.median(t.host_ns for t in rows) / 1e3 if rows else None
            )
            out[f"plugin_cpu_us_{key}"] = (
                statistics.median(t.cpu_ns for t in rows) / 1e3 if rows else None
            )
            out[f"{key}_steps"] = len(rows)
    print("RESULT " + json.dumps(out), flush=True)
    return out


def profile(llm, generate, args) -> dict:
    """The evicting workload with the runner's two hooks under cProfile: the top
    functions by cumulative time, and the worker's own per-step figures."""
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    prof = cProfile.Profile()
    cls = type(runner)
    for name in ("_update_states", "_prepare_inputs"):
        orig = getattr(cls, name)

        def wrapper(self, *a, _orig=orig, **k):
            prof.enable()
            try:
                return _orig(self, *a, **k)
            finally:
                prof.disable()

        setattr(cls, name, wrapper)
    llm.collective_rpc("sink_trace")
    generate(args.evict_window - 48, 160, window=args.evict_window)
    trace = [
        t
        for t in records(llm.collective_rpc("sink_trace")[0])
        if t.requests == t.tokens == args.sessions
    ]
    evicting = [t for t in trace if t.evictions]
    out = {
        "decode_steps": len(trace),
        "evicting_steps": len(evicting),
        "evictions_per_evicting_step": statistics.mean(t.evictions for t in evicting)
        if evicting
        else 0,
        "plugin_host_us_evicting": statistics.mean(t.host_ns for t in evicting) / 1e3
        if evicting
        else None,
        "keys_us_evicting": statistics.mean(t.keys_ns for t in evicting) / 1e3
        if evicting
        else None,
        "plugin_host_us_ordinary": statistics.mean(t.host_ns for t in trace if not t.evictions)
        / 1e3
        if len(evicting) < len(trace)
        else None,
    }
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(args.profile)
    print(text.getvalue())
    print("RESULT " + json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--evict-window", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="KV block size (the CPU backend needs a multiple of 32)",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="plugin only, the evicting workload under cProfile: print the "
        "top N functions (in-process, one run)",
    )
    ap.add_argument("--side", choices=["vanilla", "plugin"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        args.side = "plugin"
    if args.side:
        side(args)
        return 0
    runs: dict[str, list[dict]] = {"vanilla": [], "plugin": []}
    for r in range(args.rounds):
        for name in runs:  # alternate, each in a fresh process
            cmd = [
                sys.executable,
                __file__,
                "--side",
                name,
                "--sessions",
                str(args.sessions),
                "--evict-window",
                str(args.evict_window),
                "--seed",
                str(r),
                "--block-size",
                str(args.block_size),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not lines:
                print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
                return 1
            runs[name].append(json.loads(lines[-1][len("RESULT ") :]))
    best = {
        name: {
            k: (max if k == "output_tok_s" else min)(r[k] for r in rows if r.get(k) is not None)
            for k in rows[0]
            if isinstance(rows[0][k], (int, float))
        }
        for name, rows in runs.items()
    }
    rows = [
        {
            "per step": k.removesuffix("_us") + " us",
            "vanilla": best["vanilla"][k],
            "plugin": best["plugin"][k],
            "plugin - vanilla": best["plugin"][k] - best["vanilla"][k],
        }
        for k in best["vanilla"]
        if k.endswith("_us")
    ]
    rows.append(
        {
            "per step": "output tok/s",
            "vanilla": best["vanilla"]["output_tok_s"],
            "plugin": best["plugin"]["output_tok_s"],
            "plugin - vanilla": best["plugin"]["output_tok_s"] - best["vanilla"]["output_tok_s"],
        }
    )
    print(
        f"\n{args.sessions} sessions within capacity (256 + 256 tokens), best of "
        f"{args.rounds} rounds, thread CPU time per step:"
    )
    print(table(rows, list(rows[0])))
    p = best["plugin"]
    print(
        f"the plugin's own code per full decode step of {args.sessions} streams (its "
        f"trace, median): {p['plugin_host_us_within']:.0f} us within capacity; through "
        f"evictions (window {args.evict_window}) "
        f"{p.get('plugin_host_us_evicting') or 0:.0f} us in evicting steps, "
        f"{p.get('plugin_host_us_ordinary') or 0:.0f} us in the others"
    )
    save("host", {"args": vars(args), "runs": runs, "best": best})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
