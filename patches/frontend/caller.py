"""Frontend: who sent the request being admitted, for binding session ids to callers.

Every way a session id reaches the engine (chat, completions and responses bodies,
``X-Session-ID``, ``vllm_xargs``, the scale-out ``/inference/v1/generate`` header and
``extra_args``, beam search's sub-requests, offline ``extra_args``) passes
``InputProcessor.process_inputs``, where ``request_sink`` namespaces it with ``owner()``.
That function has no HTTP request, so the caller travels in a ``ContextVar``:

* ``CallerMiddleware`` (pure ASGI, outermost) sets it for each HTTP request to a hash of
  the ``Authorization`` header (nothing else; the cache salt joins at admission), and
  keeps the request's ``X-Session-ID`` header beside it: what a router in front of
  replicas hashes, which ``session_ids.bind`` holds the id the engine gets to. The
  handler, the body of a streamed response and the tasks they create (beam search's
  sub-requests: ``asyncio`` copies the context into each task) all see it.
  Target: ``vllm.entrypoints.launchers.api_server.entry:build_app`` (the name the OpenAI
  server calls; wrap and delegate: the middleware is added to the app it returns).
* ``process_inputs_async`` runs ``process_inputs`` on the renderer's thread pool, and
  ``run_in_executor`` does not carry contextvars into the thread. Target:
  ``vllm.v1.engine.input_processor:make_async`` (the name ``InputProcessor.__init__``
  calls); wrap and delegate: each call runs in a copy of the caller's context.

Outside an HTTP request (offline ``LLM``, a program driving ``AsyncLLM``) the owner is
``"local"``. Installed only when a sink engine is configured in this process.
"""

from __future__ import annotations

import contextvars
import hashlib

from vllm_sink.patches._patching import Patch

LOCAL = "local"
_OWNER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vllm_sink_caller", default=None
)
_HEADER_SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vllm_sink_header_session", default=None
)
SESSION_HEADER = b"x-session-id"


def owner() -> str:
    """The caller of the request being admitted: a hash of its Authorization header, or
    "local" outside an HTTP request. An HTTP caller never gets "local"."""
    return _OWNER.get() or LOCAL


def header_session_id() -> str | None:
    """The X-Session-ID header of the HTTP request being admitted (its first one)."""
    return _HEADER_SESSION.get()


def session_of_headers(headers) -> str | None:
    for k, v in headers:
        if k.lower() == SESSION_HEADER:
            return v.decode("latin-1") or None  # as Starlette decodes header values
    return None


def owner_of_headers(headers) -> str:
    """Owner of an ASGI request's raw ``(name, value)`` header pairs."""
    auth = b"".join(v for k, v in headers if k.lower() == b"authorization")
    return hashlib.sha256(b"caller\0" + auth).hexdigest()[:24]


class CallerMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or ()
        token = _OWNER.set(owner_of_headers(headers))
        header_token = _HEADER_SESSION.set(session_of_headers(headers))
        try:
            await self.app(scope, receive, send)
        finally:
            _HEADER_SESSION.reset(header_token)
            _OWNER.reset(token)


def _wrap_build_app(original):
    def build_app(*args, **kwargs):
        from starlette.middleware import Middleware

        app = original(*args, **kwargs)
        # Outermost; Starlette's add_middleware refuses once the stack is built, and
        # vLLM's SageMaker bootstrap builds it inside build_app: rebuild it as they do.
        app.user_middleware.insert(0, Middleware(CallerMiddleware))
        if app.middleware_stack is not None:
            app.middleware_stack = app.build_middleware_stack()
        return app

    return build_app


def _in_context(context, func, *args, **kwargs):
    return context.run(func, *args, **kwargs)


def _wrap_make_async(original):
    def make_async(func, executor=None):
        run = original(_in_context, executor)

        def call(*args, **kwargs):
            return run(contextvars.copy_context(), func, *args, **kwargs)

        return call

    return make_async


PATCHES = [
    Patch(
        "vllm.entrypoints.launchers.api_server.entry:build_app",
        _wrap_build_app,
        signature="(args, supported_tasks=None, model_config=None)",
    ),
    Patch(
        "vllm.v1.engine.input_processor:make_async",
        _wrap_make_async,
        signature="(func, executor=None)",
    ),
]
