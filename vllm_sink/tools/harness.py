"""Engines and servers for the tests and the benchmarks, started as a user starts them.

``make_llm`` builds a ``vllm.LLM`` (optionally in sink mode) with the tests' defaults:
eager, a small fixed KV pool, seed 0. ``Server`` runs a real ``vllm serve`` process on
127.0.0.1 (start, wait for /health, scrape /metrics, stop); ``Router`` runs the project's
``scripts/router`` (vllm-router, consistent hash of ``X-Session-ID``) in front of
servers. Only vLLM's public ``LLM`` class and its CLI are used; nothing here touches
vLLM's internals.

Environment (``scripts/gpu-verify`` sets these to run the CPU suite's layouts on a GPU):

``VLLM_SINK_TEST_BLOCK_SIZE``              KV block size of every engine and server
``VLLM_SINK_TEST_GPU_MEMORY_UTILIZATION``  vLLM's memory share, so that several engines
                                          fit on one GPU side by side
``VLLM_SINK_TEST_LOG_DIR``                 where server logs go (default: the temp dir)
``VLLM_SINK_TEST_ENGINE_PROCESS``          ``1``: ``make_llm`` runs the engine core in its
                                          own process, as ``LLM`` does by default; ``0``:
                                          in this process (the default without CUDA:
                                          an engine then starts ~25 s sooner on 2 cores)
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

KV_BYTES = 256 * 1024 * 1024  # make_llm's KV pool unless told


def make_llm(model: str, sink: dict | None = None, *, in_process: bool | None = None, **kw):
    """A ``vllm.LLM`` for ``model``; ``sink`` is its ``"sink"`` section (None: vanilla).
    ``in_process``: the engine core runs in this process (vLLM's
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) or its own; None: ``engine_in_process()``."""
    from vllm import LLM

    kw.setdefault("enforce_eager", True)
    kw.setdefault("kv_cache_memory_bytes", KV_BYTES)
    if os.environ.get("VLLM_SINK_TEST_BLOCK_SIZE"):  # the CPU layouts, on another device
        kw.setdefault("block_size", int(os.environ["VLLM_SINK_TEST_BLOCK_SIZE"]))
    kw.setdefault("seed", 0)
    for k, v in gpu_share().items():
        kw.setdefault(k, v)
    extra = {"sink": sink} if sink is not None else {}
    inproc = engine_in_process() if in_process is None else in_process
    with _engine_process(inproc):
        llm = LLM(model, additional_config=extra, **kw)
    llm.vllm_sink_in_process = inproc
    return llm


def engine_in_process() -> bool:
    """Where ``make_llm`` runs the engine core unless told: ``VLLM_SINK_TEST_ENGINE_PROCESS``,
    else in this process without CUDA (its own process with CUDA, as verified there)."""
    v = os.environ.get("VLLM_SINK_TEST_ENGINE_PROCESS")
    if v not in (None, "", "0", "1"):
        raise ValueError(f"VLLM_SINK_TEST_ENGINE_PROCESS must be 0 or 1, not {v!r}")
    return v == "0" if v else not _cuda()


@contextmanager
def _engine_process(in_process: bool):
    """``VLLM_ENABLE_V1_MULTIPROCESSING`` for one engine's construction, restored after.
    vLLM caches its environment once an engine core started in this process (and an
    in-process engine keeps reading that cache while it runs); the cache is dropped
    before each build, so that every engine reads the environment as it is then."""
    from vllm_sink.patches._envs import refresh

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(key)
    os.environ[key] = "0" if in_process else "1"
    refresh()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def worker_stats(llm) -> dict:
    """The first worker's ``sink_stats``. A worker learns that requests finished or were
    aborted from the engine's next step: the engine-core process takes that step on its
    own, an in-process engine only when stepped, so an idle one is stepped once first."""
    if getattr(llm, "vllm_sink_in_process", False) and not llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    return llm.collective_rpc("sink_stats")[0]


def gpu_share() -> dict:
    """Engine settings that let several engines share one GPU (gpu-verify runs the e2e
    files side by side): vLLM refuses to start when less memory is free than its
    gpu_memory_utilization share, and the pool here is fixed (KV_BYTES) anyway."""
    util = os.environ.get("VLLM_SINK_TEST_GPU_MEMORY_UTILIZATION")
    return {"gpu_memory_utilization": float(util)} if util else {}


def shutdown(llm) -> None:
    """Stop ``llm``'s engine core processes now (not at garbage collection)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


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
    """``vllm serve model`` on a free port of 127.0.0.1, served as model name "smol",
    eager, with ``sink`` as its ``"sink"`` section (None: vanilla) and ``args`` appended.
    The KV pool is ``kv_gib`` GiB on the CPU and on CUDA alike; the log goes to
    ``log_path`` (default: ``vllm_sink_test_server_<port>.log`` in the log directory);
    ``port`` a given port instead of a free one."""

    def __init__(
        self,
        model: str,
        sink: dict | None,
        *args: str,
        env: dict | None = None,
        kv_gib: int = 1,
        log_path: str | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
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
        import requests

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
        import requests

        from vllm_sink.tools.loadtest import parse_prometheus

        return parse_prometheus(requests.get(self.url + "/metrics", timeout=10).text)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (API server, engine, workers) at
        once: a replica lost without a goodbye."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

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


ROUTER_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "router"


class Router:
    """``scripts/router`` (vllm-router, ``--policy consistent_hash``) on a free port of
    127.0.0.1 in front of ``urls``, its own process group, its log in the log directory.
    Needs the repository checkout (the script and ``.venv/bin/vllm-router``)."""

    def __init__(self, urls: list[str], log_path: str | None = None) -> None:
        if not ROUTER_SCRIPT.exists():
            raise FileNotFoundError(f"{ROUTER_SCRIPT} missing: run from the repository")
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir = os.environ.get("VLLM_SINK_TEST_LOG_DIR") or tempfile.gettempdir()
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = log_path or os.path.join(log_dir, f"vllm_sink_router_{self.port}.log")
        self.log = open(self.log_path, "w")
        env = {
            **os.environ,
            "PORT": str(self.port),
            "ROUTER_METRICS_PORT": str(self.metrics_port),
        }
        self.proc = subprocess.Popen(
            [str(ROUTER_SCRIPT), *urls],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the router answers /health."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        tail = self.tail()
        self.stop()
        raise TimeoutError(f"router not ready after {timeout}s:\n{tail}")

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        return "".join(open(self.log_path).readlines()[-n:])

    def stop(self) -> None:
        if self.log.closed:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def replica_ports(n: int, base: int = 18600) -> list[int]:
    """``n`` consecutive ports from ``base`` when all are free, else free ones. The
    router's hash ring is built from the replicas' URLs: fixed ports give the same
    split of the same session ids on every run."""
    ports = list(range(base, base + n))
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return [free_port() for _ in range(n)]
    return ports


class Replicas:
    """``n`` sink-mode ``Server`` replicas of ``model`` behind a ``Router``. On the CPU
    build replica i runs on core ``cores[i]`` (one OpenMP thread each; default: this
    process's cores, one per replica). ``args`` go to every replica."""

    def __init__(self, model: str, sink: dict, n: int, *args: str, cores=None) -> None:
        cpus = list(cores if cores is not None else sorted(os.sched_getaffinity(0)))
        if len(cpus) < n:
            raise ValueError(f"{n} replicas need {n} cores, have {cpus}")
        per = len(cpus) // n
        self.servers = [
            Server(
                model,
                sink,
                *args,
                port=port,
                env={
                    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus[i * per : (i + 1) * per]))
                },
            )
            for i, port in enumerate(replica_ports(n))
        ]
        self.router: Router | None = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, timeout: float = 600.0) -> Replicas:
        try:
            for s in self.servers:
                s.wait_ready(timeout)
            self.router = Router(self.urls)
            self.router.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for s in self.servers:
            s.stop()
