"""Drift check: every vLLM name the plugin relies on, in a release's *source*, unimported.

For each ``Patch`` and ``Target`` under ``patches/`` (``module:Owner.attr``) and each
supported release, the release's source is parsed with ``ast`` (nothing of it is
imported, so a CUDA build is checked on a machine without CUDA) and the symbol must
exist with the parameter list the plugin's code for that release expects (names,
kinds, defaults: ``signature``). A ``Patch`` replaces the attribute on its owner, so
it must be defined there (a module-level name may be an import: it is followed to its
definition); a ``Target`` may be inherited from a base class. Every ``from vllm... import
name`` under ``patches/`` must resolve in every release too.

Sources: a directory holding ``vllm/`` (the installed package's ``site-packages``, found
without importing it), a release's wheel, or a zip of a wheel's ``vllm/**/*.py``
(what ``--fetch`` caches: a few MB instead of the wheel's few hundred).

    python -m vllm_sink.tools.vllm_drift                 every supported release: the
                                                         installed one, the others from
                                                         the cache
    python -m vllm_sink.tools.vllm_drift --fetch         first download the missing ones
    python -m vllm_sink.tools.vllm_drift --fetch-only    only that (scripts/setup runs it)
    python -m vllm_sink.tools.vllm_drift --source vllm-0.34.0-...whl --expect 0.33.0
                                                         a new release against what the
                                                         0.33.0 adapters expect
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


class Source:
    """vLLM's Python source, from directories and zip files holding ``vllm/`` (the first
    that has a file wins, so a directory may overlay part of another source)."""

    def __init__(self, *roots: str | os.PathLike) -> None:
        self.roots = [Path(r) for r in roots]
        self._zips = {r: zipfile.ZipFile(r) for r in self.roots if r.is_file()}
        self._trees: dict[str, tuple[ast.Module, bool] | None] = {}

    @classmethod
    def installed(cls) -> Source:
        """The vLLM package this interpreter would import (found, not imported)."""
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("no vllm package is installed for this interpreter")
        return cls(Path(list(spec.submodule_search_locations)[0]).parent)

    def read(self, path: str) -> str | None:
        for root in self.roots:
            if root in self._zips:
                try:
                    return self._zips[root].read(path).decode()
                except KeyError:
                    continue
            elif (root / path).is_file():
                return (root / path).read_text()
        return None

    def version(self) -> str | None:
        """``__version__`` as ``vllm/_version.py`` sets it."""
        text = self.read("vllm/_version.py")
        found = re.search(r"^__version__ = version = ['\"]([^'\"]+)['\"]", text or "", re.M)
        return found.group(1) if found else None

    def module(self, name: str) -> tuple[ast.Module, bool] | None:
        """(the module's tree, whether it is a package), or None if it has no source."""
        if name not in self._trees:
            base = name.replace(".", "/")
            self._trees[name] = None
            for path, package in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
                text = self.read(path)
                if text is not None:
                    self._trees[name] = (ast.parse(text), package)
                    break
        return self._trees[name]


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """``(self, request, *, flag=False, **kwargs)``: parameter names, kinds and default
    expressions as written, annotations left out."""
    a = node.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = []
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        out.append(arg.arg + ("" if default is None else f"={ast.unparse(default)}"))
        if a.posonlyargs and i == len(a.posonlyargs) - 1:
            out.append("/")
    if a.vararg:
        out.append(f"*{a.vararg.arg}")
    elif a.kwonlyargs:
        out.append("*")
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append(arg.arg + ("" if default is None else f"={ast.unparse(default)}"))
    if a.kwarg:
        out.append(f"**{a.kwarg.arg}")
    return f"({', '.join(out)})"


@dataclass
class Found:
    node: ast.AST  # a def or class, or the statement that binds the name
    module: str  # where it is defined


class Missing(LookupError):
    pass


def _absolute(module: str, package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _binds(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, (*FUNCTIONS, ast.ClassDef)):
        return stmt.name == name
    if isinstance(stmt, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)
    if isinstance(stmt, ast.AnnAssign):
        return isinstance(stmt.target, ast.Name) and stmt.target.id == name
    return False


def binding(source: Source, module: str, name: str, depth: int = 0) -> Found:
    """What ``name`` is at module level of ``module``: its definition, following
    ``from x import name`` (and a submodule ``module.name``). The last binding at the
    module's top level wins, as at run time."""
    tree = source.module(module)
    if tree is None:
        raise Missing(f"module {module} has no source")
    if depth > 20:
        raise Missing(f"{module}:{name}: import cycle")
    body, package = tree
    hit: Found | tuple[str, str] | None = None
    for stmt in body.body:
        if _binds(stmt, name):
            hit = Found(stmt, module)
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (alias.asname or alias.name) == name:
                    hit = (_absolute(module, package, stmt), alias.name)
    if isinstance(hit, tuple):
        origin, original = hit
        try:
            return binding(source, origin, original, depth + 1)
        except Missing:
            sub = source.module(f"{origin}.{original}")
            if sub is not None:
                return Found(sub[0], f"{origin}.{original}")  # a submodule
            raise
    if hit is None:
        lazy = next(
            (s for s in body.body if isinstance(s, FUNCTIONS) and s.name == "__getattr__"), None
        )
        if lazy is not None and any(
            isinstance(n, ast.Constant) and n.value == name for n in ast.walk(lazy)
        ):
            return Found(lazy, module)  # a lazy module attribute (PEP 562)
        sub = source.module(f"{module}.{name}") if package else None
        if sub is not None:
            return Found(sub[0], f"{module}.{name}")
        raise Missing(f"{module} does not define {name}")
    return hit


def _assigns_self(cls: ast.ClassDef, name: str) -> ast.stmt | None:
    for node in ast.walk(cls):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AnnAssign, ast.AugAssign))
            else []
        )
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and t.attr == name
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
            ):
                return node
    return None


