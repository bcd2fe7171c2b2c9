"""Pure-torch StreamingLLM reference over a Hugging Face Llama-family model. No vLLM.

This is the oracle the vLLM plugin is compared against, token by token. It implements
the semantics contract of docs/architecture.md in the most direct way possible:

* the cache holds *un-rotated* keys and values: at most C - 1 (C = S + W) when a step
  starts, plus the step's own n <= K tokens (the prefill chunk) while it runs;
* before each step, ``policy.eviction_for_step`` drops the oldest whole window blocks
  (the same function the plugin uses, tested against a naive model);
* every step rotates queries and *all* cached keys afresh at cache-relative positions
  0 .. L+n-1, so scores are exactly those of a dense model run over the cache contents.

It uses only the HF model's weights and modules (embeddings, norms, projections, MLP,
rotary table), never its attention or cache code. Supported: Llama-style decoders
(Llama, Mistral, Qwen2/3, SmolLM, ...) with full neox rotary. ``sink_tokens=0`` gives
the window-only ablation; ``pin_prompt_tokens=N`` keeps the first N tokens with the
sinks (the sink region grows to cover them, the window shrinks by as much). Use float32
for comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from vllm_sink.core.config import SinkConfig, SinkLayout, pinned_region
from vllm_sink.core.policy import eviction_for_step
from vllm_sink.core.policy import prefill_steps as prefill_steps_for


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StreamingReference:
    """Weights plus a layout; ``stream()`` starts an independent endless stream."""

    def __init__(
        self,
        model,
        *,
        sink_tokens: int = 4,
        window_tokens: int = 2048,
        block_size: int = 32,
        position_limit: int | None = None,
        prefill_chunk_tokens: int | None = None,
        pin_prompt_tokens: int = 0,
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        limit = position_limit or int(self.config.max_position_embeddings)
        # A pinned prefix is part of the sink region; the blocks it adds come out of the
        # window (the plugin's rule for a request that pins without its own window).
        sink_tokens, window_tokens = pinned_region(
            sink_tokens, window_tokens, pin_prompt_tokens, block_size
        )
        self.layout: SinkLayout = SinkConfig(
            sink_tokens, window_tokens, prefill_chunk_tokens
        ).resolve(block_size, limit)

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: torch.dtype = torch.float32, **kw):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        return cls(model, **kw)

    def stream(self) -> ReferenceStream:
        return ReferenceStream(self)


class ReferenceStream:
    """One stream: a cache of un-rotated K/V per layer plus the cached token ids."""

    def __init__(self, ref: StreamingReference) -> None:
        self.ref = ref
        self.layout = ref.layout
        n_layers = len(ref.model.model.layers)
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # [L, Hkv, D]
        self.values: list[torch.Tensor | None] = [None] * n_layers  # [L, Hkv, D]
        self.cached_ids: list[int] = []  # token ids in cache order (sinks, window)
        self.total = 0  # tokens fed so far
        self.evicted = 0  # window tokens evicted so far
        self.last_logprobs: torch.Tensor | None = None  # after the last fed token

    # -- cache maintenance -------------------------------------------------------------
    def _evict(self, t: int) -> None:
        """Drop cache entries S .. S+t-1 (the oldest window tokens)."""
        S = self.layout.sink_tokens
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i] = torch.cat((k[:S], k[S + t :]))
                self.values[i] = torch.cat((v[:S], v[S + t :]))
        del self.cached_ids[S : S + t]
        self.evicted += t

    # -- one step ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Feed ``token_ids`` as one step; return next-token log-probs ``[n, vocab]``."""
        n = len(token_ids)
        t = eviction_for_step(self.layout, len(self.cached_ids), n)
        if t:
            self._evict(t)
        self._before_forward(n)
        device = self.ref.model.lm_head.weight.device
        logits = self._forward(torch.tensor(list(token_ids), dtype=torch.long, device=device))
        self.cached_ids.extend(int(x) for x in token_ids)
        self.total += n
        lp = torch.log_softmax(logits.float(), dim=-1).cpu()
        self.last_logprobs = lp[-1]
        return lp

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        model = self.ref.model
        body = model.model
        # L: tokens attended before this step's (a subclass may attend to more than the
        # cache holds: vllm_sink.reference.recall inserts recalled blocks after the sinks).
        n, L = ids.shape[0], len(self.cached_ids) + self._inserted_tokens()
        h = body.embed_tokens(ids)  # [n, hidden]
        positions = torch.arange(L + n, device=ids.device)[None]  # cache-relative
        cos, sin = body.rotary_emb(h[None], positions)  # [1, L+n, D]
        cos, sin = cos[0].float(), sin[0].float()
        causal = positions[0][None, :] <= (L + torch.arange(n, device=ids.device))[:, None]
        for i, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            D = attn.head_dim
            q = attn.q_proj(x).view(n, -1, D)
            k = attn.k_proj(x).view(n, -1, D)
            v = attn.v_proj(x).view(n, -1, D)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
                q, k = attn.q_norm(q), attn.k_norm(k)
            K = k if self.keys[i] is None else torch.cat((self.keys[i], k))
            V = v if self.values[i] is None else torch.cat((self.values[i], v))
            self.keys[i], self.values[i] = K, V
            self._seen_query(i, q[-1])
            K, V = self._attended(i, K, V)
            # RoPE at cache-relative positions: queries L.., all keys 0..L+n-1.
            qf = q.float() * cos[L:, None] + _rotate_half(q.float()) * sin[L:, None]
            kf = K.float() * cos[:, None] + _rotate_half(K.float()) * sin[:, None]
            groups = qf.shape[1] // kf.shape[1]
            kf = kf.repeat_interleave(groups, dim=1)  # [L+n, Hq, D]
            vf = V.float().repeat_interleave(groups, dim=1)
            scale = getattr(attn, "scaling", 1.0 / math.sqrt(D))
            scores = torch.einsum("qhd,khd->hqk", qf, kf) * scale  # [Hq, n, L+n]
            scores = scores.masked_fill(~causal[None], float("-inf"))
            out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vf)
            h = h + attn.o_proj(out.reshape(n, -1).to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.lm_head(body.norm(h))

    # Extension points (no-ops here): a step of n tokens about to run (after eviction),
    # tokens attended beyond the cache, the keys and values a layer attends to given its
    # cache's, and each layer's last-token query.
    def _before_forward(self, n: int) -> None:
        pass

    def _inserted_tokens(self) -> int:
        return 0

    def _attended(self, layer: int, K: torch.Tensor, V: torch.Tensor):
        return K, V

    def _seen_query(self, layer: int, q: torch.Tensor) -> None:
        pass

    # -- drivers -------------------------------------------------------------------------
    def teacher_force(self, tokens: Sequence[int], steps: int | Iterable[int]) -> torch.Tensor:
        """Feed ``tokens`` in steps; return ``lp[i] = log p(tokens[i] | stream so far)``.

        ``steps`` is a step size or the list of step sizes (summing to len(tokens)).
        ``lp[0]`` is NaN unless this stream already held tokens before the call.
        """
        return self.score(tokens, steps)[0]

    def score(
        self, tokens: Sequence[int], steps: int | Iterable[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``teacher_force``, plus ``top1[i]``: the most likely token at position i
        (-1 where ``lp`` is NaN)."""
        tokens = [int(x) for x in tokens]
        sizes = _step_sizes(len(tokens), steps)
        out = torch.full((len(tokens),), float("nan"))
        top1 = torch.full((len(tokens),), -1, dtype=torch.long)
        pending = self.last_logprobs
        start = 0
        for size in sizes:
            chunk = tokens[start : start + size]
            if pending is not None:
                out[start] = pending[chunk[0]]
                top1[start] = int(pending.argmax())
            lp = self.step(chunk)
            idx = torch.tensor(chunk[1:], dtype=torch.long)
            out[start + 1 : start + size] = lp[:-1].gather(1, idx[:, None])[:, 0]
            top1[start + 1 : start + size] = lp[:-1].argmax(dim=-1)
            pending = lp[-1]
            start += size
        return out, top1

    def greedy(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        prefill_steps: int | Iterable[int] | None = None,
    ) -> tuple[list[int], list[float]]:
        """Greedy continuation of ``prompt``: (token ids, their log-probs). The prompt is
        read in ``prefill_steps`` (default: as the sink scheduler reads it when the step
        budget is not the limit, ``policy.prefill_steps``)."""
        sizes = _step_sizes(
            len(prompt), prefill_steps or prefill_steps_for(self.layout, len(prompt), self.total)
        )
        start, lp = 0, None
        for size in sizes:
            lp = self.step(prompt[start : start + size])[-1]
            start += size
        out, out_lp = [], []
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(lp))
            out.append(tok)
            out_lp.append(float(lp[tok]))
            lp = self.step([tok])[-1]
        return out, out_lp


def _step_sizes(total: int, steps: int | Iterable[int]) -> list[int]:
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError("step size must be >= 1")
        sizes = [steps] * (total // steps) + ([total % steps] if total % steps else [])
    else:
        sizes = [int(s) for s in steps]
    if sum(sizes) != total or any(s < 1 for s in sizes):
        raise ValueError(f"step sizes {sizes[:8]}... must be >= 1 and sum to {total}")
    return sizes
