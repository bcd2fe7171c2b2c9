"""vllm_sink.core.backends: verified backends run, unverified ones only when named, others
never; every refusal names what to use instead."""

import pytest

from vllm_sink.core import backends

pytestmark = pytest.mark.cpu


def test_verified_backends_run(monkeypatch):
    monkeypatch.delenv(backends.ENV, raising=False)
    for platform, names in backends.VERIFIED.items():
        for name in names:
            assert backends.refusal(name, platform) is None
            assert backends.refusal(name.lower()) is None  # any platform, any case


def test_unverified_backend_refused_unless_named(monkeypatch):
    # The mechanism, on a backend put in the unverified list for the test (none is now).
    monkeypatch.setitem(backends.UNVERIFIED, "cuda", ("NEW_ATTN",))
    monkeypatch.delenv(backends.ENV, raising=False)
    why = backends.refusal("NEW_ATTN", "cuda")
    assert why is not None and "not verified" in why and backends.ENV in why
    assert "FLASH_ATTN" in why and "TRITON_ATTN" in why and "FLASHINFER" in why
    monkeypatch.setenv(backends.ENV, "triton_attn, new_attn")
    assert backends.refusal("NEW_ATTN", "cuda") is None
    assert "NEW_ATTN" in backends.allowed("cuda")
    assert backends.refusal("NEW_ATTN", "cpu") is not None  # not a CPU backend


def test_flashinfer_is_verified_on_cuda_only(monkeypatch):
    monkeypatch.delenv(backends.ENV, raising=False)
    assert backends.refusal("FLASHINFER", "cuda") is None
    assert backends.refusal("FLASHINFER", "cpu") is not None


def test_unknown_backend_refused_even_when_named(monkeypatch):
    monkeypatch.setenv(backends.ENV, "FLEX_ATTENTION")
    why = backends.refusal("FLEX_ATTENTION", "cuda")
    assert why is not None and "verified on FLASH_ATTN, TRITON_ATTN, FLASHINFER" in why


def test_verification_is_per_release(monkeypatch):
    """vLLM 0.33.0 on CUDA: FLASH_ATTN and TRITON_ATTN verified, FLASHINFER (verified on
    0.32.0) refused until its oracle has passed on 0.33.0, unless opted in."""
    monkeypatch.delenv(backends.ENV, raising=False)
    assert backends.verified("cuda", "0.33.0") == ("FLASH_ATTN", "TRITON_ATTN")
    assert backends.refusal("FLASHINFER", "cuda", "0.32.0") is None
    assert backends.refusal("TRITON_ATTN", "cuda", "0.33.0") is None
    why = backends.refusal("FLASHINFER", "cuda", "0.33.0")
    assert why is not None and "vLLM 0.33.0" in why and backends.ENV in why
    assert "FLASH_ATTN, TRITON_ATTN" in why and "FLASHINFER," not in why
    assert backends.refusal("CPU_ATTN", "cpu", "0.32.0") is None  # default lists elsewhere
    monkeypatch.setenv(backends.ENV, "FLASHINFER")
    assert backends.refusal("FLASHINFER", "cuda", "0.33.0") is None
