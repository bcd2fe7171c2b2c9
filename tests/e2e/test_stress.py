"""Adversarial concurrency against a real server with a small KV pool.

Sixteen clients at once, for a fixed time: eight conversations (six of them two per
session id, each its own conversation; a turn is now and then sent twice, as a client
retry), floods of streams past their capacity that outnumber the pool, n = 2 samples
and beam search (three one-token requests per beam step) under the conversations' ids,
streams cut by the client mid-way, requests abandoned by a
client timeout, dense requests (``"sink": false``) and bad ones, and a second API key
sending the first key's session ids with the first key's conversations. All but the
conversations and the second key come in storms (PHASE_S seconds on, PHASE_S off): in
a storm the pool (nine full streams) is oversubscribed, so streams are preempted (KV
saved and restored) and parked sessions dropped for room; between storms
conversations resume.

Checked while running: /health answers; every request is answered (HTTP 200, or a
clean 400 for the deliberately bad ones, never 5xx), each completion whole; the pool
adds up: ``pool_blocks_in_use`` = blocks of running requests + parked blocks. At the
end: every kind of traffic happened, with resumes and preemptions; the second key
never resumed anything but its own history (``usage.prompt_tokens_details
.cached_tokens``); once idle and the parked sessions expired, no block is in use and
no saved KV is held; the server's memory grew by less than RSS_GROWTH_MIB after
warm-up. The default run lasts STRESS_SECONDS; the slow variant ten minutes.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

import pytest
import requests

from vllm_sink.tools.harness import Server

pytestmark = pytest.mark.e2e

BLOCK_BYTES = 2 * 30 * 3 * 32 * 64 * 2  # bf16 block, all 30 layers
POOL_BLOCKS = 64  # null + 9 full streams of 7 blocks
IDLE_S = 6
SINK = {
    "sink_tokens": 4,
    "window_tokens": 96,
    "max_parked_sessions": 6,
    "session_idle_timeout": IDLE_S,
    # Enough host budget that no preempted stream is refused here (a refusal is a
    # finish_reason "error", HTTP 500 on the server: tests/e2e/test_pool_pressure).
    "max_saved_kv_gib": 0.25,
}
STRESS_SECONDS = 45
FLOOD, FLOOD_TOKENS = 16, 120  # 16 decoding streams past capacity x 5 blocks > the pool's 63
PHASE_S = 6
RSS_GROWTH_MIB = 512  # (60 s runs here grew 115-250 MiB after warm-up: allocator pools)
SESSIONS = ("c0", "c1", "c2", "c3")
VOCAB = (1000, 40000)


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = Server(
        default_model_dir,
        SINK,
        "--api-key",
        "key-a",
        "key-b",
        "--enable-prompt-tokens-details",
        "--max-num-seqs",
        "16",
        "--kv-cache-memory-bytes",
        str(POOL_BLOCKS * BLOCK_BYTES),
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


class Stress:
    def __init__(self, server: Server, seconds: float, seed: int = 0) -> None:
        self.srv = server
        self.url = server.url + "/v1/completions"
        self.start = time.monotonic()
        self.until = self.start + seconds
        self.seed = seed
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.counts: Counter = Counter()
        self.latest: dict[str, list[int]] = {}  # key-a's newest history per id
        self.rss: list[int] = []

    # -- helpers ---------------------------------------------------------------------
    def running(self) -> bool:
        return time.monotonic() < self.until and len(self.errors) < 5

    def storm(self) -> bool:
        """The heavy clients run in storms of PHASE_S seconds, with calm spells of the
        same length between them: in a storm the pool is oversubscribed (preemptions,
        parked sessions dropped for room), in a calm spell conversations resume."""
        while self.running():
            if int((time.monotonic() - self.start) / PHASE_S) % 2 == 0:
                return True
            time.sleep(0.2)
        return False

    def fail(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def post(self, key: str, body: dict, **kw):
        return requests.post(
            self.url,
            json={"model": "smol", **body},
            timeout=kw.pop("timeout", 300),
            headers={"Authorization": f"Bearer {key}"},
            **kw,
        )

    def answered(self, what: str, r, n: int = 1, max_tokens: int | None = None) -> dict | None:
        """A 200 with ``n`` whole choices, else a recorded failure."""
        if r.status_code != 200:
            self.fail(f"{what}: HTTP {r.status_code} {r.text[:300]}")
            return None
        body = r.json()
        choices = body["choices"]
        reasons = [c["finish_reason"] for c in choices]
        if len(choices) != n or any(x != "length" for x in reasons):
            self.fail(f"{what}: choices {reasons}")
            return None
        if max_tokens and body["usage"]["completion_tokens"] != n * max_tokens:
            self.fail(f"{what}: usage {body['usage']}")
            return None
        self.count(what)
        return body

    @staticmethod
    def cached(body: dict) -> int:
        return ((body.get("usage") or {}).get("prompt_tokens_details") or {}).get(
            "cached_tokens"
        ) or 0

    # -- clients ---------------------------------------------------------------------
    def conversation(self, i: int) -> None:
        """key-a: its own conversation under a shared id; sometimes the same turn twice
        (a client retry), sometimes a new conversation."""
        rng = random.Random(self.seed * 100 + i)
        # Six clients share three ids; two have an id of their own (they resume).
        sid, history = (SESSIONS[i % 3] if i < 6 else f"own-{i}"), []
        while self.running():
            prompt = history + [rng.randrange(*VOCAB) for _ in range(rng.randrange(4, 120))]
            for _ in range(2 if rng.random() < 0.2 else 1):
                body = self.answered(
                    "turn",
                    self.post(
                        "key-a",
                        {
                            "prompt": prompt,
                            "max_tokens": 16,
                            "temperature": 0,
                            "ignore_eos": True,
                            "session_id": sid,
                            "return_token_ids": True,
                        },
                    ),
                    max_tokens=16,
                )
                if body is None:
                    return
                if self.cached(body):
                    self.count("turn resumed")
            history = prompt + body["choices"][0]["token_ids"]
            with self.lock:
                self.latest[sid] = history
            if len(history) > 200 or rng.random() < 0.1:
                history = []

    def samples(self, i: int) -> None:
        """key-a: n = 2 samples continuing a shared id's latest conversation."""
        rng = random.Random(self.seed * 100 + 20 + i)
        while self.storm():
            sid = rng.choice(SESSIONS)
            with self.lock:
                base = list(self.latest.get(sid, []))
            self.answered(
                "n=2",
                self.post(
                    "key-a",
                    {
                        "prompt": base + [rng.randrange(*VOCAB) for _ in range(6)],
                        "n": 2,
                        "max_tokens": 12,
                        "temperature": 0.8,
                        "seed": rng.randrange(1 << 30),
                        "ignore_eos": True,
                        "session_id": sid,
                    },
                ),
                n=2,
                max_tokens=12,
            )

    def beams(self, i: int) -> None:
        """key-a: beam search continuing a shared id's conversation: every beam step
        sends beam-width one-token requests under the same id at once."""
        rng = random.Random(self.seed * 100 + 30 + i)
        while self.storm():
            sid = rng.choice(SESSIONS)
            with self.lock:
                base = list(self.latest.get(sid, []))
            r = self.post(
                "key-a",
                {
                    "prompt": base + [rng.randrange(*VOCAB) for _ in range(4)],
                    "use_beam_search": True,
                    "n": 3,
                    "max_tokens": 6,
                    "ignore_eos": True,
                    "session_id": sid,
                },
            )
            if r.status_code != 200 or len(r.json()["choices"]) != 3:
                self.fail(f"beams: HTTP {r.status_code} {r.text[:300]}")
                return
            self.count("beams")

    def disconnect(self, i: int) -> None:
        """key-a: a long stream continuing a shared id's conversation, cut by the
        client after its first tokens."""
        rng = random.Random(self.seed * 100 + 40 + i)
        while self.storm():
            sid = rng.choice(SESSIONS)
            with self.lock:
                base = list(self.latest.get(sid, []))
            with self.post(
                "key-a",
                {
                    "prompt": base + [rng.randrange(*VOCAB) for _ in range(5)],
                    "stream": True,
                    "max_tokens": 5000,
                    "ignore_eos": True,
                    "session_id": sid,
                },
                stream=True,
            ) as r:
                if r.status_code != 200:
                    self.fail(f"disconnect: HTTP {r.status_code} {r.text[:300]}")
                    return
                seen = 0
                for line in r.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    if "error" in json.loads(line[6:]):
                        self.fail(f"disconnect: {line[:300]!r}")
                        return
                    seen += 1
                    if seen >= rng.randrange(1, 30):
                        break
            self.count("disconnect")

    def abandon(self, i: int) -> None:
        """key-a: a long request whose client gives up waiting (the server aborts it)."""
        rng = random.Random(self.seed * 100 + 60 + i)
        while self.storm():
            try:
                r = self.post(
                    "key-a",
                    {
                        "prompt": [rng.randrange(*VOCAB) for _ in range(20)],
                        "max_tokens": 5000,
                        "ignore_eos": True,
                        "session_id": rng.choice(SESSIONS),
                    },
                    timeout=(5, rng.uniform(0.3, 2.0)),
                )
                self.fail(f"abandon: answered {r.status_code} before the timeout")
                return
            except requests.Timeout:
                self.count("abandon")

    def dense(self, i: int) -> None:
        """Dense requests, and now and then a bad one (a clean 400)."""
        rng = random.Random(self.seed * 100 + 80 + i)
        key = ("key-a", "key-b")[i % 2]
        first = True
        while self.storm():
            if first or rng.random() < 0.1:  # at least one each, on any machine speed
                first = False
                r = self.post(key, {"prompt": [1, 2, 3], "max_tokens": 4, "n": 0})
                if r.status_code != 400:
                    self.fail(f"bad request: HTTP {r.status_code} {r.text[:300]}")
                self.count("refused")
                continue
            # Long prompts: a dense request admitted ahead of a resume takes many
            # blocks at once (the resume then waits, claimed, for room).
            self.answered(
                "dense",
                self.post(
                    key,
                    {
                        "prompt": [rng.randrange(*VOCAB) for _ in range(rng.randrange(20, 300))],
                        "max_tokens": 16,
                        "ignore_eos": True,
                        "sink": False,
                        "session_id": rng.choice(SESSIONS),
                    },
                ),
                max_tokens=16,
            )

    def flood(self) -> None:
        """key-a: more sessions parked at once than max_parked_sessions (the oldest are
        dropped, whatever the idle timeout did meanwhile), then FLOOD streams at once,
        each past its capacity (5 blocks while decoding): more than the pool holds,
        whatever else is running, so parked sessions are dropped for room and running
        streams are preempted (KV saved, restored, each completion whole)."""
        rng = random.Random(self.seed * 100 + 90)
        last = -1
        while self.storm():
            phase = int((time.monotonic() - self.start) / PHASE_S)
            if phase == last:  # one flood per storm: the calm spells stay calm
                time.sleep(0.2)
                continue
            last = phase
            for j in range(SINK["max_parked_sessions"] + 2):
                park = {
                    "prompt": [rng.randrange(*VOCAB) for _ in range(8)],
                    "max_tokens": 2,
                    "ignore_eos": True,
                    "session_id": f"flood-{phase}-{j}",
                }
                self.answered("park", self.post("key-a", park), max_tokens=2)
            # One request with n = FLOOD: its streams reach the scheduler together (a
            # slow machine serves FLOOD clients' requests too far apart to overlap).
            body = {
                "prompt": [rng.randrange(*VOCAB) for _ in range(rng.randrange(4, 40))],
                "n": FLOOD,
                "max_tokens": FLOOD_TOKENS,
                "temperature": 0.8,
                "seed": rng.randrange(1 << 30),
                "ignore_eos": True,
            }
            self.answered("flood", self.post("key-a", body), n=FLOOD, max_tokens=FLOOD_TOKENS)

    def spy(self) -> None:
        """key-b sends key-a's ids with key-a's conversations. It may only ever resume
        its own history (what it parked under that id itself), never key-a's."""
        rng = random.Random(self.seed * 100 + 99)
        own: dict[str, list[int]] = {}
        while self.running():
            sid = rng.choice(SESSIONS)
            with self.lock:
                base = list(self.latest.get(sid, []))
            prompt = base + [rng.randrange(*VOCAB) for _ in range(3)]
            body = self.answered(
                "spy",
                self.post(
                    "key-b",
                    {
                        "prompt": prompt,
                        "max_tokens": 7,
                        "temperature": 0,
                        "ignore_eos": True,
                        "session_id": sid,
                        "return_token_ids": True,
                    },
                ),
                max_tokens=7,
            )
            if body is None:
                return
            cached, mine = self.cached(body), own.get(sid, [])
            if cached and not (
                cached in (len(mine) - 1, len(mine)) and prompt[:cached] == mine[:cached]
            ):
                self.fail(
                    f"key-b resumed {cached} tokens under {sid!r} that are not its "
                    f"own ({len(mine)} tokens of its own history)"
                )
            self.count("spy resumed" if cached else "spy")
            own[sid] = prompt + body["choices"][0]["token_ids"]

    def monitor(self) -> None:
        import psutil

        proc = psutil.Process(self.srv.proc.pid)
        while self.running():
            try:
                if requests.get(self.srv.url + "/health", timeout=10).status_code != 200:
                    self.fail("health check failed")
                self.check_pool()
                self.rss.append(proc.memory_info().rss + self.children_rss(proc))
            except (requests.RequestException, psutil.Error) as e:
                self.fail(f"monitor: {e!r}")
            time.sleep(0.5)

    @staticmethod
    def children_rss(proc) -> int:
        """RSS of the server's children. A short-lived child (a compile worker, a
        tokenizer helper) may exit between the listing and the read: it holds no
        memory any more, so it counts 0. The engine core dying fails /health."""
        import psutil

        total = 0
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def check_pool(self) -> dict[str, float]:
        """pool_blocks_in_use = running requests' blocks + parked blocks (one board
        snapshot; a scrape may catch the board mid-write, so a mismatch is re-read)."""
        for _ in range(5):
            m = self.srv.metrics()
            held = (
                m["vllm_sink:blocks_sink"]
                + m["vllm_sink:blocks_dense"]
                + m["vllm_sink:blocks_parked"]
            )
            if m["vllm_sink:pool_blocks_in_use"] == held:
                return m
            time.sleep(0.05)
        self.fail(f"pool: {m['vllm_sink:pool_blocks_in_use']} in use, running + parked hold {held}")
        return m

    def run(self) -> None:
        clients = (
            [(self.conversation, i) for i in range(8)]
            + [(self.samples, 0), (self.beams, 0), (self.disconnect, 0), (self.abandon, 0)]
            + [(self.dense, 0), (self.dense, 1), (self.spy, None), (self.monitor, None)]
            + [(self.flood, None)]
        )
        threads = [threading.Thread(target=self._guard, args=c, daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, self.until - time.monotonic()) + 600)
        assert not any(t.is_alive() for t in threads), "a client hung"

    def _guard(self, client, i) -> None:
        try:
            client() if i is None else client(i)
        except Exception as e:  # noqa: BLE001 (a client's crash is a finding)
            self.fail(f"{client.__name__}: {e!r}")


