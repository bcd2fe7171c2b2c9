"""Sessions, preemption and prefix-cache resets under KV-pool pressure, step by step.

One engine for the module, run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): each
``LLMEngine.step()`` is then exactly one schedule + forward, so a race between requests
that share a session id can be staged at a chosen step and replays the same way every
run. Pool: 11 usable blocks of 32 tokens; a stream of this layout holds up to 5
(S = 32, W = 96, K = 32: span 159). The saved-KV cap holds one full stream (6 blocks'
worth): a second concurrent save is refused.
"""

from __future__ import annotations

import pytest

from vllm_sink.tools.harness import make_llm, shutdown

pytestmark = pytest.mark.e2e

BLOCK_BYTES = 2 * 30 * 3 * 32 * 64 * 2  # K+V, 30 layers, 3 heads, bf16
POOL_BLOCKS = 12  # the null block + 11
SINK = {
    "sink_tokens": 4,
    "window_tokens": 96,
    "prefill_chunk_tokens": 32,
    "max_saved_kv_gib": 6 * BLOCK_BYTES / 2**30,
}  # one full stream (5 blocks) fits


@pytest.fixture(scope="module")
def engine(default_model_dir):
    llm = make_llm(
        default_model_dir,
        SINK,
        in_process=True,
        kv_cache_memory_bytes=POOL_BLOCKS * BLOCK_BYTES,
    )
    try:
        yield Stepper(llm)
    finally:
        shutdown(llm)


