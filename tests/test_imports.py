"""Import boundaries between the repository's parts.

* Nothing under ``scripts/`` imports the test suite (``tests``): what the benchmarks and
  the tests share (engines, servers) lives in ``vllm_sink.tools.harness``.
* ``vllm_sink/`` takes from vLLM only its public top level (``from vllm import LLM``);
  the code that touches vLLM's internals is ``patches/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]


def _python_files(folder: Path) -> list[Path]:
    """``*.py`` files under ``folder``, and extension-less scripts with a python shebang."""
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".py":
            files.append(path)
        elif not path.suffix:
            with open(path, "rb") as f:
                first = f.readline()
            if first.startswith(b"#!") and b"python" in first:
                files.append(path)
    return files


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement, nested ones included; for ``from X
    import a`` the module is X, for a relative import the dotted name as written."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def test_scripts_do_not_import_tests():
    files = _python_files(ROOT / "scripts")
    assert files, "no Python files found under scripts/"
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        for line, module in _imports(path)
        if _top(module) == "tests"
    ]
    assert not bad, "scripts/ must not import the test suite: " + "; ".join(bad)


def test_vllm_sink_uses_only_vllms_public_top_level():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in _python_files(ROOT / "vllm_sink")
        for line, module in _imports(path)
        if _top(module) == "vllm" and module != "vllm"
    ]
    assert not bad, "vllm_sink/ imports vLLM internals (patches/ holds those): " + "; ".join(bad)
