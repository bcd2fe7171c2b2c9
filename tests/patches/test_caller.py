"""patches/frontend/caller.py: the caller's owner reaches code that runs for its request:
the handler, tasks it creates (beam search), a streamed body, and the thread pool
``process_inputs_async`` uses; outside an HTTP request the owner is "local"."""

import asyncio
import concurrent.futures

import pytest

from vllm_sink.patches.frontend import caller

pytestmark = pytest.mark.cpu


def _app(seen: list):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def handler(request):
        seen.append(("handler", caller.owner()))
        task = asyncio.create_task(asyncio.sleep(0, result=None))
        await task
        seen.append(("task", await asyncio.create_task(_owner_later())))
        return PlainTextResponse("ok")

    async def stream(request):
        async def body():
            seen.append(("stream", caller.owner()))
            yield b"x"

        return StreamingResponse(body())

    return Starlette(routes=[Route("/h", handler), Route("/s", stream)])


async def _owner_later():
    await asyncio.sleep(0)
    return caller.owner()


def test_owner_follows_the_http_request():
    from starlette.middleware import Middleware
    from starlette.testclient import TestClient

    seen: list = []
    app = _app(seen)
    app.user_middleware.insert(0, Middleware(caller.CallerMiddleware))
    client = TestClient(app)
    for auth in ("Bearer key-a", "Bearer key-b"):
        assert client.get("/h", headers={"Authorization": auth}).status_code == 200
        assert client.get("/s", headers={"Authorization": auth}).status_code == 200
    client.get("/h")
    owners = [o for _, o in seen]
    a, b, anon = owners[0], owners[3], owners[6]
    assert owners[:3] == [a] * 3 and owners[3:6] == [b] * 3 and owners[6:] == [anon] * 2
    assert len({a, b, anon, caller.LOCAL}) == 4  # an HTTP caller is never "local"
    assert caller.owner() == caller.LOCAL  # outside a request


def test_thread_pool_calls_keep_the_callers_context():
    patch = caller.PATCHES[1]
    assert patch.target.endswith(":make_async")
    applied = patch.apply()
    try:
        from vllm.v1.engine import input_processor

        pool = concurrent.futures.ThreadPoolExecutor(2)
        run = input_processor.make_async(lambda x: (x, caller.owner()), executor=pool)

        async def call():
            token = caller._OWNER.set("owner-1")
            try:
                return await run(7)
            finally:
                caller._OWNER.reset(token)

        assert asyncio.run(call()) == (7, "owner-1")
        pool.shutdown()
    finally:
        if applied:
            patch.revert()


def test_build_app_adds_the_middleware_to_a_built_stack():
    from fastapi import FastAPI

    app = FastAPI()
    app.middleware_stack = app.build_middleware_stack()  # as vLLM's bootstrap leaves it
    wrapped = caller._wrap_build_app(lambda: app)()
    assert wrapped.user_middleware[0].cls is caller.CallerMiddleware
    layer, found = wrapped.middleware_stack, False
    while layer is not None and not found:
        found = isinstance(layer, caller.CallerMiddleware)
        layer = getattr(layer, "app", None)
    assert found
