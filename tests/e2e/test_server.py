"""A real `vllm serve` with sink mode, real clients (openai, requests, vllm bench serve).

The model copy has max_position_embeddings = 256 (same weights), so streams far past
the trained context take seconds. Capacity: sink 32 + window 192 = 224 tokens."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from vllm_sink.tools.harness import Server, cli

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 192}
CONTEXT = 256


@pytest.fixture(scope="module")
def server(default_model_dir):
    from vllm_sink import model_variant

    srv = Server(model_variant(default_model_dir, max_position_embeddings=CONTEXT), SINK)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code is not None


def _wait_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m.get("vllm_sink:active_requests") == 0 and m.get("vllm:kv_cache_usage_perc") == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not return to idle: {m}")
        time.sleep(0.5)


def _wait_metrics(server, ok, timeout=10.0) -> dict:
    """The first scrape where ``ok`` holds within ``timeout`` s; else fail with the last
    scrape and the server log's tail. (One CI run read active_requests 0 mid-stream
    here, once, on a loaded 2-core box; not reproduced since: a later scrape, and the
    log, tell a stale read from a lost stream.)"""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if ok(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched: {m}\n{server.tail()}")
        time.sleep(0.2)


def test_metrics_expose_layout(server):
    m = server.metrics()
    assert m["vllm_sink:sink_tokens"] == 32 and m["vllm_sink:window_tokens"] == 192
    assert m["vllm_sink:capacity"] == 224 and m["vllm_sink:block_size"] == 32
    assert m["vllm_sink:position_limit"] == CONTEXT


def test_openai_completion_far_past_context(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    before = server.metrics()
    r = client.completions.create(
        model="smol",
        prompt="Once upon a time",
        max_tokens=4 * CONTEXT + 100,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 4 * CONTEXT + 100
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].text) > 1000
    after = _wait_idle(server)
    evicted = after["vllm_sink:tokens_evicted_total"] - before["vllm_sink:tokens_evicted_total"]
    # Everything but the last <= 224 cached tokens was evicted, in 32-token blocks.
    assert evicted >= r.usage.prompt_tokens + 4 * CONTEXT + 100 - 224
    assert after["vllm_sink:evictions_total"] > before["vllm_sink:evictions_total"]
    assert after["vllm_sink:rebases_total"] > before["vllm_sink:rebases_total"]


def test_openai_chat_streaming(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    stream = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=3 * CONTEXT,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert usage.completion_tokens == 3 * CONTEXT and finish == "length"
    assert len("".join(text)) > 500


def test_long_prompt_streams_through(server):
    """A prompt 3x the capacity (and > the trained context) is accepted and scored."""
    prompt = " ".join(f"word{i}" for i in range(400))  # ~1000+ tokens
    r = requests.post(
        server.url + "/v1/completions",
        json={"model": "smol", "prompt": prompt, "max_tokens": 20, "temperature": 0},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] > 3 * 224 and body["usage"]["completion_tokens"] == 20


def test_requests_sse_and_disconnect_frees_blocks(server):
    """Client disconnect mid-stream aborts the request and returns its blocks."""
    _wait_idle(server)
    r = requests.post(
        server.url + "/v1/completions",
        stream=True,
        timeout=120,
        json={
            "model": "smol",
            "prompt": "The history of the world",
            "max_tokens": 100_000,
            "stream": True,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200
    events, last = 0, None
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            last = json.loads(line[6:])
            assert "error" not in last, (last, server.tail())
            events += 1
            if events == 300:  # past the capacity: evictions have happened
                break
    assert events == 300 and last["choices"][0]["finish_reason"] is None, (
        events,
        last,
        server.tail(),
    )
    during = _wait_metrics(server, lambda m: m["vllm_sink:active_requests"] == 1)
    assert during["vllm_sink:kv_blocks_reserved"] == 7, (during, server.tail())
    r.close()
    _wait_idle(server)


def test_loadtest_64_sessions(server, tmp_path):
    out = tmp_path / "load.json"
    cmd = [
        *cli("vllm-sink"),
        "loadtest",
        "--url",
        server.url,
        "--sessions",
        "64",
        "--duration",
        "25",
        "--mode",
        "generate",
        "--quiet",
        "--metrics-interval",
        "0.5",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    s = json.loads(out.read_text())
    print("\n" + done.stdout)
    assert s["error_count"] == 0 and s["total_tokens"] > 64
    # Blocks on demand: at least one per stream, never more than C/B = 7 per decoding
    # stream (short prompts need no headroom), within the engine's bound throughout.
    held = s["kv_blocks_while_all_active"]
    assert held and 64 <= min(held) and max(held) <= 64 * 7, held
    assert s["kv_blocks_within_bound"] is True
    assert s["ttft_ms"]["p50"] is not None and s["itl_ms"]["p99"] is not None
    _wait_idle(server)


def test_loadtest_mixes_dense_and_streams(server, tmp_path):
    """--dense-fraction: short plain-dense requests beside endless streams, one batch."""
    out = tmp_path / "mixed.json"
    cmd = [
        *cli("vllm-sink"),
        "loadtest",
        "--url",
        server.url,
        "--sessions",
        "10",
        "--dense-fraction",
        "0.8",
        "--dense-tokens",
        "16",
        "--duration",
        "15",
        "--quiet",
        "--metrics-interval",
        "0.5",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    s = json.loads(out.read_text())
    print("\n" + done.stdout)
    dense, streams = s["by_kind"]["dense"], s["by_kind"]["sink"]
    assert (dense["sessions"], streams["sessions"]) == (8, 2)
    assert dense["errors"] == streams["errors"] == 0
    # dense sessions send one short request after another; each stream is one request
    assert dense["requests"] > 8 and streams["requests"] == 2
    assert all(t["tokens"] <= 16 for t in s["turns"] if t["kind"] == "dense")
    held = s["kv_blocks_while_all_active"]  # the worker counts streams only
    assert held and max(held) <= 2 * 7, held
    m = _wait_idle(server)
    assert m["vllm_sink:requests_dense_total"] >= dense["requests"]


@pytest.mark.slow
def test_vllm_bench_serve_interop(server, tmp_path):
    """vLLM's own benchmark client runs against the sink server without errors."""
    cmd = [
        *cli("vllm"),
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        server.url,
        "--model",
        "smol",
        "--tokenizer",
        server.model,
        "--dataset-name",
        "random",
        "--random-input-len",
        "64",
        "--random-output-len",
        str(2 * CONTEXT),
        "--num-prompts",
        "8",
        "--ignore-eos",
        "--save-result",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "bench.json",
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 8 and result.get("failed", 0) == 0
    assert result["total_output_tokens"] == 8 * 2 * CONTEXT
    _wait_idle(server)


@pytest.mark.slow
def test_seeded_sampling_with_chunked_prompt_is_deterministic(server):
    """Seeded sampling over a prompt streamed in many chunks: no engine error (vLLM's
    CPU generators cannot rewind by offset) and the same seed gives the same text."""
    prompt = " ".join(f"item{i}" for i in range(300))
    body = {"model": "smol", "prompt": prompt, "max_tokens": 40, "temperature": 1.0, "seed": 1234}
    a = requests.post(server.url + "/v1/completions", json=body, timeout=300)
    b = requests.post(server.url + "/v1/completions", json=body, timeout=300)
    assert a.status_code == b.status_code == 200, a.text
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


@pytest.mark.slow
def test_chat_client_example(server):
    script = Path(__file__).resolve().parents[2] / "examples" / "chat_client.py"
    done = subprocess.run(
        [sys.executable, str(script), "--url", server.url, "--max-tokens", "300"],
        input="Tell me about the sea.\nAnd the mountains?\n/quit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KV capacity 224 tokens" in done.stdout
    turns = [line for line in done.stdout.splitlines() if "[conversation:" in line]
    assert len(turns) == 2 and "evicted while answering" in turns[1]
