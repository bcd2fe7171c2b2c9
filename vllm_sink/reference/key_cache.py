"""Reference for ``KeyCache.rotate``: one layer, one block at a time, through raw storage
offsets (``base + block * block_stride + rel``), no views, no batching. Tests hold the
batched op to it on random layouts, on the CPU and on a GPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_sink.core.rotary import rotate, rotation_for_delta


def _flat(kv: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    span = (kv.shape[0] - 1) * kv.stride(0) + int(rel.max()) + 1
    return kv.as_strided((span,), (1,), kv.storage_offset())


def read_block(kv: torch.Tensor, rel: torch.Tensor, block: int, N: int, H: int, D: int):
    idx = block * kv.stride(0) + rel.to(kv.device)
    return _flat(kv, rel)[idx].view(N, H, D)


def rotate_reference(
    layers: Sequence[torch.Tensor],
    rel: torch.Tensor,
    N: int,
    H: int,
    D: int,
    cos_sin_f32: torch.Tensor,
    is_neox: bool,
    blocks: Sequence[int],
    deltas: Sequence[int],
    source: torch.Tensor | None = None,
) -> None:
    """Same contract as ``KeyCache.rotate`` (``source``: ``[L, n, N, H, D]``)."""
    rel = rel.to(torch.long)
    for layer, kv in enumerate(layers):
        flat = _flat(kv, rel)
        for i, (block, delta) in enumerate(zip(blocks, deltas)):
            keys = read_block(kv, rel, block, N, H, D) if source is None else source[layer, i]
            if delta:
                cos, sin = rotation_for_delta(cos_sin_f32, delta)
                keys = rotate(keys, cos.to(kv.device), sin.to(kv.device), is_neox)
            flat[block * kv.stride(0) + rel.to(kv.device)] = keys.reshape(-1).to(kv.dtype)
