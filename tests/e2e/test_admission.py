"""Admission (InputProcessor.process_inputs, the frontend process) on an offline engine:
what the scheduler or a worker cannot serve is refused there with an error naming the
cause, never raised later inside the engine (which would kill it for everyone); session
ids are namespaced there ("local" for offline callers)."""

from __future__ import annotations

import pytest

from vllm_sink.tools.harness import make_llm, shutdown

pytestmark = pytest.mark.e2e

SINK = {"sink_tokens": 4, "window_tokens": 96}
PROMPT = {"prompt_token_ids": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def llm(default_model_dir):
    engine = make_llm(default_model_dir, SINK)
    yield engine
    shutdown(engine)


def _admit(llm, params, request_id="r", **kw):
    return llm.llm_engine.input_processor.process_inputs(
        request_id, PROMPT, params, supported_tasks=("generate",), **kw
    )


def _generate_two(llm) -> list[int]:
    from vllm import SamplingParams

    out = llm.generate([PROMPT], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def test_reserved_request_ids_are_refused(llm):
    """A request id starting with NUL would be read by the workers as a scheduler
    directive when it finishes (a malformed one used to raise there, killing the
    engine): refused at admission, and the engine serves on."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    refused = None
    try:
        llm.llm_engine.add_request(
            "\x00vllm_sink:not a directive", PROMPT, SamplingParams(max_tokens=2)
        )
    except VLLMValidationError as e:
        refused = e
    assert len(_generate_two(llm)) == 2
    assert refused is not None and "request id" in str(refused), refused


def test_streaming_input_is_refused_for_streams(llm):
    """Resumable (streaming-input) requests would raise in the sink worker: a stream
    gets a clear error at admission; a dense one is vLLM's own and stays allowed."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="streaming-input"):
        _admit(llm, SamplingParams(max_tokens=2), resumable=True)
    dense = _admit(llm, SamplingParams(max_tokens=2, extra_args={"sink": False}), resumable=True)
    assert dense.resumable


def test_offline_session_ids_are_namespaced_and_checked(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    req = _admit(llm, SamplingParams(max_tokens=2, extra_args={"session_id": "conv"}))
    assert req.session_id == "local:conv"
    assert "session_id" not in (req.sampling_params.extra_args or {})
    req = _admit(llm, SamplingParams(max_tokens=2), session_id="conv")
    assert req.session_id == "local:conv"
    salted = llm.llm_engine.input_processor.process_inputs(
        "r",
        {**PROMPT, "cache_salt": "tenant-1"},
        SamplingParams(max_tokens=2),
        supported_tasks=("generate",),
        session_id="conv",
    )
    assert salted.session_id.endswith(":conv") and salted.session_id != "local:conv"
    for extra, kw, words in (
        ({"session_id": 5}, {}, "string"),
        ({"session_id": "s" * 300}, {}, "at most"),
        ({"session_id": "a"}, {"session_id": "b"}, "twice"),
    ):
        with pytest.raises(VLLMValidationError, match=words) as e:
            _admit(llm, SamplingParams(max_tokens=2, extra_args=extra), **kw)
        assert "session_id" in str(e.value)