def member(source: Source, found: Found, name: str, inherit: bool, depth: int = 0) -> Found:
    """Attribute ``name`` of class ``found``: a def, class or class-level binding in its
    body, else (``inherit``) a base class's, in base order; an attribute set on ``self``
    in a method counts as a last resort (instance state)."""
    cls = found.node
    if not isinstance(cls, ast.ClassDef):
        raise Missing(f"{found.module}: not a class")
    for stmt in cls.body:
        if _binds(stmt, name):
            return Found(stmt, found.module)
    if inherit and depth < 30:
        for base in cls.bases:
            if not isinstance(base, ast.Name):
                continue
            try:
                parent = binding(source, found.module, base.id)
                return member(source, parent, name, inherit, depth + 1)
            except Missing:
                continue
    assigned = _assigns_self(cls, name)
    if assigned is not None:
        return Found(assigned, found.module)
    raise Missing(f"{cls.name} has no attribute {name}")


def lookup(source: Source, target: str, own: bool) -> Found:
    """The definition ``module:Owner.attr`` names; ``own``: the last part must be
    defined on its owner itself (what a patch replaces), not inherited."""
    module, _, path = target.partition(":")
    first, *rest = path.split(".")
    found = binding(source, module, first)
    for i, name in enumerate(rest):
        last = i == len(rest) - 1
        if isinstance(found.node, ast.Module):
            found = binding(source, found.module, name)  # a submodule's attribute
        else:
            found = member(source, found, name, inherit=not (own and last))
    return found


def describe(found: Found) -> str:
    """The found symbol as the ``signature`` of a declaration compares with it: a
    function's parameter list, else what kind of thing it is."""
    node = found.node
    if isinstance(node, FUNCTIONS):
        return signature(node)
    if isinstance(node, ast.ClassDef):
        return "class"
    if isinstance(node, ast.Module):
        return "module"
    return "value"


def check_targets(source: Source, targets: Iterable, release: str) -> list[str]:
    """Problems with the declarations that apply to ``release``: ``[]`` if none."""
    problems = []
    for t in targets:
        if release not in t.releases:
            continue
        expected = t.signature_for(release)
        try:
            found = lookup(source, t.target, t.own)
        except Missing as e:
            problems.append(f"{t.target}: missing ({e})")
            continue
        if expected is None:
            continue  # existence is all that is relied on
        got = describe(found)
        if got != expected:
            problems.append(
                f"{t.target}: the plugin expects {expected}, vLLM {release} has {got} "
                f"({found.module})"
            )
    return problems


