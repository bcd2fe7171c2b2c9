"""scripts/router (vllm-router 0.1.17, consistent_hash) in front of two fake replicas
that answer with their name and what they received: what the router hashes, what it
forwards, and how it fails over. The plugin namespaces session ids by the caller's
Authorization header and cache_salt; those and every body field must reach the replica
unchanged, and one X-Session-ID must always reach one replica."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from vllm_sink.tools.harness import free_port

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[2]
ROUTER = ROOT / ".venv" / "bin" / "vllm-router"


class Fakes:
    """Fake replicas in one background event loop; each answers {"replica", "headers",
    "body"}. ``stop(name)`` takes one down (its port then refuses connections)."""

    def __init__(self, names: list[str]) -> None:
        self.ports = {name: free_port() for name in names}
        self.loop = asyncio.new_event_loop()
        self.runners = {}
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        for name in names:
            asyncio.run_coroutine_threadsafe(self._start(name), self.loop).result(10)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    async def _start(self, name: str) -> None:
        from aiohttp import web

        async def answer(request):
            body = await request.json()
            return web.json_response(
                {"replica": name, "headers": dict(request.headers), "body": body}
            )

        async def health(request):
            return web.Response(text="ok")

        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions"):
            app.router.add_post(path, answer)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.ports[name]).start()
        self.runners[name] = runner

    def stop(self, name: str | None = None) -> None:
        for n in [name] if name else list(self.runners):
            runner = self.runners.pop(n)
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        if not self.runners:
            self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def routed():
    if not ROUTER.exists():
        if os.environ.get("VLLM_SINK_CI"):  # CI's setup installs the router: must run
            pytest.fail(f"{ROUTER} missing: scripts/setup installs it")
        pytest.skip(f"{ROUTER} missing: run scripts/setup")
    fakes = Fakes(["a", "b"])
    port = free_port()
    env = {**os.environ, "PORT": str(port), "ROUTER_METRICS_PORT": str(free_port())}
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "router"), fakes.url("a"), fakes.url("b")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the router exited"
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the router did not start"
            time.sleep(0.2)
        yield url, fakes
    finally:
        proc.terminate()
        proc.wait(30)
        fakes.stop()


def _post(url, body, headers=None, path="/v1/chat/completions") -> dict:
    r = requests.post(url + path, json=body, headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _chat(turn: int, **fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": f"turn {turn} " * 30}], **fields}


def test_one_session_header_reaches_one_replica(routed):
    url, _ = routed
    for sid in (f"conv-{i}" for i in range(8)):
        seen = {_post(url, _chat(t), {"X-Session-ID": sid})["replica"] for t in range(5)}
        assert len(seen) == 1, (sid, seen)
    spread = Counter(_post(url, _chat(0), {"X-Session-ID": f"s{i}"})["replica"] for i in range(64))
    assert min(spread["a"], spread["b"]) >= 16, spread


def test_what_the_plugin_keys_on_is_forwarded_unchanged(routed):
    url, _ = routed
    fields = {
        "session_id": "conv-1",
        "cache_salt": "salt-1",
        "sink": {"window_tokens": 256},
        "vllm_xargs": {"session_id": "conv-1", "sink": "{}"},
        "seed": 3,
        "ignore_eos": True,
    }
    headers = {"X-Session-ID": "conv-1", "Authorization": "Bearer key-a"}
    usage = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    got = _post(url, _chat(0, **fields, **usage), headers)
    assert got["headers"]["Authorization"] == "Bearer key-a"
    assert {k.lower(): v for k, v in got["headers"].items()}["x-session-id"] == "conv-1"
    for key, value in fields.items():
        assert got["body"][key] == value, key
    # The one change seen: per-chunk usage is dropped (the load test copes without it).
    assert got["body"]["stream_options"] == {"include_usage": True}


def test_body_only_ids_are_not_hashed(routed):
    """vllm-router 0.1.17 hashes headers, then the request's text: for chat that text
    is empty, so every chat request without a header reaches the same replica (its
    sessions still resume there, but all of them load one replica); completions hash
    their prompt, which changes every turn."""
    url, _ = routed
    chat = Counter(_post(url, _chat(i, session_id=f"s{i}"))["replica"] for i in range(16))
    assert len(chat) == 1, chat
    completions = Counter(
        _post(url, {"model": "m", "prompt": f"turn {i} " * 30, "session_id": "s"}, None,
              "/v1/completions")["replica"]
        for i in range(16)
    )  # fmt: skip
    assert len(completions) == 2, completions


def test_a_lost_replica_fails_over_without_errors(routed):
    """Requests for the lost replica's sessions reach the other one within the router's
    retries (its circuit breaker opens after 3 failures): no client-visible error.
    Runs last in this module: it takes replica b down."""
    url, fakes = routed
    on_b = [f"s{i}" for i in range(64)]
    on_b = [s for s in on_b if _post(url, _chat(0), {"X-Session-ID": s})["replica"] == "b"][:6]
    fakes.stop("b")
    for sid in on_b:
        assert _post(url, _chat(1), {"X-Session-ID": sid})["replica"] == "a"
