"""Where the test harness runs an engine core (no engine is started here)."""

from __future__ import annotations

import pytest

from vllm_sink.tools import harness

pytestmark = pytest.mark.cpu


def test_engine_process_follows_the_setting_else_the_device(monkeypatch):
    monkeypatch.setenv("VLLM_SINK_TEST_ENGINE_PROCESS", "1")
    assert harness.engine_in_process() is False
    monkeypatch.setenv("VLLM_SINK_TEST_ENGINE_PROCESS", "0")
    assert harness.engine_in_process() is True
    monkeypatch.delenv("VLLM_SINK_TEST_ENGINE_PROCESS")
    monkeypatch.setattr(harness, "_cuda", lambda: True)
    assert harness.engine_in_process() is False
    monkeypatch.setattr(harness, "_cuda", lambda: False)
    assert harness.engine_in_process() is True


def test_a_bad_engine_process_setting_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_SINK_TEST_ENGINE_PROCESS", "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        harness.engine_in_process()


@pytest.mark.parametrize("before", [None, "1"])
def test_the_multiprocessing_switch_is_restored_after_a_build(monkeypatch, before):
    import os

    if before is None:
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", before)
    with harness._engine_process(True):
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == before
