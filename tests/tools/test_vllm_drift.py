"""The drift check (``vllm_sink.tools.vllm_drift``) and per-release adapters (``Patch``).

Every ``Patch`` and ``Target`` under ``patches/`` must find its symbol, with the parameter
list the plugin's code expects, in every supported release's source: the installed 0.32
and 0.33 from its wheel's sources (``scripts/setup`` caches them; in CI a missing cache
fails). A synthetic source shows the check reports a changed signature, a missing
symbol, a target defined only on a base class, and a broken import; adapters are chosen
by the exact installed release, anything else refused."""

from __future__ import annotations

import os
import textwrap

import pytest

pytestmark = pytest.mark.cpu

from vllm_sink.patches import _patching  # noqa: E402
from vllm_sink.patches._patching import RELEASES, Patch, PatchError, Target  # noqa: E402
from vllm_sink.tools import vllm_drift  # noqa: E402


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_every_declaration_matches_each_supported_release(release):
    source = vllm_drift.source_for(release)
    if source is None:
        why = f"vLLM {release}'s source is not cached at {vllm_drift.cached(release)}"
        if os.environ.get("VLLM_SINK_CI"):
            pytest.fail(f"{why}: scripts/setup fetches it")
        pytest.skip(f"{why} (python -m vllm_sink.tools.vllm_drift --fetch)")
    assert source.version() == release
    declared = _patching.declared()
    # Every Patch carries a signature for every release it supports (a wrapped callable's
    # parameters are what its wrapper relies on); None marks an attribute only a Target has.
    assert any(isinstance(t, Patch) for t in declared)
    assert all(
        t.signature_for(r) is not None for t in declared if isinstance(t, Patch) for r in t.releases
    )
    assert vllm_drift.check(source, release, declared) == []


def _fake(tmp_path, body: str, version: str = "0.32.0"):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (tmp_path / "vllm" / "_version.py").write_text(f"__version__ = version = '{version}'\n")
    (tmp_path / "vllm" / "mod.py").write_text(textwrap.dedent(body))
    return vllm_drift.Source(tmp_path)


def test_changed_missing_and_inherited_symbols_are_reported(tmp_path):
    source = _fake(
        tmp_path,
        """
        from vllm.other import Gone

        class Base:
            def run(self, a, b=1):
                pass

        class Child(Base):
            def step(self, x, *, flag=False):
                self.state = 0
        """,
    )
    assert source.version() == "0.32.0"
    ok = [
        Target("vllm.mod:Child.step", "(self, x, *, flag=False)"),
        Target("vllm.mod:Child.run", "(self, a, b=1)"),  # inherited: fine for a Target
        Target("vllm.mod:Child.state", None),  # instance state set in a method
    ]
    assert vllm_drift.check_targets(source, ok, "0.32.0") == []
    bad = [
        Target("vllm.mod:Child.step", "(self, x)"),
        Target("vllm.mod:Child.nothing", None),
        Patch("vllm.mod:Child.run", lambda f: f, signature="(self, a, b=1)"),  # not its own
    ]
    problems = vllm_drift.check_targets(source, bad, "0.32.0")
    assert len(problems) == 3, problems
    assert "expects (self, x)" in problems[0] and "(self, x, *, flag=False)" in problems[0]
    assert "missing" in problems[1] and "missing" in problems[2]
    # a declaration for another release only is not checked against this one
    assert (
        vllm_drift.check_targets(source, [Target("vllm.mod:X", None, ("0.33.0",))], "0.32.0") == []
    )
    imports = [("patches/x.py", "vllm.mod", "Gone"), ("patches/x.py", "vllm.mod", "Child")]
    problems = vllm_drift.check_imports(source, imports)
    assert len(problems) == 1 and "import Gone" in problems[0]


def test_cli_reports_problems_with_a_nonzero_exit(tmp_path, capsys):
    _fake(tmp_path, "def nothing():\n    pass\n")
    assert vllm_drift.main(["--source", str(tmp_path), "--expect", "0.32.0"]) == 1
    out = capsys.readouterr().out
    assert "vLLM 0.32.0" in out and "problem(s)" in out and "missing" in out


def test_adapters_are_chosen_by_the_exact_release(monkeypatch):
    import sys
    import types

    import vllm

    owner = types.ModuleType("vllm_sink_fake_target")
    owner.f = lambda: "vllm"
    monkeypatch.setitem(sys.modules, owner.__name__, owner)
    patch = Patch(
        f"{owner.__name__}:f",
        {
            "0.32.0": lambda orig: lambda: ("0.32", orig()),
            "0.33.0": lambda orig: lambda: ("0.33", orig()),
        },
    )
    for version, want in (("0.32.0", "0.32"), ("0.33.0+cu130", "0.33"), ("0.32.0+cpu", "0.32")):
        monkeypatch.setattr(vllm, "__version__", version)
        assert patch.apply() == 1
        assert owner.f() == (want, "vllm")
        patch.revert()
        assert owner.f() == "vllm"
    for version in ("0.34.0", "0.33.0rc1", "0.33.1"):
        monkeypatch.setattr(vllm, "__version__", version)
        with pytest.raises(PatchError, match="0.32.0 .*0.33.0"):
            patch.apply()
        assert owner.f() == "vllm"
