"""The plugin's policy and math, shared by every process: the ``"sink"`` section and its
layout (``config``), which requests are streams (``requests``), the eviction rule and
ring (``policy``), RoPE rotations (``rotary``), batched key edits (``key_cache``), the
attention backends sink mode runs on (``backends``), and the counter board behind
``/metrics`` (``stats_board``). Imports nothing from vLLM."""
