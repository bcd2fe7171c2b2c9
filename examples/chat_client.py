"""A terminal chat with a vllm_sink server that can go on for ever.

    scripts/serve                                   # in another terminal
    .venv/bin/python examples/chat_client.py        # then type; Ctrl-D or /quit ends

Every turn sends the whole conversation (as any chat UI does); the server keeps only
the sinks and the recent window in its KV cache, so the conversation may grow far past
the model's context. After each reply it shows the conversation's length in tokens and
how many tokens the server evicted while answering (from its /metrics).
"""

from __future__ import annotations

import argparse
import sys

import requests


def _metric(url: str, name: str) -> float | None:
    try:
        text = requests.get(url + "/metrics", timeout=5).text
    except requests.RequestException:
        return None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the server's first model")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--max-tokens", type=int, default=512, help="per reply")
    ap.add_argument("--system", default=None, help="optional system prompt")
    args = ap.parse_args()

    import openai

    url = args.url.rstrip("/")
    client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    capacity = _metric(url, "vllm_sink:capacity")
    print(
        f"chatting with {model} at {url}"
        + (
            f" (KV capacity {int(capacity)} tokens per request)"
            if capacity
            else " (no vllm_sink metrics: is sink mode on?)"
        )
    )
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text in ("/quit", "/exit"):
            return 0
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        evicted_before = _metric(url, "vllm_sink:tokens_evicted_total")
        reply, usage = [], None
        print("bot> ", end="", flush=True)
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = choice.delta.content or ""
                reply.append(piece)
                print(piece, end="", flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
        evicted_after = _metric(url, "vllm_sink:tokens_evicted_total")
        total = (usage.prompt_tokens + usage.completion_tokens) if usage else None
        evicted = (
            None
            if evicted_before is None or evicted_after is None
            else int(evicted_after - evicted_before)
        )
        print(f"\n  [conversation: {total} tokens | evicted while answering: {evicted}]")


if __name__ == "__main__":
    sys.exit(main())
