"""Rotating cached keys to new positions: the RoPE arithmetic, in float32. Torch only.

vLLM caches keys *after* RoPE: ``k_p = R(p) k`` where R(p) rotates each pair of
rotary dimensions i by the angle ``p * f_i``. Rotations of the same pair commute, so
moving a cached key from position p to p + delta needs no knowledge of p::

    R(p + delta) k = R(delta) R(p) k = R(delta) k_p

``R(delta)`` comes from the model's own cos/sin table, computed in float32 (never the
bf16 copy the model keeps): row |delta| of the table, with sin negated when delta < 0.
Tables that bake a magnitude into cos/sin (YaRN's mscale) are normalised by row 0,
where cos = mscale and sin = 0, so the rotation stays a pure rotation.

Pairing (``is_neox``): neox pairs dim i with i + R/2 (Llama, Qwen, Mistral ...);
gptj pairs 2i with 2i + 1. Only the first ``rotary_dim`` dims rotate (partial rotary).
"""

from __future__ import annotations

import numpy as np
import torch


def rotation_for_delta(cos_sin_f32: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of ``delta * f_i``, each ``[rotary_dim // 2]`` float32.

    ``cos_sin_f32``: ``[max_positions, rotary_dim]`` = cat(cos, sin) per position, as
    vLLM's ``RotaryEmbedding._compute_cos_sin_cache()`` returns it.
    """
    cos, sin = rotations_for_deltas(cos_sin_f32, [delta])
    return cos[0], sin[0]


def rotations_for_deltas(cos_sin_f32: torch.Tensor, deltas) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotation_for_delta`` for many deltas at once: (cos, sin), each ``[n, rotary_dim // 2]``."""
    d = torch.as_tensor(deltas, dtype=torch.long, device=cos_sin_f32.device).reshape(-1)
    rows = d.abs()
    if d.numel() and int(rows.max()) >= cos_sin_f32.shape[0]:
        bad = int(d[rows.argmax()])
        raise ValueError(
            f"rotation by {bad} needs table row {abs(bad)}, table has {cos_sin_f32.shape[0]} rows"
        )
    half = cos_sin_f32.shape[-1] // 2
    scale = cos_sin_f32[0, :half].to(torch.float32)  # mscale (1 for plain RoPE)
    cos = cos_sin_f32[rows, :half].to(torch.float32) / scale
    sin = cos_sin_f32[rows, half:].to(torch.float32) / scale
    return cos, torch.where((d < 0)[:, None], -sin, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate the first ``2 * len(cos)`` dims of ``x [..., D]``; float32 math, x's dtype out."""
    rot = 2 * cos.shape[-1]
    xf = x.to(torch.float32)
    out = xf.clone()
    if is_neox:
        x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 : rot]
        out[..., : rot // 2] = x1 * cos - x2 * sin
        out[..., rot // 2 : rot] = x2 * cos + x1 * sin
    else:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
        out[..., 0:rot:2] = x1 * cos - x2 * sin
        out[..., 1:rot:2] = x2 * cos + x1 * sin
    return out.to(x.dtype)


class Rotations:
    """Many rotations at once, as full-width multipliers for a whole batch of keys.

    ``rotate`` above spells the pair arithmetic out; on a device that is a dozen small
    launches per batch. Here the same float32 products are one gather and four
    elementwise ops over the head dim D: with ``x[..., perm]`` the pair partner of each
    dim (a swap within each rotary pair, the identity past ``rotary_dim``)::

        out = x * c + x[..., perm] * s
        c = cos(delta f) on both dims of a pair, 1 past rotary_dim
        s = -sin(delta f) on the pair's first dim, +sin on its second, 0 past rotary_dim

    which is ``x1 cos - x2 sin`` and ``x2 cos + x1 sin`` term for term (a - b is
    a + (-b) exactly in IEEE arithmetic), so it matches ``rotate`` to the bit except
    that a -0.0 in an untouched dim may come back as +0.0.

    ``multipliers`` builds c and s for a list of deltas on the host, with numpy, from
    the rows it needs (``rotations_for_deltas``' arithmetic): one array to ship.
    """

    def __init__(self, cos_sin_f32: torch.Tensor, head_size: int, is_neox: bool) -> None:
        table = cos_sin_f32.to(torch.float32).cpu()
        self.half = table.shape[-1] // 2
        rot = 2 * self.half
        if rot > head_size:
            raise ValueError(f"rotary dim {rot} exceeds head size {head_size}")
        self.table = table.numpy()  # shares the tensor's memory
        self.scale = self.table[0, : self.half].copy()  # mscale (1 for plain RoPE)
        self.D, self.is_neox = head_size, is_neox
        if is_neox:  # pairs (i, i + R/2)
            first = np.arange(self.half)
            second = first + self.half
        else:  # pairs (2i, 2i + 1)
            first = np.arange(0, rot, 2)
            second = first + 1
        self.first, self.second = first, second
        perm = np.arange(head_size)
        perm[first], perm[second] = second, first
        self.perm = torch.from_numpy(perm)

    def multipliers(self, deltas) -> np.ndarray:
        """``[n, 2, D]`` float32: c then s (see the class) for each delta."""
        d = np.asarray(deltas, dtype=np.int64).reshape(-1)
        rows = np.abs(d)
        if d.size and int(rows.max()) >= self.table.shape[0]:
            bad = int(d[rows.argmax()])
            raise ValueError(
                f"rotation by {bad} needs table row {abs(bad)}, table has "
                f"{self.table.shape[0]} rows"
            )
        picked = self.table[rows]  # [n, R]: cos | sin
        cos = picked[:, : self.half] / self.scale
        sin = picked[:, self.half :] / self.scale
        sin = np.where((d < 0)[:, None], -sin, sin)
        out = np.zeros((d.size, 2, self.D), dtype=np.float32)
        out[:, 0, :] = 1.0
        out[:, 0, self.first] = cos
        out[:, 0, self.second] = cos
        out[:, 1, self.first] = -sin
        out[:, 1, self.second] = sin
        return out


def rotate_full(
    x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, perm: torch.Tensor
) -> torch.Tensor:
    """``Rotations``' formula: x ``[..., D]`` (any dtype), c and s broadcastable to it,
    perm ``[D]`` long on x's device; float32 math, x's dtype out."""
    xf = x.to(torch.float32)
    out = xf * c
    out += xf.index_select(-1, perm) * s
    return out.to(x.dtype)


def rope_table(inv_freq: torch.Tensor, positions: int, mscale: float = 1.0) -> torch.Tensor:
    """A float32 ``[positions, 2 * len(inv_freq)]`` cos/sin table, vLLM's layout."""
    t = torch.arange(positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.to(torch.float32))
    return torch.cat((freqs.cos() * mscale, freqs.sin() * mscale), dim=-1)
