"""``vllm-sink soak``: endless sessions for a long time; fail on leaks or errors.

Runs ``--sessions`` concurrent sessions against a server for ``--duration`` seconds
(each session streams back-to-back long completions, ``--request-tokens`` each, or one
endless completion with ``--request-tokens 0``), sampling every ``--interval`` seconds
the server's resident memory (process tree; the server must be local), the sink KV
blocks reserved and the errors. Fails (exit 1) if, after ``--warmup`` seconds:

* resident memory grows by more than ``--max-rss-growth`` (default 2%) over its
  level at the end of the warm-up;
* KV blocks drift: a sample where the scheduler's pool has more blocks in use than
  its running requests and parked sessions hold (streams and dense requests,
  read at the same instant from the scheduler), or where streams hold more than
  running streams x the most blocks one stream may hold, or blocks still held after
  the run (by the pool or by the worker);
* any request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from vllm_sink.tools.loadtest import LoadConfig, LoadTest


def analyse(summary: dict, warmup: float, max_growth: float) -> dict:
    samples = summary["samples"]
    per_request = None
    for s in samples:
        if s.get("vllm_sink:blocks_per_request"):
            per_request = int(s["vllm_sink:blocks_per_request"])
    rss = [(s["t"], s["server_rss_bytes"]) for s in samples if s.get("server_rss_bytes")]
    after = [v for t, v in rss if t >= warmup]
    baseline = after[0] if after else None
    peak = max(after) if after else None
    growth = (peak - baseline) / baseline if baseline else None
    keys = (
        "vllm_sink:pool_blocks_in_use",
        "vllm_sink:blocks_sink",
        "vllm_sink:blocks_dense",
        "vllm_sink:running_sink",
    )
    drift = [
        s
        for s in samples
        if per_request is not None
        and all(k in s for k in keys)
        # in use but held by no running request (dense requests may share prefix
        # blocks, so what they hold can only over-count the pool)
        and (
            s["vllm_sink:pool_blocks_in_use"] - s.get("vllm_sink:blocks_parked", 0)
            > s["vllm_sink:blocks_sink"] + s["vllm_sink:blocks_dense"]
            or s["vllm_sink:blocks_sink"] > s["vllm_sink:running_sink"] * per_request
        )
    ]
    final_blocks = None
    if samples:
        last = samples[-1]
        final_blocks = max(
            last.get("vllm_sink:kv_blocks_reserved") or 0,
            (last.get("vllm_sink:pool_blocks_in_use") or 0)
            - (last.get("vllm_sink:blocks_parked") or 0),
        )
    failures = []
    if growth is None:
        failures.append("no RSS samples after warm-up (is the server local?)")
    elif growth > max_growth:
        failures.append(f"RSS grew {100 * growth:.2f}% after warm-up (> {100 * max_growth:.1f}%)")
    if per_request is None:
        failures.append("no vllm_sink metrics (is sink mode on?)")
    if drift:
        failures.append(
            f"{len(drift)} samples where the pool had more blocks in use than "
            "running requests and parked sessions hold, or streams held more "
            f"than {per_request} each"
        )
    if final_blocks:
        failures.append(f"{final_blocks} blocks still reserved after the run")
    if summary["error_count"]:
        failures.append(f"{summary['error_count']} failed requests: {summary['errors']}")
    return {
        "rss_baseline_mib": baseline and round(baseline / 2**20, 1),
        "rss_peak_mib": peak and round(peak / 2**20, 1),
        "rss_last_mib": after and round(after[-1] / 2**20, 1),
        "rss_growth_pct": None if growth is None else round(100 * growth, 3),
        "blocks_per_request": per_request,
        "drift_samples": len(drift),
        "blocks_after": final_blocks,
        "samples": len(samples),
        "failures": failures,
        "passed": not failures,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vllm-sink soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--duration", type=float, default=1800.0)
    p.add_argument("--warmup", type=float, default=120.0)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument(
        "--request-tokens",
        type=int,
        default=2048,
        help="tokens per request (0: one endless request per session)",
    )
    p.add_argument("--max-rss-growth", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=1800.0, help="per request (s)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.warmup >= args.duration:
        print("vllm-sink soak: --warmup must be shorter than --duration", file=sys.stderr)
        return 2
    cfg = LoadConfig(
        url=args.url,
        sessions=args.sessions,
        duration=args.duration,
        mode="generate",
        request_tokens=args.request_tokens or None,
        api_key=args.api_key,
        metrics_interval=args.interval,
        quiet=args.quiet,
        timeout=args.timeout,
    )
    summary = asyncio.run(LoadTest(cfg).run())
    verdict = analyse(summary, args.warmup, args.max_rss_growth)
    rows = [
        ("sessions", args.sessions),
        ("duration (s)", summary["elapsed_s"]),
        ("requests", summary["requests"]),
        ("tokens", summary["total_tokens"]),
        ("tokens/s", summary["tokens_per_s"]),
        ("errors", summary["error_count"]),
        (
            "RSS MiB after warm-up / peak / last",
            f"{verdict['rss_baseline_mib']} / {verdict['rss_peak_mib']} / "
            f"{verdict['rss_last_mib']}",
        ),
        ("RSS growth after warm-up (%)", verdict["rss_growth_pct"]),
        ("blocks per request", verdict["blocks_per_request"]),
        ("samples with block drift", verdict["drift_samples"]),
        ("blocks after run", verdict["blocks_after"]),
        ("result", "PASS" if verdict["passed"] else "FAIL: " + "; ".join(verdict["failures"])),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"verdict": verdict, "summary": summary}, fh, indent=1)
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
