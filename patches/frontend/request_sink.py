"""Frontend: each request's ``"sink"`` field, checked where every request enters vLLM.

Target: ``vllm.v1.engine.input_processor:InputProcessor.process_inputs`` (the one place
``LLM.generate`` and the OpenAI server both turn a prompt and its sampling parameters
into an engine request). Wrap and delegate, then:

* resolve the request's ``"sink"`` field (``vllm_sink.core.requests``): a bad field, or one
  asking for more KV than the engine allows, is a ``VLLMValidationError`` naming it
  (HTTP 400 on the server);
* a dense request gets vanilla vLLM's context bound, which sink mode lifted engine-wide
  for the streams (and, since sink mode admits pools sized for streams, the pool's
  size when that is smaller): a prompt of that length or more is refused with vanilla's
  message, ``max_tokens`` above it likewise, a default ``max_tokens`` becomes "up to
  the bound", and a larger one is capped there (vanilla's scheduler would stop the
  request at that length with ``finish_reason`` "length").

Installed only when a sink engine is configured in this process.
"""

from __future__ import annotations

from vllm_sink.core.config import SinkConfigError
from vllm_sink.patches._layout import engine_sink
from vllm_sink.patches._patching import Patch


def _wrap(original):
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        sink = _sink_of(self)
        params = request.sampling_params
        if sink is None or params is None:
            return request
        from vllm.exceptions import VLLMValidationError

        try:
            layout = sink.layout_for(params.extra_args)
        except SinkConfigError as e:
            raise VLLMValidationError(str(e), parameter="sink") from None
        if layout is None:
            _bound_dense(request, *dense_bound(self.vllm_config, sink),
                         self.vllm_config.model_config.max_model_len)
        return request

    return process_inputs


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
    return pool, (f" (for dense requests this engine's KV pool, {pool} tokens, is the "
                  "bound: sink mode sizes the pool for streams)")


def _bound_dense(request, limit: int, why: str, stream_cap: int) -> None:
    """Vanilla vLLM's checks at max_model_len = ``limit`` for one dense request."""
    from vllm.exceptions import VLLMValidationError

    prompt_len = len(request.prompt_token_ids or ())
    fix = "Make sure that `max_model_len` is no smaller than the number of text tokens"
    if prompt_len > limit:
        raise VLLMValidationError(
            f"The decoder prompt (length {prompt_len}) is longer than the maximum model "
            f"length of {limit}{why}. {fix}. (This request is dense: send it with the "
            'field "sink": true to run it as an endless stream instead.)')
    if prompt_len == limit:
        raise VLLMValidationError(
            f"The decoder prompt (length {prompt_len}) plus the number of requested "
            f"output tokens (at least 1) is longer than the maximum model length of "
            f"{limit}{why}. {fix} (prompt + requested output tokens).")
    params = request.sampling_params
    room = limit - prompt_len
    asked = params.max_tokens
    if asked is None or asked >= stream_cap - prompt_len:   # the server's default
        params.max_tokens = room
    elif asked > limit:
        raise VLLMValidationError(
            f"max_tokens={asked} cannot be greater than max_model_len={limit}{why}. "
            "Please request fewer output tokens.", parameter="max_tokens", value=asked)
    elif asked > room:
        params.max_tokens = room


PATCH = Patch("vllm.v1.engine.input_processor:InputProcessor.process_inputs", _wrap)
