"""``vllm-sink loadtest``: many concurrent endless sessions against an OpenAI server.

Each session is either one endless streamed completion (``--mode generate``) or a long
multi-turn chat (``--mode chat``: every turn re-sends the conversation so far, like a
chat UI). The run is bounded by ``--duration`` seconds and/or ``--tokens`` per session
(and by ``--max-turns``, per-request ``--timeout``); at the end in-flight requests are
closed, which the server handles as client disconnects; a session still running
``DEADLINE_GRACE_S`` past the deadline is cancelled and counted as an
``overran_deadline`` error, the frames it waited in printed to stderr (and a process
that is still alive long after that dumps its threads' stacks and exits non-zero). Only
the URL given is contacted (default: loopback).

Against several replicas behind a router (``scripts/serve-replicas``), give each
replica's own address with ``--metrics-url`` (repeatable; default ``--url``): samples
sum over them, and the summary reports each replica's requests, resumes and misses and
the resume rate. Chat sessions with ``--session-ids`` send the id as the ``X-Session-ID``
header (what a router hashes) and as the ``session_id`` body field. ``--retries N``
resends a turn whose request failed (a stream cut by a replica's loss, a 5xx), up to N
times; such attempts are counted apart from the errors.

``--dense-fraction F`` turns that share of the sessions into short plain-dense API
calls (``"sink": false`` in the body, ``--dense-tokens`` each, back to back), next to
the endless streams in the same batch; figures are then also reported per kind.

Measures per token (streamed with continuous usage stats, so token counts are exact):
time to first token, inter-token latency, aggregate tokens/s, errors by kind; samples
the server's /metrics (``vllm_sink:kv_blocks_reserved``, active requests, KV usage)
and, for a local server, the resident memory of its process tree (read on a thread),
every ``--metrics-interval`` seconds. Prints a table; ``--json PATH`` writes everything.

KV flatness: streams take blocks on demand, so the blocks in use grow until every
stream's cache holds its capacity (prompt + generated tokens past ``vllm_sink:capacity``).
With one endless request per stream (``--mode generate`` without ``--request-tokens``)
the time every stream got there is the plateau; from then on, while all streams run, the
blocks in use must not change ("KV blocks flat"). Runs that start a new request per turn
have no single plateau and are not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from vllm_sink.tools.servers import SessionTally, merge, parse_prometheus, sample_of

STARTUP_TIMEOUT_S = 60.0  # the server must list its model within this
DEADLINE_GRACE_S = 30.0  # in-flight requests must close within this after the deadline

__all__ = ["LoadConfig", "LoadTest", "TurnRecord", "format_table", "parse_prometheus"]

TOPICS = [
    "Tell me a long story about a lighthouse keeper and the sea.",
    "Explain in detail how a city grows over many centuries.",
    "Describe a journey across an endless desert, day by day.",
    "Let's plan a garden together. What should we plant first, and why?",
    "Teach me the history of mathematics, one era at a time.",
    "Invent a new board game and explain its rules in depth.",
]
FOLLOW_UPS = [
    "Go on.",
    "Tell me more about that.",
    "What happens next?",
    "Why is that?",
    "Can you give an example?",
    "Continue, please.",
]


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    sessions: int = 8
    duration: float | None = 60.0
    tokens: int | None = None  # per session
    mode: str = "generate"  # "generate" | "chat"
    turn_tokens: int = 64  # max tokens per chat turn
    request_tokens: int | None = None  # generate mode: tokens per request, then another
    max_turns: int = 10_000  # per session (bounds the request count)
    model: str | None = None
    api_key: str | None = None
    timeout: float = 600.0  # per request
    metrics_interval: float = 1.0
    seed: int = 0
    session_ids: bool = False  # send a stable session id per chat session (header + body)
    metrics_urls: list[str] | None = None  # the servers to scrape (default: [url])
    retries: int = 0  # resends of a turn whose request failed (not a 4xx)
    dense_fraction: float = 0.0  # share of sessions that are short dense requests
    dense_tokens: int = 64  # max tokens per dense request
    quiet: bool = False

    @property
    def dense_sessions(self) -> int:
        return round(self.dense_fraction * self.sessions)

    def is_dense(self, session: int) -> bool:
        # Spread the dense sessions evenly over the session indices.
        n = self.dense_sessions
        return n > 0 and (session * n) % self.sessions < n

    def validate(self) -> None:
        if self.mode not in ("generate", "chat"):
            raise ValueError("--mode must be 'generate' or 'chat'")
        if not 1 <= self.sessions <= 10_000:
            raise ValueError("--sessions must be in 1..10000")
        if self.duration is None and self.tokens is None:
            raise ValueError("give --duration and/or --tokens: the run must end by itself")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be > 0")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError("--tokens must be >= 1")
        if self.retries < 0:
            raise ValueError("--retries must be >= 0")
        if not 0.0 <= self.dense_fraction <= 1.0:
            raise ValueError("--dense-fraction must be between 0 and 1")
        if self.dense_tokens < 1:
            raise ValueError("--dense-tokens must be >= 1")
        for flag, url in [("--url", self.url)] + [("--metrics-url", u) for u in self.scraped]:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"{flag} must be an http(s) URL, got {url!r}")

    @property
    def scraped(self) -> list[str]:
        return list(self.metrics_urls or [self.url])


@dataclass
class TurnRecord:
    session: int
    turn: int
    start: float
    kind: str = "sink"  # "sink" (endless stream / chat) or "dense"
    ttft: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    detail: str | None = None  # first line of the error message
    retried: bool = False  # failed, and the turn was sent again
    stopped: bool = False  # closed by the run's end, not an error
    reached: float | None = None  # s since the start when its cache held capacity


def plateau_time(reached: list[float | None]) -> float | None:
    """When every stream's cache held its capacity (None: some stream never did)."""
    if not reached or any(r is None for r in reached):
        return None
    return max(reached)