def _idle_and_empty(srv: Server, timeout: float = 60.0) -> dict[str, float]:
    """After the parked sessions' idle timeout, one request lets the scheduler expire
    them; then nothing may hold a block."""
    time.sleep(IDLE_S + 1)
    r = requests.post(
        srv.url + "/v1/completions",
        timeout=120,
        headers={"Authorization": "Bearer key-a"},
        json={"model": "smol", "prompt": [5, 6, 7], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        if (
            m["vllm_sink:pool_blocks_in_use"]
            == m["vllm_sink:parked_sessions"]
            == m["vllm_sink:active_requests"]
            == m["vllm_sink:kv_saved_bytes"]
            == m.get("vllm:num_requests_running", 0)
            == 0
        ):
            return m
        assert time.monotonic() < deadline, f"not empty: {m}"
        time.sleep(0.5)


def _stress(srv: Server, seconds: float, seed: int) -> None:
    before = srv.metrics()
    stress = Stress(srv, seconds, seed)
    stress.run()
    assert not stress.errors, (stress.errors, srv.tail(40))
    assert requests.get(srv.url + "/health", timeout=10).status_code == 200
    m = _idle_and_empty(srv)
    delta = {
        k.split(":")[1]: m.get(k, 0) - before.get(k, 0)
        for k in m
        if k.startswith("vllm_sink:") and k.endswith("_total")
    }
    print(f"\n{seconds:.0f} s: {dict(stress.counts)}\nsink counters: {delta}")
    for kind in (
        "turn",
        "n=2",
        "beams",
        "disconnect",
        "abandon",
        "dense",
        "refused",
        "spy",
        "park",
        "flood",
    ):
        assert stress.counts[kind] > 0, (kind, stress.counts)
    assert delta["preempted_sink_total"] > 0 and delta["parked_evictions_total"] > 0, delta
    assert delta["resumes_total"] > 0, delta
    # (a stream aborted while preempted is saved and never restored: its KV dropped)
    assert delta["kv_saves_total"] >= delta["kv_restores_total"] > 0, delta
    assert delta["kv_saves_refused_total"] == 0 and m["vllm_sink:kv_saved_bytes"] == 0, delta
    # Memory: after the first quarter (model, buffers and allocator pools warm), the
    # server's processes grow by less than RSS_GROWTH_MIB to the end.
    warm = stress.rss[len(stress.rss) // 4 :]
    growth = (max(warm) - warm[0]) / 2**20
    print(f"server RSS {warm[0] / 2**20:.0f} MiB after warm-up, growth {growth:.0f} MiB")
    assert growth < RSS_GROWTH_MIB, growth


def test_adversarial_clients(server):
    _stress(server, STRESS_SECONDS, seed=0)


@pytest.mark.slow
def test_adversarial_clients_ten_minutes(server):
    _stress(server, 600, seed=1)
