"""EngineCore: persistent sessions: park a finished sink request's KV, resume it later.

When a sink request carrying a session id finishes normally, its block set is *parked*
instead of freed: the blocks stay out of the pool and the scheduler remembers how many
tokens they hold (A) and a digest of those tokens. The next request with the same
session key whose prompt starts with exactly those A tokens *resumes*: it gets the
parked blocks as already-computed (like a prefix-cache hit of A tokens) and only the
new tokens are prefilled. Anything else is a miss (counted by reason) and runs as a
fresh stream. Parked sessions are bounded: least recently parked first, they are
dropped when waiting requests need blocks, when there are more than
``max_parked_sessions``, or after ``session_idle_timeout`` seconds. Running requests
always win over parked sessions.

Session keys: ``request.session_id``, namespaced by the frontend with the caller's
credentials whichever way the id arrived (``session_key``).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np

from vllm_sink.patches import _directives


def digest(tokens) -> bytes:
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(),
                           digest_size=16).digest()


@dataclass
class Parked:
    blocks: tuple[list, ...]      # KVCacheBlock lists, one per KV group, allocation order
    layout: object                # the stream's SinkLayout: a resume must ask for the same
    length: int                   # A: tokens whose KV the blocks hold (absolute)
    digest: bytes                 # digest of those A token ids
    parked_at: float
    claimed_by: str | None = None  # request id that resumed it, until it adopts the blocks


def session_key(request) -> str | None:
    """The namespaced key ``<owner>:<id>``: the frontend's admission
    (``patches/frontend/session_ids.py``) moved every way a session id arrives into
    ``request.session_id`` and bound it to the caller."""
    return request.session_id or None


class SessionStore:
    def __init__(self, scheduler, sink) -> None:
        config = sink.config
        self.sched = scheduler
        self.enabled = config.sessions and config.max_parked_sessions > 0
        self.cap = config.max_parked_sessions
        self.timeout = config.session_idle_timeout
        self.blocks_per_request = sink.layout.blocks_per_request  # the most a stream holds
        self.parked: OrderedDict[str, Parked] = OrderedDict()
        self.running: dict[str, str] = {}          # session key -> running request id
        self.counters: Counter = Counter()
        self._seq = 0                               # orders directives to the workers

    def _directive(self, make, *args) -> None:
        self._seq += 1
        self.sched.finished_req_ids.add(make(self._seq, *args))

    @property
    def _managers(self):
        return self.sched.kv_cache_manager.coordinator.single_type_managers

    # ---- finish: park instead of free ----------------------------------------------------
    def on_finish(self, request) -> bool:
        """Take the request's blocks into parking; False means free them as usual."""
        from vllm.v1.request import RequestStatus

        key = session_key(request)
        if key is not None and self.running.get(key) == request.request_id:
            del self.running[key]
        for p in self.parked.values():      # a resume that never got admitted
            if p.claimed_by == request.request_id:
                p.claimed_by = None
        if not self.enabled or key is None or request.num_computed_tokens <= 0 or \
                request.status not in (RequestStatus.FINISHED_STOPPED,
                                       RequestStatus.FINISHED_LENGTH_CAPPED):
            return False
        if not all(m.req_to_blocks.get(request.request_id) for m in self._managers):
            return False
        if key in self.parked:
            self._drop(key, None)
        blocks = tuple(m.req_to_blocks.pop(request.request_id) for m in self._managers)
        for m in self._managers:
            m.num_cached_block.pop(request.request_id, None)
        A = request.num_computed_tokens
        self.parked[key] = Parked(blocks, self.sched.sink_layouts[request.request_id], A,
                                  digest(request.all_token_ids[:A]), time.monotonic())
        self._directive(_directives.park, request.request_id, key)
        while len(self.parked) > self.cap:
            if not self._evict_lru("parked_evictions"):
                break
        return True

    # ---- admission: resume -------------------------------------------------------------
    def try_resume(self, request):
        """(blocks per group, A) if ``request`` resumes a parked session, else None."""
        key = session_key(request)
        if not self.enabled or key is None:
            return None
        params = request.sampling_params
        p = self.parked.get(key)
        if p is not None and p.claimed_by == request.request_id:
            return p.blocks, p.length                 # asked again: not admitted yet
        self.counters["session_requests"] += 1
        reason = None
        if p is None or p.claimed_by is not None:
            reason = "miss_in_use" if key in self.running else "miss_none_parked"
        elif params is not None and params.prompt_logprobs is not None:
            reason = "miss_prompt_logprobs"
        elif self.sched.sink_layouts.get(request.request_id) != p.layout:
            reason = "miss_layout"
        else:
            tokens = request.prompt_token_ids or []
            if digest(tokens[:p.length]) != p.digest or len(tokens) < p.length:
                reason = "miss_prefix"
            elif len(tokens) == p.length:
                reason = "miss_no_new_tokens"
        if reason is not None:
            self.counters[reason] += 1
            if reason in ("miss_prefix", "miss_no_new_tokens", "miss_prompt_logprobs",
                          "miss_layout"):
                self._drop(key, None)   # the conversation moved on: parked KV is stale
            self.running[key] = request.request_id
            return None
        p.claimed_by = request.request_id
        extra = dict(params.extra_args or {})
        extra[_directives.RESUME_ARG] = key
        params.extra_args = extra
        self.counters["resumes"] += 1
        self.running[key] = request.request_id
        return p.blocks, p.length

    def adopted(self, request_id: str) -> None:
        """The resumed request now owns its blocks: the session is no longer parked."""
        for key, p in list(self.parked.items()):
            if p.claimed_by == request_id:
                del self.parked[key]

    # ---- bounds ------------------------------------------------------------------------
    def before_schedule(self) -> None:
        if not self.parked:
            return
        # ``parked`` is in parking order (a re-park drops and re-inserts), so parked_at
        # only grows along it: stop at the first session that is still fresh.
        now = time.monotonic()
        for key, p in list(self.parked.items()):
            if now - p.parked_at <= self.timeout:
                break
            if p.claimed_by is None:
                self._drop(key, "parked_expired")
        sched = self.sched
        if sched.waiting:
            slots = max(0, sched.max_num_running_reqs - len(sched.running))
            need = self.blocks_per_request * len(self._managers) * min(len(sched.waiting), slots)
            pool = sched.kv_cache_manager.block_pool
            while pool.get_num_free_blocks() < need and self._evict_lru("parked_evictions"):
                pass

    def _evict_lru(self, reason: str) -> bool:
        for key, p in self.parked.items():
            if p.claimed_by is None:
                self._drop(key, reason)
                return True
        return False

    def _drop(self, key: str, reason: str | None) -> None:
        p = self.parked.pop(key)
        pool = self.sched.kv_cache_manager.block_pool
        for blocks in p.blocks:
            pool.free_blocks(reversed(blocks))
        self._directive(_directives.drop, key)
        if reason:
            self.counters[reason] += 1

    def stats(self) -> dict[str, int]:
        return {**{k: int(v) for k, v in self.counters.items()},
                "parked_sessions": len(self.parked),
                "blocks_parked": sum(len(b) for p in self.parked.values() for b in p.blocks)}