def judge_flat(
    samples: list[dict], streams: int, plateau: float | None
) -> tuple[bool | None, list[int]]:
    """(flat, distinct block counts) over the samples scraped at or after the plateau
    while all ``streams`` ran; flat is None when no such sample exists."""
    if plateau is None or not streams:
        return None, []
    blocks = sorted(
        {
            int(s["vllm_sink:kv_blocks_reserved"])
            for s in samples
            if s["t"] >= plateau
            and s.get("vllm_sink:active_requests") == streams
            and "vllm_sink:kv_blocks_reserved" in s
        }
    )
    return (len(blocks) == 1 if blocks else None), blocks


def _has_text(chunk: dict) -> bool:
    return any(
        choice.get("text") or (choice.get("delta") or {}).get("content")
        for choice in chunk.get("choices") or []
    )


def session_id(seed: int, session: int) -> str:
    """The id chat session ``session`` sends with ``--session-ids``."""
    return f"loadtest-{seed}-{session}"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def _local_server_pid(port: int) -> int | None:
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN":
                return conn.pid
    except (psutil.AccessDenied, OSError):
        return None
    return None


def _tree_rss(pid: int) -> int | None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
        return sum(p.memory_info().rss for p in procs if p.is_running())
    except psutil.Error:
        return None


class RssProbe:
    """The resident memory of local servers' process trees, read on a daemon thread.

    psutil reads /proc, and a read of a busy process's /proc files can block (it waits
    for that process's memory map lock) for many seconds on a loaded machine. Done on
    the event loop, such a read stalls every stream the loop times, and the deadline
    with them; here it only delays the next reading. ``latest`` is the newest complete
    reading (None until one exists or when a server cannot be read)."""

    def __init__(self, ports: list[int], interval: float) -> None:
        import threading

        self.latest: int | None = None
        self._ports, self._interval = ports, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-probe", daemon=True)

    def start(self) -> RssProbe:
        if self._ports:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()  # a daemon thread blocked in a read never holds up the exit

    def _loop(self) -> None:
        pids = [_local_server_pid(p) for p in self._ports]
        if any(p is None for p in pids):
            return
        while not self._stop.is_set():
            rss = [_tree_rss(p) for p in pids]
            self.latest = sum(rss) if all(r is not None for r in rss) else None
            self._stop.wait(self._interval)


