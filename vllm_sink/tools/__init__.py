"""Client-side tools: the ``vllm-sink`` command (``cli``), its load test and soak test,
the default model (``model``) and the long-text fixture (``kjv``). Imports nothing from
vLLM's internals."""
