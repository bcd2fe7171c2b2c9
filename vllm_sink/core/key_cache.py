"""Cached keys of a stack of attention layers: read, write and rotate them by KV block,
all layers and all blocks of a step in one batch. Torch only; CPU or any device.

Every attention backend keeps a layer's paged KV cache as a strided view of memory with
KV blocks on dim 0. The key of token n, head h, dim d of block b in layer l sits at
storage element::

    base[l] + b * block_stride + rel[n, h, d]

``base[l]`` is the layer view's storage offset, ``block_stride`` its dim-0 stride, and
``rel`` the in-block offset table the worker probes through the backend's own cache
writer (patches/worker/kv_keys.py), so no layout is assumed. Two ways to address keys,
picked once at construction:

* strided: ``rel`` is affine (``rel = c0 + n*sn + h*sh + d*sd``; true of the CPU
  ``vec`` layout, NHD and HND alike). When the layers also share one storage at a
  constant distance (vLLM 0.32 allocates every layer of the cache in one buffer), one
  5-D view ``[L, blocks, N, H, D]`` spans the whole stack, and reading or writing any
  set of blocks in every layer is a single gather / scatter. Layers spread over several
  storages get one 4-D view each.
* tabled: any other layout, through ``rel`` as an index table, one layer at a time.

``KeyCache.rotate`` moves keys to new positions (RoPE rotations by per-block deltas,
``vllm_sink.core.rotary``) for a whole batch of blocks and layers at once, in float32,
optionally from a ``source`` (the pristine sink snapshot) instead of the cache itself.
``vllm_sink.reference.key_cache.rotate_reference`` is the one-layer, one-block-at-a-time reference.

``fused=True`` (stacked mode only) rotates each batch with one Triton kernel instead
(``vllm_sink.core.key_rotate_fused``): no scratch copy, one read and one write of each key;
``fused="interpret"`` runs that kernel in Triton's interpreter, on CPU tensors (tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vllm_sink.core.rotary import Rotations, rotate_full

# Key elements one rotation batch may touch: larger batches (rebases of long windows,
# many streams' sinks at once) go in chunks of blocks below this, so the float32
# temporaries stay bounded: 2**25 elements, 128 MiB per float32 copy.
MAX_SCRATCH_ELEMENTS = 1 << 25
# Device scratch one chunk of a save or restore of whole KV blocks may use.
MAX_COPY_BYTES = 64 << 20


def scratch_bytes(dtype_size: int) -> int:
    """Device memory one rotation chunk may take at its peak: the keys read or the
    sources joined (dtype), their float32 copy, the product, the partner gather (each
    float32) and the result cast back (dtype)."""
    return MAX_SCRATCH_ELEMENTS * (2 * dtype_size + 3 * 4)


def fit_strides(rel: torch.Tensor, N: int, H: int, D: int) -> tuple[int, int, int, int] | None:
    """(c0, sn, sh, sd) with ``rel[n, h, d] = c0 + n*sn + h*sh + d*sd``, or None."""
    o = rel.reshape(N, H, D).to(torch.long).cpu()
    c0 = int(o[0, 0, 0])
    sn = int(o[1, 0, 0]) - c0 if N > 1 else 0
    sh = int(o[0, 1, 0]) - c0 if H > 1 else 0
    sd = int(o[0, 0, 1]) - c0 if D > 1 else 0
    if min(c0, sn, sh, sd) < 0:
        return None
    expect = (
        c0
        + torch.arange(N)[:, None, None] * sn
        + torch.arange(H)[None, :, None] * sh
        + torch.arange(D)[None, None, :] * sd
    )
    return (c0, sn, sh, sd) if torch.equal(expect, o) else None


def _same_storage(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(
        t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.dtype == first.dtype
        and t.stride() == first.stride()
        and t.shape == first.shape
        for t in tensors
    )


class KeyCache:
    """The keys of ``layers`` (KV tensors, blocks on dim 0), ``N`` tokens per block."""

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        rel: torch.Tensor,
        N: int,
        H: int,
        D: int,
        cos_sin_f32: torch.Tensor,
        is_neox: bool,
        fused: bool | str = False,
    ) -> None:
        # Layers sharing one cache (KV sharing) are rotated once: keep distinct views.
        self.layers = distinct(layers)
        self.N, self.H, self.D = N, H, D
        self.device = self.layers[0].device
        self.dtype = self.layers[0].dtype
        self.rotations = Rotations(cos_sin_f32, D, is_neox)
        self._perm = self.rotations.perm.to(self.device)
        self.is_neox = is_neox
        self.rel = rel.to(torch.long).cpu()
        self.num_blocks = self.layers[0].shape[0]
        strides = fit_strides(self.rel, N, H, D)
        self.stack: torch.Tensor | None = None  # [L, blocks, N, H, D]
        self.views: list[torch.Tensor] = []  # per layer [blocks, N, H, D]
        self.tables: list[torch.Tensor] = []  # per layer flat storage view
        if strides is not None:
            c0, sn, sh, sd = strides
            self.views = [
                kv.as_strided(
                    (kv.shape[0], N, H, D), (kv.stride(0), sn, sh, sd), kv.storage_offset() + c0
                )
                for kv in self.layers
            ]
            self.stack = stacked_view(self.views)
        else:
            span = max(
                (kv.shape[0] - 1) * kv.stride(0) + int(self.rel.max()) + 1 for kv in self.layers
            )
            self.tables = [kv.as_strided((span,), (1,), kv.storage_offset()) for kv in self.layers]
            self._rel_dev = self.rel.to(self.device)
        if fused not in (False, True, "interpret"):
            raise ValueError(f"fused must be False, True or 'interpret', not {fused!r}")
        if fused and self.stack is None:
            raise ValueError(
                f"the fused key op needs the layers in one stacked view; this cache is {self.mode}"
            )
        self.fused = fused

    @property
    def mode(self) -> str:
        return "stacked" if self.stack is not None else ("strided" if self.views else "tabled")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- addressing --------------------------------------------------------------------
    def read(self, blocks: torch.Tensor) -> torch.Tensor:
        """Keys of ``blocks`` (long tensor on the cache's device) as ``[L, n, N, H, D]``."""
        if self.stack is not None:
            return self.stack[:, blocks]
        if self.views:
            return torch.stack([v[blocks] for v in self.views])
        idx = self._index(blocks)
        return torch.stack([t[idx] for t in self.tables]).view(
            len(self.tables), len(blocks), self.N, self.H, self.D
        )

    def write(self, blocks: torch.Tensor, keys: torch.Tensor) -> None:
        """Store ``keys [L, n, N, H, D]`` into ``blocks``."""
        if keys.dtype != self.dtype:  # (each torch call costs host time: skip a no-op)
            keys = keys.to(self.dtype)
        if self.stack is not None:
            self.stack[:, blocks] = keys
        elif self.views:
            for v, k in zip(self.views, keys):
                v[blocks] = k
        else:
            idx = self._index(blocks)
            for t, k in zip(self.tables, keys):
                t[idx] = k.reshape(idx.shape)

    def _index(self, blocks: torch.Tensor) -> torch.Tensor:
        stride = self.layers[0].stride(0)
        return blocks[:, None] * stride + self._rel_dev[None, :]

    # -- rotation ------------------------------------------------------------------------
    @property
    def block_elements(self) -> int:
        """Key elements of one block in every layer."""
        return self.num_layers * self.N * self.H * self.D

    @property
    def blocks_per_chunk(self) -> int:
        """Blocks one rotation batch takes at most (``MAX_SCRATCH_ELEMENTS``)."""
        return max(1, MAX_SCRATCH_ELEMENTS // self.block_elements)

    def rotate(
        self, blocks: Sequence[int], deltas: Sequence[int], source: torch.Tensor | None = None
    ) -> None:
        """Rewrite each block ``blocks[i]`` as its keys (or ``source[:, i]``) moved by
        ``deltas[i]`` positions, in every layer. A delta of 0 copies ``source`` as is.
        Done in chunks of ``blocks_per_chunk`` so the float32 scratch stays bounded."""
        n, chunk = len(blocks), self.blocks_per_chunk
        for i in range(0, n, chunk):
            part = None if source is None else source[:, i : i + chunk]
            self._rotate(blocks[i : i + chunk], deltas[i : i + chunk], part)

    def _rotate(self, blocks, deltas, source) -> None:
        # One host-to-device copy carries the block ids and, when any delta is not 0,
        # the rotation multipliers (``Rotations``): [n] int64 then [n, 2, D] float32.
        n = len(blocks)
        ids = np.asarray(blocks, dtype=np.int64)
        rotating = bool(self.fused) or any(deltas)
        parts = [ids.view(np.uint8)]
        if rotating:
            parts.append(self.rotations.multipliers(deltas).reshape(-1).view(np.uint8))
        packed = to_device(torch.from_numpy(np.concatenate(parts)), self.device)
        idx = packed[: 8 * n].view(torch.int64)
        if self.fused:
            from vllm_sink.core.key_rotate_fused import rotate_blocks

            mult = packed[8 * n :].view(torch.float32).view(n, 2, self.D)
            if source is not None and source.dtype != self.dtype:
                source = source.to(self.dtype)
            rotate_blocks(self.stack, idx, mult, self._perm, source, self.fused == "interpret")
            return
        keys = self.read(idx) if source is None else source
        if rotating:
            c, s = packed[8 * n :].view(torch.float32).view(n, 2, 1, 1, self.D).unbind(1)
            keys = rotate_full(keys, c, s, self._perm)  # [L, n, N, H, D]
        self.write(idx, keys)


def distinct(layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The layers' KV tensors, each physical cache once (layers may share one)."""
    seen: dict[tuple[int, int], torch.Tensor] = {}
    for kv in layers:
        seen.setdefault((kv.untyped_storage().data_ptr(), kv.storage_offset()), kv)
    return list(seen.values())


def stacked_view(views: list[torch.Tensor]) -> torch.Tensor | None:
    """One ``[L, ...]`` view over every layer's view, if they lie in one storage at a
    constant distance from each other (then one gather or scatter reaches all layers)."""
    if not _same_storage(views):
        return None
    offsets = [v.storage_offset() for v in views]
    step = offsets[1] - offsets[0] if len(offsets) > 1 else 0
    if (
        any(b - a != step for a, b in zip(offsets, offsets[1:]))
        or step < 0
        or (len(views) > 1 and step == 0)
    ):
        return None
    return views[0].as_strided(
        (len(views), *views[0].shape), (step, *views[0].stride()), offsets[0]
    )


class BlockStack:
    """Whole KV blocks (keys and values, any layout) of a stack of layers: read every
    layer's copy of some blocks at once, and write them back into other blocks. Used to
    save a preempted stream's cache to host memory and restore it after the blocks were
    reused (``save`` / ``restore``)."""

    def __init__(self, layers: Sequence[torch.Tensor]) -> None:
        self.layers = distinct(layers)
        self.device = self.layers[0].device
        self.stack = stacked_view(self.layers)
        first = self.layers[0]
        self.block_bytes = len(self.layers) * first[0].numel() * first.element_size()
        # Blocks per chunk of a save or restore: its device scratch within MAX_COPY_BYTES.
        self.chunk_blocks = max(1, MAX_COPY_BYTES // max(1, self.block_bytes))

    def save(self, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Host copies of ``blocks`` (every layer) as chunks ``[L, c, ...]`` of at most
        ``chunk_blocks`` blocks each, so the device scratch of a gather stays bounded.

        On CUDA each chunk is pinned and copied without blocking: the copies are queued
        on the current stream, ahead of any later kernel on it (this step's forward)
        that overwrites the blocks. A chunk is complete once the stream passed it; read
        it only through that stream (``restore``). Dropping a chunk early is safe: the
        pinned allocator reuses memory only after the copies recorded on it completed.
        """
        pin = self.device.type == "cuda"
        out = []
        for i in range(0, len(blocks), self.chunk_blocks):
            part = self.read(to_device(blocks[i : i + self.chunk_blocks], self.device))
            if self.device.type == "cpu":
                out.append(part)  # the gather already made a copy in host memory
                continue
            host = torch.empty(part.shape, dtype=part.dtype, pin_memory=pin)
            host.copy_(part, non_blocking=pin)
            out.append(host)
        return out

    def restore(self, blocks: Sequence[int], saved: Sequence[torch.Tensor]) -> None:
        """Write ``save``'s chunks into ``blocks`` (as many as were saved), chunk by
        chunk, queued on the current stream like ``save``."""
        i = 0
        for chunk in saved:
            n = chunk.shape[1]
            self.write(
                to_device(blocks[i : i + n], self.device), chunk.to(self.device, non_blocking=True)
            )
            i += n
        if i != len(blocks):
            raise ValueError(f"restore into {len(blocks)} blocks of {i} saved")

    def read(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.stack is not None:
            return self.stack[:, blocks]
        return torch.stack([kv[blocks] for kv in self.layers])

    def write(self, blocks: torch.Tensor, data: torch.Tensor) -> None:
        if self.stack is not None:
            self.stack[:, blocks] = data
        else:
            for kv, d in zip(self.layers, data):
                kv[blocks] = d


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t``'s copy in host memory, queued on the current device stream like
    ``BlockStack.save`` (pinned and not blocking on CUDA): read it only through that
    stream (``to_device``). A CPU tensor is returned as it is."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
    host.copy_(t, non_blocking=True)
    return host


def to_device(data, device: torch.device) -> torch.Tensor:
    """A CPU list / array / tensor on ``device`` without stalling the device stream:
    host-to-device copies go through pinned memory (a pageable copy may synchronize)."""
    t = data if isinstance(data, torch.Tensor) else torch.as_tensor(data, dtype=torch.long)
    if device.type == "cpu" or t.device == device:
        return t
    return t.pin_memory().to(device, non_blocking=True)
