"""Frontend: ``vllm_sink:*`` series on the server's existing Prometheus ``/metrics``.

A custom collector in prometheus_client's default registry (the one vLLM's /metrics
endpoint serves) reads the rank-0 worker's ``StatsBoard`` at scrape time. Registered
once per process; it reports the most recently started sink engine.
"""

from __future__ import annotations

import threading

from vllm_sink.core.stats_board import SESSION_FIELDS, StatsBoard, board_path

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

    def watch(self, instance_id: str, model_name: str) -> None:
        with self._lock:
            self._path = board_path(instance_id)
            self._session_path = board_path(instance_id, "scheduler")
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
            tables += [(GaugeMetricFamily, _SESSION_GAUGES, sessions),
                       (CounterMetricFamily, _SESSION_COUNTERS, sessions)]
        for family, docs, source in tables:
            for key, doc in docs.items():
                metric = family(f"vllm_sink:{key}", doc, labels=names)
                metric.add_metric(label_values, source[key])
                yield metric
        if sessions is None:
            return
        misses = CounterMetricFamily("vllm_sink:session_misses",
                                     "Session requests that could not resume, by reason",
                                     labels=names + ["reason"])
        for reason in _MISSES:
            misses.add_metric(label_values + [reason], sessions[f"miss_{reason}"])
        yield misses


_COLLECTOR: SinkCollector | None = None


def watch_engine(vllm_config) -> None:
    """Expose the sink counters of this engine on the process's Prometheus registry."""
    global _COLLECTOR
    if _COLLECTOR is None:
        from prometheus_client import REGISTRY

        _COLLECTOR = SinkCollector()
        REGISTRY.register(_COLLECTOR)
    names = vllm_config.model_config.served_model_name
    name = names[0] if isinstance(names, (list, tuple)) else names
    _COLLECTOR.watch(vllm_config.instance_id, str(name or vllm_config.model_config.model))
