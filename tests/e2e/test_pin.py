"""Pinned prefixes: a stream keeps its first N prompt tokens (or, on the chat endpoint,
its system part) with its sinks, through evictions, rebases and preemption.

Oracle: float32, block size 32, vllm_sink.reference with the same pin. Server: the real
chat template, the count of ``"pin": "system"`` against the same prompt sent as token
ids with ``pin_prompt_tokens``, and a session that resumes its pinned stream."""

import re

import pytest
import requests
import torch

from tests.e2e.conftest import check_against_reference
from vllm_sink.core.pin import system_part_tokens
from vllm_sink.reference import StreamingReference
from vllm_sink.tools.harness import Server, make_llm, shutdown, worker_stats

pytestmark = pytest.mark.e2e

# Engine: S = 32, W = 128, C = 160; a request may hold 96 sink + pinned tokens.
SINK = {"sink_tokens": 4, "window_tokens": 128, "max_request_sink_tokens": 96}
BLOCK_BYTES = 2 * 30 * 3 * 32 * 64 * 4  # K+V, 30 layers, 3 heads, fp32


@pytest.fixture(scope="module")
def reference_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def test_pinned_streams_match_reference_through_rebases_and_preemption(
    default_model_dir, reference_model, kjv
):
    """max_position_embeddings 192: C = 160 leaves a 33-token chunk, 7 blocks per
    stream, a rotary range of 448 positions, so streams of 420-510 tokens (360 generated)
    rebase. Pins of 70 and 40 tokens (sink regions of 96 and 64, windows of 64 and 96)
    beside an unpinned stream, in a pool of 12 blocks for three streams that each hold 5
    while decoding: vLLM preempts, the saved KV (pinned blocks included) is restored, and
    each stream agrees with its pinned reference."""
    from vllm import SamplingParams

    from vllm_sink import model_variant

    small = model_variant(default_model_dir, max_position_embeddings=192)
    requests_ = [
        (kjv[50000:50100], 70),
        (kjv[51000:51150], 40),
        (kjv[52000:52060], 0),
    ]
    llm = make_llm(
        small,
        SINK,
        dtype="float32",
        disable_log_stats=False,
        kv_cache_memory_bytes=12 * BLOCK_BYTES,
    )
    try:
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=360,
                logprobs=0,
                ignore_eos=True,
                extra_args={"sink": {"pin_prompt_tokens": pin}} if pin else None,
            )
            for _, pin in requests_
        ]
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in requests_], params, use_tqdm=False)
        stats = worker_stats(llm)
        metrics = {m.name: getattr(m, "value", None) for m in llm.llm_engine.get_metrics()}
    finally:
        shutdown(llm)
    print(
        f"rebases {stats['rebases']}, preemptions {metrics['vllm:num_preemptions']}, "
        f"KV restored {stats['kv_restores']}"
    )
    assert stats["rebases"] >= 2 and metrics["vllm:num_preemptions"] >= 1
    assert stats["kv_saves"] == stats["kv_restores"] >= 1 and stats["active_requests"] == 0
    for (prompt, pin), out in zip(requests_, outs):
        toks = list(out.outputs[0].token_ids)
        lps = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, toks)])
        ref = StreamingReference(
            reference_model,
            block_size=32,
            position_limit=192,
            sink_tokens=4,
            window_tokens=128,
            pin_prompt_tokens=pin,
        )
        assert ref.layout.capacity == 160 and ref.layout.sink_tokens == max(32, -(-pin // 32) * 32)
        mean, mx, agree = check_against_reference(
            ref, prompt, toks, lps, len(prompt), min_agree_after_evict=150
        )
        print(f"pin {pin}: mean {mean:.1e} max {mx:.1e} agree {agree}/360")


# ---- server ---------------------------------------------------------------------------

SYSTEM = (
    "You are the keeper's assistant at the lighthouse on the Isle of Brenn. The keeper is "
    "called Ada Morrow and the lamp was first lit in 1871."
)


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = Server(default_model_dir, {**SINK, "window_tokens": 96}, "--api-key", "key-a")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _render(tok):
    def render(conversation):
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    return render


def _post(server, path, body):
    return requests.post(
        server.url + path,
        timeout=300,
        headers={"Authorization": "Bearer key-a"},
        json={"model": "smol", "temperature": 0, **body},
    )


def _completion(server, prompt, sink, n=12):
    r = _post(
        server,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": n, "logprobs": 0, "return_token_ids": True, "sink": sink},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["token_ids"], torch.tensor(choice["logprobs"]["token_logprobs"])


def _resumes(server) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return float(re.search(r"^vllm_sink:resumes_total\{[^}]*\} ([0-9.e+]+)$", text, re.M).group(1))


def test_chat_pins_its_system_part(server, tokenizer, kjv):
    """A system part of ~50 tokens (sink region 64, window 64) and a 300-token user
    message, so the window moves past the system prompt while the prompt is read. The
    chat endpoint's count equals the count from the model's template offline: the same
    prompt as token ids with that pin_prompt_tokens gives the same tokens and log-probs,
    and without the pin they differ (the pin is what the stream attends to)."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": tokenizer.decode(kjv[60000:60300])},
    ]
    render = _render(tokenizer)
    n = system_part_tokens(render, messages)
    prompt = render(messages)
    assert 32 < n <= 64 and len(prompt) > 300, (n, len(prompt))
    r = _post(
        server,
        "/v1/chat/completions",
        {
            "messages": messages,
            "max_tokens": 12,
            "logprobs": True,
            "return_token_ids": True,
            "sink": {"pin": "system"},
            "session_id": "pin-conv",
        },
    )
    assert r.status_code == 200, r.text
    chat = r.json()["choices"][0]
    chat_lps = torch.tensor([c["logprob"] for c in chat["logprobs"]["content"]])
    toks, lps = _completion(server, prompt, {"pin_prompt_tokens": n})
    assert chat["token_ids"] == toks
    assert (chat_lps - lps).abs().max() <= 1e-3, (chat_lps, lps)
    _, unpinned = _completion(server, prompt, {"pin": "none"})
    assert (unpinned - lps).abs().max() > 1e-3
    # The next turn pins the same system part: its session resumes.
    before = _resumes(server)
    follow = messages + [
        {"role": "assistant", "content": chat["message"]["content"]},
        {"role": "user", "content": "Who keeps the lighthouse?"},
    ]
    r = _post(
        server,
        "/v1/chat/completions",
        {"messages": follow, "max_tokens": 8, "sink": {"pin": "system"}, "session_id": "pin-conv"},
    )
    assert r.status_code == 200, r.text
    assert _resumes(server) == before + 1


def test_pin_refusals_name_the_fix(server):
    r = _post(
        server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "sink": {"pin": "system"}}
    )
    assert r.status_code == 400 and "pin_prompt_tokens" in r.text, r.text
    r = _post(
        server,
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": 2, "sink": {"pin_prompt_tokens": 97}},
    )
    assert r.status_code == 400 and "max_request_sink_tokens" in r.text, r.text
    long_system = [
        {"role": "system", "content": SYSTEM * 4},
        {"role": "user", "content": "Hello"},
    ]
    r = _post(
        server,
        "/v1/chat/completions",
        {"messages": long_system, "max_tokens": 2, "sink": {"pin": "system"}},
    )
    assert r.status_code == 400 and "max_request_sink_tokens" in r.text, r.text
    r = _post(
        server,
        "/v1/chat/completions",
        {
            "messages": long_system,
            "max_tokens": 2,
            "sink": {"pin": "system", "pin_prompt_tokens": 1},
        },
    )
    assert r.status_code == 400 and "keep one" in r.text, r.text
