"""Worker: the sink keys' fix-ups of one step, batched over layers and requests.

Built once from the KV cache vLLM allocated: one ``vllm_sink.core.key_cache.KeyCache`` per
(KV-cache group, rotary table) holds the keys of those layers, its in-block layout
probed through the backend (``kv_keys``). A step's edits arrive as lists over the
requests that need them and each becomes one batched op per cache (usually one cache
per model): a few device launches a step, never a loop over layers or requests.

Block ids: the scheduler's (manager) block ``b`` of ``B`` tokens may be split by the
attention backend into ``r`` kernel blocks ``b*r .. b*r+r-1`` of ``B/r`` tokens each
(vLLM's kernel block splitting); every op here works on kernel blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_sink.core import backends, key_rotate_fused
from vllm_sink.core.key_cache import BlockStack, KeyCache, to_device
from vllm_sink.patches._patching import release
from vllm_sink.patches.worker.kv_keys import probe_key_layout


@dataclass(frozen=True)
class BlockSpan:
    """Manager blocks ``rows[g][first:last]`` of every KV-cache group ``g``."""

    rows: tuple[Sequence[int], ...]  # one block-table row (virtual order) per group
    first: int
    last: int


class SinkKeys:
    def __init__(
        self, caches: list[tuple[int, KeyCache]], factors: list[int], stacks: list[BlockStack]
    ) -> None:
        self.caches = caches  # (KV-cache group index, keys of its layers)
        self.factors = factors  # kernel blocks per manager block, per group
        self.stacks = stacks  # whole KV blocks of every layer, per group

    @classmethod
    def build(cls, kv_cache_config, forward_context: dict, rotaries: dict) -> SinkKeys:
        from vllm_sink.core.config import SinkConfigError

        caches, factors, stacks = [], [], []
        try:
            fused = key_rotate_fused.requested()
        except ValueError as e:
            raise SinkConfigError(str(e)) from None
        why = key_rotate_fused.available() if fused else None
        if why is not None:
            raise SinkConfigError(
                f"{key_rotate_fused.KEY_OP_ENV}=fused needs Triton on a CUDA device: {why}. "
                "Unset it to rotate keys with torch ops."
            )
        for g, group in enumerate(kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            first = forward_context[group.layer_names[0]]
            r = first.kv_cache.shape[0] // kv_cache_config.num_blocks
            if r < 1 or r * kv_cache_config.num_blocks != first.kv_cache.shape[0]:
                raise SinkConfigError(
                    f"KV cache of {group.layer_names[0]} has "
                    f"{first.kv_cache.shape[0]} blocks for "
                    f"{kv_cache_config.num_blocks} scheduler blocks"
                )
            factors.append(r)
            kernel_block = spec.block_size // r
            installed = release()  # backends are verified per vLLM release
            by_table: dict[tuple[int, bool], tuple[torch.Tensor, list[str]]] = {}
            for name in group.layer_names:
                backend = forward_context[name].attn_backend.get_name()
                why = backends.refusal(backend, None, installed)
                if why is not None:
                    raise SinkConfigError(
                        f"Layer {name} runs on the {backend} attention backend (vLLM's "
                        f"choice or --attention-backend): {why} Choose the backend with "
                        "--attention-backend."
                    )
                table, neox = rotaries[name]
                by_table.setdefault((id(table), neox), (table, []))[1].append(name)
            rel = probe_key_layout(
                first,
                first.kv_cache,
                kernel_block,
                spec.num_kv_heads,
                spec.head_size,
                spec.head_size_v,
            )
            stacks.append(BlockStack([forward_context[n].kv_cache for n in group.layer_names]))
            for (_, neox), (table, names) in by_table.items():
                layers = [forward_context[n].kv_cache for n in names]
                try:
                    cache = KeyCache(
                        layers,
                        rel,
                        kernel_block,
                        spec.num_kv_heads,
                        spec.head_size,
                        table,
                        neox,
                        fused=fused,
                    )
                except ValueError as e:
                    raise SinkConfigError(
                        f"{key_rotate_fused.KEY_OP_ENV}=fused: {e} (backend {backend}). "
                        "Unset it to rotate keys with torch ops."
                    ) from None
                caches.append((g, cache))
        return cls(caches, factors, stacks)

    def describe(self) -> str:
        return ", ".join(
            f"{c.num_layers} layers {c.mode}{' (fused key op)' if c.fused else ''}"
            for _, c in self.caches
        )

    def _kernel_blocks(self, g: int, spans: Sequence[BlockSpan]) -> tuple[list[int], list[int]]:
        """Kernel block ids of ``spans`` in group g, and how many belong to each span."""
        r, ids, counts = self.factors[g], [], []
        for s in spans:
            blocks = s.rows[g][s.first : s.last]
            ids.extend(b * r + j for b in blocks for j in range(r))
            counts.append(len(blocks) * r)
        return ids, counts

    def _groups(self, g: int, cache: KeyCache, spans: Sequence[BlockSpan]):
        """Consecutive runs of ``spans`` (index lists) of at most one rotation chunk of
        kernel blocks each (a larger span forms a run alone): batches whose device
        temporaries stay within ``key_cache.scratch_bytes``."""
        limit, run, size = cache.blocks_per_chunk, [], 0
        r = self.factors[g]
        for i, s in enumerate(spans):
            n = (s.last - s.first) * r
            if run and size + n > limit:
                yield run
                run, size = [], 0
            run.append(i)
            size += n
        if run:
            yield run

    def snapshot(self, spans: Sequence[BlockSpan]) -> list[list[torch.Tensor]]:
        """A copy of the keys of each span (per cache ``[L, n, N, H, D]``), one read per
        batch of spans.

        Each span's copy is its own contiguous tensor: a slice of the batch read would
        keep the whole batch alive as long as any of its streams lives, and ``move``
        concatenates the snapshots of a step, which on CUDA is one kernel only when
        every input is contiguous (else one copy per input)."""
        out: list[list[torch.Tensor]] = [[] for _ in spans]
        for g, cache in self.caches:
            for run in self._groups(g, cache, spans):
                ids, counts = self._kernel_blocks(g, [spans[i] for i in run])
                keys = cache.read(to_device(ids, cache.device))
                parts = torch.split(keys, counts, dim=1)
                for i, part in zip(run, parts):
                    out[i].append(
                        part
                        if len(parts) == 1
                        else part.clone(memory_format=torch.contiguous_format)
                    )
        return out

    def move(
        self,
        spans: Sequence[BlockSpan],
        deltas: Sequence[int],
        sources: Sequence[list[torch.Tensor]] | None = None,
    ) -> None:
        """Rotate the keys of each span by its delta, in place, or rewrite them as the
        span's ``sources`` (snapshots, as ``snapshot`` returned them) moved by it.
        Snapshots are joined one rotation chunk at a time (``_groups``)."""
        for c, (g, cache) in enumerate(self.caches):
            runs = [list(range(len(spans)))] if sources is None else self._groups(g, cache, spans)
            for run in runs:
                ids, counts = self._kernel_blocks(g, [spans[i] for i in run])
                per_block = [deltas[i] for i, n in zip(run, counts) for _ in range(n)]
                source = None
                if sources is not None:  # one span (most steps at batch 1): no copy
                    parts = [sources[i][c] for i in run]
                    source = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
                cache.rotate(ids, per_block, source)

    def save(self, spans: Sequence[BlockSpan]) -> list[list[torch.Tensor]]:
        """Host copies of the whole KV blocks of ``spans`` (every layer), per group, in
        chunks (``BlockStack.save``: pinned and not blocking on CUDA)."""
        return [stack.save(self._kernel_blocks(g, spans)[0]) for g, stack in enumerate(self.stacks)]

    def restore(self, spans: Sequence[BlockSpan], saved: list[list[torch.Tensor]]) -> None:
        """Write ``save``'s copies into the blocks of ``spans`` (same block count)."""
        for g, (stack, chunks) in enumerate(zip(self.stacks, saved)):
            stack.restore(self._kernel_blocks(g, spans)[0], chunks)

    @staticmethod
    def saved_bytes(saved: list[list[torch.Tensor]]) -> int:
        return sum(c.numel() * c.element_size() for chunks in saved for c in chunks)
