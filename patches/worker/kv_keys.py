"""Worker: read and rewrite cached *keys* in vLLM's paged KV tensors, any layout.

Attention backends store K (post-RoPE) in layouts of their own (the CPU ``vec`` ISA
keeps each block's keys transposed, ``[head_dim, block_size]`` per head). Rather than
hard-coding layouts, ``probe_key_layout`` asks the backend itself: it writes keys whose
values encode their (token, head, dim) index through the layer's own
``impl.do_kv_cache_update`` into a scratch 2-block tensor and reads back where each
landed. The result is an index table: flat offset inside one block's slab for every
(token, head, dim). Anything that is not an exact bijection is refused (fail closed).

Encoding: index i of the key element is written as its base-16 digits, one pass per
digit, each digit stored as (digit + 1) in 1..16: exact in fp32/fp16/bf16, and 0 marks
"never written" (the value half of the block, which we write as zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_sink.rotary import rotate, rotation_for_delta


class KVLayoutError(RuntimeError):
    pass


def probe_key_layout(layer, kv_cache: torch.Tensor, block_size: int, num_kv_heads: int,
                     head_size: int, head_size_v: int | None = None) -> torch.Tensor:
    """Flat in-block offsets of keys, ``[block_size * num_kv_heads * head_size]`` long,
    in (token, head, dim) order. Blocks must be contiguous slabs of the tensor."""
    nb = kv_cache.shape[0]
    slab = kv_cache[0].numel()
    if not (kv_cache.is_contiguous() and kv_cache.numel() == nb * slab):
        raise KVLayoutError(f"KV cache tensor {tuple(kv_cache.shape)} is not block-major "
                            "contiguous; sink mode cannot address its blocks")
    n = block_size * num_kv_heads * head_size
    digits = max(1, math.ceil(math.log(n, 16)))
    scratch = torch.zeros((2, *kv_cache.shape[1:]), dtype=kv_cache.dtype)
    slots = torch.arange(block_size, 2 * block_size, dtype=torch.long)  # block 1
    index = torch.arange(n, dtype=torch.long)
    value = torch.zeros((block_size, num_kv_heads, head_size_v or head_size),
                        dtype=kv_cache.dtype)
    decoded = torch.zeros(slab, dtype=torch.long)
    written = None
    for d in range(digits):
        key = (((index >> (4 * d)) & 15) + 1).to(kv_cache.dtype)
        key = key.view(block_size, num_kv_heads, head_size)
        scratch.zero_()
        layer.impl.do_kv_cache_update(layer, key, value, scratch, slots)
        if scratch[0].count_nonzero():
            raise KVLayoutError("probe write leaked outside its block")
        got = scratch[1].reshape(-1).to(torch.float32)
        if written is None:
            written = got > 0
        elif not torch.equal(written, got > 0):
            raise KVLayoutError("probe writes landed in different places per pass")
        decoded += ((got.round().to(torch.long) - 1).clamp(min=0)) << (4 * d)
    assert written is not None
    where = torch.nonzero(written).flatten()
    if where.numel() != n:
        raise KVLayoutError(f"probe found {where.numel()} key slots, expected {n}")
    offsets = torch.full((n,), -1, dtype=torch.long)
    offsets[decoded[where]] = where
    if (offsets < 0).any():
        raise KVLayoutError("probe could not map every key element to one slot")
    return offsets


@dataclass
class LayerKeys:
    """One attention layer: its KV tensor, key offsets and rotary parameters."""

    kv_cache: torch.Tensor          # backend tensor, block-major
    offsets: torch.Tensor           # [bs * H * D] flat offsets within a block slab
    block_size: int
    num_kv_heads: int
    head_size: int
    cos_sin_f32: torch.Tensor       # [positions, rotary_dim] float32 rotary table
    is_neox: bool

    def read(self, blocks: torch.Tensor) -> torch.Tensor:
        """Keys of ``blocks`` as ``[nb, block_size, H, D]`` (KV dtype)."""
        flat = self.kv_cache.view(self.kv_cache.shape[0], -1)
        return flat[blocks][:, self.offsets].view(
            len(blocks), self.block_size, self.num_kv_heads, self.head_size)

    def write(self, blocks: torch.Tensor, keys: torch.Tensor) -> None:
        flat = self.kv_cache.view(self.kv_cache.shape[0], -1)
        flat[blocks[:, None], self.offsets[None, :]] = keys.reshape(len(blocks), -1).to(
            self.kv_cache.dtype)

    def rotate_blocks(self, blocks: torch.Tensor, delta: int,
                      source: torch.Tensor | None = None) -> None:
        """Rewrite keys of ``blocks`` as ``source`` (default: themselves) moved by delta."""
        keys = self.read(blocks) if source is None else source
        if delta:
            cos, sin = rotation_for_delta(self.cos_sin_f32, delta)
            keys = rotate(keys, cos, sin, self.is_neox)
        self.write(blocks, keys)
