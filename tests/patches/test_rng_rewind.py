"""RngRewind (patches/worker/rng_rewind.py): a discarded draw of a seeded CPU generator
is undone by state, and vLLM's own offset rewind does not see that generator."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from vllm_sink.patches.worker.rng_rewind import RngRewind

pytestmark = pytest.mark.cpu


def _batch(n: int) -> types.SimpleNamespace:
    gens = {i: torch.Generator().manual_seed(i) for i in range(n)}
    return types.SimpleNamespace(generators=gens, num_reqs=n)


def test_discarded_draws_are_undone_and_hidden_from_vllm():
    ib = _batch(3)
    rng = RngRewind()
    rng.remember(ib, np.array([True, False, True, True]))  # row 3 is past num_reqs
    discarded = {i: torch.rand(1, generator=g).item() for i, g in ib.generators.items()}
    gens = dict(ib.generators)
    with rng.rewound(ib):
        assert set(ib.generators) == {1}  # vLLM's offset rewind sees only row 1
    assert ib.generators == gens and rng.pending == {}
    again = {i: torch.rand(1, generator=g).item() for i, g in ib.generators.items()}
    assert again[0] == discarded[0] and again[2] == discarded[2]  # draw undone
    assert again[1] != discarded[1]  # kept: the next draw


def test_nothing_remembered_without_generators_or_discards():
    rng = RngRewind()
    rng.remember(types.SimpleNamespace(generators={}, num_reqs=2), np.ones(2, bool))
    assert rng.pending == {}
    ib = _batch(2)
    rng.remember(ib, np.zeros(2, bool))
    with rng.rewound(ib):
        assert len(ib.generators) == 2
