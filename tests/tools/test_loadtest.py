"""vllm_sink.tools.loadtest: the KV-flatness judgement on synthetic samples. Streams take
blocks on demand, so the pool grows until every stream holds its capacity: flatness is
judged only from then on, and the time to that plateau is reported."""

import pytest

from vllm_sink.tools.loadtest import LoadConfig, LoadTest, TurnRecord, format_table

pytestmark = pytest.mark.cpu

STREAMS, PER_STREAM, CAPACITY = 256, 129, 4096


def _run(blocks_at, reached_at, end=120, active_until=110, mode="generate"):
    """A LoadTest holding a finished run of one endless request per stream: samples every
    second, ``blocks_at(t)`` blocks in use, stream s at capacity at ``reached_at(s)``."""
    lt = LoadTest(LoadConfig(sessions=STREAMS, duration=end, mode=mode, quiet=True))
    lt.capacity = CAPACITY
    for s in range(STREAMS):
        rec = TurnRecord(s, 0, 0.0, tokens=4000, prompt_tokens=12, ttft=0.5)
        rec.reached = reached_at(s)
        lt.turns.append(rec)
    lt.session_tokens = [4000] * STREAMS
    # Half the streams end at active_until (their blocks go back with them).
    lt.samples = [
        {
            "t": float(t),
            "vllm_sink:active_requests": STREAMS if t < active_until else STREAMS // 2,
            "vllm_sink:kv_blocks_reserved": blocks_at(t) if t < active_until else blocks_at(t) // 2,
            "vllm_sink:blocks_per_request": PER_STREAM + 8,
        }
        for t in range(end + 1)
    ]
    return lt.summary("m", float(end))


def test_growth_then_plateau_is_flat():
    """The GPU run that printed "KV blocks flat: False": the pool grew for 37 s (blocks
    on demand), then stayed at 33,024 blocks to the end."""
    s = _run(
        lambda t: min(t, 37) * (STREAMS * PER_STREAM) // 37,
        lambda stream: 20.0 + 17.0 * stream / (STREAMS - 1),
    )
    assert s["kv_plateau_s"] == 37.0
    assert s["kv_blocks_at_plateau"] == [STREAMS * PER_STREAM]
    assert s["kv_blocks_flat"] is True and s["kv_blocks_within_bound"] is True
    table = format_table(s)
    assert "37.0" in table and "True" in table


def test_change_after_the_plateau_is_not_flat():
    s = _run(lambda t: STREAMS * PER_STREAM + (t == 80), lambda stream: 10.0)
    assert s["kv_plateau_s"] == 10.0 and s["kv_blocks_flat"] is False
    assert s["kv_blocks_at_plateau"] == [STREAMS * PER_STREAM, STREAMS * PER_STREAM + 1]


def test_a_stream_that_never_filled_leaves_flatness_unjudged():
    s = _run(lambda t: min(t, 37) * 100, lambda stream: None if stream == 3 else 5.0)
    assert s["kv_plateau_s"] is None and s["kv_blocks_flat"] is None
    assert "not reached" in format_table(s)


def test_runs_that_restart_streams_are_not_judged():
    """Chat turns (or --request-tokens) start a new request per turn: the pool dips and
    regrows between turns, so there is no single plateau to judge."""
    s = _run(lambda t: 1000, lambda stream: 1.0, mode="chat")
    assert s["kv_plateau_s"] is None and s["kv_blocks_flat"] is None


def test_a_session_past_the_deadline_is_cancelled_and_counted(monkeypatch, capsys):
    """A session that does not end by the deadline (+ grace) does not hang the run: it is
    cancelled, reported with the frames it waits in, and counted as an error."""
    import asyncio
    import time

    import vllm_sink.tools.loadtest as loadtest

    monkeypatch.setattr(loadtest, "DEADLINE_GRACE_S", 0.2)

    class Stuck(LoadTest):
        async def _session(self, http, session, model):
            if session == 1:
                await asyncio.sleep(3600)  # stands for a request that ignores the deadline

    lt = Stuck(LoadConfig(sessions=3, duration=1, quiet=True))
    lt.deadline = time.monotonic() + 0.1
    t0 = time.monotonic()
    asyncio.run(lt._sessions(None, "m"))
    assert time.monotonic() - t0 < 5
    assert lt.overdue == 1
    assert "waits in" in capsys.readouterr().err
    s = lt.summary("m", 1.0)
    assert s["errors"] == {"overran_deadline": 1} and s["error_count"] == 1


def test_a_blocking_memory_read_does_not_stall_the_streams(monkeypatch):
    """Reading a server's RSS can block (its /proc files wait on the process's memory
    map lock); that read runs on a daemon thread, so the event loop that times streams
    and enforces the deadline keeps its pace, and the newest reading is still reported."""
    import asyncio
    import threading
    import time

    import vllm_sink.tools.loadtest as loadtest

    release = threading.Event()

    def slow_rss(pid):
        release.wait(10)
        return 7 << 20

    monkeypatch.setattr(loadtest, "_local_server_pid", lambda port: 4242)
    monkeypatch.setattr(loadtest, "_tree_rss", slow_rss)
    probe = loadtest.RssProbe([8000], interval=0.01).start()

    async def ticks():
        t0 = time.monotonic()
        for _ in range(10):
            await asyncio.sleep(0.01)
        return time.monotonic() - t0

    assert asyncio.run(ticks()) < 1.0 and probe.latest is None
    release.set()
    deadline = time.monotonic() + 5
    while probe.latest is None and time.monotonic() < deadline:
        time.sleep(0.01)
    probe.close()
    assert probe.latest == 7 << 20
