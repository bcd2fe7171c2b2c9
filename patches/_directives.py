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

Request ids starting with NUL are refused at admission (``frontend/request_sink.py``,
``is_reserved_id``), so no client id can pose as a directive; ``split`` still reads only
well-formed directives and hands anything else on as a request id (vLLM ignores the
id of a request it does not hold), so nothing in the set can make a worker raise.
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


def is_reserved_id(request_id: str) -> bool:
    """Ids of this form are the scheduler's (directives), never a client's."""
    return request_id.startswith("\x00")


def _parse(item: str) -> tuple[int, str, str | None, str] | None:
    """(seq, op, req_id, key) of a well-formed directive, else None."""
    try:
        entry = json.loads(item[len(PREFIX) :])
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, list) or len(entry) != 4:
        return None
    op, seq, req_id, key = entry
    if type(seq) is not int or not isinstance(key, str):
        return None
    if (op, type(req_id)) not in (("park", str), ("drop", type(None))):
        return None
    return seq, op, req_id, key


def split(finished) -> tuple[set[str], list[tuple[str, str | None, str]]]:
    """(real finished request ids, [(op, req_id, key)] in the order they were issued).

    Order matters: a request may be parked under a key and that session evicted before
    the workers heard of either (both land in the same step's set)."""
    real, ops = set(), []
    for item in finished:
        parsed = _parse(item) if item.startswith(PREFIX) else None
        if parsed is None:
            real.add(item)
        else:
            ops.append(parsed)
    ops.sort(key=lambda entry: entry[0])
    return real, [(op, req_id, key) for _, op, req_id, key in ops]
