"""GPU memory of streams with large sink regions: everything the plugin holds outside the
KV pool fits in the budget vLLM planned (``gpu_memory_utilization``).

Each stream keeps a device copy of its sink keys (every layer) for its life, and its
sink rewrite rotates them in float32. The engine allows requests up to
``max_request_sink_tokens`` sinks and reserves that much per stream (max_num_seqs +
max_parked_sessions of them) plus one rotation chunk's scratch in vLLM's memory profile.
Here ``--sessions`` streams each ask for the largest sink region allowed, read a prompt
longer than their capacity (so every one snapshots and rewrites its sinks, all in the
same steps) and decode; meanwhile the worker process's GPU memory is sampled through
NVML. Reported: the reserve, the snapshots' peak, the allocator's peak, the process's
peak, and the budget (utilization x total memory).

    python gpu_memory.py [--sessions 256] [--sink 512] [--out DIR]
    (8B shape, dummy weights, vLLM's memory profile: no explicit KV size)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = HERE / "shapes" / "llama-3.1-8b"


def device_used_bytes() -> int:
    """GPU 0's memory in use, every process on it (NVML, else nvidia-smi)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except ImportError:
        out = subprocess.run(
            ["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.split()[0]) << 20


def sampler(stop: threading.Event, peak: dict) -> None:
    """Peak of the device's memory in use while the run lasts (the lent machine runs
    nothing else, so that is vLLM's processes; container pid namespaces make a per-pid
    NVML filter unreliable)."""
    while not stop.is_set():
        peak["bytes"] = max(peak.get("bytes", 0), device_used_bytes())
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--sink", type=int, default=512, help="sink tokens every stream asks for")
    ap.add_argument("--window", type=int, default=1536)
    ap.add_argument("--prompt", type=int, default=2400)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--model", default=str(SHAPE))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    sink = {"sink_tokens": 4, "window_tokens": 2048, "max_request_sink_tokens": args.sink}
    before = device_used_bytes()  # the driver's own share, before vLLM starts
    llm = LLM(
        args.model,
        load_format="dummy",
        skip_tokenizer_init=True,
        seed=0,
        max_num_seqs=args.sessions,
        additional_config={"sink": sink},
        compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"},
    )
    stop, peak = threading.Event(), {}
    watcher = threading.Thread(target=sampler, args=(stop, peak), daemon=True)
    watcher.start()
    rng = random.Random(0)
    field = {"sink": {"sink_tokens": args.sink, "window_tokens": args.window}}
    prompts = [
        {"prompt_token_ids": [rng.randrange(1000, 32000) for _ in range(args.prompt)]}
        for _ in range(args.sessions)
    ]
    params = SamplingParams(
        max_tokens=args.decode, temperature=0, ignore_eos=True, detokenize=False, extra_args=field
    )
    t = time.monotonic()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.monotonic() - t
    memory = llm.collective_rpc("sink_memory")[0]
    stats = llm.collective_rpc("sink_stats")[0]
    stop.set()
    watcher.join()
    done = sum(len(o.outputs[0].token_ids) == args.decode for o in outs)
    gib = 1 << 30
    row = {
        "sessions": args.sessions,
        "sink_tokens": args.sink,
        "completed": done,
        "seconds": round(seconds, 1),
        "sink_rewrites": stats["sink_rewrites"],
        "reserve_gib": memory["reserve"] / gib,
        "kv_pool_gib": memory["kv_cache_bytes"] / gib,
        "allocator_peak_gib": memory["max_reserved"] / gib,
        "process_peak_gib": (peak.get("bytes", before) - before) / gib,
        "budget_gib": memory["gpu_memory_utilization_budget"] / gib,
        "total_gib": memory["total"] / gib,
    }
    print(json.dumps(row, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_memory.json").write_text(
        json.dumps(
            {"benchmark": "gpu_memory", "date": time.strftime("%Y-%m-%d %H:%M:%S"), **row}, indent=1
        )
    )
    ok = done == args.sessions and row["process_peak_gib"] <= row["budget_gib"]
    print("within budget" if ok else "OVER BUDGET or incomplete")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
