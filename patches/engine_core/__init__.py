"""EngineCore-process parts: the scheduler class and the sink + ring KV policy."""
