"""Finding backends: every module of the built-in ``backends/`` folder (no list to maintain), then
every ``pytest_attn.backends`` entry point of installed packages.

A module (or an entry point's target) exposes its backends as a module-level ``BACKENDS`` list, a
``backends()`` function, or is itself a Backend instance, class, or a function returning some.
Nothing here imports torch; backend modules keep their heavy imports inside methods.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable

from .contract import Backend, check_backend
from .errors import UnknownBackendError

ENTRY_POINT_GROUP = "pytest_attn.backends"
BUILTIN_PACKAGE = "pytest_attn_backends"


def _builtin_package():
    """The installed ``pytest_attn_backends`` package, or ``backends/`` beside a source checkout."""
    try:
        return importlib.import_module(BUILTIN_PACKAGE)
    except ImportError:
        folder = Path(__file__).resolve().parent.parent / "backends"
        if not (folder / "__init__.py").exists():
            return None
        spec = importlib.util.spec_from_file_location(BUILTIN_PACKAGE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[BUILTIN_PACKAGE] = module
        spec.loader.exec_module(module)
        return module


def _expand(obj, origin: str) -> list[Backend]:
    if isinstance(obj, Backend):
        return [obj]
    if isinstance(obj, type) and issubclass(obj, Backend):
        return [check_backend(obj(), origin)]
    if hasattr(obj, "BACKENDS"):
        return [check_backend(b, origin) for b in obj.BACKENDS]
    if hasattr(obj, "backends") and callable(obj.backends):
        return [check_backend(b, origin) for b in obj.backends()]
    if callable(obj):
        got = obj()
        return [check_backend(b, origin) for b in (got if isinstance(got, (list, tuple)) else [got])]
    raise TypeError(f"{origin} exposes no backends: give it a BACKENDS list or a backends() function")


def builtin_backends() -> list[Backend]:
    package = _builtin_package()
    if package is None:
        return []
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
        if hasattr(module, "BACKENDS") or hasattr(module, "backends"):
            found.extend(_expand(module, f"backends/{info.name}.py"))
    return found


def entry_point_backends() -> list[Backend]:
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.extend(_expand(ep.load(), f"entry point {ep.name!r} ({ep.value})"))
    return found


class Registry:
    """Backends by name, in discovery order (built-ins first)."""

    def __init__(self, backends: Iterable[Backend]):
        self._by_name: dict[str, Backend] = {}
        for b in backends:
            if b.name in self._by_name:
                raise TypeError(f"two backends are named {b.name!r}: {self._by_name[b.name]!r} and {b!r}")
            self._by_name[b.name] = b

    @classmethod
    def discover(cls) -> "Registry":
        return cls([*builtin_backends(), *entry_point_backends()])

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> Backend:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownBackendError(
                f"unknown attention backend {name!r}; registered: {', '.join(self.names) or '(none)'}") from None

    def resolve(self, requested: list[str]) -> list[Backend]:
        """Names from --attn-backend (comma lists, repeated, 'all') to backends, in order, once each."""
        names: list[str] = []
        for item in requested:
            for name in (n.strip() for n in item.split(",")):
                if not name:
                    continue
                for n in (self.names if name == "all" else [name]):
                    if n not in names:
                        names.append(n)
        unknown = [n for n in names if n not in self._by_name]
        if unknown:
            raise UnknownBackendError(
                f"unknown attention backend{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"registered: {', '.join(self.names) or '(none)'} (or 'all')")
        return [self._by_name[n] for n in names]