def _awaiting(coro) -> str:
    """The chain of frames a suspended coroutine waits in, outermost first (what
    ``Task.print_stack`` does not show: it stops at the task's own frame)."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(
                f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n"
            )
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "".join(lines) or "  (no frames)\n"


class LoadTest:
    def __init__(self, config: LoadConfig) -> None:
        config.validate()
        self.cfg = config
        self.turns: list[TurnRecord] = []
        self.samples: list[dict] = []
        self.t0 = 0.0
        self.deadline = math.inf
        self.session_tokens = [0] * config.sessions
        self.stop = asyncio.Event()
        self.capacity: int | None = None  # the engine's vllm_sink:capacity, if served
        self.tally = SessionTally(config.scraped)
        self.overdue = 0  # sessions cancelled after the deadline's grace
        local = [urlparse(u) for u in config.scraped]
        self.rss = RssProbe(
            [u.port or 80 for u in local if u.hostname in ("127.0.0.1", "localhost", "::1")],
            config.metrics_interval,
        )

    # ---- HTTP ------------------------------------------------------------------------
    def _headers(self, session_id: str | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            h["Authorization"] = f"Bearer {self.cfg.api_key}"
        if session_id:
            # What vllm-router's consistent_hash hashes (it ignores the body field).
            h["X-Session-ID"] = session_id
        return h

    async def _model(self, http) -> str:
        if self.cfg.model:
            return self.cfg.model
        import aiohttp

        async with http.get(
            self.cfg.url.rstrip("/") + "/v1/models",
            headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=STARTUP_TIMEOUT_S),
        ) as r:
            r.raise_for_status()
            return (await r.json())["data"][0]["id"]

    async def _stream(self, http, path: str, body: dict, rec: TurnRecord) -> str:
        """POST a streamed request; fill ``rec``; return the generated text."""
        import aiohttp

        body = {
            **body,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        text_parts: list[str] = []
        last = None
        done = False
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout)
        headers = self._headers(body.get("session_id"))
        async with http.post(
            self.cfg.url.rstrip("/") + path, json=body, headers=headers, timeout=timeout
        ) as r:
            if r.status != 200:
                detail = (await r.text())[:200]
                rec.error = f"http_{r.status}"
                raise RuntimeError(f"HTTP {r.status}: {detail}")
            async for raw in r.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = "stream_error"
                    raise RuntimeError(str(chunk["error"])[:200])
                usage = chunk.get("usage") or {}
                n = usage.get("completion_tokens")
                if n is None and _has_text(chunk):
                    # No per-chunk usage (vllm-router drops continuous_usage_stats):
                    # vLLM streams one delta per token; the final usage corrects the count.
                    n = rec.tokens + 1
                if usage.get("prompt_tokens") and not rec.prompt_tokens:
                    rec.prompt_tokens = usage["prompt_tokens"]
                if n is None or n <= rec.tokens:
                    continue
                now = time.monotonic()
                if rec.ttft is None:
                    rec.ttft = now - rec.start
                elif last is not None:
                    gap = (now - last) / (n - rec.tokens)
                    rec.itl.extend([gap] * (n - rec.tokens))
                last = now
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text_parts.append(choice.get("text") or delta.get("content") or "")
                self.session_tokens[rec.session] += n - rec.tokens
                rec.tokens = n
                if rec.reached is None and self.capacity and rec.prompt_tokens + n > self.capacity:
                    rec.reached = round(now - self.t0, 3)
                if self._session_done(rec.session):
                    rec.stopped = True
                    break
        if not done and not rec.stopped:
            rec.error = "incomplete_stream"  # the body ended before [DONE]
            raise RuntimeError("the stream ended before [DONE]")
        return "".join(text_parts)

    def _session_done(self, session: int) -> bool:
        if self.stop.is_set() or time.monotonic() >= self.deadline:
            return True
        return self.cfg.tokens is not None and self.session_tokens[session] >= self.cfg.tokens

    # ---- sessions ----------------------------------------------------------------------
    async def _turn(self, http, session: int, turn: int, path: str, body: dict) -> str | None:
        """One turn: its reply, or None when it failed (after ``retries`` resends) or the
        run ended. A 4xx is the request's own fault and is not resent."""
        for attempt in range(self.cfg.retries + 1):
            rec = TurnRecord(
                session,
                turn,
                time.monotonic(),
                kind="dense" if body.get("sink") is False else "sink",
            )
            self.turns.append(rec)
            reply = await self._attempt(http, path, body, rec)
            failed = rec.error is not None and not rec.error.startswith("http_4")
            if reply is not None or not failed or attempt == self.cfg.retries:
                return reply
            if self._session_done(session):
                return None
            rec.retried = True
        return None

    async def _attempt(self, http, path: str, body: dict, rec: TurnRecord) -> str | None:
        remaining = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(
                self._stream(http, path, body, rec),
                timeout=max(0.01, min(self.cfg.timeout, remaining)),
            )
        except asyncio.TimeoutError:
            if time.monotonic() >= self.deadline - 0.05:
                rec.stopped = True  # the run ended mid-request: a client disconnect
            else:
                rec.error = rec.error or "timeout"
        except asyncio.CancelledError:
            rec.stopped = True
            raise
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            rec.error = rec.error or type(e).__name__
            rec.detail = str(e).splitlines()[0][:300] if str(e) else None
        return None

    async def _session(self, http, session: int, model: str) -> None:
        rng = random.Random(self.cfg.seed * 100_003 + session)
        topic = TOPICS[session % len(TOPICS)]
        if self.cfg.is_dense(session):
            # Short plain API calls, back to back: vanilla vLLM behaviour in the batch.
            for turn in range(self.cfg.max_turns):
                if self._session_done(session):
                    return
                left = (
                    (self.cfg.tokens - self.session_tokens[session])
                    if self.cfg.tokens
                    else self.cfg.dense_tokens
                )
                body = {
                    "model": model,
                    "prompt": topic,
                    "sink": False,
                    "max_tokens": min(left, self.cfg.dense_tokens),
                    "temperature": 0.8,
                    "top_p": 0.95,
                    "ignore_eos": True,
                    "seed": self.cfg.seed + 7919 * session + turn,
                }
                if await self._turn(http, session, turn, "/v1/completions", body) is None:
                    return
            return
        if self.cfg.mode == "generate":
            # One endless completion, or (request_tokens) back-to-back long completions.
            for turn in range(self.cfg.max_turns):
                if self._session_done(session):
                    return
                left = (
                    (self.cfg.tokens - self.session_tokens[session]) if self.cfg.tokens else 1 << 29
                )
                max_tokens = min(left, self.cfg.request_tokens or left)
                body = {
                    "model": model,
                    "prompt": topic,
                    "max_tokens": max_tokens,
                    "temperature": 0.8,
                    "top_p": 0.95,
                    "ignore_eos": True,
                    "seed": self.cfg.seed + 7919 * session + turn,
                }
                if await self._turn(http, session, turn, "/v1/completions", body) is None:
                    return
            return
        messages = [{"role": "user", "content": topic}]
        for turn in range(self.cfg.max_turns):
            if self._session_done(session):
                return
            left = (self.cfg.tokens - self.session_tokens[session]) if self.cfg.tokens else None
            body = {
                "model": model,
                "messages": messages,
                "temperature": 0.8,
                "top_p": 0.95,
                "max_tokens": min(self.cfg.turn_tokens, left or 1 << 30),
                "seed": self.cfg.seed + 7919 * session + turn,
            }
            if self.cfg.session_ids:
                body["session_id"] = session_id(self.cfg.seed, session)
            reply = await self._turn(http, session, turn, "/v1/chat/completions", body)
            if reply is None:
                return
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": rng.choice(FOLLOW_UPS)},
            ]

    async def _scrape(self, http, url: str) -> str | None:
        """``url``'s /metrics text, or None when it does not answer."""
        import aiohttp

        try:
            async with http.get(
                url.rstrip("/") + "/metrics",
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=10),
            ) as r:
                return await r.text() if r.status == 200 else None
        except Exception:  # noqa: BLE001 - a server that does not answer is recorded
            return None

    async def _scrape_all(self, http) -> list[str | None]:
        urls = self.cfg.scraped
        texts = await asyncio.gather(*(self._scrape(http, u) for u in urls))
        for url, text in zip(urls, texts):
            self.tally.seen(url, text)
        return texts

    async def _capacity(self, http) -> int | None:
        """The engine's capacity (None: flatness is not judged); starts the tally."""
        texts = await self._scrape_all(http)
        value = max(
            (parse_prometheus(t).get("vllm_sink:capacity") or 0 for t in texts if t), default=0
        )
        return int(value) or None

    def _plateau(self) -> float | None:
        """When every stream held its capacity, for runs of one request per stream."""
        if self.cfg.mode != "generate" or self.cfg.request_tokens:
            return None
        first = {t.session: t for t in self.turns if t.kind == "sink" and t.turn == 0}
        streams = [s for s in range(self.cfg.sessions) if not self.cfg.is_dense(s)]
        return plateau_time([first[s].reached if s in first else None for s in streams])

    # ---- sampling and display ----------------------------------------------------------
    async def _sampler(self, http) -> None:
        while True:
            sample: dict = {"t": round(time.monotonic() - self.t0, 3)}
            texts = await self._scrape_all(http)
            sample.update(merge([sample_of(t) for t in texts if t is not None]))
            lost = [u for u, t in zip(self.cfg.scraped, texts) if t is None]
            if lost:
                sample["unreachable"] = lost
            if self.rss.latest is not None:
                sample["server_rss_bytes"] = self.rss.latest
            self.samples.append(sample)
            if not self.cfg.quiet:
                self._progress(sample)
            await asyncio.sleep(self.cfg.metrics_interval)

    def _progress(self, sample: dict) -> None:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        tokens = sum(self.session_tokens)
        errors = sum(1 for t in self.turns if t.error and not t.retried)
        blocks = sample.get("vllm_sink:kv_blocks_reserved")
        rss = sample.get("server_rss_bytes")
        sys.stderr.write(
            f"\r[{elapsed:6.1f}s] sessions {self.cfg.sessions} | tokens {tokens} | "
            f"{tokens / elapsed:7.1f} tok/s | errors {errors} | blocks "
            f"{'-' if blocks is None else int(blocks)}"
            + ("" if rss is None else f" | server RSS {rss / 2**20:.0f} MiB")
            + "   "
        )
        sys.stderr.flush()

    # ---- run ---------------------------------------------------------------------------
    async def _sessions(self, http, model: str) -> None:
        """Run every session; past the deadline (+ a grace for in-flight requests to
        close) a session still running is overdue: its stack goes to stderr, it is
        cancelled and counted as an ``overran_deadline`` error."""
        tasks = [
            asyncio.create_task(self._session(http, s, model)) for s in range(self.cfg.sessions)
        ]
        limit = None
        if math.isfinite(self.deadline):
            limit = max(0.0, self.deadline - time.monotonic()) + DEADLINE_GRACE_S
        done, pending = await asyncio.wait(tasks, timeout=limit)
        for task in pending:
            sys.stderr.write(
                f"vllm-sink loadtest: a session is still running {DEADLINE_GRACE_S:.0f} s "
                "past the run's deadline; it waits in:\n" + _awaiting(task.get_coro())
            )
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=DEADLINE_GRACE_S)
            self.overdue = len(pending)
        for task in done:
            task.result()  # a session's own exception (a bug) ends the run loudly

    async def run(self) -> dict:
        self.rss.start()
        try:
            return await self._run()
        finally:
            self.rss.close()

    async def _run(self) -> dict:
        import aiohttp

        conn = aiohttp.TCPConnector(limit=self.cfg.sessions + 4)
        async with aiohttp.ClientSession(connector=conn) as http:
            model = await self._model(http)
            self.capacity = await self._capacity(http)
            self.t0 = time.monotonic()
            if self.cfg.duration is not None:
                self.deadline = self.t0 + self.cfg.duration
            sampler = asyncio.create_task(self._sampler(http))
            try:
                await self._sessions(http, model)
            finally:
                elapsed = time.monotonic() - self.t0
                sampler.cancel()
                try:
                    await sampler
                except asyncio.CancelledError:
                    pass
            # One last sample after the sessions ended (blocks should be back).
            await asyncio.sleep(min(2.0, self.cfg.metrics_interval * 2))
            final = asyncio.create_task(self._sampler(http))
            await asyncio.sleep(0.2)
            final.cancel()
            try:
                await final
            except asyncio.CancelledError:
                pass
        if not self.cfg.quiet:
            sys.stderr.write("\n")
        return self.summary(model, elapsed)

    def summary(self, model: str, elapsed: float) -> dict:
        ttft = [t.ttft for t in self.turns if t.ttft is not None]
        itl = [g for t in self.turns for g in t.itl]
        errors = Counter(t.error for t in self.turns if t.error and not t.retried)
        if self.overdue:
            errors["overran_deadline"] = self.overdue
        retried = Counter(t.error for t in self.turns if t.retried)
        chat_ids = self.cfg.mode == "chat" and self.cfg.session_ids
        first_turns = len({t.session for t in self.turns if t.kind == "sink"}) if chat_ids else 0
        tokens = sum(self.session_tokens)
        streams = self.cfg.sessions - self.cfg.dense_sessions
        full = [
            s for s in self.samples if streams and s.get("vllm_sink:active_requests") == streams
        ]
        blocks_full = sorted(
            {
                int(s["vllm_sink:kv_blocks_reserved"])
                for s in full
                if "vllm_sink:kv_blocks_reserved" in s
            }
        )
        plateau = self._plateau()
        flat, blocks_plateau = judge_flat(self.samples, streams, plateau)
        # Streams take blocks as they grow, each at most blocks_per_request of them:
        # every sample must stay within active streams x that bound.
        bound = [
            (
                s["vllm_sink:kv_blocks_reserved"],
                s["vllm_sink:active_requests"] * s["vllm_sink:blocks_per_request"],
            )
            for s in self.samples
            if "vllm_sink:blocks_per_request" in s
            and "vllm_sink:kv_blocks_reserved" in s
            and "vllm_sink:active_requests" in s
        ]
        rss = [s["server_rss_bytes"] for s in self.samples if s.get("server_rss_bytes")]
        ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
        by_turn: dict[int, list[float]] = {}
        prompt_by_turn: dict[int, list[int]] = {}
        for t in self.turns:
            if t.ttft is not None:
                by_turn.setdefault(t.turn, []).append(t.ttft)
                prompt_by_turn.setdefault(t.turn, []).append(t.prompt_tokens)
        return {
            "config": asdict(self.cfg),
            "model": model,
            "sessions": self.cfg.sessions,
            "requests": len(self.turns),
            "elapsed_s": round(elapsed, 2),
            "total_tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
            "ttft_ms": {f"p{q}": ms(_pct(ttft, q)) for q in (50, 90, 99)},
            "itl_ms": {f"p{q}": ms(_pct(itl, q)) for q in (50, 90, 99)},
            "ttft_by_turn_ms": {turn: ms(_pct(v, 50)) for turn, v in sorted(by_turn.items())},
            "prompt_tokens_by_turn": {
                turn: int(_pct(v, 50)) for turn, v in sorted(prompt_by_turn.items())
            },
            "errors": dict(errors),
            "error_count": sum(errors.values()),
            "error_examples": {t.error: t.detail for t in self.turns if t.error},
            "retried": dict(retried),
            "retried_count": sum(retried.values()),
            **self.tally.summary(first_turns),
            "kv_blocks_while_all_active": blocks_full,
            "kv_plateau_s": plateau,
            "kv_blocks_at_plateau": blocks_plateau,
            "kv_blocks_flat": flat,
            "kv_blocks_within_bound": all(b <= m for b, m in bound) if bound else None,
            "kv_blocks_after": (
                self.samples[-1].get("vllm_sink:kv_blocks_reserved") if self.samples else None
            ),
            "server_rss_mib": (
                {
                    "first": round(rss[0] / 2**20, 1),
                    "max": round(max(rss) / 2**20, 1),
                    "last": round(rss[-1] / 2**20, 1),
                }
                if rss
                else None
            ),
            "by_kind": self._by_kind(elapsed) if self.cfg.dense_sessions else None,
            "samples": self.samples,
            "turns": [{k: v for k, v in asdict(t).items() if k != "itl"} for t in self.turns],
        }

    def _by_kind(self, elapsed: float) -> dict:
        out = {}
        for kind in ("sink", "dense"):
            turns = [t for t in self.turns if t.kind == kind]
            ttft = [t.ttft for t in turns if t.ttft is not None]
            itl = [g for t in turns for g in t.itl]
            tokens = sum(t.tokens for t in turns)
            dense = self.cfg.dense_sessions
            out[kind] = {
                "sessions": dense if kind == "dense" else self.cfg.sessions - dense,
                "requests": len(turns),
                "tokens": tokens,
                "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else 0.0,
                "ttft_ms_p50": None if not ttft else round(_pct(ttft, 50) * 1000, 2),
                "itl_ms_p50": None if not itl else round(_pct(itl, 50) * 1000, 2),
                "errors": sum(1 for t in turns if t.error and not t.retried),
            }
        return out


