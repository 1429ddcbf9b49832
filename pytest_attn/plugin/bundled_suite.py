"""The validation suite that ships with pytest-attn (``pytest_attn/suite``), added to a run.

``pytest --attn-backend=NAME`` in any project runs the bundled suite against NAME together with the
project's own tests: when --attn-backend is given and no test paths are (``--attn-suite=auto``),
or always with ``--attn-suite=on``; ``--attn-suite=off`` leaves it out. It is never added twice:
a run that already names it (``--pyargs pytest_attn.suite``, a path inside it, or a folder that
contains it, as this project's own testpaths do) is left as it is.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

SUITE_PACKAGE = "pytest_attn.suite"
#: Suite modules that test one backend family: collected only when such a backend is selected.
BACKEND_MODULES = {"test_flashinfer_gpu.py": "flashinfer", "test_trtllm_gpu.py": "trtllm"}


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


def add_to_run(config) -> bool:
    """Add the suite's folder to this run's arguments when wanted; True when it was added."""
    if not wanted(config) or already_included(config):
        return False
    config.args.append(str(suite_dir()))
    return True


def header_line(config, added: bool) -> Optional[str]:
    if added:
        return (f"attn suite: the bundled validation suite ({SUITE_PACKAGE}) runs with this run's tests; "
                "--attn-suite=off leaves it out")
    if config.getoption("attn_suite", "auto") == "off":
        return "attn suite: off (--attn-suite=off)"
    return None


def inapplicable(item, session) -> bool:
    """A suite test that cannot apply to this run (see suite/conftest.py)."""
    from pytest_attn.core.contract import Backend
    from pytest_attn.plugin.collected import backend_name_of

    if suite_dir() not in item.path.parents:
        return False
    if item.get_closest_marker("attn_gpu") is not None and session.device_type != "cuda":
        return True
    name = item.path.name
    if name == "test_graph_replay.py":
        backend = session.registry.get(backend_name_of(item))
        return type(backend).graph_decoder is Backend.graph_decoder
    if name == "test_differential.py":
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case_name") if callspec is not None else None
        runnable = [b for b in session.selected if session.availability(b)]
        if len(runnable) < 2:
            return True
        if session.case_filter and case is not None:
            from pytest_attn.cases.catalog import select

            return case not in {c.name for c in select(session.case_filter)}
    return False


def deselect_inapplicable(config, items) -> None:
    from pytest_attn.plugin.session import attn_session_of

    session = attn_session_of(config)
    drop = [item for item in items if inapplicable(item, session)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]
