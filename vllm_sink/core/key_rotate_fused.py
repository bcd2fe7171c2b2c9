"""The batched key op as one Triton kernel: gather, rotate in float32, scatter, for every
block of a step in every layer of a stacked key cache, in one launch.

``KeyCache`` (``vllm_sink.core.key_cache``) rotates a batch of blocks with torch ops: a
gather of the keys into a scratch copy, the float32 products of ``rotate_full`` and a
scatter back, about eight launches and three passes over the keys per chunk. Here each
program loads one tile of key rows ``[rows, D]`` of one block in one layer, and its pair
partners (the same rows at ``perm[d]``), computes ``x * c + x[perm] * s`` in float32 and
stores the result in the key's dtype: one read and one write of every key, no scratch.

Addressing (the stacked view ``[L, blocks, N, H, D]`` of ``KeyCache.stack``): key
(l, b, n, h, d) sits at ``l*sl + b*sb + n*sn + h*sh + d*sd`` elements from the view's
start; a tile row ``r`` in ``0 .. N*H - 1`` is token ``r // H``, head ``r % H``. Offsets
are int64 (a layer stack passes 2**31 elements). A row's partner dims lie in the same
row, so a program reads only what it writes and the op may run in place.

Contract (the same as ``KeyCache.rotate``): ``ids`` distinct block ids; ``mult[i]`` is
``Rotations.multipliers``' ``[2, D]`` (c, s) of block i; with ``source`` ``[L, n, N, H,
D]``, block ``ids[i]`` is written from ``source[:, i]`` instead of its own keys. The
float32 products may be fused (FMA) on a GPU: results agree with ``rotate_full`` to
one unit in the last place of float32 before the cast, which the reference test
bounds (``tests/core/test_key_rotate_fused.py``).

``rotate_blocks(..., interpret=True)`` runs the same kernel in Triton's interpreter, on
CPU tensors: how the CPU test checks it against the pure-torch reference.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton.language as tl
except ImportError:  # available() says so; the kernel is never built
    tl = None

ROWS = 16  # key rows (token, head) per program


def _rotate_kernel(
    dst_ptr,
    src_ptr,
    ids_ptr,
    mult_ptr,
    perm_ptr,
    rows,
    H,
    D,
    d_sl,
    d_sb,
    d_sn,
    d_sh,
    d_sd,
    s_sl,
    s_sb,
    s_sn,
    s_sh,
    s_sd,
    HAS_SOURCE: tl.constexpr,
    ROWS_: tl.constexpr,
    DP: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    block = tl.load(ids_ptr + i).to(tl.int64)
    r = tile * ROWS_ + tl.arange(0, ROWS_)
    n = (r // H).to(tl.int64)
    h = (r % H).to(tl.int64)
    d = tl.arange(0, DP)
    dmask = d < D
    p = tl.load(perm_ptr + d, mask=dmask, other=0).to(tl.int64)
    mask = (r < rows)[:, None] & dmask[None, :]
    c = tl.load(mult_ptr + i * 2 * D + d, mask=dmask, other=0.0)
    s = tl.load(mult_ptr + i * 2 * D + D + d, mask=dmask, other=0.0)
    dst = dst_ptr + layer * d_sl + block * d_sb + n * d_sn + h * d_sh
    if HAS_SOURCE:
        src = src_ptr + layer * s_sl + i * s_sb + n * s_sn + h * s_sh
        x = tl.load(src[:, None] + d[None, :] * s_sd, mask=mask, other=0.0)
        xp = tl.load(src[:, None] + p[None, :] * s_sd, mask=mask, other=0.0)
    else:
        x = tl.load(dst[:, None] + d[None, :] * d_sd, mask=mask, other=0.0)
        xp = tl.load(dst[:, None] + p[None, :] * d_sd, mask=mask, other=0.0)
    out = x.to(tl.float32) * c[None, :] + xp.to(tl.float32) * s[None, :]
    tl.store(dst[:, None] + d[None, :] * d_sd, out.to(dst_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernel(interpret: bool):
    fn = _rotate_kernel
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    import triton

    return triton.jit(fn)


KEY_OP_ENV = "VLLM_SINK_KEY_OP"


def requested() -> bool:
    """Whether the workers rotate keys with the fused kernel: ``VLLM_SINK_KEY_OP=fused``
    (``torch``, the default: the torch ops of ``KeyCache``)."""
    v = os.environ.get(KEY_OP_ENV, "torch") or "torch"
    if v not in ("torch", "fused"):
        raise ValueError(f"{KEY_OP_ENV} must be 'torch' or 'fused', not {v!r}")
    return v == "fused"


def available() -> str | None:
    """None if the fused op can run on CUDA here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def rotate_blocks(
    stack: torch.Tensor,
    ids: torch.Tensor,
    mult: torch.Tensor,
    perm: torch.Tensor,
    source: torch.Tensor | None = None,
    interpret: bool = False,
) -> None:
    """Rewrite ``stack[:, ids[i]]`` (``[L, blocks, N, H, D]``, any strides) as its keys,
    or ``source[:, i]``, rotated by ``mult[i]`` (``[n, 2, D]`` float32), in place."""
    L, _, N, H, D = stack.shape
    n = ids.numel()
    if n == 0:
        return
    if mult.shape != (n, 2, D) or mult.dtype != torch.float32:
        raise ValueError(f"multipliers must be float32 [{n}, 2, {D}], got {tuple(mult.shape)}")
    if source is not None and tuple(source.shape) != (L, n, N, H, D):
        raise ValueError(f"source must be [{L}, {n}, {N}, {H}, {D}], got {tuple(source.shape)}")
    mult = mult.contiguous()
    src = source if source is not None else stack
    dp = 1 << (D - 1).bit_length()
    grid = (L, n, -(-(N * H) // ROWS))
    _kernel(interpret)[grid](
        stack,
        src,
        ids,
        mult,
        perm,
        N * H,
        H,
        D,
        *stack.stride(),
        *src.stride(),
        HAS_SOURCE=source is not None,
        ROWS_=ROWS,
        DP=dp,
    )
