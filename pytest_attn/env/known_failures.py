"""Known failures as data: which backend fails on which case or condition, for which library
versions and GPU architectures, with the upstream thread.

A file (TOML) holds ``[[failure]]`` entries::

    [[failure]]
    id = "flashinfer-4972"                       # unique; reasons and reports name it
    backends = ["flashinfer", "flashinfer-fa2"]  # backend names (fnmatch patterns); default: every one
    condition = "fa2-paged-noncausal-window"     # decided in Python by the backend ...
    cases = ["swa-noncausal-chunked"]            # ... or these case names (one of the two, or both)
    library = "flashinfer-python"                # whose version ``versions`` constrains
    versions = "<=0.7.2.post1"                   # a PEP 440 specifier; default: every version
    arch = ["sm90"]                              # GPU architectures; default: every one
    run = true                                   # false: never run it (it crashes the process)
    url = "https://github.com/flashinfer-ai/flashinfer/issues/4972"
    reason = "fa2's paged prefill gets ... wrong"    # what fails; {name} fields filled by the backend
    params = { multiple_of = 64 }                # the condition's data, read by the backend

The built-in backends keep one file per family in ``backends/known_failures/``: each decision stays
in the backend's Python (testable on CPU), its data (thresholds, texts, versions, architectures,
URLs) in the file. Users add files with ``--attn-known-failures PATH``. In a pytest run a listed
failure is a strict expected failure: it runs (unless ``run = false``) and must fail; one that
passes fails the run as fixed upstream. Anything unlisted that fails is a regression.

Imports: ``pytest_attn.core`` only.
"""
from __future__ import annotations

import fnmatch
import functools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from pytest_attn.core.errors import AttnInputError

#: A refusal names the entry it comes from in this form; the plugin finds the entry by it.
MARKER = "known failure {id}: {url}"
_MARKER_RE = re.compile(r"known failure ([A-Za-z0-9_.\-]+): ")
_ARCH_RE = re.compile(r"^sm\d{2,3}[a-z]?$")
_FIELDS = {"id", "backends", "condition", "cases", "library", "versions", "arch", "run", "url", "reason", "params"}


class KnownFailuresFileError(AttnInputError):
    """A known-failures file that cannot be read: its path, the entry and what is wrong, in one line."""


@dataclass(frozen=True)
class KnownFailure:
    id: str
    url: str
    reason: str
    source: str  # the file it came from
    backends: tuple[str, ...] = ("*",)
    condition: str = ""
    cases: tuple[str, ...] = ()
    library: str = ""
    versions: str = ""
    arch: tuple[str, ...] = ()
    run: bool = True
    params: dict = field(default_factory=dict, compare=False, hash=False)

    def applies(self, *, backend: Optional[str] = None, version: Optional[str] = None,
                arch: Optional[str] = None) -> bool:
        """Whether it holds here. An unknown version (library not installed) or architecture (no
        GPU: a plan made on CPU) counts as inside the range, as the plan assumes the target."""
        if backend is not None and not any(fnmatch.fnmatchcase(backend, p) for p in self.backends):
            return False
        if self.arch and arch is not None and arch not in self.arch:
            return False
        if self.versions and version is not None:
            from packaging.specifiers import SpecifierSet
            from packaging.version import InvalidVersion, Version

            try:
                return Version(version) in SpecifierSet(self.versions, prereleases=True)
            except InvalidVersion:
                return True
        return True

    def text(self, **values) -> str:
        """The reason a backend gives, its {fields} filled, ending with the marker naming the entry."""
        try:
            reason = self.reason.format(**values)
        except (KeyError, IndexError, ValueError) as exc:
            raise AttnInputError(f"known failure {self.id} ({self.source}): its reason needs {exc} "
                                 "from the backend") from None
        return f"{reason} ({MARKER.format(id=self.id, url=self.url)})"


@functools.lru_cache(maxsize=None)
def installed_version(library: str) -> Optional[str]:
    """The installed version of a distribution (FlashInfer also where it came without metadata)."""
    from pytest_attn.env.packages import dist_version, flashinfer_version

    if library in ("flashinfer-python", "flashinfer"):
        return flashinfer_version()
    return dist_version(library)


