"""Scheduler -> worker messages about parked sessions, carried in ``finished_req_ids``.

vLLM gives the scheduler no channel to send plugin state to workers, but every worker
reads ``SchedulerOutput.finished_req_ids``. The sink scheduler adds entries that can
never be request ids (they start with a NUL byte); the sink worker strips them before
vLLM sees the set:

* ``park``  the finished request ``req_id`` was parked under session ``key``: keep its
  worker state (stream offsets, pristine sink keys) instead of dropping it;
* ``drop``  the parked session ``key`` was evicted or replaced: forget its state.

Resuming travels the other way round inside the request itself: the scheduler puts the
session key in ``sampling_params.extra_args[RESUME_ARG]`` (after removing any
client-supplied ``vllm_sink_*`` keys).
"""

from __future__ import annotations

import json

PREFIX = "\x00vllm_sink:"
RESUME_ARG = "vllm_sink_resume"
PRIVATE_ARG_PREFIX = "vllm_sink_"


def park(seq: int, req_id: str, key: str) -> str:
    return PREFIX + json.dumps(["park", seq, req_id, key])


def drop(seq: int, key: str) -> str:
    return PREFIX + json.dumps(["drop", seq, None, key])


def split(finished) -> tuple[set[str], list[tuple[str, str | None, str]]]:
    """(real finished request ids, [(op, req_id, key)] in the order they were issued).

    Order matters: a request may be parked under a key and that session evicted before
    the workers heard of either (both land in the same step's set)."""
    real, ops = set(), []
    for item in finished:
        if not item.startswith(PREFIX):
            real.add(item)
            continue
        op, seq, req_id, key = json.loads(item[len(PREFIX):])
        ops.append((seq, op, req_id, key))
    return real, [(op, req_id, key) for _, op, req_id, key in sorted(ops)]
