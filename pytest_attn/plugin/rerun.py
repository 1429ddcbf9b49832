"""The command that reruns exactly one test, from the directory the user ran pytest in.

A test of the bundled suite has a node ID relative to pytest-attn's install (``pytest_attn/suite/
test_correctness.py::...``), which pytest cannot find from the user's project: the command names the
file by a path that works from there, then the test's name and parameters, then the options that
decide what the test is and sees (its backend, its case, the resolved seed, dtypes, device, limits,
strictness).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional


def test_target(item) -> list[str]:
    """How pytest finds this one test: a test of the bundled suite by package and exact name (so
    the command works wherever pytest-attn is installed, a CI artifact's reader's machine too), any
    other by ``path::name[params]``, the path relative to the invocation directory when inside it."""
    from pytest_attn.plugin.bundled_suite import suite_dir

    path = Path(item.path)
    name = item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.name
    if suite_dir() in path.parents:
        return ["--pyargs", "pytest_attn.suite", "-k", name.split("::")[-1]]
    here = Path(item.config.invocation_params.dir)
    try:
        shown = os.path.relpath(path, here) if path.is_relative_to(here) else str(path)
    except ValueError:  # another drive
        shown = str(path)
    return [f"{shown}::{name}"]


def attn_options(item, seed: Optional[int]) -> list[str]:
    """The pytest-attn options that make this test the same test: its own backend and case (so a
    run of this one test names nothing it does not run: no other backend, no --attn-cases for a
    test that takes no case), and the run's settings."""
    from pytest_attn.plugin.collected import backend_name_of, case_of
    from pytest_attn.plugin.options import split_list

    config = item.config
    backend, case = backend_name_of(item), case_of(item)
    backends = [backend] if backend else split_list(config, "attn_backend")
    args = [f"--attn-backend={','.join(backends)}"] if backends else []
    if case is not None:  # a test that takes no case needs no filter, and one would select nothing
        from pytest_attn.plugin.session import attn_session_of

        args.append(f"--attn-cases={case.name}")
        args += attn_session_of(config).case_source_options(case)  # its --attn-case-file or --attn-fuzz
    dtypes = split_list(config, "attn_dtype")
    if dtypes:
        args.append(f"--attn-dtype={','.join(dtypes)}")
    for dest in ("attn_device", "attn_max_tokens"):
        value = config.getoption(dest, None)
        if value is not None:
            args.append(f"--{dest.replace('_', '-')}={value}")
    if config.getoption("attn_strict", False):
        args.append("--attn-strict")
    if seed is not None:
        args.append(f"--attn-seed={seed}")
    for path in split_list(config, "attn_known_failures"):  # the user's own entries make it the same test
        args.append(f"--attn-known-failures={Path(path).resolve()}")
    return args


def rerun_command(item, seed: Optional[int] = None) -> str:
    """A shell command, to paste where the user ran pytest, that reruns this one test."""
    words = ["python3", "-m", "pytest", *test_target(item), *attn_options(item, seed)]
    return " ".join(shlex.quote(w) for w in words)
