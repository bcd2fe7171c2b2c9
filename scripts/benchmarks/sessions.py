"""Persistent sessions: time to first token per turn of long chats, resume on vs off.

A real `vllm serve` with a small capacity (sink 4 + window 224 = 256 tokens) and
`vllm-sink loadtest --mode chat --session-ids`: each session is a multi-turn chat that
re-sends its whole history every turn (as chat UIs do), growing to many times the
capacity. With resume, each turn prefills only the new tokens and TTFT stays flat;
with `"sessions": false` (ablation) every turn streams the whole history through
prefill again and TTFT grows with the conversation. Both runs side by side.

    scripts/bench sessions
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common import RESULTS, save, table


def run(sessions_on: bool, args) -> dict:
    from vllm_sink import default_model
    from vllm_sink.tools.harness import Server
    from vllm_sink.tools.loadtest import LoadConfig, LoadTest

    sink = {"sink_tokens": 4, "window_tokens": args.window, "sessions": sessions_on}
    server = Server(default_model(), sink)
    t = time.monotonic()
    try:
        server.wait_ready()
        # progress lines: a run under a time limit shows where it stood (log: server.log_path)
        print(
            f"[sessions] resume {'on' if sessions_on else 'off'}: server ready in "
            f"{time.monotonic() - t:.0f} s ({server.log_path})",
            flush=True,
        )
        cfg = LoadConfig(
            url=server.url,
            sessions=args.sessions,
            duration=None,
            tokens=args.turns * args.turn_tokens,
            mode="chat",
            turn_tokens=args.turn_tokens,
            max_turns=args.turns,
            session_ids=True,
            quiet=True,
            timeout=1800,
        )
        summary = asyncio.run(LoadTest(cfg).run())
        print(
            f"[sessions] resume {'on' if sessions_on else 'off'}: chats done in "
            f"{time.monotonic() - t:.0f} s",
            flush=True,
        )
        metrics = server.metrics()
    finally:
        server.stop()
    summary["resumes"] = metrics.get("vllm_sink:resumes_total")
    summary["session_requests"] = metrics.get("vllm_sink:session_requests_total")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=224)
    args = ap.parse_args()
    runs = {"resume on": run(True, args), "resume off (ablation)": run(False, args)}
    rows = []
    on, off = runs["resume on"], runs["resume off (ablation)"]
    for turn in sorted(on["ttft_by_turn_ms"], key=int):
        if int(turn) % 5 == 0 or int(turn) == args.turns - 1:
            rows.append(
                {
                    "turn": turn,
                    "prompt tokens": on["prompt_tokens_by_turn"][turn],
                    "TTFT ms, resume on": on["ttft_by_turn_ms"][turn],
                    "TTFT ms, resume off": off["ttft_by_turn_ms"].get(turn),
                }
            )
    print(
        f"\n{args.sessions} chat sessions x {args.turns} turns of {args.turn_tokens} "
        f"tokens, capacity {args.window + 32}; median TTFT per turn:"
    )
    print(table(rows, list(rows[0])))
    print(
        f"resumes: {on['resumes']:.0f} of {on['session_requests']:.0f} session requests "
        f"(resume on); {off['resumes'] or 0:.0f} (off)"
    )
    save(
        "sessions",
        {
            "args": vars(args),
            "runs": {
                k: {kk: vv for kk, vv in v.items() if kk not in ("samples", "turns")}
                for k, v in runs.items()
            },
        },
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, s in runs.items():
            turns = sorted(s["ttft_by_turn_ms"], key=int)
            ax.plot(
                [s["prompt_tokens_by_turn"][t] for t in turns],
                [s["ttft_by_turn_ms"][t] for t in turns],
                marker=".",
                label=name,
            )
        ax.axvline(args.window + 32, color="gray", ls=":", label="KV capacity")
        ax.set_xlabel("conversation length at the turn (prompt tokens)")
        ax.set_ylabel("median time to first token (ms)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "sessions.png", dpi=110)
        print(f"wrote {RESULTS / 'sessions.png'}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
