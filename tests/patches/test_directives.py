"""Scheduler -> worker directives in finished_req_ids: issued order kept; anything that
is not a well-formed directive is passed through as a request id, never raised on."""

import pytest

from vllm_sink.patches import _directives as d

pytestmark = pytest.mark.cpu


def test_split_keeps_issue_order():
    items = {d.drop(3, "k1"), d.park(1, "r1", "k1"), d.park(2, "r2", "k2"), "req-9"}
    real, ops = d.split(items)
    assert real == {"req-9"}
    assert ops == [("park", "r1", "k1"), ("park", "r2", "k2"), ("drop", None, "k1")]


@pytest.mark.parametrize(
    "bad",
    [
        d.PREFIX + "garbage",
        d.PREFIX + '["park"]',
        d.PREFIX + '["drop", "x", null, "k"]',  # sequence number not an int
        d.PREFIX + '["nuke", 1, null, "k"]',  # unknown op
        d.PREFIX + '["park", 1, null, "k"]',  # park without a request id
        d.PREFIX + '["drop", 1, null, 5]',  # key not a string
        d.PREFIX + '{"op": "drop"}',
        d.PREFIX + "[" * 100_000,
        d.PREFIX,
    ],
)
def test_malformed_directives_pass_through_as_ids(bad):
    real, ops = d.split({bad, d.drop(1, "k"), "req-1"})
    assert real == {bad, "req-1"} and ops == [("drop", None, "k")]


def test_client_ids_are_never_directives():
    assert d.is_reserved_id(d.PREFIX + '["drop", 1, null, "k"]')
    assert d.is_reserved_id("\x00anything")
    assert not d.is_reserved_id("cmpl-1") and not d.is_reserved_id("")
