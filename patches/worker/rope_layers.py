"""Worker: which RoPE module rotates the keys of each attention layer, and its table.

Each attention layer's keys are rotated by a rotary module that lives next to it (its
parent module's ``rotary_emb`` in every vLLM decoder). We accept only rotary classes
whose frequencies do not depend on sequence length and whose float32 cos/sin table we
can recompute exactly as the model does; anything else is refused at startup with the
reason, never silently mis-rotated.
"""

from __future__ import annotations

import torch

from vllm_sink.core.config import SinkConfigError

# class name -> why it is supported (frequencies fixed; table = _compute_cos_sin_cache)
SUPPORTED_ROTARY = {
    "RotaryEmbedding": "default RoPE",
    "LinearScalingRotaryEmbedding": "linear position interpolation (one factor)",
    "Llama3RotaryEmbedding": "Llama 3 frequency scaling",
    "YaRNScalingRotaryEmbedding": "YaRN (magnitude mscale normalised out)",
}


def _parents(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    parents = {}
    for module in model.modules():
        for child in module.children():
            parents[id(child)] = module
    return parents


def find_layer_rotaries(model, attention_layers: dict, position_limit: int
                        ) -> dict[str, tuple[torch.Tensor, bool]]:
    """layer name -> (float32 cos/sin table ``[positions, rotary_dim]``, is_neox)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    parents = _parents(model)
    tables: dict[int, torch.Tensor] = {}
    out = {}
    for name, attn in attention_layers.items():
        parent = parents.get(id(attn))
        found = [] if parent is None else [
            m for m in parent.children() if isinstance(m, RotaryEmbeddingBase)]
        if len(found) != 1:
            raise SinkConfigError(
                f"Attention layer {name} has {len(found)} rotary embeddings next to it; "
                "sink mode needs exactly one RoPE module per layer (models without RoPE, "
                "e.g. absolute or ALiBi positions, are not supported).")
        rope = found[0]
        kind = type(rope).__name__
        if kind not in SUPPORTED_ROTARY:
            raise SinkConfigError(
                f"Layer {name} uses {kind}; sink mode supports "
                f"{', '.join(SUPPORTED_ROTARY)} (RoPE whose frequencies do not depend "
                "on sequence length).")
        if len(getattr(rope, "scaling_factors", [1])) != 1:
            raise SinkConfigError(f"Layer {name}: linear RoPE scaling with several "
                                  "factors is not supported.")
        if id(rope) not in tables:
            table = rope._compute_cos_sin_cache().to(torch.float32).cpu()
            if table.shape[-1] != rope.rotary_dim or table.shape[0] < position_limit:
                raise SinkConfigError(
                    f"Layer {name}: rotary table {tuple(table.shape)} does not cover "
                    f"rotary_dim {rope.rotary_dim} x {position_limit} positions.")
            own = rope.cos_sin_cache.to(torch.float32).cpu()
            if own.shape != table.shape or not torch.allclose(own, table, atol=1e-2):
                raise SinkConfigError(f"Layer {name}: recomputed rotary table differs "
                                      "from the model's own; refusing to re-rotate keys.")
            tables[id(rope)] = table
        out[name] = (tables[id(rope)], bool(rope.is_neox_style))
    return out
