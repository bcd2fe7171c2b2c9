"""Frontend: ``"pin": "system"`` on the OpenAI chat endpoint, counted where it renders.

Target: ``vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.render_chat_request``
(where a chat request's messages become prompt token ids, with the request's own chat
template and kwargs). Wrap and delegate: when the request's ``"sink"`` field (body or
``vllm_xargs``), or the engine's default, asks to pin the system part, render the
leading system messages with two probe user turns through the same renderer and count
the prompt prefix they share (``vllm_sink.core.pin``); the field then carries that count
as ``"pin_prompt_tokens"`` (in place of ``"pin"``), which every other process resolves
as any request's. A field that does not parse is left as it is: admission
(``request_sink``) refuses it with its message. Installed only when a sink engine is
configured in this process.
"""

from __future__ import annotations

from vllm_sink.core.config import SinkConfigError
from vllm_sink.core.pin import common_prefix, probe_conversations
from vllm_sink.core.requests import ABSENT, FIELD
from vllm_sink.patches._layout import engine_sink
from vllm_sink.patches._patching import Patch, Target


def _wrap(original):
    async def render_chat_request(self, request):
        result = await original(self, request)
        sink = _sink_of(self)
        if sink is None or not isinstance(result, tuple):
            return result
        try:
            field = sink.system_pin_field(_field_of(request))
        except SinkConfigError:
            return result
        if field is None:
            return result
        n = await _system_part(self, request, result[1])
        if n is None:
            return self.create_error_response(
                'request field "sink" asks for "pin": "system", but the chat template could '
                "not render this conversation's "
                "system messages on their own, so the tokens to pin are unknown. Send "
                '"pin_prompt_tokens": N instead, or "pin": "none".'
            )
        _set_field(request, {**field, "pin_prompt_tokens": n})
        return result

    return render_chat_request


def _sink_of(serving):
    cached = getattr(serving, "_vllm_sink_engine", False)
    if cached is False:
        config = getattr(serving.engine_client, "vllm_config", None)
        cached = engine_sink(config) if config is not None else None
        serving._vllm_sink_engine = cached
    return cached


def _field_of(request):
    extra = request.model_extra or {}
    if FIELD in extra:
        return extra[FIELD]
    return (getattr(request, "vllm_xargs", None) or {}).get(FIELD, ABSENT)


def _set_field(request, value) -> None:
    """The counted field goes in the body's place; a ``vllm_xargs`` copy that agreed with
    the body (or stood alone) is dropped so the body hook sees one value."""
    extra = request.model_extra
    xargs = getattr(request, "vllm_xargs", None) or {}
    if FIELD in xargs and (FIELD not in extra or extra[FIELD] == xargs[FIELD]):
        del xargs[FIELD]
    extra[FIELD] = value


async def _system_part(serving, request, engine_inputs) -> int | None:
    """Prompt tokens before the first non-system message's content, or None when a
    probe conversation does not render."""
    tokens = [serving._extract_prompt_components(engine_inputs[0]).token_ids]
    for conversation in probe_conversations(request.messages):
        probe = request.model_copy(
            update={
                "messages": conversation,
                "add_generation_prompt": True,
                "continue_final_message": False,
                "kv_transfer_params": None,
            }
        )
        try:
            out = await serving.online_renderer.render_chat(probe)
        except Exception:  # noqa: BLE001 (a template may refuse a lone system turn)
            return None
        if not isinstance(out, tuple) or len(out[1]) != 1:
            return None
        tokens.append(serving._extract_prompt_components(out[1][0]).token_ids)
    return common_prefix(*tokens)


_CHAT = "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat"
PATCH = Patch(f"{_CHAT}.render_chat_request", _wrap, signature="(self, request)")
# What the wrapper calls on the serving object and its renderer.
TARGETS = [
    Target(
        "vllm.renderers.online_renderer:OnlineRenderer.render_chat",
        "(self, request, *, skip_mm_cache=False)",
    ),
    Target(f"{_CHAT}._extract_prompt_components", "(self, prompt)"),
    Target(
        f"{_CHAT}.create_error_response",
        "(message, err_type='BadRequestError', status_code=HTTPStatus.BAD_REQUEST, param=None)",
    ),
]
