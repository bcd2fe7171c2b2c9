"""Shared helpers for the benchmarks: engines, tables, JSON/PNG output, memory."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's vllm_sink, ahead of an installed copy


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    try:
        import vllm

        engine = f"vLLM {vllm.__version__}"
    except ImportError:  # the pure-torch benchmarks (drift) run without vLLM
        engine = "no vLLM"

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device = "CPU"
    if torch.cuda.is_available():
        device = f"CUDA, {torch.cuda.get_device_name()}"
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram / 2**30:.0f} GiB "
        f"RAM; {engine}, torch {torch.__version__} ({device}), Python "
        f"{platform.python_version()}"
    )


def make_llm(model: str, sink: dict | None = None, **kw):
    """``harness.make_llm`` (the tests' engine defaults), with a 1 GiB KV pool by default."""
    from vllm_sink.tools import harness

    kw.setdefault("kv_cache_memory_bytes", 1 << 30)
    return harness.make_llm(model, sink, **kw)


def shutdown(llm) -> None:
    from vllm_sink.tools import harness

    harness.shutdown(llm)


def engine_rss_bytes() -> int:
    """Resident memory of this process and its children (EngineCore, workers)."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me] + me.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep] + [line(r) for r in cells])


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": hardware(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path
