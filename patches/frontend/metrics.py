"""Frontend: ``vllm_sink:*`` series on the server's existing Prometheus ``/metrics``.

A custom collector in prometheus_client's default registry (the one vLLM's /metrics
endpoint serves) reads the rank-0 worker's and the scheduler's ``StatsBoard`` at scrape
time. Registered once per process; it reports the most recently started sink engine.

With ``--api-server-count > 1`` (prometheus' multiprocess mode) the default registry is
not what /metrics serves. vLLM's ``attach_router`` (``vllm/entrypoints/serve/
instrumentator/metrics.py``) then builds a fresh ``CollectorRegistry`` holding prometheus'
``MultiProcessCollector`` (``get_prometheus_registry``) and mounts it at /metrics, but
the ``prometheus_fastapi_instrumentator`` route it registered first answers GET /metrics
from a new registry of its own per scrape, which no plugin can join. Two wraps, each
delegating: ``get_prometheus_registry`` (the collector joins the registry it returns) and
``attach_router`` (in multiprocess mode, vLLM's own /metrics mount moves ahead of the
instrumentator's route, so the registry vLLM built, with the collector in it, answers).
Every API server reads the same boards, so each serves the same values.

The boards' directory (``watch_engine``): the process that builds the engine config
makes a private one (``stats_board.make_private_dir``) and names it to the processes it
starts in ``STATS_DIR_ENV``; vLLM's API server processes (``--api-server-count > 1``)
build their own config but belong to their launcher's engine, so they read the
launcher's directory from the same variable. Its creator removes it when the engine
config is collected or at exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import weakref

from vllm_sink.core.stats_board import (
    SESSION_FIELDS,
    STATS_DIR_ENV,
    StatsBoard,
    board_path,
    check_private_dir,
    make_private_dir,
)
from vllm_sink.patches._patching import Patch

logger = logging.getLogger("vllm.vllm_sink")
# vLLM's Ray executor copies these to its workers (a documented comma-separated list).
RAY_COPY_ENV = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"

_GAUGES = {
    "active_requests": "Sink requests currently holding a KV block set",
    "kv_blocks_reserved": "KV blocks held by sink requests (each grows up to its block set)",
    "sink_tokens": "Effective sink tokens per request (whole KV blocks)",
    "window_tokens": "Effective window tokens per request (whole KV blocks)",
    "capacity": "Effective KV capacity per request in tokens (sink + window)",
    "block_size": "KV block size in tokens",
    "position_limit": "Largest position + 1 fed to the model",
    "prefill_chunk_tokens": "Most prompt tokens a full stream reads per step",
    "blocks_per_request": "Most KV blocks one stream of the engine's layout holds",
}
_SESSION_GAUGES = {
    "running_requests": "Requests the scheduler is running (streams and dense)",
    "running_sink": "Running endless-stream (sink) requests",
    "running_dense": "Running plain dense requests",
    "blocks_sink": "KV blocks held by running sink requests",
    "blocks_dense": "KV blocks held by running dense requests",
    "pool_blocks_in_use": "KV blocks taken from the pool (running requests + parked sessions)",
    "parked_sessions": "Sessions whose KV is parked between requests",
    "blocks_parked": "KV blocks held by parked sessions",
    "kv_saved_bytes": "Host bytes per worker reserved for the KV of preempted streams",
    "kv_saved_cap_bytes": "Cap on kv_saved_bytes (max_saved_kv_gib)",
}
_SESSION_COUNTERS = {
    "session_requests": "Requests that carried a session id",
    "resumes": "Requests that resumed a parked session (only new tokens prefilled)",
    "parked_evictions": "Parked sessions dropped to make room or over the cap",
    "parked_expired": "Parked sessions dropped after the idle timeout",
    "requests_sink": "Requests served as endless streams",
    "requests_dense": "Requests served with plain dense attention",
    "preempted_sink": "Stream preemptions (cached KV saved, restored on resume)",
    "preempted_dense": "Dense preemptions (recomputed by vLLM on resume)",
    "parked_reset": "Parked sessions dropped by a prefix-cache reset",
    "kv_saves_refused": "Preempted streams finished with an error: their KV did not fit "
    "max_saved_kv_gib",
    "streams_lost_reset": "Preempted streams finished with an error: a prefix-cache reset "
    "invalidated their saved KV",
}
_MISSES = ("none_parked", "prefix", "no_new_tokens", "in_use", "prompt_logprobs", "layout")
_COUNTERS = {
    "requests": "Sink requests started",
    "evictions": "Eviction events (whole window blocks dropped before a step)",
    "tokens_evicted": "Window tokens evicted",
    "rebases": "Position-offset rebases (window keys rotated back once)",
    "sink_rewrites": "Sink-key rewrites from the pristine snapshot",
    "kv_saves": "Preempted streams whose cached KV was saved before its blocks were reused",
    "kv_restores": "Resumed streams whose cached KV was restored (nothing recomputed)",
    "tokens_restored": "Cached tokens restored after preemption instead of recomputed",
}


class SinkCollector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: str | None = None
        self._board: StatsBoard | None = None
        self._sessions: StatsBoard | None = None
        self._session_path: str | None = None
        self._labels: dict[str, str] = {}
        self.directory: str | None = None

    def watch(self, directory: str, model_name: str) -> None:
        with self._lock:
            self.directory = directory
            self._path = board_path("worker", directory)
            self._session_path = board_path("scheduler", directory)
            self._board = self._sessions = None
            self._labels = {"model_name": model_name}

    def describe(self):
        return []  # names are dynamic per engine; skip registry-time collision checks

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            if self._path is None:
                return
            if self._board is None:
                self._board = StatsBoard.open(self._path)
            if self._sessions is None and self._session_path:
                self._sessions = StatsBoard.open(self._session_path, SESSION_FIELDS)
            if self._board is None:
                return
            values = self._board.read()
            sessions = self._sessions.read() if self._sessions is not None else None
            labels = self._labels
        names, label_values = list(labels), list(labels.values())
        tables = [(GaugeMetricFamily, _GAUGES, values), (CounterMetricFamily, _COUNTERS, values)]
        if sessions is not None:
            tables += [
                (GaugeMetricFamily, _SESSION_GAUGES, sessions),
                (CounterMetricFamily, _SESSION_COUNTERS, sessions),
            ]
        for family, docs, source in tables:
            for key, doc in docs.items():
                metric = family(f"vllm_sink:{key}", doc, labels=names)
                metric.add_metric(label_values, source[key])
                yield metric
        if sessions is None:
            return
        misses = CounterMetricFamily(
            "vllm_sink:session_misses",
            "Session requests that could not resume, by reason",
            labels=names + ["reason"],
        )
        for reason in _MISSES:
            misses.add_metric(label_values + [reason], sessions[f"miss_{reason}"])
        yield misses


_COLLECTOR: SinkCollector | None = None
_JOINED: weakref.WeakSet = weakref.WeakSet()  # registries the collector is in


def watch_engine(vllm_config, engine_args) -> str:
    """Expose the sink counters of this engine on the process's Prometheus registry;
    return the directory of its boards."""
    global _COLLECTOR
    if _COLLECTOR is None:
        from prometheus_client import REGISTRY

        _COLLECTOR = SinkCollector()
        REGISTRY.register(_COLLECTOR)
        _JOINED.add(REGISTRY)
    directory = _boards_dir(vllm_config, engine_args)
    names = vllm_config.model_config.served_model_name
    name = names[0] if isinstance(names, (list, tuple)) else names
    _COLLECTOR.watch(directory, str(name or vllm_config.model_config.model))
    return directory


def stats_dir() -> str | None:
    """The boards' directory of the engine this process reports (tests, tools)."""
    return None if _COLLECTOR is None else _COLLECTOR.directory


