"""patches/README.md, the ledger, names every place the plugin patches vLLM.

Invariants: every ``Patch`` object defined under ``patches/`` (each wraps one vLLM
attribute) has a row in the ledger's table whose module column names the file that
defines it and whose target column gives its full target ``module:Owner.attr``, with
kind "monkeypatch"; every row of kind "monkeypatch" names the target of a ``Patch``
that exists in the file it names; and every file that constructs a ``Patch`` exposes
it at module level (``PATCH``, or a list ``PATCHES``), so none escapes the collection.
Every file the table's module column names exists.

Imports every module under ``patches/`` (vLLM, no engine)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

import vllm_sink.patches as package  # noqa: E402
from vllm_sink.patches._patching import Patch  # noqa: E402

ROOT = Path(package.__file__).resolve().parent
LEDGER = ROOT / "README.md"
TARGET = re.compile(r"`([\w.]+:[\w.]+)`")


def _rel(module_name: str) -> str:
    """``vllm_sink.patches.frontend.body_field`` -> ``frontend/body_field.py``."""
    return module_name.removeprefix(package.__name__ + ".").replace(".", "/") + ".py"


def _rows() -> list[tuple[str, str, str]]:
    """(module, target, kind) cells of each numbered row of the ledger's table."""
    rows = []
    for line in LEDGER.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0].isdigit():
            rows.append((cells[2], cells[3], cells[4]))
    return rows


def _defined_patches() -> dict[str, list[Patch]]:
    """{file under patches/: the Patch objects it defines}. A Patch is attributed to the
    module its wrapper factory lives in, so one imported elsewhere is not counted twice."""
    found: dict[str, dict[int, Patch]] = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, Patch):
                    home = _rel(item.make_wrapper.__module__)
                    found.setdefault(home, {})[id(item)] = item
    return {path: list(patches.values()) for path, patches in found.items()}


def _files_calling_patch() -> set[str]:
    files = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Patch":
                files.add(path.relative_to(ROOT).as_posix())
    return files


def test_ledger_table_is_found():
    rows = _rows()
    assert len(rows) >= 10, f"{LEDGER}: the patch table has {len(rows)} numbered rows"


def test_every_module_the_ledger_names_exists():
    named = {f for module, _, _ in _rows() for f in re.findall(r"`([\w/]+\.py)`", module)}
    missing = sorted(f for f in named if not (ROOT / f).is_file())
    assert not missing, f"the ledger's table names files that do not exist: {missing}"


def test_every_patch_object_is_in_the_ledger():
    defined = _defined_patches()
    assert defined, "no Patch objects found under patches/"
    rows = _rows()
    missing = []
    for path, patches in sorted(defined.items()):
        for patch in patches:
            if not any(
                f"`{path}`" in module and f"`{patch.target}`" in target and "monkeypatch" in kind
                for module, target, kind in rows
            ):
                missing.append(f"{path}: {patch.target}")
    assert not missing, (
        "patches/README.md has no table row (module column naming the "
        "file, target column with the full target, kind 'monkeypatch') "
        "for: " + "; ".join(missing)
    )


def test_every_monkeypatch_row_has_its_patch_object():
    defined = _defined_patches()
    stale = []
    for module, target, kind in _rows():
        if "monkeypatch" not in kind:
            continue
        files = re.findall(r"`([\w/]+\.py)`", module)
        named = TARGET.findall(target)
        assert files and named, f"ledger row without a file or a full target: {module} | {target}"
        real = {p.target for f in files for p in defined.get(f, [])}
        stale += [f"{', '.join(files)}: {t}" for t in named if t not in real]
    assert not stale, "ledger rows name targets no Patch object patches: " + "; ".join(stale)


def test_every_patch_construction_is_collected():
    hidden = _files_calling_patch() - set(_defined_patches()) - {"_patching.py"}
    assert not hidden, (
        f"{sorted(hidden)} construct a Patch that is not a module-level "
        "PATCH / PATCHES object, so the ledger check cannot see it"
    )


def test_the_ledger_has_a_column_per_supported_release():
    from vllm_sink.patches._patching import RELEASES

    lines = LEDGER.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| # |"))
    columns = [c.strip() for c in header.strip().strip("|").split("|")]
    assert [f"vLLM {r}" for r in RELEASES] == columns[5:], header
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].isdigit():
            assert len(cells) == len(columns) and all(cells[5:]), line
