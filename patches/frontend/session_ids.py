"""Frontend: a request's session id, bound to its caller at admission (one path for all).

Called by ``request_sink`` on every engine request (``InputProcessor.process_inputs``).
The id arrives as the request's ``session_id`` (vLLM's servers read the body field, the
``X-Session-ID`` header or ``vllm_xargs``; ``/inference/v1/generate`` the header; beam
search hands its id to every sub-request) or as ``extra_args["session_id"]`` (offline
``LLM``, the scale-out endpoint's ``sampling_params``). It leaves admission as
``request.session_id = "<owner>:<id>"`` with ``extra_args["session_id"]`` removed, so
the engine core only ever sees namespaced keys (``engine_core/sessions.session_key``).

The owner is ``caller.owner()`` (a hash of the HTTP caller's Authorization header, or
"local" offline), hashed together with the request's ``cache_salt`` when it has one:
two callers with different API keys (or salts) never share a parked session, whatever
ids they send; without credentials, every HTTP caller is the same owner (the server is
open anyway). Refused with an error naming ``session_id``: an id that is not a string,
one longer than ``MAX_CHARS``, two different ids in one request, the ``X-Session-ID``
header included (vLLM prefers the body field; a router hashes the header, so a request
whose two differ could reach a replica that never parked its session).
"""

from __future__ import annotations

import hashlib

from vllm_sink.core.config import show
from vllm_sink.patches.frontend import caller

FIELD = "session_id"
MAX_CHARS = 256


def _refuse(message: str):
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=FIELD)


def bind(request) -> None:
    """Namespace ``request``'s session id (in place); refuse a malformed one."""
    params = request.sampling_params
    extra = getattr(params, "extra_args", None) if params is not None else None
    given = extra.get(FIELD) if isinstance(extra, dict) else None
    if given is not None and not isinstance(given, str):
        raise _refuse(f"{FIELD} must be a string, got {show(given)} ({type(given).__name__}).")
    sid = request.session_id
    if sid and given and sid != given:
        raise _refuse(
            f"{FIELD} given twice with different values ({show(sid)}, "
            f"{show(given)}: body or header, and vllm_xargs / extra_args); "
            "send it once."
        )
    sid = sid or given
    header = caller.header_session_id()
    if sid and header and sid != header:
        raise _refuse(
            f"{FIELD} {show(sid)} differs from the X-Session-ID header {show(header)}, "
            "which a router in front of replicas routes by; send one id."
        )
    if isinstance(extra, dict) and FIELD in extra:
        params.extra_args = {k: v for k, v in extra.items() if k != FIELD}
    if not sid:
        request.session_id = None
        return
    if len(sid) > MAX_CHARS:
        raise _refuse(f"{FIELD} has {len(sid)} characters; at most {MAX_CHARS} are accepted.")
    owner = caller.owner()
    salt = getattr(request, "cache_salt", None)
    if salt:
        owner = hashlib.sha256(f"{owner}\0{salt}".encode()).hexdigest()[:24]
    request.session_id = f"{owner}:{sid}"
