"""The user's documents say what the code does: README.md's configuration table lists
exactly the keys of ``vllm_sink.core.config._KEYS``, docs/metrics.md's table exactly the
series the ``/metrics`` collector publishes, and every repository path the README and
docs/ name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _section(heading: str, doc: Path = README) -> str:
    """``doc``'s text under ``heading`` (a ``#`` line), to the next ``##`` one."""
    text = doc.read_text()
    start = text.index(heading + "\n")
    end = re.search(r"^##", text[start + len(heading) :], re.M)
    return text[start : start + len(heading) + end.start()] if end else text[start:]


def _first_cells(section: str) -> list[str]:
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [name for cell in rows for name in re.findall(r"`([^`]+)`", cell)]


def test_configuration_table_lists_every_key():
    from vllm_sink.core.config import _KEYS

    listed = _first_cells(_section('## Configuration: the `"sink"` section'))
    assert sorted(listed) == sorted(_KEYS), (
        f"README configuration table {sorted(listed)} vs config._KEYS {sorted(_KEYS)}"
    )


def test_metrics_table_lists_every_series():
    from vllm_sink.patches.frontend import metrics

    published = {*metrics._GAUGES, *metrics._SESSION_GAUGES, "session_misses"}
    published |= {f"{name}_total" for name in (*metrics._COUNTERS, *metrics._SESSION_COUNTERS)}
    published.add("session_misses_total")
    published.discard("session_misses")
    listed = set()
    for cell in _first_cells(_section("# Metrics", ROOT / "docs" / "metrics.md")):
        # `vllm_sink:name`, `:name` (same prefix), `vllm_sink:name_total{reason}`
        listed.add(re.sub(r"\{.*\}$", "", cell).removeprefix("vllm_sink").removeprefix(":"))
    assert listed == published, (
        f"in docs/metrics.md, not published: {sorted(listed - published)}; "
        f"published, not in docs/metrics.md: {sorted(published - listed)}"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_paths_exist(doc):
    text = doc.read_text()
    names = re.findall(r"`((?:scripts|tests|vllm_sink|patches|examples|docs)/[\w./-]*)", text)
    names += [link for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)]
    missing = sorted(
        {n for n in names if not (doc.parent / n).exists() and not (ROOT / n).exists()}
    )
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"
