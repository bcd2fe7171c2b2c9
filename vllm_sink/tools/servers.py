"""The servers a load test scrapes: one ``vllm serve``, or every replica behind a router.

A router answers ``/metrics`` from one replica only, so a run through a router scrapes
each replica's own address. ``merge`` folds one scrape per server into one sample:
counts add up, the layout gauges (the same on every replica) are kept once.
``SessionTally`` keeps each server's session counters at the start and the last ones
seen (a replica lost mid-run keeps what it last reported) and gives each server's share
of the run's requests, resumes and misses, and the resume rate over all of them.
"""

from __future__ import annotations

import re

# Gauges every replica of one layout reports alike: kept once, never added.
SAME = frozenset(
    {
        "vllm_sink:capacity",
        "vllm_sink:block_size",
        "vllm_sink:blocks_per_request",
        "vllm:kv_cache_usage_perc",
    }
)
SAMPLED = (
    "vllm_sink:kv_blocks_reserved",
    "vllm_sink:active_requests",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm_sink:capacity",
    "vllm_sink:block_size",
    "vllm_sink:tokens_evicted_total",
    "vllm:num_preemptions_total",
    "vllm_sink:running_requests",
    "vllm_sink:pool_blocks_in_use",
    "vllm_sink:blocks_parked",
    "vllm_sink:blocks_per_request",
    "vllm_sink:blocks_sink",
    "vllm_sink:blocks_dense",
    "vllm_sink:running_sink",
)
SESSION_COUNTERS = {
    "requests": "vllm_sink:session_requests_total",
    "resumes": "vllm_sink:resumes_total",
    "misses": "vllm_sink:session_misses_total",
}


def parse_prometheus(text: str) -> dict[str, float]:
    """``name -> value`` for unlabeled-or-first-labeled samples (sums same-name series)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            name_part, value = line.rsplit(" ", 1)
            name = name_part.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def pool_blocks(metrics_text: str) -> int | None:
    """num_gpu_blocks from vLLM's ``vllm:cache_config_info`` labels."""
    m = re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', metrics_text)
    return int(m.group(1)) if m else None


def sample_of(text: str) -> dict[str, float]:
    """The sampled series of one server's scrape."""
    m = parse_prometheus(text)
    out = {key: m[key] for key in SAMPLED if key in m}
    pool = pool_blocks(text)
    if pool and "vllm:kv_cache_usage_perc" in m:
        # Blocks in use in the scheduler's pool (the null block excluded).
        out["pool_blocks_used"] = round(m["vllm:kv_cache_usage_perc"] * (pool - 1))
    return out


def merge(parts: list[dict[str, float]]) -> dict[str, float]:
    """One sample from one per server: counts added, layout gauges kept once (max)."""
    out: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            if key in SAME:
                out[key] = max(out.get(key, value), value)
            else:
                out[key] = out.get(key, 0) + value
    return out


class SessionTally:
    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)
        self.start: dict[str, dict[str, float]] = {}
        self.last: dict[str, dict[str, float]] = {}
        self.lost: set[str] = set()  # unreachable at the last scrape

    def seen(self, url: str, text: str | None) -> None:
        """Record one scrape of ``url`` (None: it did not answer)."""
        if text is None:
            self.lost.add(url)
            return
        self.lost.discard(url)
        m = parse_prometheus(text)
        counters = {k: m.get(name, 0.0) for k, name in SESSION_COUNTERS.items()}
        self.start.setdefault(url, counters)
        self.last[url] = counters

    def summary(self, first_turns: int) -> dict:
        """Each server's requests / resumes / misses during the run, and the resume rate
        over the turns that had something to resume (all but ``first_turns``)."""
        per = {}
        for url in self.urls:
            if url not in self.start:
                per[url] = None
                continue
            delta = {k: int(self.last[url][k] - self.start[url][k]) for k in SESSION_COUNTERS}
            per[url] = {**delta, "answered_last_scrape": url not in self.lost}
        counted = [v for v in per.values() if v]
        requests = sum(v["requests"] for v in counted)
        resumes = sum(v["resumes"] for v in counted)
        follow_ups = requests - first_turns
        return {
            "servers": per,
            "session_requests": requests,
            "resumes": resumes,
            "resume_rate": round(resumes / follow_ups, 4) if follow_ups > 0 else None,
        }