def arch_name(sm) -> str:
    """(9, 0) -> "sm90", (10, 0) -> "sm100", (12, 1) -> "sm121"."""
    return f"sm{sm[0]}{sm[1]}"


def _bad(path, where: str, message: str) -> KnownFailuresFileError:
    return KnownFailuresFileError(f"known-failures file {path}: {where}{message}")


def _strings(value, path, where, name) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(path, where, f"{name} must be a string or a list of strings, got {value!r}")
    return tuple(value)


def _entry(raw, path, index: int) -> KnownFailure:
    where = f"entry {index + 1}: "
    if not isinstance(raw, dict):
        raise _bad(path, where, "each [[failure]] must be a table")
    where = f"entry {index + 1} ({raw.get('id', 'no id')}): "
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _bad(path, where, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(_FIELDS))}")
    for name in ("id", "url", "reason"):
        if not isinstance(raw.get(name), str) or not raw[name].strip():
            raise _bad(path, where, f"needs {name} (a non-empty string)")
    if not _MARKER_RE.fullmatch(f"known failure {raw['id']}: "):
        raise _bad(path, where, f"id {raw['id']!r} may hold letters, digits, '.', '_' and '-' only")
    if "condition" not in raw and "cases" not in raw:
        raise _bad(path, where, "needs a condition (decided by the backend) or cases (names), or both")
    versions = raw.get("versions", "")
    if versions:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            SpecifierSet(versions)
        except (InvalidSpecifier, TypeError):
            raise _bad(path, where, f"versions {versions!r} is not a version specifier such as '>=0.6,<0.8'") from None
        if not raw.get("library"):
            raise _bad(path, where, "versions needs library (the distribution whose version it constrains)")
    arch = _strings(raw.get("arch", []), path, where, "arch") if raw.get("arch") else ()
    bad_arch = [a for a in arch if not _ARCH_RE.match(a)]
    if bad_arch:
        raise _bad(path, where, f"arch {', '.join(bad_arch)}: name GPU architectures as sm80, sm90, sm100, sm120")
    if not isinstance(raw.get("run", True), bool):
        raise _bad(path, where, f"run must be true or false, got {raw['run']!r}")
    if not isinstance(raw.get("params", {}), dict):
        raise _bad(path, where, "params must be a table")
    if not isinstance(raw.get("condition", ""), str):
        raise _bad(path, where, f"condition must be a string, got {raw['condition']!r}")
    return KnownFailure(
        id=raw["id"], url=raw["url"], reason=raw["reason"], source=str(path),
        backends=_strings(raw.get("backends", ["*"]), path, where, "backends"), condition=raw.get("condition", ""),
        cases=_strings(raw["cases"], path, where, "cases") if "cases" in raw else (),
        library=str(raw.get("library", "")), versions=versions, arch=arch, run=raw.get("run", True),
        params=dict(raw.get("params", {})))


def load_file(path) -> list[KnownFailure]:
    """The entries of one file; KnownFailuresFileError (one line) when it cannot be used."""
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KnownFailuresFileError(f"known-failures file {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise KnownFailuresFileError(f"known-failures file {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"failure"})
    if unknown:
        raise _bad(path, "", f"unknown top-level key(s) {', '.join(unknown)}; entries are [[failure]] tables")
    raw = data.get("failure", [])
    if not isinstance(raw, list):
        raise _bad(path, "", "failure must be an array of tables ([[failure]])")
    entries = [_entry(item, path, i) for i, item in enumerate(raw)]
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise _bad(path, "", f"id {entry.id!r} appears twice")
        seen.add(entry.id)
    return entries


