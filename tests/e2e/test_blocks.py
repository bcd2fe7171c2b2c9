"""Block accounting through vLLM's own metrics: a stream takes blocks as it grows, holds
C/B of them once its cache is full (decoding never needs the prefill headroom), stays
flat however long it runs, and every block returns after completion and after abort.
(A pool too small for its streams: tests/e2e/test_mixed.py.)"""

import pytest

from vllm_sink.tools.harness import make_llm, shutdown

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 96}  # C = 128: 4 blocks of 32 when full
BLOCK_BYTES = 2 * 30 * 3 * 32 * 64 * 2  # K+V, 30 layers, 3 heads, bf16


@pytest.fixture(scope="module")
def engine(default_model_dir):
    # 14 blocks: the null block + room for 3 decoding streams (12 blocks) and one more.
    llm = make_llm(
        default_model_dir, SINK, kv_cache_memory_bytes=14 * BLOCK_BYTES, disable_log_stats=False
    )
    yield llm.llm_engine
    shutdown(llm)


def _metrics(eng) -> dict:
    return {m.name: getattr(m, "value", None) for m in eng.get_metrics()}


def _blocks_used(eng) -> int:
    total = eng.vllm_config.cache_config.num_gpu_blocks - 1
    return round(_metrics(eng)["vllm:kv_cache_usage_perc"] * total)


def test_pool_holds_three_requests(engine):
    assert engine.vllm_config.cache_config.num_gpu_blocks == 14


def test_blocks_grow_to_capacity_then_stay_flat(engine):
    from vllm import SamplingParams

    for i in range(3):
        engine.add_request(
            f"long{i}",
            {"prompt_token_ids": list(range(200, 230 + i))},
            SamplingParams(max_tokens=400, ignore_eos=True),
        )
    history, lengths = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                lengths[out.request_id] = len(out.outputs[0].token_ids)
        history.append((int(_metrics(engine)["vllm:num_requests_running"]), _blocks_used(engine)))
    # 400 tokens per stream = 3x+ the 128-token capacity; all three ran to the end.
    assert lengths == {f"long{i}": 400 for i in range(3)}
    # On demand: one block per ~30-token prompt at first, never more than C/B each ...
    assert all(running <= blocks <= 4 * running for running, blocks in history if running)
    # (With async scheduling, vLLM's CUDA default, the scheduler may already have
    # scheduled the next step when the metrics are read: the 32-token prompt's stream
    # then holds the second block its first decoded token needs.)
    ahead = int(engine.vllm_config.scheduler_config.async_scheduling)
    assert any(blocks <= running + ahead for running, blocks in history[:5] if running)
    # ... and exactly C/B per stream from then on, through ~270 tokens of evictions.
    full = [blocks for running, blocks in history[110:] if running == 3]
    assert len(full) > 250 and set(full) == {12}
    assert _metrics(engine)["vllm:num_preemptions"] == 0
    assert _blocks_used(engine) == 0


def test_step_trace_counts_the_evictions(engine):
    """The worker's step trace (what the benchmarks read through sink_trace): one record
    per step, its evictions adding up to the worker's counter, the plugin's wall time
    covering its key-op time."""
    from vllm import SamplingParams

    engine.collective_rpc("sink_trace")  # read and clear: a fresh trace
    before = engine.collective_rpc("sink_stats")[0]
    engine.add_request(
        "traced",
        {"prompt_token_ids": list(range(300, 320))},
        SamplingParams(max_tokens=300, ignore_eos=True),
    )
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    from vllm_sink.core.trace import records

    trace = records(engine.collective_rpc("sink_trace")[0])
    after = engine.collective_rpc("sink_stats")[0]
    assert sum(r.evictions for r in trace) == after["evictions"] - before["evictions"] > 0
    assert 0 < len(trace) <= steps + 1
    assert all(r.host_ns >= r.keys_ns >= 0 and r.cpu_ns >= 0 for r in trace)
    assert sum(r.cpu_ns for r in trace) > 0  # the plugin's thread CPU time
    assert [r.start_ns for r in trace] == sorted(r.start_ns for r in trace)


def test_abort_returns_blocks(engine):
    from vllm import SamplingParams

    for i in range(3):
        engine.add_request(
            f"ab{i}",
            {"prompt_token_ids": list(range(300, 340))},
            SamplingParams(max_tokens=10_000, ignore_eos=True),
        )
    for _ in range(150):  # well past the first evictions
        engine.step()
    assert _blocks_used(engine) == 12
    engine.abort_request(["ab0", "ab1", "ab2"])
    engine.step()
    assert not engine.has_unfinished_requests()
    assert _blocks_used(engine) == 0
    # The engine still serves normally afterwards.
    engine.add_request(
        "after", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=5, ignore_eos=True)
    )
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert len(outs[0].outputs[0].token_ids) == 5


def test_min_tokens_longer_than_window(engine):
    """min_tokens counts every generated token, not just those still cached. The stop
    token gets a +100 logit bias, so it is the certain choice wherever it is allowed:
    suppressed for exactly 150 tokens (> the 96-token window), chosen at the 151st,
    whatever else this machine's numerics make the model say."""
    from vllm import SamplingParams

    tok = engine.get_tokenizer()
    stop = tok.encode(" the")[-1]
    engine.add_request(
        "mt",
        {"prompt_token_ids": tok.encode("Write about the history of the world.")},
        SamplingParams(
            temperature=0,
            max_tokens=400,
            min_tokens=150,
            stop_token_ids=[stop],
            logit_bias={stop: 100.0},
            ignore_eos=True,
        ),
    )
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    ids = list(out.outputs[0].token_ids)
    assert out.outputs[0].finish_reason == "stop"
    assert len(ids) == 151 and ids[-1] == stop and stop not in ids[:150], ids


def test_structured_output_spans_evictions(engine):
    """The grammar follows the whole stream, not the cached window: 150 comma-separated
    answers (>= 299 tokens, > 2x the 128-token capacity) match the regex exactly and end
    when the grammar does; then the blocks return."""
    import re

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    pattern = r"(yes|no)(, (yes|no)){149}"
    tok = engine.get_tokenizer()
    engine.add_request(
        "so",
        {"prompt_token_ids": tok.encode("Answer yes or no, 150 times:")},
        SamplingParams(
            temperature=0.8,
            seed=1,
            max_tokens=2000,
            structured_outputs=StructuredOutputsParams(regex=pattern),
        ),
    )
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    text, ids = out.outputs[0].text, out.outputs[0].token_ids
    # The grammar itself forces >= 299 tokens (1 + 149 x ", ans"): > 2x the capacity.
    assert out.outputs[0].finish_reason == "stop" and len(ids) > 2 * 128, (len(ids), text[-200:])
    assert re.fullmatch(pattern, text), text[-200:]
    assert _blocks_used(engine) == 0


def test_parallel_sampling_streams_each_child(engine):
    """n = 2: each child is its own endless stream with its own C/B blocks."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    tok = engine.get_tokenizer()
    engine.add_request(
        "n2",
        {"prompt_token_ids": tok.encode("Once upon a time")},
        SamplingParams(
            n=2,
            temperature=1.0,
            seed=3,
            max_tokens=300,
            ignore_eos=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        ),
    )
    peak, out = 0, None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
        peak = max(peak, _blocks_used(engine))
    a, b = (list(c.token_ids) for c in out.outputs)
    assert len(a) == len(b) == 300 and a != b
    assert peak == 2 * 4 and _blocks_used(engine) == 0
