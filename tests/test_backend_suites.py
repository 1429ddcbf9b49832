"""A backend owns its tests: the modules it names in ``Backend.suite_modules`` (or that a plugin's
``pytest_attn_suite_modules`` hook names) run when the backend is selected and are left out when it
is not; the generic suite names no backend and decides nothing by file name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from backend_packages import write_backend_package

pytest_plugins = ["pytester"]

OWNED = '''
from pytest_attn.core.contract import Capabilities
from pytest_attn_backends.torch_sdpa import TorchSDPABackend


class Owned(TorchSDPABackend):
    suite_modules = ("test_owned_suite",)


owned = Owned(name="owned")
plain = TorchSDPABackend(name="plain")
'''

OWN_SUITE = '''
def test_only_for_owned(attn_session):
    assert any(b.name == "owned" for b in attn_session.selected)
'''


@pytest.fixture
def owned(pytester):
    site = write_backend_package(pytester, "owned_attn", OWNED,
                                 {"owned": "owned_attn:owned", "plain": "owned_attn:plain"})
    (site / "test_owned_suite.py").write_text(OWN_SUITE)
    pytester.makepyfile(test_mine="def test_mine():\n    pass\n")
    return site


def test_a_backends_own_suite_runs_when_it_is_selected(pytester, owned):
    result = pytester.runpytest("--attn-backend=owned", "--attn-suite=auto", "--attn-cases=hd64-ragged", "-v")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*test_owned_suite.py::test_only_for_owned PASSED*"])


def test_a_backends_own_suite_is_left_out_when_another_is_selected(pytester, owned):
    collected = " ".join(pytester.runpytest("--attn-backend=plain", "--attn-suite=auto", "--attn-cases=hd64-ragged",
                                            "--collect-only", "-q").outlines)
    assert "test_only_for_owned" not in collected and "test_mine" in collected


def test_a_plugin_adds_suite_modules_through_the_hook(pytester, owned):
    (owned / "test_extra_suite.py").write_text("def test_extra():\n    pass\n")
    pytester.makeconftest("def pytest_attn_suite_modules(config, backends):\n"
                          "    return ['test_extra_suite'] if any(b.name == 'plain' for b in backends) else []\n")
    collected = " ".join(pytester.runpytest("--attn-backend=plain", "--attn-suite=auto", "--attn-cases=hd64-ragged",
                                            "--collect-only", "-q").outlines)
    assert "test_extra" in collected


def test_a_suite_module_pytest_would_not_collect_is_a_usage_error(pytester, owned):
    (owned / "checks.py").write_text(OWN_SUITE)
    (owned / "owned_attn.py").write_text(OWNED.replace('("test_owned_suite",)', '("checks",)'))
    result = pytester.runpytest("--attn-backend=owned", "--attn-suite=auto")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*suite module 'checks' is checks.py, which pytest does not collect*test_*.py"])


def test_a_suite_module_that_cannot_be_found_is_a_usage_error(pytester, owned):
    (owned / "owned_attn.py").write_text(OWNED.replace('("test_owned_suite",)', '("no_such_suite",)'))
    result = pytester.runpytest("--attn-backend=owned", "--attn-suite=auto")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*suite module 'no_such_suite'*cannot be found*"])


def test_the_generic_suite_names_no_backend():
    """No module of pytest_attn imports a backend or names one of the built-in backend modules."""
    root = Path(__file__).resolve().parents[1] / "pytest_attn"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("pytest_attn_backends"), f"{path} imports {node.module}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith(("test_flashinfer", "test_trtllm")), f"{path}: {node.value!r}"
