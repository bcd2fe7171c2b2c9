"""Pure-torch reference of recall: evicted window blocks go to a memory, and the k most
relevant come back into slots between the sinks and the window. No vLLM.

Semantics (the contract a serving implementation is held to), with B the block size:

* **Memory.** Every window block the StreamingLLM rule evicts (``policy``: whole
  blocks, oldest first) is kept, un-rotated, with a summary of its keys per layer and
  KV head; at most ``memory_blocks`` of them, the oldest dropped first.
* **Cache order and positions.** A step attends to the sinks, then the recalled blocks
  in stream order, then the window, at cache-relative positions: sinks 0 .. S-1,
  recalled S .. S+R-1 (R = B x the blocks recalled, at most ``recall_blocks`` x B), the
  window from S+R. Recalled blocks occupy extra capacity: the window is what it is
  without recall.
* **Selection.** Before a step of several tokens (a prompt chunk), before the first
  one-token step after one, and before every ``refresh``-th one-token step, the memory's blocks are
  scored against the queries of the previous step's last token, every layer and head,
  and the ``recall_blocks`` best are loaded (ties: the older block). One choice for
  all layers: in a paged cache the block table is shared by the layers of a KV group,
  so per-layer choices would need a table per layer.
* **Scores.** ``"mean"`` (InfLLM-style, the default): the logit of the block's mean key,
  rotated to the first recall slot's position, against the query at its own
  cache-relative position, per query head; the maximum over heads, summed over layers,
  each layer's logits scaled as its attention scales them. ``"max"`` (Quest-style): in
  place of the mean key's logit, the upper bound ``sum_d max(q_d kmin_d, q_d kmax_d)``
  of the block's largest logit, from the elementwise min and max of its rotated keys.
  On the pass-key benchmark the mean recalls the fact's block in every trial up to
  8 x C and the bound does markedly worse (docs/recall.md).

``selected`` after each step says which memory blocks (by their index in the stream's
evicted blocks, 0 = first evicted) the step attended to, for tests that hold a serving
implementation to the same choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_sink.reference.streaming import ReferenceStream, StreamingReference, _rotate_half

SCORES = ("mean", "max")


@dataclass
class MemoryBlock:
    index: int  # evicted blocks before this one in the stream
    ids: list[int]
    keys: list[torch.Tensor]  # per layer [B, Hkv, D], un-rotated
    values: list[torch.Tensor]
    kmin: torch.Tensor | None = None  # [layers, Hkv, D], keys rotated to the slot start
    kmax: torch.Tensor | None = None
    kmean: torch.Tensor | None = None


class RecallReference(StreamingReference):
    """A ``StreamingReference`` whose streams recall evicted blocks."""

    def __init__(
        self,
        model,
        *,
        recall_blocks: int = 8,
        refresh: int = 1,
        memory_blocks: int = 4096,
        score: str = "mean",
        **kw,
    ) -> None:
        super().__init__(model, **kw)
        if recall_blocks < 0 or refresh < 1 or memory_blocks < recall_blocks:
            raise ValueError(
                "need recall_blocks >= 0, refresh >= 1, memory_blocks >= recall_blocks"
            )
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}")
        self.recall_blocks, self.refresh = recall_blocks, refresh
        self.memory_blocks, self.score_kind = memory_blocks, score

    def stream(self) -> RecallStream:
        return RecallStream(self)


class RecallStream(ReferenceStream):
    def __init__(self, ref: RecallReference) -> None:
        super().__init__(ref)
        self.memory: list[MemoryBlock] = []
        self.evicted_blocks = 0
        self.selected: list[int] = []  # memory indices the last step attended to
        self._recalled: list[MemoryBlock] = []
        self._queries: list[torch.Tensor] | None = None  # last token, per layer [Hq, D]
        self._since_refresh = 0  # one-token steps since the last selection
        self._after_prompt = True  # the next step follows a prompt step (or starts)

    # -- memory ------------------------------------------------------------------------
    def _evict(self, t: int) -> None:
        S, B = self.layout.sink_tokens, self.layout.block_size
        for j in range(t // B):
            lo, hi = S + j * B, S + (j + 1) * B
            block = MemoryBlock(
                index=self.evicted_blocks,
                ids=self.cached_ids[lo:hi],
                keys=[k[lo:hi].clone() for k in self.keys],
                values=[v[lo:hi].clone() for v in self.values],
            )
            self._summarize(block)
            self.memory.append(block)
            self.evicted_blocks += 1
        if len(self.memory) > self.ref.memory_blocks:
            del self.memory[: len(self.memory) - self.ref.memory_blocks]
        super()._evict(t)

    def _summarize(self, block: MemoryBlock) -> None:
        S = self.layout.sink_tokens
        cos, sin = self._rope(torch.tensor([S]))
        rotated = torch.stack(
            [k.float() * cos + _rotate_half(k.float()) * sin for k in block.keys]
        )  # [layers, B, Hkv, D], every key at the first slot's position
        block.kmin, block.kmax = rotated.amin(dim=1), rotated.amax(dim=1)
        block.kmean = rotated.mean(dim=1)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        body = self.ref.model.model
        h = body.embed_tokens.weight[:1][None]
        cos, sin = body.rotary_emb(h, positions.to(h.device)[None])
        return cos[0].float()[:, None], sin[0].float()[:, None]  # [n, 1, D]

    def scores(self) -> torch.Tensor:
        """Each memory block's score against the previous step's last-token queries."""
        if not self.memory or self._queries is None:
            return torch.empty(0)
        body = self.ref.model.model
        L = len(self.cached_ids) + self.ref.recall_blocks * self.layout.block_size
        cos, sin = self._rope(torch.tensor([max(L - 1, 0)]))
        q = torch.stack(self._queries).float()  # [layers, Hq, D]
        q = q * cos[0] + _rotate_half(q) * sin[0]
        Hkv = self.memory[0].kmin.shape[1]
        q = q.view(q.shape[0], Hkv, -1, q.shape[-1])  # [layers, Hkv, groups, D]
        scale = torch.tensor(
            [
                getattr(layer.self_attn, "scaling", 1.0 / math.sqrt(q.shape[-1]))
                for layer in body.layers
            ]
        )
        out = []
        for block in self.memory:
            if self.ref.score_kind == "max":
                lo, hi = block.kmin[:, :, None], block.kmax[:, :, None]
                s = torch.maximum(q * lo, q * hi).sum(-1)  # [layers, Hkv, groups]
            else:
                s = (q * block.kmean[:, :, None]).sum(-1)
            out.append((s.flatten(1).amax(dim=1) * scale).sum())
        return torch.stack(out)

    def _select(self) -> None:
        k = self.ref.recall_blocks
        scores = self.scores()
        if k == 0 or scores.numel() == 0:
            self._recalled = []
        else:
            # Best first; among equal scores the older block (stable sort on -score).
            order = sorted(range(len(self.memory)), key=lambda i: (-float(scores[i]), i))[:k]
            self._recalled = [self.memory[i] for i in sorted(order)]
        self.selected = [b.index for b in self._recalled]

    # -- one step ------------------------------------------------------------------------
    def _before_forward(self, n: int) -> None:
        """Selection: before a step of several tokens (it reads the prompt), before the
        first one-token step after one, and before every ``refresh``-th one-token step."""
        prompt = n > 1
        if prompt or self._after_prompt or self._since_refresh >= self.ref.refresh:
            self._select()
            self._since_refresh = 0
        self._since_refresh += 0 if prompt else 1
        self._after_prompt = prompt

    def _inserted_tokens(self) -> int:
        return sum(len(b.ids) for b in self._recalled)

    def _attended(self, layer: int, K: torch.Tensor, V: torch.Tensor):
        """Sinks, the recalled blocks in stream order, then the window."""
        if not self._recalled:
            return K, V
        S = min(self.layout.sink_tokens, K.shape[0])
        K = torch.cat((K[:S], *(b.keys[layer] for b in self._recalled), K[S:]))
        V = torch.cat((V[:S], *(b.values[layer] for b in self._recalled), V[S:]))
        return K, V

    def _seen_query(self, layer: int, q: torch.Tensor) -> None:
        if layer == 0:
            self._queries = []
        self._queries.append(q.detach())
