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

from vllm_sink.core.requests import FIELD
from vllm_sink.patches._patching import Patch


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
                    "different values; send it once.",
                    parameter="sink",
                )
            args_[FIELD] = extra[FIELD]
            params.extra_args = args_
        return params

    return to_sampling_params


def _wrap_beam(original):
    def to_beam_search_params(self, *args, **kwargs):
        extra = getattr(self, "model_extra", None) or {}
        if FIELD in extra or FIELD in (getattr(self, "vllm_xargs", None) or {}):
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                'request field "sink" cannot be used with beam search (use_beam_search): '
                "vLLM runs each beam step as new requests that do not carry it. Remove "
                '"sink" (beam search then runs as this engine\'s default) or turn beam '
                "search off.",
                parameter="sink",
            )
        return original(self, *args, **kwargs)

    return to_beam_search_params


_CHAT = "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest"
_COMPLETION = "vllm.entrypoints.openai.completion.protocol:CompletionRequest"
_RESPONSES = "vllm.entrypoints.openai.responses.protocol:ResponsesRequest"
PATCHES = [
    Patch(
        f"{_CHAT}.to_sampling_params",
        _wrap,
        signature="(self, max_tokens, default_sampling_params)",
    ),
    Patch(
        f"{_COMPLETION}.to_sampling_params",
        _wrap,
        signature="(self, max_tokens, default_sampling_params=None)",
    ),
    Patch(
        f"{_RESPONSES}.to_sampling_params",
        _wrap,
        signature="(self, default_max_tokens, default_sampling_params=None)",
    ),
    Patch(
        f"{_CHAT}.to_beam_search_params",
        _wrap_beam,
        signature="(self, max_tokens, default_sampling_params)",
    ),
    Patch(
        f"{_COMPLETION}.to_beam_search_params",
        _wrap_beam,
        signature="(self, max_tokens, default_sampling_params=None)",
    ),
]
