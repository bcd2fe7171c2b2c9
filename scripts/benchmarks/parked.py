"""Scheduler host time per step with many parked sessions: the per-step bookkeeping must
not grow with them.

vLLM's real scheduler (with the sink scheduler and KV policy) runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the tiny Llama shape (``shapes/tiny-llama``,
dummy weights, a large block pool of 16 KiB blocks). First ``--parked`` requests with
distinct session ids (8-token prompts, one output token) finish and park one block
each (idle timeout far away); then ``--streams`` streams decode ``--tokens`` tokens and
every step is timed in thread CPU time (waits excluded):

    schedule             vLLM's schedule + the plugin's (expiry, board, KV policy)
    update_from_output   vLLM's + the plugin's (failed streams' outputs)

Each figure is the median over the full decode steps (every stream scheduled), best of
``--rounds`` fresh processes per side (0 and ``--parked`` parked sessions).

    scripts/bench parked                  # 0 vs 10,000 parked sessions (~3 min, 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save, table

HERE = Path(__file__).resolve().parent
SHAPE = HERE / "shapes" / "tiny-llama"
TIMED = ("schedule", "update_from_output")


def side(args) -> dict:
    """One engine with ``args.side`` parked sessions: park them, then time decode steps."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    parked = args.side
    llm = LLM(
        str(SHAPE),
        load_format="dummy",
        skip_tokenizer_init=True,
        seed=0,
        enforce_eager=True,
        dtype="bfloat16",
        block_size=32,
        kv_cache_memory_bytes=args.pool_gib << 30,
        max_num_seqs=256,
        additional_config={
            "sink": {
                "sink_tokens": 4,
                "window_tokens": 96,
                "max_parked_sessions": max(parked, 1),
                "session_idle_timeout": 1e6,
            }
        },
    )
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    spent: dict[str, list[int]] = {n: [] for n in TIMED}
    cls = type(sched)
    for name in TIMED:
        orig = getattr(cls, name)

        def wrapper(self, *a, _orig=orig, _name=name, **k):
            t = time.thread_time_ns()
            try:
                return _orig(self, *a, **k)
            finally:
                spent[_name].append(time.thread_time_ns() - t)

        setattr(cls, name, wrapper)
    t0 = time.monotonic()
    if parked:
        prompts = [
            {"prompt_token_ids": [3 + (i * 7 + j) % 2000 for j in range(8)]} for i in range(parked)
        ]
        params = [
            SamplingParams(max_tokens=1, detokenize=False, extra_args={"session_id": f"s{i}"})
            for i in range(parked)
        ]
        llm.generate(prompts, params, use_tqdm=False)
    park_s = time.monotonic() - t0
    stats = sched.sink_stats()
    assert stats.get("parked_sessions", 0) == parked, stats
    for v in spent.values():
        v.clear()
    steps_before = len(spent["schedule"])
    prompts = [
        {"prompt_token_ids": [3 + (i * 13 + j) % 2000 for j in range(16)]}
        for i in range(args.streams)
    ]
    llm.generate(
        prompts,
        SamplingParams(max_tokens=args.tokens, ignore_eos=True, detokenize=False),
        use_tqdm=False,
    )
    steps = len(spent["schedule"]) - steps_before
    # Full decode steps: the last args.tokens - 2 steps of every stream at once (the
    # first steps prefill, the last one only finishes); take the middle of the run.
    middle = slice(steps // 4, steps * 3 // 4)
    out = {
        "side": parked,
        "park_s": park_s,
        "steps": steps,
        "parked_sessions": sched.sink_stats().get("parked_sessions", 0),
        **{f"{n}_us": statistics.median(spent[n][middle]) / 1e3 for n in TIMED},
    }
    print("RESULT " + json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parked", type=int, default=10_000)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pool-gib", type=int, default=1)
    ap.add_argument("--label", default="", help="a note stored with the results")
    ap.add_argument("--side", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side is not None:
        side(args)
        return 0
    runs: dict[int, list[dict]] = {0: [], args.parked: []}
    for _ in range(args.rounds):
        for n in runs:  # alternate, each in a fresh process
            cmd = [
                sys.executable,
                __file__,
                "--side",
                str(n),
                "--streams",
                str(args.streams),
                "--tokens",
                str(args.tokens),
                "--pool-gib",
                str(args.pool_gib),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not lines:
                print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
                return 1
            runs[n].append(json.loads(lines[-1][len("RESULT ") :]))
    best = {
        n: {k: min(r[k] for r in rows) for k in rows[0] if k.endswith("_us")}
        for n, rows in runs.items()
    }
    rows = [
        {
            "per step": f"{name} us",
            "0 parked": best[0][f"{name}_us"],
            f"{args.parked} parked": best[args.parked][f"{name}_us"],
            "difference": best[args.parked][f"{name}_us"] - best[0][f"{name}_us"],
        }
        for name in TIMED
    ]
    print(
        f"\nscheduler thread CPU time per full decode step of {args.streams} streams, "
        f"median, best of {args.rounds} rounds{' (' + args.label + ')' if args.label else ''}:"
    )
    print(table(rows, list(rows[0])))
    save(
        "parked",
        {
            "args": vars(args),
            "runs": {str(k): v for k, v in runs.items()},
            "best": {str(k): v for k, v in best.items()},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