class KnownFailures:
    """Every entry in force: the built-in files' and the user's."""

    def __init__(self, entries: Iterable[KnownFailure] = ()):
        self._by_id: dict[str, KnownFailure] = {}
        self.extend(entries)

    def extend(self, entries: Iterable[KnownFailure]) -> None:
        for entry in entries:
            other = self._by_id.get(entry.id)
            if other is not None and other.source != entry.source:
                raise KnownFailuresFileError(f"known-failures file {entry.source}: id {entry.id!r} is already "
                                             f"defined in {other.source}; give it another id")
            self._by_id[entry.id] = entry

    def __iter__(self):
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, entry_id: str) -> Optional[KnownFailure]:
        return self._by_id.get(entry_id)

    def condition(self, name: str, *, backend: Optional[str] = None, version_of=lambda library: None,
                  arch: Optional[str] = None) -> list[KnownFailure]:
        """The entries of a backend's condition that hold here (first: the one to cite)."""
        return [e for e in self if e.condition == name
                and e.applies(backend=backend, version=version_of(e.library) if e.library else None, arch=arch)]

    def for_case(self, backend: str, case: str, *, version_of=lambda library: None,
                 arch: Optional[str] = None) -> list[KnownFailure]:
        """The entries naming this case for this backend that hold here (and name no condition:
        those are the backend's to decide)."""
        return [e for e in self if case in e.cases and not e.condition
                and e.applies(backend=backend, version=version_of(e.library) if e.library else None, arch=arch)]

    def in_reasons(self, reasons: Iterable[str]) -> tuple[list[KnownFailure], list[str]]:
        """(the entries these refusal reasons cite, the reasons that cite none)."""
        cited, other = [], []
        for reason in reasons:
            found = [self._by_id[m] for m in _MARKER_RE.findall(reason) if m in self._by_id]
            if found:
                cited += [e for e in found if e not in cited]
            else:
                other.append(reason)
        return cited, other


# -- the entries in force in this process --------------------------------------------------------------
_LOCK = threading.Lock()
_FAMILY_FILES: dict[str, Path] = {}  # family -> its built-in file
_LOADED: Optional[KnownFailures] = None
_USER_FILES: list[Path] = []
_LIFTED: set[str] = set()  # ids a run lifts to watch the failure happen (the plugin, one test at a time)


def register_family(family: str, path) -> None:
    """A backend module names its family's data file (loaded on first use)."""
    global _LOADED
    with _LOCK:
        if _FAMILY_FILES.get(family) != Path(path):
            _FAMILY_FILES[family] = Path(path)
            _LOADED = None


def use_user_files(paths: Iterable) -> None:
    """Files given with --attn-known-failures; each is checked now (KnownFailuresFileError)."""
    global _LOADED
    paths = [Path(p) for p in paths]  # as given: errors name them so
    with _LOCK:
        known = KnownFailures()
        for path in [*_FAMILY_FILES.values(), *paths]:  # every file checked, a duplicate id too, before any is used
            known.extend(load_file(path))
        _USER_FILES[:] = [p.resolve() for p in paths]  # a later reload may run in another directory
        _LOADED = known


def active() -> KnownFailures:
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            known = KnownFailures()
            for path in [*_FAMILY_FILES.values(), *_USER_FILES]:
                known.extend(load_file(path))
            _LOADED = known
        return _LOADED


def lifted(entry_id: str) -> bool:
    return entry_id in _LIFTED


class lift:
    """``with lift(ids):`` the backends do not refuse on these entries (to watch them fail)."""

    def __init__(self, ids: Iterable[str]):
        self.ids = set(ids)

    def __enter__(self):
        _LIFTED.update(self.ids)
        return self

    def __exit__(self, *exc):
        _LIFTED.difference_update(self.ids)
        return False


class Family:
    """What a backend module asks: the reasons of its conditions that hold here.

    ``reasons(condition, sm=..., holds=lambda params: ..., **values)`` -> the reason of the first
    entry of that condition in force for this library version and architecture whose data makes
    ``holds`` true, formatted with ``values``; [] when none does or it is lifted."""

    def __init__(self, family: str, path):
        self.family, self.path = family, Path(path)
        register_family(family, self.path)

    def entries(self, condition: str, sm=None) -> list[KnownFailure]:
        register_family(self.family, self.path)  # again: a module imported twice, or a test's file, may have replaced it
        return active().condition(condition, version_of=installed_version, arch=arch_name(sm) if sm else None)

    def reasons(self, condition: str, *, sm=None, holds=lambda params: True, **values) -> list[str]:
        for entry in self.entries(condition, sm):
            try:
                found = holds(entry.params)
            except (KeyError, TypeError) as exc:
                raise KnownFailuresFileError(f"known-failures file {entry.source}: entry {entry.id}: condition "
                                             f"{condition} needs params {exc}") from None
            if found:
                return [] if lifted(entry.id) else [entry.text(**values)]
        return []
