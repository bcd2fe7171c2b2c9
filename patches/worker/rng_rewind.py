"""Worker (CPU): seeded generators of partial-prefill rows rewound by state.

A request in a partial prefill step samples a token that vLLM discards, and vLLM's
``_bookkeeping_sync`` then rewinds the request's seeded generator with ``set_offset``,
which CPU generators do not support. Sink mode chunks prompts often (chunk <= window),
so ``remember`` keeps each such generator's state once the step's inputs are prepared
(``discard_request_mask`` is set then) and ``rewound`` restores it around vLLM's
bookkeeping, hiding the generator from vLLM's own rewind. CUDA generators have an
offset: there vLLM's rewind is used and nothing is remembered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


class RngRewind:
    def __init__(self) -> None:
        # input-batch row -> (its generator, the state before this step's draws)
        self.pending: dict[int, tuple[torch.Generator, torch.Tensor]] = {}

    def remember(self, input_batch, discard: np.ndarray) -> None:
        """Keep the state of the generator of every row whose sample this step
        discards (``discard``: vLLM's mask over the batch's rows)."""
        self.pending = {}
        if input_batch.generators:
            for i in np.nonzero(discard[: input_batch.num_reqs])[0]:
                gen = input_batch.generators.get(int(i))
                if gen is not None:
                    self.pending[int(i)] = (gen, gen.get_state())

    @contextlib.contextmanager
    def rewound(self, input_batch) -> Iterator[None]:
        """Around vLLM's bookkeeping: the remembered generators are back in their state
        before the discarded draw and out of ``input_batch.generators`` (so vLLM does
        not rewind them again); afterwards they are back in the batch."""
        hidden = {}
        for i, (gen, state) in self.pending.items():
            gen.set_state(state)  # undo the discarded draw
            hidden[i] = input_batch.generators.pop(i)
        try:
            yield
        finally:
            input_batch.generators.update(hidden)
            self.pending = {}
