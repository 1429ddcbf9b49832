"""The validation suite that ships with pytest-attn (``pytest_attn/suite``), added to a run.

``pytest --attn-backend=NAME`` in any project runs the bundled suite against NAME together with the
project's own tests: when --attn-backend is given and no test paths are (``--attn-suite=auto``),
or always with ``--attn-suite=on``; ``--attn-suite=off`` leaves it out. It is never added twice:
a run that already names it (``--pyargs pytest_attn.suite``, a path inside it, or a folder that
contains it, as this project's own testpaths do) is left as it is.

Backends bring their own suite modules (``Backend.suite_modules``, or a plugin's
``pytest_attn_suite_modules`` hook): added beside the bundled suite for a selected backend, and
left out of a run that selects none that names them. Which generic tests apply is read from their
markers (``attn_gpu``, ``attn_graph_replay``, ``attn_differential``), never from file names.
"""
from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path
from typing import Optional

import pytest

SUITE_PACKAGE = "pytest_attn.suite"


def suite_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "suite"


def _arg_path(config, arg: str) -> Optional[Path]:
    """The file or folder a command-line argument names (a path, or a module with --pyargs)."""
    target = str(arg).split("::", 1)[0]
    if not target or target.startswith("-"):
        return None
    if config.getoption("pyargs", False) and not Path(target).exists():
        try:
            spec = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return None
        if spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0]).resolve()
        return Path(spec.origin).resolve() if spec.origin else None
    path = Path(target)
    return (path if path.is_absolute() else Path(config.invocation_params.dir) / path).resolve()


def already_included(config) -> bool:
    suite = suite_dir()
    for arg in config.args:
        path = _arg_path(config, arg)
        if path is not None and (path == suite or suite in path.parents or path in suite.parents):
            return True
    return False


def wanted(config) -> bool:
    mode = config.getoption("attn_suite", "auto")
    if mode == "off":
        return False
    if mode == "on":
        return True
    from_command_line = getattr(config, "args_source", None) == config.ArgsSource.ARGS
    return bool(config.getoption("attn_backend", None)) and not from_command_line


def _module_file(name: str) -> Optional[Path]:
    """The file of a test module named by its dotted name, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    return Path(spec.origin).resolve() if spec is not None and spec.origin else None


def backend_suite_files(config, backends) -> list[Path]:
    """The test files that ``backends`` bring (``pytest_attn_suite_modules``), in order, once each.
    A module that cannot be found is a usage error naming it."""
    from pytest_attn.core.errors import AttnInputError

    files: list[Path] = []
    for names in config.hook.pytest_attn_suite_modules(config=config, backends=list(backends)):
        for name in names or ():
            path = _module_file(name)
            if path is None:
                raise AttnInputError(f"suite module {name!r} (Backend.suite_modules or pytest_attn_suite_modules) "
                                     "cannot be found: install its package or fix the name")
            patterns = config.getini("python_files")
            if not any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
                raise AttnInputError(f"suite module {name!r} is {path.name}, which pytest does not collect as tests "
                                     f"(python_files: {' '.join(patterns)}): name it test_*.py")
            if path not in files:
                files.append(path)
    return files


def add_to_run(config) -> bool:
    """Add the suite's folder, and the suite modules of the selected backends, to this run's
    arguments when wanted; True when the suite was added."""
    if not wanted(config):
        return False
    from pytest_attn.plugin.session import attn_session_of

    included = already_included(config)
    if not included:
        config.args.append(str(suite_dir()))
    named = {_arg_path(config, arg) for arg in config.args}
    for path in backend_suite_files(config, attn_session_of(config).selected):
        if path not in named:  # a folder above it may be named too: pytest collects a file once
            config.args.append(str(path))
    return not included


_SUITE_FILES = pytest.StashKey[tuple]()


def suite_files(config) -> tuple[frozenset, frozenset]:
    """(every registered backend's own suite files, those no selected backend brings), once a run."""
    if _SUITE_FILES not in config.stash:
        from pytest_attn.plugin.session import attn_session_of

        session = attn_session_of(config)
        every = frozenset(backend_suite_files(config, session.registry.resolve(["all"])))
        config.stash[_SUITE_FILES] = (every, every - set(backend_suite_files(config, session.selected)))
    return config.stash[_SUITE_FILES]


def header_line(config, added: bool) -> Optional[str]:
    if added:
        return (f"attn suite: the bundled validation suite ({SUITE_PACKAGE}) runs with this run's tests; "
                "--attn-suite=off leaves it out")
    if config.getoption("attn_suite", "auto") == "off":
        return "attn suite: off (--attn-suite=off)"
    return None


def inapplicable(item, session) -> bool:
    """A test that cannot apply to this run, by its markers: GPU-only on a CPU run, a graph replay
    of a backend without a graph decoder, a differential with fewer than two runnable backends or
    a case outside --attn-cases."""
    from pytest_attn.core.contract import Backend
    from pytest_attn.plugin.collected import backend_name_of

    if (item.get_closest_marker("attn_gpu") is not None and session.device_type != "cuda"
            and _ours(item, session)):
        return True
    if item.get_closest_marker("attn_graph_replay") is not None:
        backend = session.registry.get(backend_name_of(item))
        return type(backend).graph_decoder is Backend.graph_decoder
    if item.get_closest_marker("attn_differential") is not None:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case_name") if callspec is not None else None
        runnable = [b for b in session.selected if session.availability(b)]
        if len(runnable) < 2:
            return True
        if session.case_filter and case is not None:
            return case not in {c.name for c in session.cases()}
    return False


def _ours(item, session) -> bool:
    """A test of the bundled suite or of a backend's own suite (a user's own GPU test is skipped
    with its reason instead, by the plugin)."""
    path = Path(item.path).resolve()
    return suite_dir() in path.parents or path in suite_files(item.config)[0]


def deselect_inapplicable(config, items) -> None:
    from pytest_attn.plugin.session import attn_session_of

    session = attn_session_of(config)
    drop = [item for item in items if inapplicable(item, session)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]
