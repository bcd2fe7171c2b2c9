"""Pure-torch reference implementations the plugin is tested against: StreamingLLM over
a Hugging Face model (``streaming``), its recall of evicted blocks (``recall``) and
one-block-at-a-time key rotation (``key_cache``). No vLLM."""

from vllm_sink.reference.recall import RecallReference, RecallStream
from vllm_sink.reference.streaming import ReferenceStream, StreamingReference

__all__ = ["RecallReference", "RecallStream", "ReferenceStream", "StreamingReference"]
