"""Attention backends sink mode runs on, per platform. Pure Python.

A backend is *verified* when the plugin's oracle tests passed on it on real hardware
(``tests/e2e/test_cuda.py`` on CUDA, the e2e suite on CPU): its KV writes, block tables
and kernels attend the virtual sequence exactly as the reference does. Backends whose
key layout the plugin can probe but whose oracle run is still outstanding are
*unverified*: refused by name, unless the operator lists them in
``VLLM_SINK_UNVERIFIED_BACKENDS`` (comma-separated) to run them anyway, e.g. to verify
them. Nothing is ever used silently.

On CUDA, verified on an NVIDIA H200 (vLLM 0.32.0, bf16, 2026-12-02): FLASH_ATTN (vLLM's
Hopper default, with torch.compile and FULL_AND_PIECEWISE CUDA graphs), TRITON_ATTN
and FLASHINFER (full CUDA graphs for decode, async scheduling). No backend is in the
unverified list now; the mechanism stays for the next one a vLLM release adds.
"""

from __future__ import annotations

import os

ENV = "VLLM_SINK_UNVERIFIED_BACKENDS"

VERIFIED = {"cpu": ("CPU_ATTN",), "cuda": ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")}
UNVERIFIED: dict[str, tuple[str, ...]] = {"cpu": (), "cuda": ()}


def opted_in() -> set[str]:
    """Unverified backends the operator asked for through ``VLLM_SINK_UNVERIFIED_BACKENDS``."""
    return {n.strip().upper() for n in os.environ.get(ENV, "").split(",") if n.strip()}


def _platforms(platform: str | None) -> list[str]:
    return [platform] if platform else list(VERIFIED)


def allowed(platform: str | None = None) -> tuple[str, ...]:
    """Backends sink mode runs on (``platform`` None: on any platform)."""
    chosen = opted_in()
    return tuple(
        n
        for p in _platforms(platform)
        for n in VERIFIED[p] + tuple(u for u in UNVERIFIED[p] if u in chosen)
    )


def refusal(name: str, platform: str | None = None) -> str | None:
    """Why sink mode will not run on backend ``name`` (None: it will)."""
    name = name.upper()
    if name in allowed(platform):
        return None
    where = f" on {platform}" if platform else ""
    verified = ", ".join(n for p in _platforms(platform) for n in VERIFIED[p])
    if any(name in UNVERIFIED[p] for p in _platforms(platform)):
        return (
            f"the {name} attention backend is not verified with sink mode yet (its "
            f"oracle test, tests/e2e/test_cuda.py, has not passed on a GPU). Use "
            f"{verified}{where}, or set {ENV}={name} to run it unverified."
        )
    return (
        f"sink mode is verified on {verified}{where}: it re-rotates cached keys in "
        f"place and must know each backend's cache and block-table handling. Pick "
        "one of those."
    )
