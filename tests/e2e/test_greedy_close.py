"""The two-engine comparison rule (tests/e2e/conftest.py:assert_greedy_close) fails
where it must: a divergence that is not a near-tie, or log-probs apart before it."""

import pytest

from tests.e2e.conftest import assert_greedy_close

pytestmark = pytest.mark.cpu


def _run(tokens, tops):
    return [(tokens, tops)]


def test_identical_runs_pass():
    a = _run([5, 6], [{5: -0.1, 9: -3.0}, {6: -0.2, 7: -2.0}])
    assert assert_greedy_close(a, a) == 0


def test_divergence_at_a_near_tie_passes_and_is_counted():
    a = _run([5, 6, 1], [{5: -0.1}, {6: -0.70, 7: -0.72}, {1: -0.1}])
    b = _run([5, 7, 2], [{5: -0.1}, {7: -0.70, 6: -0.71}, {2: -0.1}])
    assert assert_greedy_close(a, b) == 1


def test_divergence_that_is_no_tie_fails():
    a = _run([5, 6], [{5: -0.1}, {6: -0.1, 7: -2.5}])
    b = _run([5, 7], [{5: -0.1}, {7: -0.1, 6: -2.5}])
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_greedy_close(a, b)


def test_divergence_outside_the_top_k_fails():
    a = _run([5, 6], [{5: -0.1}, {6: -0.1, 8: -0.2}])
    b = _run([5, 7], [{5: -0.1}, {7: -0.1, 6: -0.2}])
    with pytest.raises(AssertionError, match="top-k"):
        assert_greedy_close(a, b)


def test_log_probs_apart_before_any_divergence_fail():
    a = _run([5, 6], [{5: -0.1}, {6: -0.1}])
    b = _run([5, 6], [{5: -0.9}, {6: -0.1}])
    with pytest.raises(AssertionError, match="token 0"):
        assert_greedy_close(a, b)