def _turn_line(s: dict) -> str:
    items = list(s["ttft_by_turn_ms"].items())
    if len(items) > 8:  # first 4 and last 4 turns
        items = items[:4] + [("..", "..")] + items[-4:]
    return " ".join(f"{t}:{v}" for t, v in items)


def _blocks_line(blocks: list[int]) -> str:
    if not blocks:
        return "-"
    if len(blocks) <= 6:
        return str(blocks)
    return f"{len(blocks)} values, {blocks[0]}..{blocks[-1]}"


def _servers_line(servers: dict) -> str:
    return "  ".join(
        f"{url}: "
        + ("-" if v is None else f"{v['requests']}/{v['resumes']}")
        + ("" if v is None or v["answered_last_scrape"] else " (lost)")
        for url, v in servers.items()
    )


def format_table(s: dict) -> str:
    rows = [
        ("sessions", s["sessions"]),
        ("requests", s["requests"]),
        ("elapsed (s)", s["elapsed_s"]),
        ("total tokens", s["total_tokens"]),
        ("aggregate tokens/s", s["tokens_per_s"]),
        ("TTFT p50/p90/p99 (ms)", "/".join(str(v) for v in s["ttft_ms"].values())),
        *([("TTFT p50 by turn (ms)", _turn_line(s))] if len(s["ttft_by_turn_ms"]) > 1 else []),
        ("ITL p50/p90/p99 (ms)", "/".join(str(v) for v in s["itl_ms"].values())),
        (
            "errors",
            s["error_count"]
            if not s["errors"]
            else f"{s['error_count']} " + json.dumps(s["errors"]),
        ),
        *(
            [("failed and resent (--retries)", f"{s['retried_count']} " + json.dumps(s["retried"]))]
            if s.get("retried_count")
            else []
        ),
        *([("resume rate (follow-up turns)", s["resume_rate"])] if s.get("resume_rate") else []),
        *(
            [("session requests / resumes per server", _servers_line(s["servers"]))]
            if len(s.get("servers") or {}) > 1
            else []
        ),
        *[
            (
                f"{kind} sessions: tokens/s, TTFT/ITL p50 ms",
                f"{v['sessions']} sessions, {v['requests']} requests: {v['tokens_per_s']} tok/s, "
                f"{v['ttft_ms_p50']}/{v['itl_ms_p50']}, {v['errors']} errors",
            )
            for kind, v in (s.get("by_kind") or {}).items()
        ],
        ("KV blocks while all active", _blocks_line(s["kv_blocks_while_all_active"])),
        (
            "time to KV plateau (s)",
            "not reached" if s["kv_plateau_s"] is None else s["kv_plateau_s"],
        ),
        ("KV blocks after plateau", _blocks_line(s["kv_blocks_at_plateau"])),
        (
            "KV blocks flat / within streams x max",
            f"{s['kv_blocks_flat']} / {s['kv_blocks_within_bound']}",
        ),
        ("KV blocks after run", s["kv_blocks_after"]),
        (
            "server RSS MiB first/max/last",
            "-"
            if not s["server_rss_mib"]
            else "/".join(str(v) for v in s["server_rss_mib"].values()),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LoadConfig()
    p.add_argument("--url", default=d.url, help="server base URL (default: loopback)")
    p.add_argument("--sessions", type=int, default=d.sessions)
    p.add_argument(
        "--duration", type=float, default=None, help="seconds (default 60 unless --tokens is given)"
    )
    p.add_argument("--tokens", type=int, default=None, help="tokens per session")
    p.add_argument("--mode", choices=["generate", "chat"], default=d.mode)
    p.add_argument(
        "--turn-tokens", type=int, default=d.turn_tokens, help="chat mode: max tokens per turn"
    )
    p.add_argument(
        "--request-tokens",
        type=int,
        default=None,
        help="generate mode: tokens per request, then start another "
        "(default: one endless request per session)",
    )
    p.add_argument("--max-turns", type=int, default=d.max_turns)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=d.timeout, help="per request (s)")
    p.add_argument("--metrics-interval", type=float, default=d.metrics_interval)
    p.add_argument(
        "--session-ids",
        action="store_true",
        help="send a stable session id per chat session (X-Session-ID header and body field)",
    )
    p.add_argument(
        "--metrics-url",
        action="append",
        default=None,
        help="a server to scrape /metrics from (repeatable; default --url): each replica "
        "behind a router",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=d.retries,
        help="resend a turn whose request failed (not a 4xx) up to N times",
    )
    p.add_argument(
        "--dense-fraction",
        type=float,
        default=d.dense_fraction,
        help="share of sessions that are short plain-dense requests (\"sink\": false), e.g. 0.9",
    )
    p.add_argument(
        "--dense-tokens", type=int, default=d.dense_tokens, help="max tokens per dense request"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--quiet", action="store_true", help="no live progress line")


def run_from_args(args: argparse.Namespace) -> int:
    duration = (
        args.duration if args.duration is not None else (None if args.tokens is not None else 60.0)
    )
    cfg = LoadConfig(
        url=args.url,
        sessions=args.sessions,
        duration=duration,
        tokens=args.tokens,
        mode=args.mode,
        turn_tokens=args.turn_tokens,
        request_tokens=args.request_tokens,
        max_turns=args.max_turns,
        model=args.model,
        api_key=args.api_key,
        timeout=args.timeout,
        metrics_interval=args.metrics_interval,
        seed=args.seed,
        session_ids=args.session_ids,
        metrics_urls=args.metrics_url,
        retries=args.retries,
        dense_fraction=args.dense_fraction,
        dense_tokens=args.dense_tokens,
        quiet=args.quiet,
    )
    if duration is not None:
        # Last resort against a hang outside the event loop's reach (a blocking call):
        # dump every thread's stack and exit non-zero well after the run should be over.
        faulthandler.dump_traceback_later(
            duration + STARTUP_TIMEOUT_S + 3 * DEADLINE_GRACE_S + 30, exit=True
        )
    try:
        summary = asyncio.run(LoadTest(cfg).run())
    except ValueError as e:
        print(f"vllm-sink loadtest: {e}", file=sys.stderr)
        return 2
    faulthandler.cancel_dump_traceback_later()
    print(format_table(summary))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 1 if summary["error_count"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vllm-sink loadtest", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
