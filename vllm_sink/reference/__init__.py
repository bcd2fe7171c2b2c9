"""Pure-torch reference implementations the plugin is tested against: StreamingLLM over
a Hugging Face model (``streaming``) and one-block-at-a-time key rotation
(``key_cache``). No vLLM."""

from vllm_sink.reference.streaming import ReferenceStream, StreamingReference

__all__ = ["ReferenceStream", "StreamingReference"]
