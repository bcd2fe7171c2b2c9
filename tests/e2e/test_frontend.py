"""The OpenAI server in front of hostile and concurrent clients: one real server
(`vllm serve` with two API server processes, two API keys, the scale-out endpoints).

* sessions are bound to the caller on every way a session id arrives (chat,
  completions, responses, /inference/v1/generate header and extra_args, vllm_xargs):
  another key can neither resume nor drop them;
* beam search refuses a "sink" field by name (its sub-requests would drop it);
* every API server process has the plugin's frontend: /metrics from either serves the
  vllm_sink series; the stats boards live in a private directory removed at shutdown;
* fuzzing: the "sink" field, session ids and vllm_xargs, each request answered 200 or
  400 naming the field, never 500, the engine alive after (a `slow` variant runs many
  more examples)."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import requests
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.e2e import _fuzz
from vllm_sink.tools.harness import Server

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 96}  # C = 128 tokens, 4 blocks
KEYS = ("key-a", "key-b")


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = Server(
        default_model_dir, SINK, "--api-key", *KEYS, "--enable-scale-out", "--api-server-count", "2"
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _post(server, path, body, key=KEYS[0], headers=None, timeout=300):
    """POST ``body`` as JSON (NaN / Infinity allowed: clients send them)."""
    return requests.post(
        server.url + path,
        data=json.dumps(body),
        timeout=timeout,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )


def _ok(response) -> dict:
    assert response.status_code == 200, response.text[:2000]
    return response.json()


def _counters(server) -> dict[str, float]:
    m = server.metrics()
    text = requests.get(server.url + "/metrics", timeout=10).text
    misses = {
        r: float(v)
        for r, v in re.findall(
            r'^vllm_sink:session_misses_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)$', text, re.M
        )
    }
    return {"resumes": m["vllm_sink:resumes_total"], **misses}


# ---- sessions bound to the caller ---------------------------------------------------


def _chat(stream):
    def send(server, key, sid, state):
        messages = state or [{"role": "user", "content": "Tell me about lighthouses."}]
        body = {
            "model": "smol",
            "messages": messages,
            "max_tokens": 8,
            "temperature": 0,
            "session_id": sid,
            "stream": stream,
        }
        r = _post(server, "/v1/chat/completions", body, key)
        assert r.status_code == 200, r.text[:2000]
        if stream:  # admitted while the response body streams
            chunks = [
                json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
            ]
            content = "".join(
                c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
            )
        else:
            content = r.json()["choices"][0]["message"]["content"]
        return messages + [
            {"role": "assistant", "content": content},
            {"role": "user", "content": "And then?"},
        ]

    return send


def _responses(server, key, sid, state):
    items = state or [{"role": "user", "content": "Tell me about rivers."}]
    body = {
        "model": "smol",
        "input": items,
        "max_output_tokens": 8,
        "temperature": 0,
        "session_id": sid,
    }
    out = _ok(_post(server, "/v1/responses", body, key))
    text = "".join(
        c["text"]
        for o in out["output"]
        if o["type"] == "message"
        for c in o["content"]
        if c["type"] == "output_text"
    )
    return items + [
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And then?"},
    ]


def _completion(how):
    def send(server, key, sid, state):
        prompt = state or list(range(1000, 1040))
        body = {
            "model": "smol",
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "return_token_ids": True,
        }
        if how == "body":
            body["session_id"] = sid
        else:
            body["vllm_xargs"] = {"session_id": sid}
        out = _ok(_post(server, "/v1/completions", body, key))
        return prompt + out["choices"][0]["token_ids"] + [2000, 2001]

    return send


def _generate(how):
    def send(server, key, sid, state):
        tokens = state or list(range(3000, 3040))
        params = {"max_tokens": 8, "temperature": 0}
        headers = {}
        if how == "header":
            headers["X-Session-ID"] = sid
        else:
            params["extra_args"] = {"session_id": sid}
        out = _ok(
            _post(
                server,
                "/inference/v1/generate",
                {"model": "smol", "token_ids": tokens, "sampling_params": params},
                key,
                headers,
            )
        )
        return tokens + out["choices"][0]["token_ids"] + [4000, 4001]

    return send


ENDPOINTS = {
    "chat": _chat(False),
    "chat-stream": _chat(True),
    "completions": _completion("body"),
    "completions-vllm_xargs": _completion("vllm_xargs"),
    "responses": _responses,
    "generate-header": _generate("header"),
    "generate-extra_args": _generate("extra_args"),
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_other_key_can_neither_resume_nor_drop_a_session(server, endpoint):
    """Key A parks a session; key B sends A's exact follow-up under the same id (it would
    resume A's KV if ids were shared) and then an unrelated prompt (it would drop A's
    session). Neither touches A's session: A's follow-up then resumes it."""
    turn = ENDPOINTS[endpoint]
    sid = f"iso-{endpoint}"
    follow_up = turn(server, KEYS[0], sid, None)
    before = _counters(server)
    turn(server, KEYS[1], sid, follow_up)
    mid = _counters(server)
    assert mid["resumes"] == before["resumes"], (before, mid, server.tail())
    assert mid["none_parked"] == before["none_parked"] + 1, (before, mid)
    turn(server, KEYS[1], sid, None)
    turn(server, KEYS[0], sid, follow_up)
    after = _counters(server)
    assert after["resumes"] == mid["resumes"] + 1, (mid, after, server.tail())


# ---- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "Hi", "sink": False}),
        ("/v1/completions", {"prompt": "Hi", "vllm_xargs": {"sink": "dense"}}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "sink": {"window_tokens": 64}},
        ),
    ],
)
def test_beam_search_refuses_the_sink_field(server, path, body):
    """vLLM's beam search builds each step's requests with fresh sampling parameters: a
    "sink" field would silently not apply, so it is refused by name."""
    body = {"model": "smol", "max_tokens": 2, "use_beam_search": True, "n": 2, **body}
    r = _post(server, path, body)
    assert r.status_code == 400, r.text[:1000]
    error = r.json()["error"]
    assert "sink" in error["message"] and "beam" in error["message"], error
    plain = {k: v for k, v in body.items() if k not in ("sink", "vllm_xargs")}
    assert _ok(_post(server, path, plain))["choices"]  # beam search itself works


def test_session_id_must_be_a_short_string(server):
    for xargs, words in (({"session_id": 5}, "string"), ({"session_id": "s" * 5000}, "at most")):
        r = _post(
            server,
            "/v1/completions",
            {"model": "smol", "prompt": "Hi", "max_tokens": 1, "vllm_xargs": xargs},
        )
        assert r.status_code == 400 and "session_id" in r.text and words in r.text, r.text
    r = _post(
        server,
        "/v1/completions",
        {
            "model": "smol",
            "prompt": "Hi",
            "max_tokens": 1,
            "session_id": "one",
            "vllm_xargs": {"session_id": "two"},
        },
    )
    assert r.status_code == 400 and "session_id" in r.text, r.text
    # A router routes by the header: a body id that differs from it is refused.
    body = {"model": "smol", "prompt": "Hi", "max_tokens": 1, "session_id": "one"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        if path.endswith("chat/completions"):
            body = {k: v for k, v in body.items() if k != "prompt"} | CHAT
        r = _post(server, path, body, headers={"X-Session-ID": "two"})
        assert r.status_code == 400 and "X-Session-ID" in r.text, r.text
        assert _post(server, path, body, headers={"X-Session-ID": "one"}).status_code == 200


# ---- every API server process: metrics, stats boards --------------------------------


def test_every_api_server_serves_the_sink_metrics(server):
    """Two API servers share the port (the kernel spreads connections): every scrape,
    whichever process answers, carries the vllm_sink series; each API server process
    resolved the sink section itself (its frontend patches applied)."""
    for _ in range(12):
        m = server.metrics()  # a new connection per scrape
        assert m.get("vllm_sink:capacity") == 128 and "vllm_sink:resumes_total" in m, sorted(
            k for k in m if k.startswith("vllm_sink")
        )
    log = open(server.log_path).read()
    pids = set(re.findall(r"\(\w+ pid=(\d+)\)[^\n]*vllm_sink: sink mode on", log))
    assert len(pids) == 3, pids  # the launcher and its two API servers


def _stats_dir(server) -> str:
    found = re.findall(r"vllm_sink: stats boards in (\S+)", open(server.log_path).read())
    assert found, server.tail()
    assert len(set(found)) == 1, found  # every process uses the launcher's directory
    return found[0]


def test_stats_boards_are_private(server):
    path = _stats_dir(server)
    st_ = os.lstat(path)
    assert stat.S_ISDIR(st_.st_mode) and st_.st_uid == os.getuid()
    assert stat.S_IMODE(st_.st_mode) == 0o700
    for name in ("worker.stats", "scheduler.stats"):
        f = os.lstat(os.path.join(path, name))
        assert stat.S_ISREG(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o600, name


# ---- fuzzing ----------------------------------------------------------------------------

# Fixed examples in the default run (same requests every time); no shrinking (each
# shrink step is another request to the server; the first failure is reported as is).
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
FUZZ_MANY = settings(FUZZ, max_examples=5000, derandomize=False)
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
PROMPTS = {"/v1/completions": {"prompt": "Hi"}, "/v1/chat/completions": CHAT}
paths = st.sampled_from(sorted(PROMPTS))


def _fuzz_sink(server, path, value, as_text):
    field = {"vllm_xargs": {"sink": value}} if as_text else {"sink": value}
    r = _post(
        server, path, {"model": "smol", "max_tokens": 1, **PROMPTS[path], **field}, key=KEYS[1]
    )
    _fuzz.check(r, "sink")


def _fuzz_session(server, path, where, sid):
    body = {"model": "smol", "max_tokens": 1, **PROMPTS[path]}
    headers = {}
    if where == "header":
        headers["X-Session-ID"] = sid
    elif where == "body":
        body["session_id"] = sid
    else:
        body["vllm_xargs"] = {"session_id": sid}
    _fuzz.check(_post(server, path, body, key=KEYS[1], headers=headers), "session_id")


def _fuzz_xargs(server, path, xargs):
    body = {"model": "smol", "max_tokens": 1, **PROMPTS[path], "vllm_xargs": xargs}
    named = [k for k in ("sink", "session_id") if k in xargs]
    _fuzz.check(_post(server, path, body, key=KEYS[1]), "vllm_xargs", "extra_args", *named)


def _alive(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200, server.tail()


@FUZZ
@given(path=paths, value=_fuzz.sink_values)
@example(path="/v1/completions", value={"window_tokens": 10**400})  # was HTTP 500
def test_fuzz_sink_field(server, path, value):
    _fuzz_sink(server, path, value, as_text=False)


@FUZZ
@given(path=paths, value=_fuzz.sink_texts)
def test_fuzz_sink_field_as_vllm_xargs_text(server, path, value):
    _fuzz_sink(server, path, value, as_text=True)


@FUZZ
@given(path=paths, where=st.sampled_from(["body", "vllm_xargs"]), sid=_fuzz.session_ids)
def test_fuzz_session_ids(server, path, where, sid):
    _fuzz_session(server, path, where, sid)


@FUZZ
@given(path=paths, sid=_fuzz.header_ids)
def test_fuzz_session_id_header(server, path, sid):
    _fuzz_session(server, path, "header", sid)


@FUZZ
@given(path=paths, xargs=_fuzz.xargs)
@example(path="/v1/completions", xargs={"kv_transfer_params": ["x"]})  # was HTTP 500
def test_fuzz_vllm_xargs(server, path, xargs):
    _fuzz_xargs(server, path, xargs)


def test_engine_alive_after_fuzzing(server):
    _alive(server)
    assert _ok(
        _post(server, "/v1/completions", {"model": "smol", "prompt": "Hi", "max_tokens": 2})
    )["choices"]


@pytest.mark.slow
@FUZZ_MANY
@given(path=paths, kind=st.sampled_from(["sink", "sink-text", "session", "xargs"]), data=st.data())
def test_fuzz_many(server, path, kind, data):
    if kind == "sink":
        _fuzz_sink(server, path, data.draw(_fuzz.sink_values), as_text=False)
    elif kind == "sink-text":
        _fuzz_sink(server, path, data.draw(_fuzz.sink_texts), as_text=True)
    elif kind == "session":
        where = data.draw(st.sampled_from(["body", "vllm_xargs", "header"]))
        ids = _fuzz.header_ids if where == "header" else _fuzz.session_ids
        _fuzz_session(server, path, where, data.draw(ids))
    else:
        _fuzz_xargs(server, path, data.draw(_fuzz.xargs))
    _alive(server)


def test_shutdown_removes_the_stats_boards(server):
    """Last in the module: stop the server; its private directory is gone."""
    path = _stats_dir(server)
    assert os.path.isdir(path)
    server.stop()
    assert not os.path.exists(path), os.listdir(path)
