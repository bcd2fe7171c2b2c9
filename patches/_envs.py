"""vLLM's environment cache, for a process that builds several engines in turn.

An engine core started in a process makes ``vllm.envs`` cache every variable it read
(``enable_envs_cache``), so a later engine built in the same process would see those
values instead of the environment as it is then (``VLLM_ENABLE_V1_MULTIPROCESSING``
among them). ``refresh()`` drops the cache, as vLLM's own test cleanup does. Used by
``vllm_sink.tools.harness`` between the tests' and benchmarks' engines; never by the
plugin inside an engine.
"""

from __future__ import annotations


def refresh() -> None:
    from vllm.envs import disable_envs_cache

    disable_envs_cache()