def _boards_dir(vllm_config, engine_args) -> str:
    count = getattr(engine_args, "_api_process_count", 1) or 1
    rank = getattr(engine_args, "_api_process_rank", 0)
    inherited = os.environ.get(STATS_DIR_ENV)
    if count > 1 and rank is not None and rank >= 0 and inherited:
        # One of the launcher's API servers: its engine's boards are the launcher's.
        directory = check_private_dir(inherited)
        logger.info("vllm_sink: stats boards in %s (API server %d of %d)", directory, rank, count)
        return directory
    directory = make_private_dir()
    os.environ[STATS_DIR_ENV] = directory  # the engine processes started from here
    copied = [v for v in os.environ.get(RAY_COPY_ENV, "").split(",") if v.strip()]
    if STATS_DIR_ENV not in copied:
        os.environ[RAY_COPY_ENV] = ",".join(copied + [STATS_DIR_ENV])
    weakref.finalize(vllm_config, _remove, directory, os.getpid())
    logger.info("vllm_sink: stats boards in %s", directory)
    return directory


def _remove(directory: str, creator: int) -> None:
    if os.getpid() == creator:  # never from a forked child's copy of the config
        shutil.rmtree(directory, ignore_errors=True)


def _wrap_registry(original):
    def get_prometheus_registry():
        registry = original()
        if _COLLECTOR is not None and registry not in _JOINED:
            registry.register(_COLLECTOR)
            _JOINED.add(registry)
        return registry

    return get_prometheus_registry


def _wrap_attach_router(original):
    def attach_router(app):
        original(app)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            _serve_mount_first(app.router.routes)

    return attach_router


def _serve_mount_first(routes: list) -> None:
    """Move the last /metrics ``Mount`` (the one ``attach_router`` appended) ahead of
    every other route for the path /metrics."""
    from starlette.routing import Mount

    mounts = [i for i, r in enumerate(routes) if isinstance(r, Mount) and r.path == "/metrics"]
    others = [
        i
        for i, r in enumerate(routes)
        if getattr(r, "path", None) == "/metrics" and not isinstance(r, Mount)
    ]
    if mounts and others and others[0] < mounts[-1]:
        routes.insert(others[0], routes.pop(mounts[-1]))


_TARGET = "vllm.entrypoints.serve.instrumentator.metrics"
PATCHES = [
    Patch(f"{_TARGET}:get_prometheus_registry", _wrap_registry, signature="()"),
    Patch(f"{_TARGET}:attach_router", _wrap_attach_router, signature="(app)"),
]
