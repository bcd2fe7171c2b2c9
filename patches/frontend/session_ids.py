"""Frontend: bind a session id to the caller who sent it.

Target: ``vllm.entrypoints.generate.base.serving:GenerateBaseServing._get_session_id``
(the OpenAI server's one place that reads ``session_id`` from the body, the
``X-Session-ID`` header or ``vllm_xargs``). Wrap and delegate: in sink mode the id that
reaches the engine is ``<owner>:<id>``, where the owner is a hash of the request's
``Authorization`` header and ``cache_salt``. Two clients with different API keys (or
salts) therefore never share a parked session, whatever ids they send; without
credentials, everyone is the same owner (the server is open anyway).
Installed only when a sink engine is configured in this process.
"""

from __future__ import annotations

import hashlib

from vllm_sink.patches._patching import Patch


def owner_of(raw_request, cache_salt: str | None) -> str:
    auth = ""
    if raw_request is not None:
        auth = raw_request.headers.get("authorization", "") or ""
    h = hashlib.sha256(f"{auth}\0{cache_salt or ''}".encode()).hexdigest()
    return h[:24]


def _wrap(original):
    def _get_session_id(request, raw_request):
        session_id = original(request, raw_request)
        if not session_id:
            return session_id
        return f"{owner_of(raw_request, getattr(request, 'cache_salt', None))}:{session_id}"

    return _get_session_id


PATCH = Patch("vllm.entrypoints.generate.base.serving:GenerateBaseServing._get_session_id",
              _wrap)
