"""Long natural text for stream tests and benchmarks: the King James Bible.

Source: Debian's ``bible-kjv`` package (public domain), whose ``bible`` command prints
all 31,102 verses (about 4.4 MB, 1.2 M tokens with the SmolLM2 tokenizer). We strip
the verse references ("Ge1:1 ") and keep one verse per line. ``scripts/setup``
installs the package where apt is available.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from vllm_sink.tools.model import _locked, cache_dir

_RANGE = "Gen1:1-Rev22:21"
_REFERENCE = re.compile(r"^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ ", re.MULTILINE)


class KJVUnavailable(RuntimeError):
    """The ``bible`` command from Debian's bible-kjv package is not installed."""


def kjv_text() -> str:
    """The whole King James Bible, one verse per line, references stripped."""
    path = cache_dir() / "kjv.txt"
    if path.exists():
        return path.read_text()
    exe = shutil.which("bible")
    if exe is None:
        raise KJVUnavailable(
            "The KJV text comes from Debian's bible-kjv package ('bible' command), "
            "which is not installed: run scripts/setup, or: apt-get install bible-kjv"
        )
    raw = subprocess.run([exe, "-f", _RANGE], check=True, capture_output=True, text=True).stdout
    text = _REFERENCE.sub("", raw)
    if len(text) < 4_000_000:
        raise KJVUnavailable(f"'bible -f {_RANGE}' printed only {len(text)} characters")
    with _locked(path):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return text


def kjv_tokens(model_dir: str | None = None, limit: int | None = None) -> list[int]:
    """The KJV text as token ids of ``model_dir``'s tokenizer (default model if None)."""
    from vllm_sink.tools.model import default_model

    model_dir = model_dir or default_model()
    tok_file = Path(model_dir) / "tokenizer.json"
    digest = hashlib.sha1(
        tok_file.read_bytes() if tok_file.exists() else model_dir.encode()
    ).hexdigest()[:12]
    path = cache_dir() / f"kjv-tokens-{digest}.npy"
    if not path.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = np.asarray(
            tokenizer(kjv_text(), add_special_tokens=False)["input_ids"], dtype=np.int32
        )
        with _locked(path):
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, ids)
            tmp.replace(path)
    ids = np.load(path, mmap_mode="r")
    if limit is not None:
        ids = ids[:limit]
    return [int(x) for x in ids]
