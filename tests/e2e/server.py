"""A real `vllm serve` process on 127.0.0.1 for tests: start, wait for /health, stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLI_MODULES = {"vllm": "vllm.entrypoints.cli.main", "vllm-sink": "vllm_sink.tools.cli"}


def cli(name: str) -> list[str]:
    """The command of console script ``name``: the interpreter's own (its venv), else the
    PATH's, else the same CLI through this interpreter (an install into a --target
    directory, as on the lent GPU machine, has no scripts)."""
    own = Path(sys.executable).with_name(name)
    found = str(own) if own.exists() else shutil.which(name)
    return [found] if found else [sys.executable, "-m", CLI_MODULES[name]]


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class Server:
    def __init__(
        self,
        model: str,
        sink: dict | None,
        *args: str,
        env: dict | None = None,
        kv_gib: int = 1,
        log_path: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        cmd = [
            *cli("vllm"),
            "serve",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            "smol",
            "--enforce-eager",
            *args,
        ]
        block = os.environ.get("VLLM_SINK_TEST_BLOCK_SIZE")  # as make_llm: the CPU
        if block and "--block-size" not in args:  # layouts, on another device
            cmd += ["--block-size", block]
        if _cuda() and "--kv-cache-memory-bytes" not in args:
            # The same pool as on the CPU (there VLLM_CPU_KVCACHE_SPACE below sets it),
            # not vLLM's default of most of the GPU's memory.
            cmd += ["--kv-cache-memory-bytes", str(kv_gib * 2**30)]
        util = os.environ.get("VLLM_SINK_TEST_GPU_MEMORY_UTILIZATION")
        if util and "--gpu-memory-utilization" not in args:  # several engines on one GPU
            cmd += ["--gpu-memory-utilization", util]
        if sink is not None:
            cmd += ["--additional-config", json.dumps({"sink": sink})]
        # VLLM_SINK_TEST_LOG_DIR keeps the server logs (gpu-verify: with its results)
        log_dir = os.environ.get("VLLM_SINK_TEST_LOG_DIR") or tempfile.gettempdir()
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = log_path or os.path.join(log_dir, f"vllm_sink_test_server_{self.port}.log")
        self.log = open(self.log_path, "w")
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
            **(env or {}),
        }
        if "--kv-cache-memory-bytes" in args:
            # vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE override the flag.
            full_env.pop("VLLM_CPU_KVCACHE_SPACE")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait for /health; on failure stop the whole process group, then raise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.tail()
                self.stop()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        tail = self.tail()
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{tail}")

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        return "".join(open(self.log_path).readlines()[-n:])

    def metrics(self) -> dict[str, float]:
        from vllm_sink.tools.loadtest import parse_prometheus

        return parse_prometheus(requests.get(self.url + "/metrics", timeout=10).text)

    def stop(self, timeout: float = 60.0) -> int:
        if self.log.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode
