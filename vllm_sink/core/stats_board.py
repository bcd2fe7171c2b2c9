"""A tiny shared counter board: the worker writes sink counters, the frontend reads them.

vLLM has no channel for plugin-defined engine statistics, and the evictions happen in
the worker process while ``/metrics`` is served by the API server. The worker (rank 0)
and the scheduler keep their counters in small memory-mapped files; the frontend's
Prometheus collector reads them at scrape time. Fixed layout: one int64 per field, in
``FIELDS`` order. No vLLM imports.

Where: one private directory per engine (``make_private_dir``: ``mkdtemp``, mode 0700,
under ``/dev/shm`` where available), made by the frontend and named to the processes it
starts in the environment variable ``STATS_DIR_ENV`` (the engine config is not the
place: vLLM hashes ``additional_config`` into its compile-cache key, and a fresh path
per start would miss that cache every time). Boards are created exclusively
(``O_EXCL``, ``O_NOFOLLOW``, mode 0600) by their one writer; the frontend removes the
directory when its engine goes away.
"""

from __future__ import annotations

import os
import stat
import tempfile

import numpy as np

# Not VLLM_-prefixed: vLLM warns about (or, with --fail-on-environ-validation, refuses)
# environment variables of its prefix it does not know.
STATS_DIR_ENV = "VLLMSINK_STATS_DIR"

FIELDS = (
    "active_requests",  # sink requests the worker currently holds
    "kv_blocks_reserved",  # blocks those requests hold (they grow up to their block set)
    "requests",  # sink requests started (cumulative)
    "evictions",  # eviction events (cumulative)
    "tokens_evicted",  # window tokens evicted (cumulative)
    "rebases",  # position-offset rebases (cumulative)
    "sink_rewrites",  # sink-key rewrites from the pristine snapshot (cumulative)
    "kv_saves",  # preempted streams whose cached KV was saved (cumulative)
    "kv_restores",  # ... and restored on resume (cumulative)
    "tokens_restored",  # cached tokens restored instead of recomputed (cumulative)
    "sink_tokens",  # effective layout ...
    "window_tokens",
    "capacity",
    "block_size",
    "position_limit",
    "prefill_chunk_tokens",
    "blocks_per_request",  # the most blocks one stream of the default layout holds
)

# Written by the scheduler (EngineCore) after every schedule(): its pool and sessions.
SESSION_FIELDS = (
    "running_requests",  # requests the scheduler is running, dense and sink
    "running_sink",  # ... of which endless streams
    "running_dense",  # ... of which plain dense requests
    "blocks_sink",  # KV blocks held by running streams
    "blocks_dense",  # KV blocks held by running dense requests
    "requests_sink",  # stream requests received (cumulative)
    "requests_dense",  # dense requests received (cumulative)
    "preempted_sink",  # stream preemptions (cumulative; resumed without recompute)
    "preempted_dense",  # dense preemptions (cumulative; vLLM recomputes them)
    "pool_blocks_in_use",  # blocks taken from the KV pool (running + parked)
    "parked_sessions",  # sessions whose KV is parked
    "blocks_parked",  # KV blocks they hold
    "session_requests",  # requests that carried a session id (cumulative)
    "resumes",  # requests that resumed a parked session (cumulative)
    "miss_none_parked",  # no parked KV for the id (first turn, evicted, expired)
    "miss_prefix",  # the prompt does not start with the parked tokens
    "miss_no_new_tokens",  # the prompt is exactly the parked tokens
    "miss_in_use",  # the session is already running in another request
    "miss_prompt_logprobs",  # prompt log-probs need the whole prompt recomputed
    "miss_layout",  # the request asks for another sink layout than the parked one
    "parked_evictions",  # parked sessions dropped to make room (LRU) or over the cap
    "parked_expired",  # parked sessions dropped after the idle timeout
    "parked_reset",  # parked sessions dropped by a prefix-cache reset
    "kv_saved_bytes",  # host bytes (per worker) reserved for preempted streams' KV
    "kv_saved_cap_bytes",  # ... and its cap (max_saved_kv_gib)
    "kv_saves_refused",  # preempted streams finished: their KV did not fit the cap
    "streams_lost_reset",  # preempted streams finished: a reset invalidated their KV
)


def make_private_dir() -> str:
    """A new directory only this user can enter (``mkdtemp``: created here, mode 0700)."""
    root = (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else tempfile.gettempdir()
    )
    return tempfile.mkdtemp(prefix="vllm_sink-", dir=root)


def check_private_dir(path: str) -> str:
    """``path`` if it is a real directory of this user that no one else may enter."""
    info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):
        raise PermissionError(
            f"{STATS_DIR_ENV}={path} is not a private directory of "
            "this user (mode 0700, not a symlink)"
        )
    return path


def stats_dir() -> str:
    """This engine's directory, as its frontend named it; a new private one if no
    frontend did (then no /metrics reads these boards)."""
    path = os.environ.get(STATS_DIR_ENV)
    if not path:
        path = os.environ[STATS_DIR_ENV] = make_private_dir()
    return check_private_dir(path)


def board_path(role: str = "worker", directory: str | None = None) -> str:
    return os.path.join(directory or stats_dir(), f"{role}.stats")


def _create(path: str, size: int) -> None:
    """A new regular file of ``size`` zero bytes, never an existing file or link: a
    board left by an earlier engine core of the same frontend (a restart) is replaced."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, bytes(size))
    finally:
        os.close(fd)


class StatsBoard:
    def __init__(self, path: str, create: bool = False, fields: tuple[str, ...] = FIELDS) -> None:
        self.path = path
        self.fields = fields
        self._index = {name: i for i, name in enumerate(fields)}
        if create:
            _create(path, 8 * len(fields))
        self._array = np.memmap(
            path, dtype=np.int64, mode="r+" if create else "r", shape=(len(fields),)
        )

    @classmethod
    def open(cls, path: str, fields: tuple[str, ...] = FIELDS) -> StatsBoard | None:
        try:
            return cls(path, fields=fields)
        except (OSError, ValueError):
            return None

    def write(self, values: dict[str, int]) -> None:
        for name, value in values.items():
            self._array[self._index[name]] = int(value)

    def read(self) -> dict[str, int]:
        return {name: int(v) for name, v in zip(self.fields, np.array(self._array))}

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
