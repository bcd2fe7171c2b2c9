"""Reliability against real servers: bad input gets vanilla's HTTP errors (or streams),
faults never crash the engine or leak blocks, requests never see each other's KV,
and the plugin adds no endpoint. The model copy has max_position_embeddings = 256."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import requests

from vllm_sink.tools.harness import Server, cli

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 192}  # C = 224 = 7 blocks of 32
BLOCK_BYTES = 2 * 30 * 3 * 32 * 64 * 2  # bf16 block, all 30 layers


@pytest.fixture(scope="module")
def small_model(default_model_dir):
    from vllm_sink import model_variant

    return model_variant(default_model_dir, max_position_embeddings=256)


@pytest.fixture(scope="module")
def servers(small_model):
    """A sink server and a vanilla one on the same model, started together."""
    sink = Server(small_model, SINK)
    vanilla = Server(small_model, None)
    try:
        sink.wait_ready()
        vanilla.wait_ready()
        yield sink, vanilla
    finally:
        sink.stop()
        vanilla.stop()


def _idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m.get("vllm:kv_cache_usage_perc") == 0 and m.get("vllm_sink:active_requests", 0) == 0:
            return m
        assert time.monotonic() < deadline, f"not idle: {m}"
        time.sleep(0.5)


BAD_REQUESTS = [
    ("huge max_tokens", {"prompt": "hi", "max_tokens": 10**12}),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -5}),
    ("empty prompt", {"prompt": "", "max_tokens": 5}),
    ("empty token list", {"prompt": [], "max_tokens": 5}),
    ("token id out of vocabulary", {"prompt": [10**8], "max_tokens": 5}),
    ("negative temperature", {"prompt": "hi", "max_tokens": 5, "temperature": -1}),
    ("top_p > 1", {"prompt": "hi", "max_tokens": 5, "top_p": 2.0}),
    ("n = 0", {"prompt": "hi", "max_tokens": 5, "n": 0}),
    ("too many logprobs", {"prompt": "hi", "max_tokens": 5, "logprobs": 10**6}),
    ("wrong type", {"prompt": "hi", "max_tokens": "many"}),
    ("unknown model", {"prompt": "hi", "max_tokens": 5, "model": "nope"}),
]


@pytest.mark.parametrize("name, body", BAD_REQUESTS, ids=[n for n, _ in BAD_REQUESTS])
def test_bad_requests_get_vanillas_errors(servers, name, body):
    sink, vanilla = servers
    body = {"model": "smol", **body}
    got = requests.post(sink.url + "/v1/completions", json=body, timeout=120)
    want = requests.post(vanilla.url + "/v1/completions", json=body, timeout=120)
    assert got.status_code == want.status_code, (got.text[:300], want.text[:300])
    assert got.status_code >= 400
    assert requests.get(sink.url + "/health", timeout=5).status_code == 200


def test_garbage_bodies_get_vanillas_errors(servers):
    sink, vanilla = servers
    for payload in (b"\xff\xfe\x00garbage", b'{"model": "smol", "prompt": "\xc3\x28"}', b"[]"):
        got = requests.post(
            sink.url + "/v1/completions",
            data=payload,
            timeout=60,
            headers={"Content-Type": "application/json"},
        )
        want = requests.post(
            vanilla.url + "/v1/completions",
            data=payload,
            timeout=60,
            headers={"Content-Type": "application/json"},
        )
        assert got.status_code == want.status_code >= 400


@pytest.mark.slow
def test_what_vanilla_refuses_for_length_sink_mode_streams(servers):
    """Past the context limit vanilla answers 400; sink mode serves the request."""
    sink, vanilla = servers
    long_prompt = " ".join(f"w{i}" for i in range(300))  # > 256 positions
    for body in (
        {"prompt": "hi", "max_tokens": 1000, "ignore_eos": True},
        {"prompt": long_prompt, "max_tokens": 10},
    ):
        body = {"model": "smol", "temperature": 0, **body}
        assert (
            requests.post(vanilla.url + "/v1/completions", json=body, timeout=60).status_code == 400
        )
        r = requests.post(sink.url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == body["max_tokens"]
    _idle(sink)


def test_abort_many_at_once_frees_all_blocks(servers):
    sink, _ = servers
    streams = []
    for i in range(16):
        r = requests.post(
            sink.url + "/v1/completions",
            stream=True,
            timeout=120,
            json={
                "model": "smol",
                "prompt": f"Story number {i}:",
                "max_tokens": 100_000,
                "stream": True,
                "ignore_eos": True,
            },
        )
        assert r.status_code == 200
        streams.append((r, r.iter_lines()))
    for _, lines in streams:  # everyone is generating
        for line in lines:
            if line.startswith(b"data: "):
                break
    assert sink.metrics()["vllm_sink:active_requests"] == 16
    for r, _ in streams:
        r.close()
    m = _idle(sink)
    assert m["vllm_sink:kv_blocks_reserved"] == 0


def test_requests_cannot_observe_each_other(servers):
    """B's greedy output is the same alone and after A's stream reused the blocks; run
    next to A it never shows A's data. (Next to A, B shares its batch with A's prefill,
    and batch shape alone flips bf16 near-ties within a few tokens, "a vast empire" vs
    "a massive empire": vanilla vLLM on CPU is not batch-invariant either, so there only
    the answer and the absence of A's data are checked.)"""
    sink, _ = servers
    b = {
        "model": "smol",
        "prompt": "The capital of Italy is",
        "max_tokens": 240,
        "temperature": 0,
        "ignore_eos": True,
    }
    a = {
        "model": "smol",
        "prompt": "SECRET-7731 the password is swordfish. " * 20,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
    }
    url = sink.url + "/v1/completions"
    alone = requests.post(url, json=b, timeout=300).json()["choices"][0]["text"]
    requests.post(url, json=a, timeout=300).raise_for_status()
    after = requests.post(url, json=b, timeout=300).json()["choices"][0]["text"]
    assert after == alone
    results = {}

    def run(key, body):
        results[key] = requests.post(url, json=body, timeout=300).json()["choices"][0]["text"]

    threads = [threading.Thread(target=run, args=(k, v)) for k, v in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["b"].startswith(" Rome")
    for text in (alone, after, results["b"]):
        assert "swordfish" not in text and "7731" not in text


def test_no_new_endpoints(servers):
    sink, vanilla = servers
    paths = [
        set(requests.get(s.url + "/openapi.json", timeout=30).json()["paths"])
        for s in (sink, vanilla)
    ]
    assert paths[0] == paths[1]


@pytest.mark.slow
def test_soak_command_short(servers, tmp_path):
    """The CI-sized soak: 8 sessions, 60 s, back-to-back 300-token requests."""
    sink, _ = servers
    out = tmp_path / "soak.json"
    cmd = [
        *cli("vllm-sink"),
        "soak",
        "--url",
        sink.url,
        "--sessions",
        "8",
        "--duration",
        "60",
        "--warmup",
        "25",
        "--interval",
        "1",
        "--request-tokens",
        "300",
        "--quiet",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    print(done.stdout)
    verdict = json.loads(out.read_text())["verdict"]
    assert done.returncode == 0 and verdict["passed"], done.stdout + done.stderr[-2000:]
    # ~60 samples at 1 s; a loaded 2-core CI box scrapes more slowly: 20 still shows drift
    assert verdict["samples"] >= 20 and verdict["drift_samples"] == 0


@pytest.fixture(scope="module")
def tiny_pool_server(small_model):
    # 22 blocks: the null block + room for 3 streams at their full 7 blocks.
    srv = Server(small_model, SINK, "--kv-cache-memory-bytes", str(22 * BLOCK_BYTES))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_pool_too_small_for_all_streams(tiny_pool_server):
    """Six 400-token streams in a pool that holds three at full size: blocks are taken
    on demand, so more than three run at once; when the pool runs dry vLLM preempts
    streams, whose cached KV the workers save and restore (nothing recomputed). Every
    request completes in full and the pool is whole afterwards."""
    srv = tiny_pool_server
    before = srv.metrics()
    results, peak = {}, {"running": 0, "held": 0}

    def run(i):
        r = requests.post(
            srv.url + "/v1/completions",
            timeout=600,
            json={"model": "smol", "prompt": f"Tale {i}:", "max_tokens": 400, "ignore_eos": True},
        )
        results[i] = r.status_code, r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        m = srv.metrics()
        peak["running"] = max(peak["running"], m.get("vllm:num_requests_running", 0))
        peak["held"] = max(peak["held"], m.get("vllm_sink:blocks_sink", 0))
        time.sleep(0.3)
    assert results == {i: (200, 400) for i in range(6)}
    assert peak["running"] >= 4 and peak["held"] <= 21
    m = _idle(srv)
    delta = {
        k: m.get(k, 0) - before.get(k, 0)
        for k in (
            "vllm_sink:preempted_sink_total",
            "vllm_sink:kv_saves_total",
            "vllm_sink:kv_restores_total",
        )
    }
    assert delta["vllm_sink:preempted_sink_total"] >= 1, delta
    assert (
        delta["vllm_sink:kv_saves_total"]
        == delta["vllm_sink:kv_restores_total"]
        == delta["vllm_sink:preempted_sink_total"]
    ), delta


def test_shutdown_with_active_sessions(tiny_pool_server):
    srv = tiny_pool_server
    streams = [
        requests.post(
            srv.url + "/v1/completions",
            stream=True,
            timeout=120,
            json={
                "model": "smol",
                "prompt": "Go",
                "max_tokens": 100_000,
                "stream": True,
                "ignore_eos": True,
            },
        )
        for _ in range(3)
    ]
    for r in streams:
        next(x for x in r.iter_lines() if x.startswith(b"data: "))
    t0 = time.monotonic()
    os.killpg(srv.proc.pid, signal.SIGINT)
    code = srv.proc.wait(timeout=60)
    assert time.monotonic() - t0 < 60
    assert code in (0, -signal.SIGINT, 128 + signal.SIGINT), srv.tail()
    t1 = time.monotonic()
    for r in streams:  # clients see their streams end, no hang
        try:
            for _ in r.iter_lines():
                pass
        except requests.RequestException:
            pass
    assert time.monotonic() - t1 < 30  # (a hang would hit the 120 s read timeout)