class Stepper:
    """Adds requests and steps the in-process engine, collecting finished outputs."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.eng = llm.llm_engine
        self.core = self.eng.engine_core.engine_core
        self.done: dict = {}
        self.tokens: dict[str, int] = {}  # request id -> prompt + output tokens so far
        self._n = 0

    def add(self, name, prompt, max_tokens, session=None, n=1) -> str:
        from vllm import SamplingParams

        self._n += 1
        # greedy, except n > 1 (vLLM refuses several greedy samples): seeded sampling
        params = SamplingParams(
            temperature=0 if n == 1 else 0.8,
            seed=None if n == 1 else 0,
            max_tokens=max_tokens,
            ignore_eos=True,
            n=n,
            extra_args={"session_id": session} if session else None,
        )
        rid = f"{name}-{self._n}"
        self.eng.add_request(rid, {"prompt_token_ids": list(prompt)}, params)
        return rid

    def step(self):
        for out in self.eng.step():
            self.tokens[out.request_id] = len(out.prompt_token_ids) + max(
                len(c.token_ids) for c in out.outputs
            )
            if out.finished:
                self.done[out.request_id] = out
        return self.board()

    def run(self, until=None, limit: int = 2000) -> None:
        for _ in range(limit):
            if until is not None and until():
                return
            if until is None and not self.eng.has_unfinished_requests():
                return
            self.step()
        raise AssertionError(f"not done after {limit} steps: {self.board()}")

    def history(self, rid) -> list[int]:
        out = self.done[rid]
        return list(out.prompt_token_ids) + list(out.outputs[0].token_ids)

    def board(self) -> dict[str, int]:
        """The scheduler board's values as of now (what /metrics shows after the next
        step: the board is written when a step is scheduled)."""
        from vllm_sink.core.stats_board import SESSION_FIELDS

        return {**dict.fromkeys(SESSION_FIELDS, 0), **self.core.scheduler.sink_stats()}

    def worker(self) -> dict[str, int]:
        return self.llm.collective_rpc("sink_stats")[0]

    def settle(self) -> dict[str, int]:
        """Run to the end, drop parked sessions; the pool must then be whole."""
        self.run()
        assert self.llm.reset_prefix_cache() is True
        self.eng.step()  # the drops reach the workers
        board, worker = self.board(), self.worker()
        from vllm_sink.core.stats_board import SESSION_FIELDS, StatsBoard, board_path
        from vllm_sink.patches.frontend.metrics import stats_dir

        path = board_path("scheduler", stats_dir())
        assert StatsBoard(path, fields=SESSION_FIELDS).read() == board
        assert board["pool_blocks_in_use"] == 0 and board["parked_sessions"] == 0, board
        assert board["kv_saved_bytes"] == 0, board
        assert worker["active_requests"] == 0 and worker["parked_sessions"] == 0, worker
        return board


def _tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_claimed_session_survives_a_same_id_request_finishing(engine):
    """R3 resumes R1's parked session but must wait for blocks (three streams and R2
    grow into a new block in that very step); meanwhile R2, running under the same id
    (it started while R1 ran: "in use"), finishes. R2 must not replace the session R3
    claimed, and R3 must not reach the workers still marked as a resume of a session
    that is gone (that raised in the worker and killed the engine core)."""
    e = engine
    before = e.board()
    t1 = e.add("T1", _tokens(1000, 10), 5, session="K")
    e.run()
    p1 = e.history(t1)
    r1 = e.add("R1", p1 + _tokens(2000, 6), 8, session="K")  # resumes T1
    r2 = e.add("R2", _tokens(3000, 10), 26, session="K")  # same id, in use: fresh
    hogs = [e.add(f"H{h}", _tokens(4000 + 20 * h, 10), 60) for h in range(3)]
    # Add R3 when the aligned streams (10-token prompts, started together) hold 33
    # tokens: the next step gives each of R2 and the hogs its second block.
    e.run(until=lambda: r1 in e.done and e.tokens.get(hogs[0], 0) >= 33)
    assert e.tokens[hogs[0]] == 33 and r2 not in e.done
    h1 = e.history(r1)
    r3 = e.add("R3", h1 + _tokens(5000, 130 - len(h1)), 4, session="K")
    e.run()
    assert {
        rid: e.done[rid].outputs[0].finish_reason for rid in (r1, r2, r3, *hogs)
    } == dict.fromkeys((r1, r2, r3, *hogs), "length")
    assert len(e.done[r3].outputs[0].token_ids) == 4
    board = e.board()
    # R1 resumed T1, R3 resumed R1 (after waiting for room), R2 was a fresh stream.
    assert board["resumes"] - before["resumes"] == 2, board
    assert board["miss_in_use"] - before["miss_in_use"] == 1, board
    e.settle()


def test_concurrent_same_session_with_n_above_one(engine):
    """n = 3 children share one session id, resumed while the pool is short: one child
    resumes, the others run fresh; nothing crashes and the pool is whole after."""
    e = engine
    t = e.add("S1", _tokens(6000, 20), 6, session="N")
    e.run()
    hist = e.history(t)
    hogs = [e.add(f"G{h}", _tokens(7000 + 40 * h, 30), 40) for h in range(2)]
    follow = [e.add("S2", hist + _tokens(8000, 40), 12, session="N", n=3) for _ in range(2)]
    e.run()
    for rid in (*hogs, *follow):
        out = e.done[rid]
        assert [c.finish_reason for c in out.outputs] == ["length"] * len(out.outputs), rid
    e.settle()


def test_running_streams_take_blocks_from_parked_sessions(engine):
    """Two streams run while three sessions park next to them (6 of 11 blocks); when
    the streams grow past what is free, parked sessions are dropped, least recently
    parked first, and no stream is preempted."""
    e = engine
    before = e.board()
    long = [e.add(f"L{i}", _tokens(9000 + 20 * i, 10), 100) for i in range(2)]
    parked = [e.add(f"P{i}", _tokens(9100 + 70 * i, 60), 4, session=f"park-{i}") for i in range(3)]
    e.run(until=lambda: all(p in e.done for p in parked))
    mid = e.board()
    assert mid["parked_sessions"] - before["parked_sessions"] == 3, mid
    assert mid["blocks_parked"] == 6 and mid["pool_blocks_in_use"] == 8, mid
    e.run()
    after = e.board()
    assert [e.done[r].outputs[0].finish_reason for r in long] == ["length"] * 2
    assert after["preempted_sink"] == before["preempted_sink"], after
    # The streams end with 110 tokens, 4 blocks each: 8 + 2 parked blocks fit in 11,
    # so two sessions (2 blocks each) went, the oldest first.
    assert after["parked_evictions"] - before["parked_evictions"] == 2, after
    assert after["parked_sessions"] == 1 and after["blocks_parked"] == 2, after
    e.settle()


def test_save_over_the_cap_finishes_the_stream_with_an_error(engine):
    """Five streams (64-token prompts, 2 blocks each) grow in a pool of 11 blocks:
    vLLM preempts some; the first two saves (2 blocks each) fit the host budget of 6
    blocks (saved, restored later), the next (3 blocks) would pass it and finishes
    that stream with finish_reason "error" at once. The others run to the end, and
    the workers hold no saved KV afterwards."""
    e = engine
    before = e.board()
    rids = [e.add(f"C{i}", _tokens(9500 + 70 * i, 64), 48) for i in range(5)]
    e.run()
    reasons = [e.done[r].outputs[0].finish_reason for r in rids]
    board = e.board()
    refused = board["kv_saves_refused"] - before["kv_saves_refused"]
    assert refused >= 1 and reasons.count("error") == refused, (reasons, board)
    for r, why in zip(rids, reasons):
        got = len(e.done[r].outputs[0].token_ids)
        assert (why, got == 48) in (("length", True), ("error", False)), (r, why, got)
    worker = e.worker()
    assert worker["kv_saves"] >= 1 and worker["kv_restores"] == worker["kv_saves"], worker
    assert worker["saved_streams"] == 0 and worker["saved_bytes"] == 0, worker
    e.settle()


def test_reset_prefix_cache_drops_parked_sessions(engine):
    """With sessions parked (and nothing running) a reset succeeds: the sessions are
    dropped, their next turns run fresh."""
    e = engine
    t = e.add("Z", _tokens(9700, 20), 5, session="reset-me")
    e.run()
    before = e.board()
    assert before["parked_sessions"] == 1
    assert e.llm.reset_prefix_cache() is True
    e.add("Z2", e.history(t) + _tokens(9800, 5), 3, session="reset-me")
    e.run()
    after = e.board()
    assert after["parked_reset"] - before["parked_reset"] == 1, after
    assert after["miss_none_parked"] - before["miss_none_parked"] == 1, after
    assert after["resumes"] == before["resumes"], after
    e.settle()


def test_reset_with_running_requests_finishes_streams_it_cannot_restore(engine):
    """``reset_prefix_cache(reset_running_requests=True)`` (a weight update) preempts
    every running request: dense ones are recomputed by vLLM as usual; streams, and a
    stream preempted earlier whose KV was saved, lost their KV and are finished with
    finish_reason "error". New requests afterwards run normally."""
    e = engine
    before = e.board()
    dense = e.add("D", _tokens(9900, 20), 40)
    streams = [e.add(f"W{i}", _tokens(10000 + 20 * i, 10), 120) for i in range(3)]
    # Run until one stream is preempted: it waits with its KV saved.
    e.run(until=lambda: e.board()["preempted_sink"] > before["preempted_sink"])
    assert e.worker()["kv_saves"] > e.worker()["kv_restores"]
    assert e.llm.reset_prefix_cache(reset_running_requests=True) is True
    e.run()
    board = e.board()
    assert e.done[dense].outputs[0].finish_reason == "length"
    assert len(e.done[dense].outputs[0].token_ids) == 40
    assert [e.done[r].outputs[0].finish_reason for r in streams] == ["error"] * 3
    assert board["streams_lost_reset"] - before["streams_lost_reset"] == 3, board
    after = e.add("A", _tokens(10100, 10), 8)
    e.run()
    assert e.done[after].outputs[0].finish_reason == "length"
    assert e.worker()["saved_streams"] == 0
    e.settle()