def vllm_imports(root: Path) -> Iterator[tuple[str, str, str]]:
    """(file, module, name) for every ``from vllm... import name`` under ``root``."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and not node.level
                and (node.module == "vllm" or (node.module or "").startswith("vllm."))
            ):
                for alias in node.names:
                    yield path.relative_to(root).as_posix(), node.module, alias.name


def check_imports(source: Source, imports: Iterable[tuple[str, str, str]]) -> list[str]:
    problems = []
    for where, module, name in imports:
        try:
            binding(source, module, name)
        except Missing as e:
            problems.append(f"{where}: from {module} import {name}: {e}")
    return problems


def check(source: Source, release: str, targets: Iterable | None = None) -> list[str]:
    """Every problem of the plugin's declarations and vLLM imports in ``source``, for the
    adapters of ``release``."""
    from vllm_sink.patches import _patching

    if targets is None:
        targets = _patching.declared()
    patches_root = Path(_patching.__file__).resolve().parent
    return check_targets(source, targets, release) + check_imports(
        source, vllm_imports(patches_root)
    )


# ---- the cache of released sources ------------------------------------------------------
def cache_dir() -> Path:
    from vllm_sink.tools.model import cache_dir as root

    return root() / "vllm-src"


def cached(release: str) -> Path:
    """Where ``fetch`` keeps a release's source: a zip of its wheel's ``vllm/**/*.py``."""
    return cache_dir() / f"vllm-{release}-py.zip"


def fetch(release: str, python: str = sys.executable) -> Path:
    """Download vLLM ``release``'s CUDA wheel (Python 3.12, manylinux x86_64, no
    dependencies) to a temporary directory and cache its Python sources."""
    out = cached(release)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        subprocess.run(
            [python, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--no-deps", "--no-cache-dir", "--only-binary=:all:", "--python-version", "3.12",
             "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
             "-d", tmp, f"vllm=={release}"],
            check=True,
        )  # fmt: skip
        wheel = next(Path(tmp).glob("vllm-*.whl"))
        part = Path(tmp) / out.name
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename.startswith("vllm/") and info.filename.endswith(".py"):
                    dst.writestr(info.filename, src.read(info))
        shutil.move(part, out)
    return out


def source_for(release: str) -> Source | None:
    """The installed package if it is ``release``, else the cached one, else None."""
    from packaging.specifiers import SpecifierSet

    try:
        installed = Source.installed()
        version = installed.version()
        if version and SpecifierSet(f"=={release}").contains(version, prereleases=True):
            return installed
    except FileNotFoundError:
        pass
    path = cached(release)
    return Source(path) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    from vllm_sink.patches._patching import RELEASES

    ap = argparse.ArgumentParser(prog="vllm_drift", description=__doc__.split("\n")[0])
    ap.add_argument("--release", action="append", help="supported release(s) to check")
    ap.add_argument("--source", help="a directory holding vllm/, a wheel or a source zip")
    ap.add_argument("--expect", help="check --source against this release's adapters")
    ap.add_argument("--fetch", action="store_true", help="download missing releases first")
    ap.add_argument("--fetch-only", action="store_true", help="download missing releases, no check")
    args = ap.parse_args(argv)
    if args.fetch_only:
        for name in args.release or list(RELEASES):
            if source_for(name) is None:
                print(f"vLLM {name}: {fetch(name)}")
        return 0
    if args.source:
        source = Source(args.source)
        names = [args.expect or source.version() or ""]
        if names[0] not in RELEASES:
            ap.error(f"--expect one of {sorted(RELEASES)} (source version {source.version()})")
        plan = [(names[0], source)]
    else:
        plan = []
        for name in args.release or list(RELEASES):
            if args.fetch and source_for(name) is None:
                fetch(name)
            plan.append((name, source_for(name)))
    bad = 0
    for name, source in plan:
        if source is None:
            print(
                f"vLLM {name}: no source (not installed, not cached at {cached(name)}); "
                "run with --fetch"
            )
            bad += 1
            continue
        problems = check(source, name)
        where = ", ".join(str(r) for r in source.roots)
        print(f"vLLM {name} ({source.version()}, {where}): {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
