"""Frontend: the OpenAI server's top-level ``"sink"`` body field, into the request.

Targets: ``to_sampling_params`` of vLLM's chat-completion, completion and responses
request models (the three places an OpenAI request becomes ``SamplingParams``; vLLM
keeps unknown body fields as pydantic extras and otherwise drops them). Wrap and
delegate: a ``"sink"`` field (``extra_body={"sink": {...}}`` in the openai client) is
copied into ``extra_args["sink"]``, next to what ``vllm_xargs`` carries; a field given
both ways must agree. ``patches/frontend/request_sink.py`` then checks it.
Installed only when a sink engine is configured in this process.
"""

from __future__ import annotations

from vllm_sink.patches._patching import Patch
from vllm_sink.core.requests import FIELD


def _wrap(original):
    def to_sampling_params(self, *args, **kwargs):
        params = original(self, *args, **kwargs)
        extra = getattr(self, "model_extra", None) or {}
        if FIELD in extra:
            from vllm.exceptions import VLLMValidationError

            args_ = dict(params.extra_args or {})
            if FIELD in args_ and args_[FIELD] != extra[FIELD]:
                raise VLLMValidationError(
                    'request field "sink" given twice (body and vllm_xargs) with '
                    "different values; send it once.", parameter="sink")
            args_[FIELD] = extra[FIELD]
            params.extra_args = args_
        return params

    return to_sampling_params


_TARGETS = ("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
            "vllm.entrypoints.openai.completion.protocol:CompletionRequest",
            "vllm.entrypoints.openai.responses.protocol:ResponsesRequest")
PATCHES = [Patch(f"{target}.to_sampling_params", _wrap) for target in _TARGETS]
