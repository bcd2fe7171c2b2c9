"""Attention backends sink mode runs on, per platform. Pure Python.

A backend is *verified* when the plugin's oracle tests passed on it on real hardware
(``tests/e2e/test_cuda.py`` on CUDA, the e2e suite on CPU): its KV writes, block tables
and kernels attend the virtual sequence exactly as the reference does. Backends whose
key layout the plugin can probe but whose oracle run is still outstanding are
*unverified*: refused by name, unless the operator lists them in
``VLLM_SINK_UNVERIFIED_BACKENDS`` (comma-separated) to run them anyway, e.g. to verify
them. Nothing is ever used silently.

Verification is per vLLM release (a release changes the backends' code): ``VERIFIED``
and ``UNVERIFIED`` hold every release's lists unless ``BY_RELEASE`` names the release.

On CUDA, verified on an NVIDIA H200 with vLLM 0.32.0 (bf16, 2026-12-02): FLASH_ATTN
(vLLM's Hopper default, with torch.compile and FULL_AND_PIECEWISE CUDA graphs),
TRITON_ATTN and FLASHINFER (full CUDA graphs for decode, async scheduling). With vLLM
0.33.0 on an NVIDIA H100 (2026-12-07): FLASH_ATTN with vLLM's defaults and TRITON_ATTN;
FLASHINFER's oracle run on 0.33.0 is outstanding, so it is unverified there.
"""

from __future__ import annotations

import os

ENV = "VLLM_SINK_UNVERIFIED_BACKENDS"

VERIFIED = {"cpu": ("CPU_ATTN",), "cuda": ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")}
UNVERIFIED: dict[str, tuple[str, ...]] = {"cpu": (), "cuda": ()}
# (release, platform) -> (verified, unverified), where a release's lists differ.
BY_RELEASE: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ("0.33.0", "cuda"): (("FLASH_ATTN", "TRITON_ATTN"), ("FLASHINFER",)),
}


def verified(platform: str, release: str | None = None) -> tuple[str, ...]:
    """Backends verified on ``platform`` with vLLM ``release`` (None: the default lists)."""
    return BY_RELEASE.get((release or "", platform), (VERIFIED[platform], ()))[0]


def unverified(platform: str, release: str | None = None) -> tuple[str, ...]:
    """Backends sink mode can run on ``platform`` with ``release`` once opted in."""
    return BY_RELEASE.get((release or "", platform), ((), UNVERIFIED[platform]))[1]


def opted_in() -> set[str]:
    """Unverified backends the operator asked for through ``VLLM_SINK_UNVERIFIED_BACKENDS``."""
    return {n.strip().upper() for n in os.environ.get(ENV, "").split(",") if n.strip()}


def _platforms(platform: str | None) -> list[str]:
    return [platform] if platform else list(VERIFIED)


def allowed(platform: str | None = None, release: str | None = None) -> tuple[str, ...]:
    """Backends sink mode runs on (``platform`` None: on any platform) with vLLM
    ``release`` (None: the default lists)."""
    chosen = opted_in()
    return tuple(
        n
        for p in _platforms(platform)
        for n in verified(p, release) + tuple(u for u in unverified(p, release) if u in chosen)
    )


def refusal(name: str, platform: str | None = None, release: str | None = None) -> str | None:
    """Why sink mode will not run on backend ``name`` (None: it will)."""
    name = name.upper()
    if name in allowed(platform, release):
        return None
    where = f" on {platform}" if platform else ""
    with_release = f" with vLLM {release}" if release else ""
    good = ", ".join(n for p in _platforms(platform) for n in verified(p, release))
    if any(name in unverified(p, release) for p in _platforms(platform)):
        return (
            f"the {name} attention backend is not verified with sink mode{with_release} "
            f"yet (its oracle test, tests/e2e/test_cuda.py, has not passed on a GPU). Use "
            f"{good}{where}, or set {ENV}={name} to run it unverified."
        )
    return (
        f"sink mode is verified on {good}{where}{with_release}: it re-rotates cached "
        "keys in place and must know each backend's cache and block-table handling. "
        "Pick one of those."
    )
