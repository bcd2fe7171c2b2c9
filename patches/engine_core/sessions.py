"""EngineCore: persistent sessions: park a finished sink request's KV, resume it later.

When a sink request carrying a session id finishes normally, its block set is *parked*
instead of freed: the blocks stay out of the pool and the scheduler remembers how many
tokens they hold (A) and a digest of those tokens. The next request with the same
session key whose prompt starts with exactly those A tokens *resumes*: it gets the
parked blocks as already-computed (like a prefix-cache hit of A tokens) and only the
new tokens are prefilled. Anything else is a miss (counted by reason) and runs as a
fresh stream.

A resume first *claims* the session (vLLM asks for a waiting request's computed blocks
before it knows whether the request's new blocks fit) and *adopts* its blocks once the
request is admitted; until then the claim holds, however often vLLM asks again. While
claimed, a session is never dropped or replaced by another request: a request with the
same key that finishes meanwhile frees its own blocks instead of parking them. A claim
ends by adoption, by the claimant finishing (aborted while waiting: the session is
parked again, its idle time restarting), or by the session being dropped for a running
request's room or by a prefix-cache reset (the claimant then runs as a fresh stream).
A request that misses never carries the resume argument.

Parked sessions are bounded and always yield to requests: least recently parked first,
unclaimed ones are dropped whenever an allocation for a running or waiting request
fails (``make_room``; for a running request claimed ones too, once no other is left),
when there are more than ``max_parked_sessions``, or after ``session_idle_timeout``
seconds idle. Every step's bookkeeping is O(changes): the
unclaimed sessions are kept in parking order (idle times grow along it), claimed ones
apart, and the parked block count is kept as a running total.

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
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass
class Parked:
    blocks: tuple[list, ...]  # KVCacheBlock lists, one per KV group, allocation order
    layout: object  # the stream's SinkLayout: a resume must ask for the same
    length: int  # A: tokens whose KV the blocks hold (absolute)
    digest: bytes  # digest of those A token ids
    parked_at: float  # when it was parked (or its claim ended)
    num_blocks: int  # blocks over all groups
    claimed_by: str | None = None  # request id that resumed it, until it adopts the blocks


def session_key(request) -> str | None:
    """The namespaced key ``<owner>:<id>``: the frontend's admission
    (``patches/frontend/session_ids.py``) moved every way a session id arrives into
    ``request.session_id`` and bound it to the caller."""
    return request.session_id or None


# Misses after which the parked KV is stale (the conversation moved on): dropped.
_STALE = frozenset(("miss_prefix", "miss_no_new_tokens", "miss_prompt_logprobs", "miss_layout"))


class SessionStore:
    def __init__(self, scheduler, sink) -> None:
        config = sink.config
        self.sched = scheduler
        self.enabled = config.sessions and config.max_parked_sessions > 0
        self.cap = config.max_parked_sessions
        self.timeout = config.session_idle_timeout
        # Unclaimed sessions in parking order (so parked_at grows along it), and the
        # claimed ones by key and by claimant; the two key sets are disjoint.
        self.parked: OrderedDict[str, Parked] = OrderedDict()
        self.claimed: dict[str, Parked] = {}
        self.claims: dict[str, str] = {}  # claimant request id -> session key
        self.blocks_parked = 0  # blocks of parked + claimed sessions
        self.running: dict[str, str] = {}  # session key -> running request id
        self.asked: set[str] = set()  # live requests already counted
        self.counters: Counter = Counter()
        self._seq = 0  # orders directives to the workers

    def __len__(self) -> int:
        return len(self.parked) + len(self.claimed)

    def _directive(self, make, *args) -> None:
        self._seq += 1
        self.sched.finished_req_ids.add(make(self._seq, *args))

    @property
    def _managers(self):
        return self.sched.kv_cache_manager.coordinator.single_type_managers

    # ---- finish: park instead of free ----------------------------------------------------
    def on_finish(self, request) -> bool:
        """A finished stream: take its blocks into parking; False means free them."""
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        self.asked.discard(rid)
        self._release(rid)  # a resume that never got admitted
        key = session_key(request)
        if key is not None and self.running.get(key) == rid:
            del self.running[key]
        if (
            not self.enabled
            or key is None
            or request.num_computed_tokens <= 0
            or request.status
            not in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        ):
            return False
        if key in self.claimed:
            # A waiting request resumes the session parked under this key: it keeps
            # it (its prompt continues that one); this request's KV is freed.
            return False
        if not all(m.req_to_blocks.get(rid) for m in self._managers):
            return False
        if key in self.parked:
            self._drop(key, None)  # replaced by the newer turn
        blocks = tuple(m.req_to_blocks.pop(rid) for m in self._managers)
        for m in self._managers:
            m.num_cached_block.pop(rid, None)
        A = request.num_computed_tokens
        n = sum(len(b) for b in blocks)
        self.parked[key] = Parked(
            blocks,
            self.sched.sink_layouts[rid],
            A,
            digest(request.all_token_ids[:A]),
            time.monotonic(),
            n,
        )
        self.blocks_parked += n
        self._directive(_directives.park, rid, key)
        while len(self) > self.cap and self.make_room("parked_evictions"):
            pass
        return True

    # ---- admission: resume -------------------------------------------------------------
    def try_resume(self, request):
        """(blocks per group, A) if ``request`` resumes a parked session, else None.

        vLLM asks again every step the request waits: a claim is answered the same
        way; anything else is evaluated afresh (a session parked meanwhile may resume)
        but counted once per request."""
        key = session_key(request)
        if not self.enabled or key is None:
            return None
        rid = request.request_id
        c = self.claimed.get(key)
        if c is not None and c.claimed_by == rid:
            return c.blocks, c.length  # asked again: not admitted yet
        first = rid not in self.asked
        if first:
            self.asked.add(rid)
            self.counters["session_requests"] += 1
        params = request.sampling_params
        p = self.parked.get(key)
        reason = None
        if p is None:
            reason = (
                "miss_in_use" if key in self.running or key in self.claimed else "miss_none_parked"
            )
        elif params is not None and params.prompt_logprobs is not None:
            reason = "miss_prompt_logprobs"
        elif self.sched.sink_layouts.get(rid) != p.layout:
            reason = "miss_layout"
        else:
            tokens = request.prompt_token_ids or []
            if digest(tokens[: p.length]) != p.digest or len(tokens) < p.length:
                reason = "miss_prefix"
            elif len(tokens) == p.length:
                reason = "miss_no_new_tokens"
        if reason is not None:
            if first:
                self.counters[reason] += 1
            if reason in _STALE:
                self._drop(key, None)
            self.running[key] = rid
            _set_resume(request, None)
            return None
        del self.parked[key]
        p.claimed_by = rid
        self.claimed[key] = p
        self.claims[rid] = key
        _set_resume(request, key)
        self.counters["resumes"] += 1
        self.running[key] = rid
        return p.blocks, p.length

    def adopted(self, request_id: str) -> None:
        """The resumed request now owns its blocks: the session is no longer parked."""
        key = self.claims.pop(request_id, None)
        if key is not None:
            self.blocks_parked -= self.claimed.pop(key).num_blocks

    def _release(self, request_id: str) -> None:
        """The claimant finished before adopting: the session is parked again."""
        key = self.claims.pop(request_id, None)
        if key is not None:
            p = self.claimed.pop(key)
            p.claimed_by, p.parked_at = None, time.monotonic()
            self.parked[key] = p  # newest: parking order stays idle order

    # ---- bounds ------------------------------------------------------------------------
    def expire(self) -> None:
        """Drop the sessions idle longer than the timeout (the oldest come first)."""
        if not self.parked:
            return
        now = time.monotonic()
        while self.parked:
            key, p = next(iter(self.parked.items()))
            if now - p.parked_at <= self.timeout:
                break
            self._drop(key, "parked_expired")

    def make_room(self, reason: str = "parked_evictions", claimed_too: bool = False) -> bool:
        """Drop the least recently parked unclaimed session, else, with ``claimed_too``
        (room for a running request: running requests win over waiting ones), the
        oldest claim's session, its claimant then running as a fresh stream. False if
        there is nothing to drop."""
        if self.parked:
            self._drop(next(iter(self.parked)), reason)
            return True
        if claimed_too and self.claims:
            self._drop_claimed(next(iter(self.claims)), reason)
            return True
        return False

    def drop_all(self, reason: str) -> None:
        """Drop every session, claimed ones too (their claimants run as fresh
        streams): a prefix-cache reset, e.g. after a weight update."""
        for key in list(self.parked):
            self._drop(key, reason)
        for rid in list(self.claims):
            self._drop_claimed(rid, reason)

    def _drop_claimed(self, request_id: str, reason: str) -> None:
        """Drop the session ``request_id`` claimed (it was not admitted yet: the
        workers never saw it as a resume) and unmark the request."""
        key = self.claims.pop(request_id)
        request = self.sched.requests.get(request_id)
        if request is not None:
            _set_resume(request, None)
        self.parked[key] = self.claimed.pop(key)
        self._drop(key, reason)

    def _drop(self, key: str, reason: str | None) -> None:
        p = self.parked.pop(key)
        self.blocks_parked -= p.num_blocks
        pool = self.sched.kv_cache_manager.block_pool
        for blocks in p.blocks:
            pool.free_blocks(reversed(blocks))
        self._directive(_directives.drop, key)
        if reason:
            self.counters[reason] += 1

    def stats(self) -> dict[str, int]:
        return {
            **{k: int(v) for k, v in self.counters.items()},
            "parked_sessions": len(self),
            "blocks_parked": self.blocks_parked,
        }


def _set_resume(request, key: str | None) -> None:
    """Mark (or unmark) ``request`` for the workers as the resume of session ``key``."""
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    if key is None:
        if extra and _directives.RESUME_ARG in extra:
            params.extra_args = {k: v for k, v in extra.items() if k != _directives.RESUME_ARG}
        return
    params.extra_args = {**(extra or {}), _directives.RESUME_ARG: key}
