"""vllm_sink.tools.loadtest against replicas behind a router, with in-process fakes: chat
sessions send their id as the X-Session-ID header (what vllm-router hashes) and in the
body; a stream that ends before [DONE] (a replica lost mid-reply) is an error, resent
with --retries and counted apart; 4xx are never resent; several /metrics addresses are
summed and tallied per server."""

from __future__ import annotations

import asyncio
import json

import pytest

from vllm_sink.tools.harness import free_port
from vllm_sink.tools.loadtest import LoadConfig, LoadTest, format_table

pytestmark = pytest.mark.cpu


class Replica:
    """A fake OpenAI chat server with the plugin's session counters on /metrics."""

    def __init__(
        self, cut: set[tuple[str, int]] = frozenset(), status: int = 200, chunk_usage=True
    ) -> None:
        self.chunk_usage = chunk_usage  # False: usage only at the end, as through a router
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cut = set(cut)  # (session id, nth request of it) whose stream ends early
        self.status = status
        self.seen: list[tuple[str | None, str | None]] = []  # (header, body) session ids
        self.runner = None

    async def chat(self, request):
        from aiohttp import web

        body = await request.json()
        sid = body.get("session_id")
        self.seen.append((request.headers.get("X-Session-ID"), sid))
        if self.status != 200:
            return web.json_response({"error": "no"}, status=self.status)
        nth = sum(1 for _, s in self.seen if s == sid) - 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        usage = {"prompt_tokens": 10, "completion_tokens": 3}
        for n in (1, 2, 3):
            chunk = {"choices": [{"delta": {"content": f"w{n} "}}]}
            if self.chunk_usage:
                chunk["usage"] = {**usage, "completion_tokens": n}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if not self.chunk_usage:
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        if (sid, nth) not in self.cut:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def metrics(self, request):
        from aiohttp import web

        n = len(self.seen)
        sessions = len({s for _, s in self.seen})
        text = (
            f'vllm_sink:session_requests_total{{model_name="m"}} {n}\n'
            f'vllm_sink:resumes_total{{model_name="m"}} {n - sessions}\n'
            'vllm_sink:active_requests{model_name="m"} 1\n'
            'vllm_sink:capacity{model_name="m"} 256\n'
        )
        return web.Response(text=text)

    async def models(self, request):
        from aiohttp import web

        return web.json_response({"data": [{"id": "m"}]})

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()


def _run(replicas: list[Replica], **cfg) -> dict:
    async def main():
        for r in replicas:
            await r.start()
        try:
            config = LoadConfig(
                url=replicas[0].url,
                mode="chat",
                duration=None,
                quiet=True,
                metrics_interval=0.2,
                **cfg,
            )
            return await LoadTest(config).run()
        finally:
            for r in replicas:
                await r.stop()

    return asyncio.run(main())


def test_chat_sessions_send_the_header_and_the_body_id():
    r = Replica()
    s = _run([r], sessions=3, max_turns=2, tokens=100, session_ids=True)
    assert s["error_count"] == 0 and s["requests"] == 6
    assert len({h for h, _ in r.seen}) == 3
    assert all(h == b and h.startswith("loadtest-0-") for h, b in r.seen)
    plain = Replica()
    _run([plain], sessions=1, max_turns=1, tokens=100)
    assert plain.seen == [(None, None)]


def test_a_cut_stream_is_an_error_and_resent_with_retries():
    cut = {("loadtest-0-0", 1)}  # session 0's second request ends before [DONE]
    r = Replica(cut)
    s = _run([r], sessions=2, max_turns=3, tokens=100, session_ids=True)
    assert s["errors"] == {"incomplete_stream": 1} and s["retried_count"] == 0
    assert len(r.seen) == 2 + 3  # session 0 stops at its failed turn
    r = Replica(cut)
    s = _run([r], sessions=2, max_turns=3, tokens=100, session_ids=True, retries=1)
    assert s["error_count"] == 0 and s["retried"] == {"incomplete_stream": 1}
    assert len(r.seen) == 3 + 1 + 3 and s["requests"] == 7
    assert "resent" in format_table(s)


def test_client_errors_are_not_resent():
    r = Replica(status=400)
    s = _run([r], sessions=1, max_turns=3, tokens=100, session_ids=True, retries=3)
    assert s["errors"] == {"http_400": 1} and s["retried_count"] == 0 and len(r.seen) == 1


def test_every_replica_is_scraped_and_tallied():
    front, other = Replica(), Replica()
    s = _run(
        [front, other],
        sessions=4,
        max_turns=5,
        tokens=100,
        session_ids=True,
        metrics_urls=[front.url, other.url],
    )
    assert s["error_count"] == 0
    assert s["servers"][front.url]["requests"] == 20 and s["servers"][other.url]["requests"] == 0
    assert s["session_requests"] == 20 and s["resumes"] == 16 and s["resume_rate"] == 1.0
    # Counts add up over the servers, the layout gauges are kept once.
    sample = s["samples"][0]
    assert sample["vllm_sink:active_requests"] == 2 and sample["vllm_sink:capacity"] == 256
    assert "per server" in format_table(s)


def test_streams_without_per_chunk_usage_are_counted():
    """vllm-router drops continuous_usage_stats: tokens are counted per streamed delta,
    and the final usage gives the prompt length."""
    r = Replica(chunk_usage=False)
    s = _run([r], sessions=2, max_turns=2, tokens=100, session_ids=True)
    assert s["error_count"] == 0 and s["total_tokens"] == 2 * 2 * 3
    assert all(t["ttft"] is not None and t["prompt_tokens"] == 10 for t in s["turns"])
