"""The eviction step's batched key op on the Llama-3.1-8B shape: torch ops vs the fused
Triton kernel (``vllm_sink.core.key_rotate_fused``), device time and host time per call.

A decode step in which a batch of streams each evict one window block re-rotates every
stream's sink block from its pristine snapshot (``source``) in every layer; a rebase
rotates window blocks in place. Both are timed at the given batch sizes: one block per
stream, 32 layers, 8 KV heads, head 128, 16-token blocks, bf16, in one stacked KV buffer
laid out as vLLM's FLASH_ATTN cache ([2, blocks, N, H, D] per layer, layers adjacent).

    python key_op.py [--batches 1 64 256] [--reps 50] [--out DIR]

Needs only torch with CUDA and Triton (no vLLM): device time from CUDA events around
each call, the median of ``--reps``; host time is the call's wall time without a
synchronisation (what the step's critical path pays on the host). Both ops are checked
against each other first. Writes key_op.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from vllm_sink.core.key_cache import KeyCache
from vllm_sink.core.rotary import rope_table

L, N, H, D = 32, 16, 8, 128


def make_cache(fused: bool, buf: torch.Tensor) -> KeyCache:
    layers = [buf[layer, 0] for layer in range(L)]  # keys of layer l: [blocks, N, H, D]
    inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2).float() / D))
    table = rope_table(inv_freq, 1 << 17)
    rel = torch.arange(N * H * D)
    return KeyCache(layers, rel, N, H, D, table, True, fused=fused)


def timed(fn, reps: int) -> tuple[float, float]:
    dev, host = [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
        b.record()
        torch.cuda.synchronize()
        dev.append(a.elapsed_time(b))
    return statistics.median(dev), statistics.median(host)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent / "results")))
    args = ap.parse_args()
    from vllm_sink.core.key_rotate_fused import available

    why = available()
    if why is not None:
        raise SystemExit(f"key_op.py times a CUDA kernel: {why} here")
    nblocks = 2 * max(args.batches) + 8
    buf = torch.randn(L, 2, nblocks, N, H, D, device="cuda").to(torch.bfloat16)
    torch_op, fused_op = make_cache(False, buf), make_cache(True, buf)
    assert torch_op.mode == fused_op.mode == "stacked"

    # agreement: the same rotation through both ops from the same keys
    ids = list(range(0, 2 * 64, 2))
    deltas = [4096 + 16 * i for i in range(64)]
    keep = buf.clone()
    torch_op.rotate(ids, deltas)
    want = buf.clone()
    buf.copy_(keep)
    fused_op.rotate(ids, deltas)
    diff = (buf.float() - want.float()).abs().max().item()
    differ = (buf != want).float().mean().item()
    print(f"agreement: max |fused - torch| {diff:.3g}, share of keys differing {differ:.2e}")

    rows = []
    for n in args.batches:
        ids = list(range(1, 2 * n, 2))
        deltas = [1000 + 16 * i for i in range(n)]
        source = torch.randn(L, n, N, H, D, device="cuda").to(torch.bfloat16)
        for case, src in (("sinks from snapshot", source), ("window in place", None)):
            row = {"batch": n, "case": case}
            for name, op in (("torch", torch_op), ("fused", fused_op)):
                for _ in range(5):  # warm-up (Triton compiles on the first call)
                    op.rotate(ids, deltas, src)
                torch.cuda.synchronize()
                row[f"{name}_device_ms"], row[f"{name}_host_ms"] = timed(
                    lambda op=op, i=ids, d=deltas, s=src: op.rotate(i, d, s), args.reps
                )
            row["speedup"] = row["torch_device_ms"] / row["fused_device_ms"]
            rows.append(row)
    print(
        f"{'batch':>5} {'case':<20} {'torch ms':>9} {'fused ms':>9} {'x':>6} "
        f"{'torch host':>10} {'fused host':>10}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['case']:<20} {r['torch_device_ms']:>9.3f} "
            f"{r['fused_device_ms']:>9.3f} {r['speedup']:>6.2f} {r['torch_host_ms']:>10.3f} "
            f"{r['fused_host_ms']:>10.3f}"
        )
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"layers": L, "block_tokens": N, "kv_heads": H, "head_size": D},
        "agreement": {"max_abs": diff, "share_differing": differ},
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "key_op.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'key_op.json'}")


if __name__ == "__main__":
    main()
