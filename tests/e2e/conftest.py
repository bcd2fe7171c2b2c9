"""Engine helpers for e2e tests: one engine per module, small fixed KV pool, eager."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest

KV_BYTES = 256 * 1024 * 1024


def make_llm(model: str, sink: dict | None = None, **kw):
    from vllm import LLM

    kw.setdefault("enforce_eager", True)
    kw.setdefault("kv_cache_memory_bytes", KV_BYTES)
    kw.setdefault("seed", 0)
    extra = {"sink": sink} if sink is not None else {}
    return LLM(model, additional_config=extra, **kw)


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


@pytest.fixture
def engine_factory():
    engines = []

    def make(*args, **kw):
        llm = make_llm(*args, **kw)
        engines.append(llm)
        return llm

    yield make
    for llm in engines:
        shutdown(llm)


def generate_in_subprocess(model: str, prompts: list[list[int]], max_tokens: int,
                           env: dict[str, str], **engine_kw) -> list[list[int]]:
    """Greedy generations from a fresh Python process (e.g. with plugins disabled)."""
    script = os.path.join(os.path.dirname(__file__), "_generate.py")
    args = json.dumps({"model": model, "prompts": prompts, "max_tokens": max_tokens,
                       "engine": {"kv_cache_memory_bytes": KV_BYTES, "enforce_eager": True,
                                  "seed": 0, **engine_kw}})
    out = subprocess.run([sys.executable, script, args], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])
