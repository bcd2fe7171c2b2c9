"""Client-side tools: the ``vllm-sink`` command (``cli``), its load test and soak test,
the default model (``model``), the long-text fixture (``kjv``) and the engine and
server harness of the tests and benchmarks (``harness``). Imports nothing from vLLM's
internals."""
