"""Two CPU replicas with the plugin behind vLLM's router (``vllm_sink.tools.harness
.Replicas``: scripts/router, consistent hash of ``X-Session-ID``), driven by the load-test
client as a user runs it (``vllm-sink loadtest --url ROUTER --mode chat --session-ids``).

SESSIONS concurrent chat sessions of TURNS turns: every follow-up turn resumes on the
replica that parked its KV (the replicas' own /metrics, resume rate >= 0.95), and the
conversations split within 2x of even over the replicas. Then one replica is killed
(SIGKILL of its whole process group) mid-run: its conversations go on on the other
replica, each with one re-read of its history (a session miss there), no turn fails
beyond the turns cut mid-reply that the client resends (``--retries``), and once idle
the survivor's pool holds exactly its parked sessions' blocks.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vllm_sink.tools.harness import Replicas
from vllm_sink.tools.loadtest import LoadConfig, LoadTest

pytestmark = pytest.mark.e2e

SESSIONS, TURNS, TURN_TOKENS = 16, 20, 8
SINK = {"sink_tokens": 4, "window_tokens": 1024}


@pytest.fixture(scope="module")
def replicas(default_model_dir):
    reps = Replicas(default_model_dir, SINK, 2, "--max-num-seqs", "16")
    try:
        yield reps.start()
    finally:
        reps.stop()


def _load(reps: Replicas, seed: int) -> LoadTest:
    return LoadTest(
        LoadConfig(
            url=reps.router.url,
            mode="chat",
            session_ids=True,
            sessions=SESSIONS,
            max_turns=TURNS,
            turn_tokens=TURN_TOKENS,
            duration=900,
            metrics_urls=reps.urls,
            metrics_interval=0.5,
            retries=3,
            seed=seed,
            quiet=True,
        )
    )


def _session_requests(reps: Replicas) -> float:
    total = 0.0
    for s in reps.servers:
        try:
            total += s.metrics().get("vllm_sink:session_requests_total", 0.0)
        except Exception:  # noqa: BLE001 (a dead replica answers nothing)
            pass
    return total


def _idle(server, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["vllm_sink:active_requests"] == 0 and m.get("vllm:num_requests_running", 0) == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.5)


@pytest.mark.slow
def test_sessions_resume_on_their_replica(replicas):
    s = asyncio.run(_load(replicas, seed=0).run())
    assert s["error_count"] == 0, s["error_examples"]
    assert s["requests"] == SESSIONS * TURNS
    assert s["resume_rate"] >= 0.95, (s["resume_rate"], s["servers"])
    per = [v["requests"] for v in s["servers"].values()]
    even = SESSIONS * TURNS / len(per)
    assert sum(per) == SESSIONS * TURNS, s["servers"]
    assert all(even / 2 <= n <= 2 * even for n in per), s["servers"]


@pytest.mark.slow
def test_a_lost_replica_costs_a_reread_not_an_error(replicas):
    survivor, victim = replicas.servers
    start = _session_requests(replicas)
    killed: dict[str, float] = {}

    def kill_midway() -> None:  # once half of all turns have been sent
        deadline = time.monotonic() + 600
        while _session_requests(replicas) - start < SESSIONS * TURNS / 2:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        victim.kill()
        killed["at"] = time.monotonic()

    watcher = threading.Thread(target=kill_midway, daemon=True)
    watcher.start()
    load = _load(replicas, seed=1)
    s = asyncio.run(load.run())
    watcher.join(10)
    assert "at" in killed, "the run ended before the kill"
    print(
        f"\nresent {s['retried_count']} {s['retried']}, errors {s['errors']}, "
        f"servers {s['servers']}"
    )
    assert s["error_count"] == 0, s["error_examples"]
    done = [t for t in load.turns if not t.error and not t.stopped]
    assert len(done) == SESSIONS * TURNS  # every turn answered, resent ones included
    # Every first turn is a miss where it lands; the victim's conversations that went
    # on after the kill each missed once more, on the survivor.
    per = s["servers"]
    victim_sessions = per[victim.url]["misses"]  # its first turns (long before the kill)
    moved = per[survivor.url]["misses"] - (SESSIONS - victim_sessions)
    assert 1 <= moved <= victim_sessions, per
    after = _idle(survivor)
    rereads = [
        t.ttft
        for t in load.turns
        if t.start > killed["at"] and t.ttft is not None and not t.retried and t.turn > 0
    ]
    print(
        f"moved {moved} of the victim's {victim_sessions} sessions; TTFT after the kill: "
        f"max {max(rereads):.3f} s, median {sorted(rereads)[len(rereads) // 2]:.3f} s"
    )
    # The survivor's pool: exactly its parked sessions' blocks, nothing running.
    assert after["vllm_sink:pool_blocks_in_use"] == after["vllm_sink:blocks_parked"], after
    assert after["vllm_sink:kv_saved_bytes"] == 0, after
