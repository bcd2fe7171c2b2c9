"""Replicas behind vLLM's router: chat throughput and TTFT with 1 vs 2 replicas, and what
losing one replica mid-run costs.

Each configuration is `vllm_sink.tools.harness.Replicas` (N `vllm serve` replicas with
the plugin, on the CPU build each on its share of this machine's cores, behind
scripts/router: vllm-router, consistent hash of X-Session-ID) driven by
`vllm-sink loadtest --url ROUTER --mode chat --session-ids --retries 3`:

* `1 replica`: one replica on all the cores;
* `2 replicas`: two, each on half the cores;
* `2, one killed`: two, one SIGKILLed (its whole process group) once half the turns
  are sent; its conversations go on on the other with one re-read of their history.

The cores are shared by the replicas: on a few-core CPU machine two replicas split the
same compute, so the ratio says what the router costs and how even it splits, not how
replicas scale on separate machines or GPUs.

    scripts/bench replicas [--sessions 16] [--turns 20] [--turn-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

from common import save, table


def _session_requests(reps) -> float:
    total = 0.0
    for s in reps.servers:
        try:
            total += s.metrics().get("vllm_sink:session_requests_total", 0.0)
        except Exception:  # noqa: BLE001 (a killed replica answers nothing)
            pass
    return total


def run(n: int, kill: bool, args) -> dict:
    from vllm_sink import default_model
    from vllm_sink.tools.harness import Replicas
    from vllm_sink.tools.loadtest import LoadConfig, LoadTest

    sink = {"sink_tokens": 4, "window_tokens": args.window}
    reps = Replicas(default_model(), sink, n, "--max-num-seqs", str(args.sessions))
    name = f"{n} replica{'s' if n > 1 else ''}" + (", one killed" if kill else "")
    t = time.monotonic()
    reps.start()
    killed: dict[str, float] = {}
    try:
        print(f"[replicas] {name}: ready in {time.monotonic() - t:.0f} s", flush=True)
        load = LoadTest(
            LoadConfig(
                url=reps.router.url,
                mode="chat",
                session_ids=True,
                sessions=args.sessions,
                max_turns=args.turns,
                turn_tokens=args.turn_tokens,
                duration=1800,
                metrics_urls=reps.urls,
                metrics_interval=0.5,
                retries=3,
                quiet=True,
            )
        )
        if kill:
            start, half = _session_requests(reps), args.sessions * args.turns / 2

            def kill_midway() -> None:
                while _session_requests(reps) - start < half and not load.stop.is_set():
                    time.sleep(0.2)
                reps.servers[-1].kill()
                killed["at"] = time.monotonic()

            threading.Thread(target=kill_midway, daemon=True).start()
        s = asyncio.run(load.run())
    finally:
        reps.stop()
    turns = [t for t in load.turns if t.ttft is not None and t.turn > 0]
    after = [t.ttft for t in turns if killed and t.start > killed["at"]]
    per = [v["requests"] for v in s["servers"].values() if v]
    row = {
        "setup": name,
        "turns": s["requests"],
        "tok/s": s["tokens_per_s"],
        "TTFT p50 ms": s["ttft_ms"]["p50"],
        "TTFT p99 ms": s["ttft_ms"]["p99"],
        "ITL p50 ms": s["itl_ms"]["p50"],
        "resume rate": s["resume_rate"],
        "split": "/".join(map(str, per)),
        "errors": s["error_count"],
        "resent": s["retried_count"],
    }
    if kill:
        row["TTFT max after kill ms"] = round(max(after) * 1000, 1) if after else None
    print(table([row], list(row)), flush=True)
    return {"row": row, "summary": {k: v for k, v in s.items() if k not in ("samples",)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--turn-tokens", type=int, default=8)
    p.add_argument("--window", type=int, default=1024)
    args = p.parse_args()
    runs = [run(1, False, args), run(2, False, args), run(2, True, args)]
    rows = [r["row"] for r in runs]
    ratio = round(rows[1]["tok/s"] / rows[0]["tok/s"], 3) if rows[0]["tok/s"] else None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print("\n" + table(rows, columns))
    print(f"\n2 replicas / 1 replica, chat tokens/s: {ratio}")
    save("replicas", {"args": vars(args), "rows": rows, "ratio_2_over_1": ratio, "runs": runs})


if __name__ == "__main__":
    main()
