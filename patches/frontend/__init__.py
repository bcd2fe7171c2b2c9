"""Frontend-process patches (the process that builds the engine config)."""
