"""Worker-process parts: worker class, model-runner mixin, KV key re-rotation, preempted
streams' KV saved and restored."""
