"""Frontend: each request's ``"sink"`` field, checked where every request enters vLLM.

Target: ``vllm.v1.engine.input_processor:InputProcessor.process_inputs`` (the one place
``LLM.generate`` and the OpenAI server both turn a prompt and its sampling parameters
into an engine request). Wrap and delegate, then:

* a request id starting with NUL is refused before anything else: such ids are the
  scheduler's directives to the workers (``_directives``);
* its session id is bound to the caller (``session_ids.bind``: the one namespacing
  path, whichever way the id arrived);
* resolve the request's ``"sink"`` field (``vllm_sink.core.requests``): a bad field, or one
  asking for more KV than the engine allows, is a ``VLLMValidationError`` naming it
  (HTTP 400 on the server);
* a stream cannot be a streaming-input (``resumable``) request: the sink worker keeps
  no state between input chunks; refused here instead of raising in the worker;
* ``extra_args`` keys vLLM reads as objects (``kv_transfer_params``,
  ``ec_transfer_params``) must be objects (``vllm_xargs`` can send a list or string);
* a dense request gets vanilla vLLM's context bound, which sink mode lifted engine-wide
  for the streams (and, since sink mode admits pools sized for streams, the pool's
  size when that is smaller): a prompt of that length or more is refused with vanilla's
  message, ``max_tokens`` above it likewise, a default ``max_tokens`` becomes "up to
  the bound", and a larger one is capped there (vanilla's scheduler would stop the
  request at that length with ``finish_reason`` "length").

Installed only when a sink engine is configured in this process.
"""

from __future__ import annotations

from vllm_sink.core.config import SinkConfigError, show
from vllm_sink.patches import _directives
from vllm_sink.patches._layout import engine_sink
from vllm_sink.patches._patching import Patch
from vllm_sink.patches.frontend import session_ids


def _wrap(original):
    def process_inputs(self, *args, **kwargs):
        sink = _sink_of(self)
        if sink is not None:
            _check_request_id(
                kwargs["request_id"] if "request_id" in kwargs else args[0] if args else None
            )
        request = original(self, *args, **kwargs)
        if sink is not None:
            _admit(self.vllm_config, sink, request)
        return request

    return process_inputs


def _check_request_id(request_id) -> None:
    if isinstance(request_id, str) and _directives.is_reserved_id(request_id):
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(
            f"request id {show(request_id)} starts with a NUL character, which vllm_sink "
            "reserves for its own messages; use another id.",
            parameter="request_id",
        )


# extra_args keys vLLM itself reads as JSON objects: vLLM 0.32's output processor calls
# .get on kv_transfer_params (any other type from vllm_xargs is an HTTP 500 there).
_OBJECT_ARGS = ("kv_transfer_params", "ec_transfer_params")


def _admit(vllm_config, sink, request) -> None:
    from vllm.exceptions import VLLMValidationError

    session_ids.bind(request)
    params = request.sampling_params
    if params is None:
        return
    for key in _OBJECT_ARGS:
        value = (params.extra_args or {}).get(key)
        if value is not None and not isinstance(value, dict):
            raise VLLMValidationError(
                f'extra_args["{key}"] (vllm_xargs) must be a JSON object, got '
                f"{show(value)} ({type(value).__name__}).",
                parameter=key,
            )
    try:
        layout = sink.layout_for(params.extra_args)
    except SinkConfigError as e:
        raise VLLMValidationError(str(e), parameter="sink") from None
    if layout is None:
        _bound_dense(
            request, *dense_bound(vllm_config, sink), vllm_config.model_config.max_model_len
        )
    elif request.resumable:
        raise VLLMValidationError(
            "streaming-input (resumable) requests cannot be endless streams: the sink "
            "worker keeps no state between input chunks. Send the whole prompt in one "
            'request, or set the request field "sink": false.',
            parameter="sink",
        )


def _sink_of(processor):
    cached = getattr(processor, "_vllm_sink_engine", False)
    if cached is False:
        cached = engine_sink(processor.vllm_config)
        processor._vllm_sink_engine = cached
    return cached


def dense_bound(vllm_config, sink) -> tuple[int, str]:
    """Most tokens a dense request may hold, and what sets it: the model's context, or
    the KV pool if smaller (known once the engine started; the null block is unusable)."""
    blocks = vllm_config.cache_config.num_gpu_blocks
    pool = (blocks - 1) * sink.layout.block_size if blocks else None
    if pool is None or pool >= sink.dense_max_model_len:
        return sink.dense_max_model_len, ""
    return pool, (
        f" (for dense requests this engine's KV pool, {pool} tokens, is the "
        "bound: sink mode sizes the pool for streams)"
    )


def _bound_dense(request, limit: int, why: str, stream_cap: int) -> None:
    """Vanilla vLLM's checks at max_model_len = ``limit`` for one dense request."""
    from vllm.exceptions import VLLMValidationError

    prompt_len = len(request.prompt_token_ids or ())
    fix = "Make sure that `max_model_len` is no smaller than the number of text tokens"
    if prompt_len > limit:
        raise VLLMValidationError(
            f"The decoder prompt (length {prompt_len}) is longer than the maximum model "
            f"length of {limit}{why}. {fix}. (This request is dense: send it with the "
            'field "sink": true to run it as an endless stream instead.)'
        )
    if prompt_len == limit:
        raise VLLMValidationError(
            f"The decoder prompt (length {prompt_len}) plus the number of requested "
            f"output tokens (at least 1) is longer than the maximum model length of "
            f"{limit}{why}. {fix} (prompt + requested output tokens)."
        )
    params = request.sampling_params
    room = limit - prompt_len
    asked = params.max_tokens
    if asked is None or asked >= stream_cap - prompt_len:  # the server's default
        params.max_tokens = room
    elif asked > limit:
        raise VLLMValidationError(
            f"max_tokens={asked} cannot be greater than max_model_len={limit}{why}. "
            "Please request fewer output tokens.",
            parameter="max_tokens",
            value=asked,
        )
    elif asked > room:
        params.max_tokens = room


PATCH = Patch(
    "vllm.v1.engine.input_processor:InputProcessor.process_inputs",
    _wrap,
    signature="(self, request_id, prompt, params, supported_tasks, arrival_time=None, "
    "lora_request=None, tokenization_kwargs=None, trace_headers=None, priority=0, "
    "data_parallel_rank=None, resumable=False, session_id=None, kv_hints=None)",
)
