"""Finding backends: every module of the built-in ``backends/`` folder (no list to maintain), then
every ``pytest_attn.backends`` entry point of installed packages.

An entry point (or a built-in module) may name a list or tuple of backends, a module with a
``BACKENDS`` list or a ``backends()`` function, a Backend instance, a Backend class, or a function
returning any of these. A package that cannot be used (it fails to import, exposes nothing, names
something that is not a Backend, or a class that cannot be built) must not break pytest: it is
registered as an unavailable backend under its entry point's name, whose reason names the package,
the entry point and the fix, and every other backend runs. Nothing here imports torch; backend
modules keep their heavy imports inside methods.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import types
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable, Optional

from pytest_attn.core import calls
from pytest_attn.core.contract import Availability, Backend, Capabilities, Plan
from pytest_attn.core.errors import UnknownBackendError

ENTRY_POINT_GROUP = "pytest_attn.backends"
BUILTIN_PACKAGE = "pytest_attn_backends"


@dataclass(frozen=True)
class Origin:
    """Where a backend came from: built in (a module of backends/), or a package's entry point."""

    kind: str  # "built in" or "entry point"
    where: str  # "backends/torch_sdpa.py", or the entry point as declared: "name = module:attr"
    package: Optional[str] = None
    version: Optional[str] = None

    def __str__(self) -> str:
        if self.kind == "built in":
            return f"built in, {self.where}"
        package = f"package {self.package} {self.version or ''}".rstrip() if self.package else "an unknown package"
        return f"{package}, entry point '{self.where}'"

    def fix(self) -> str:
        if self.kind == "built in":
            return f"fix {self.where}"
        uninstall = f"; or uninstall it: pip uninstall {self.package}" if self.package else ""
        return f"fix the package's entry point in group {ENTRY_POINT_GROUP!r}{uninstall}"


class UnusableBackend(Backend):
    """Stands in for something registered that cannot be used: always unavailable, with the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        self.description = "(registered, but unusable: see the reason)"

    def available(self) -> Availability:
        return Availability(False, self.reason)

    def plan(self, metadata, layer, device="cpu") -> Plan:
        raise calls.BackendError(self.reason)

    def forward(self, q, k, v, metadata, plan, out=None):
        raise calls.BackendError(self.reason)


def broken_reason(backend: Backend, availability: Availability) -> str:
    """Why a backend cannot be used at all (its package failed to import, it names no Backend, or
    its available() raised or returned the wrong kind); "" for a usable one, available or not."""
    if isinstance(availability, calls.BrokenAvailability) or isinstance(backend, UnusableBackend):
        return availability.reason
    return ""


class _NotABackend(Exception):
    pass


def _builtin_package():
    """The installed ``pytest_attn_backends`` package, or ``backends/`` beside a source checkout."""
    try:
        return importlib.import_module(BUILTIN_PACKAGE)
    except ImportError:
        folder = Path(__file__).resolve().parents[2] / "backends"
        if not (folder / "__init__.py").exists():
            return None
        spec = importlib.util.spec_from_file_location(BUILTIN_PACKAGE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[BUILTIN_PACKAGE] = module
        spec.loader.exec_module(module)
        return module


def _describe(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def expand(obj, depth: int = 0) -> list:
    """The backends an entry point's target stands for (instances, not yet validated)."""
    if depth > 3:
        raise _NotABackend("nests lists or functions too deeply")
    if isinstance(obj, Backend):
        return [obj]
    if isinstance(obj, type):
        if not issubclass(obj, Backend):
            raise _NotABackend(f"names the class {obj.__qualname__}, which is not a subclass of pytest_attn.Backend")
        try:
            return [obj()]
        except Exception as exc:
            raise _NotABackend(f"names the class {obj.__qualname__}, which cannot be built without arguments "
                               f"({type(exc).__name__}: {exc}); implement plan() and forward(), or name an instance "
                               "or a list of instances") from exc
    if isinstance(obj, types.ModuleType):
        if hasattr(obj, "BACKENDS"):
            return expand(obj.BACKENDS, depth + 1)
        if callable(getattr(obj, "backends", None)):
            return expand(obj.backends(), depth + 1)
        raise _NotABackend(f"names the module {obj.__name__}, which has neither a BACKENDS list nor a backends() "
                           "function")
    if isinstance(obj, (list, tuple)):
        return [b for item in obj for b in expand(item, depth + 1)]
    if callable(obj):
        return expand(obj(), depth + 1)
    raise _NotABackend(f"names {_describe(obj)}, which is not a Backend, a Backend class, a list of them, a module or "
                       "a function returning them")


def validation_problem(obj) -> Optional[str]:
    """Why a registered object cannot be used as a backend; None when it can."""
    if not isinstance(obj, Backend):
        return f"registered {_describe(obj)}, which is not a pytest_attn.Backend instance"
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name.strip() or "," in name or name == "all" or name != name.strip():
        return f"registered a backend with the name {name!r}: give it a name without commas or spaces (and not 'all')"
    if not isinstance(getattr(obj, "capabilities", None), Capabilities):
        return f"backend {name!r} has capabilities {obj.capabilities!r}, not a pytest_attn.Capabilities"
    return None


def _discover_one(label: str, origin: Origin, load) -> list[Backend]:
    """The usable backends behind one module or entry point, or one UnusableBackend saying why."""
    try:
        target = load()
    except (Exception, SystemExit) as exc:
        return [UnusableBackend(label, f"{origin} failed to import: {type(exc).__name__}: {exc}; {origin.fix()}")]
    try:
        found = expand(target)
    except _NotABackend as exc:
        return [UnusableBackend(label, f"{origin} {exc}; {origin.fix()}")]
    except Exception as exc:
        return [UnusableBackend(label, f"{origin} raised {type(exc).__name__}: {exc} while listing its backends; "
                                       f"{origin.fix()}")]
    if not found:
        return [UnusableBackend(label, f"{origin} exposes no backends (an empty list); {origin.fix()}")]
    usable = []
    for i, obj in enumerate(found):
        problem = validation_problem(obj)
        if problem:
            usable.append(UnusableBackend(label if len(found) == 1 else f"{label}#{i + 1}",
                                          f"{origin} {problem}; {origin.fix()}"))
        else:
            calls.set_origin(obj, str(origin))
            usable.append(obj)
    return usable


def builtin_backends() -> list[Backend]:
    package = _builtin_package()
    if package is None:
        return []
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.ispkg:  # one module per backend; packages hold their suites
            continue
        origin = Origin("built in", f"backends/{info.name}.py")
        module_name = f"{BUILTIN_PACKAGE}.{info.name}"
        found.extend(_discover_one(info.name, origin, lambda m=module_name: importlib.import_module(m)))
    return found


def entry_point_backends() -> list[Backend]:
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = Origin("entry point", f"{ep.name} = {ep.value}", getattr(dist, "name", None),
                        getattr(dist, "version", None))
        found.extend(_discover_one(ep.name, origin, ep.load))
    return found


class Registry:
    """Backends by name, in discovery order (built-ins first). A name registered twice keeps the
    first; the second is recorded in ``problems``."""

    def __init__(self, backends: Iterable[Backend]):
        self._by_name: dict[str, Backend] = {}
        self.problems: list[str] = []
        for b in backends:
            if b.name in self._by_name:
                self.problems.append(f"two backends are named {b.name!r}: {calls.origin_of(self._by_name[b.name])} "
                                     f"and {calls.origin_of(b)}; the second is ignored: rename one")
                continue
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
