"""Worker: which RoPE module rotates the keys of each attention layer, and its table.

Each attention layer's keys are rotated by a rotary module that lives next to it (its
parent module's ``rotary_emb`` in every vLLM decoder). We accept only rotary classes
whose frequencies do not depend on sequence length and whose float32 cos/sin table we
can recompute exactly as the model does; anything else is refused at startup with the
reason, never silently mis-rotated.

Rotary range: a stream feeds positions up to R = ``SinkLayout.rotary_positions``, which
may exceed the model's own table (when the capacity is close to the context length, R
leaves room for a window of offsets so that keys are rarely rebased). Distances between
the tokens a stream attends to stay below its span <= the model's context, and RoPE
scores depend only on distances, so the module's table is then extended to R rows:
recomputed by its own ``_compute_cos_sin_cache`` over more positions (its prefix equal
to the original), before vLLM compiles or captures the model.
"""

from __future__ import annotations

import torch

from vllm_sink.core.config import SinkConfigError
from vllm_sink.patches._patching import Target

TARGETS = [
    Target(
        "vllm.model_executor.layers.rotary_embedding.base:RotaryEmbeddingBase"
        "._compute_cos_sin_cache",
        "(self)",
    )
]

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


def _table_with_rows(rope, rows: int) -> torch.Tensor:
    """The module's float32 cos/sin table over at least ``rows`` positions.

    Its own ``_compute_cos_sin_cache`` gives the first rows; later ones follow by angle
    addition from them (row p = row p - k composed with row k, in float64: rows hold
    ``m cos(p g), m sin(p g)`` with a per-dim rate g and the magnitude m of row 0, so
    composing two rows and dividing by m gives row p exactly up to rounding)."""
    table = rope._compute_cos_sin_cache().to(torch.float64)
    n0 = table.shape[0]
    if n0 >= rows:
        return table.to(torch.float32)
    half = table.shape[-1] // 2
    m = table[0, :half]
    out = torch.empty(rows, table.shape[-1], dtype=torch.float64)
    out[:n0] = table
    k = n0 - 1  # rows are extended k at a time
    for p in range(n0, rows, k):
        q = min(p + k, rows)
        a = out[p - k : q - k]
        cos_a, sin_a = a[:, :half], a[:, half:]
        cos_b, sin_b = out[k, :half], out[k, half:]
        out[p:q, :half] = (cos_a * cos_b - sin_a * sin_b) / m
        out[p:q, half:] = (sin_a * cos_b + cos_a * sin_b) / m
    return out.to(torch.float32)


def find_layer_rotaries(
    model, attention_layers: dict, rotary_positions: int
) -> dict[str, tuple[torch.Tensor, bool]]:
    """layer name -> (float32 cos/sin table ``[positions, rotary_dim]``, is_neox).

    Tables shorter than ``rotary_positions`` rows are extended, in the module too."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

    parents = _parents(model)
    tables: dict[int, torch.Tensor] = {}
    out = {}
    for name, attn in attention_layers.items():
        parent = parents.get(id(attn))
        found = (
            []
            if parent is None
            else [m for m in parent.children() if isinstance(m, RotaryEmbeddingBase)]
        )
        if len(found) != 1:
            raise SinkConfigError(
                f"Attention layer {name} has {len(found)} rotary embeddings next to it; "
                "sink mode needs exactly one RoPE module per layer (models without RoPE, "
                "e.g. absolute or ALiBi positions, are not supported)."
            )
        rope = found[0]
        kind = type(rope).__name__
        if kind not in SUPPORTED_ROTARY:
            raise SinkConfigError(
                f"Layer {name} uses {kind}; sink mode supports "
                f"{', '.join(SUPPORTED_ROTARY)} (RoPE whose frequencies do not depend "
                "on sequence length)."
            )
        if len(getattr(rope, "scaling_factors", [1])) != 1:
            raise SinkConfigError(
                f"Layer {name}: linear RoPE scaling with several factors is not supported."
            )
        if id(rope) not in tables:
            table = _table_with_rows(rope, rotary_positions).cpu()
            if table.shape[-1] != rope.rotary_dim:
                raise SinkConfigError(
                    f"Layer {name}: rotary table {tuple(table.shape)} does not match "
                    f"rotary_dim {rope.rotary_dim}."
                )
            own = rope.cos_sin_cache
            rows = own.shape[0]
            if rows > table.shape[0] or not torch.allclose(
                own.to(torch.float32).cpu(), table[:rows], atol=1e-2
            ):
                raise SinkConfigError(
                    f"Layer {name}: recomputed rotary table differs "
                    "from the model's own; refusing to re-rotate keys."
                )
            if rows < rotary_positions:  # positions up to R are fed: extend the module's
                rope.cos_sin_cache = table.to(own.dtype).to(own.device)
            tables[id(rope)] = table
        out[name] = (tables[id(rope)], bool(rope.is_neox_style))
    return out
