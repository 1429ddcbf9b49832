"""Crash isolation: a backend that kills its process, or poisons its CUDA context, fails only its
own tests, and every other result is kept: with --attn-isolate (a subprocess per test) and under
xdist (a fresh worker). The crashing backends are real: ctypes.string_at(0) and os.abort()."""
import json
import os
import signal
import sys

import pytest
from backend_packages import write_backend_package

from pytest_attn.plugin import isolation

CRASHERS = '''
import ctypes
import os

from pytest_attn_backends.torch_sdpa import TorchSDPABackend


class Crasher(TorchSDPABackend):
    """The torch backend, except that forward dies the way a broken kernel does."""

    def __init__(self, name):
        super().__init__(name)

    def forward(self, q, k, v, metadata, plan, out=None):
        if self.name == "segv":
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        elif self.name == "abort":
            os.abort()  # SIGABRT, as a failed assert in C++ does
        elif self.name == "poison":
            # what torch raises after a kernel's illegal memory access (FlashInfer fa2, head_dim 80)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().forward(q, k, v, metadata, plan, out)


segv, abort, poison = Crasher("segv"), Crasher("abort"), Crasher("poison")
'''
CRASHER_ENTRY_POINTS = {"segv": "crash_attn:segv", "abort": "crash_attn:abort", "poison": "crash_attn:poison"}

FORWARD_TEST = """
def test_forward(attn_backend, make_attn_batch):
    make_attn_batch([7, 3], num_heads=2, head_dim=16).assert_matches_reference(attn_backend)
"""
MORE_TESTS = """
import pytest

@pytest.mark.parametrize("i", range(6))
def test_unrelated(i):
    pass
"""


@pytest.fixture
def crashers(pytester, monkeypatch):
    """The segv, abort and poison backends, registered through entry points (also for subprocesses)."""
    site = write_backend_package(pytester, "crash_attn", CRASHERS, CRASHER_ENTRY_POINTS)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    return site


# -- units ----------------------------------------------------------------------------------------
def test_exit_status_names_the_signal():
    assert isolation.describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV (signal 11)"
    assert isolation.describe_exit(-signal.SIGABRT) == "killed by SIGABRT (signal 6)"
    assert isolation.describe_exit(3) == "exited with status 3"


def test_child_gets_plugins_and_configuration_but_not_test_selection():
    args = ["-p", "no:randomly", "-pfoo", "-k", "x", "-o", "a=b", "--rootdir=/r", "-x", "-p", "no:cacheprovider", "t.py"]
    assert isolation._forwarded_invocation_args(args) == ["-p", "no:randomly", "-pfoo", "-o", "a=b", "--rootdir=/r"]


def test_unknown_isolate_name_stops_the_run_with_a_usage_message(pytester):
    pytester.makepyfile(FORWARD_TEST)
    result = pytester.runpytest("--attn-isolate=nope", "--attn-backend=torch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--attn-isolate names unknown backend(s) 'nope'; registered: *torch*"])


# -- without xdist --------------------------------------------------------------------------------
@pytest.mark.attn_long
def test_without_isolation_a_segfault_takes_the_whole_run_down(pytester, crashers):
    pytester.makepyfile(FORWARD_TEST)
    result = pytester.runpytest_subprocess("--attn-backend=segv,torch", "-p", "no:cacheprovider")
    assert result.ret not in (0, 1), result.ret  # killed: no summary, no result for torch either
    assert "Segmentation fault" in result.stderr.str() + result.stdout.str()
    assert "passed" not in result.stdout.str()


@pytest.mark.attn_long
def test_isolated_crashes_fail_only_their_own_tests(pytester, crashers):
    # 'all': the torch test runs in a subprocess too, and its child's passing report comes through
    pytester.makepyfile(FORWARD_TEST)
    result = pytester.runpytest_subprocess("--attn-backend=segv,torch,abort", "--attn-isolate=all",
                                           "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*test_forward[[]segv[]] crashed its isolated subprocess during call: killed by SIGSEGV (signal 11)*",
        "*test_forward[[]abort[]] crashed its isolated subprocess during call: killed by SIGABRT (signal 6)*",
    ])
    assert "PASSED test_isolated_crashes_fail_only_their_own_tests.py::test_forward[torch]" in out
    # the child's faulthandler traceback points at the culprit, pytest's own frames left out
    assert "crash_attn.py" in out and "pluggy" not in out.split("= FAILURES =")[1].split("short test summary")[0]


def test_isolation_works_from_a_users_project_for_the_bundled_suite_and_its_own_tests(pytester, crashers):
    """Issue 17: from a directory outside this repository the children named the bundled suite's
    tests from another root, and every isolated test came back as 'never started'."""
    pytester.makepyfile(FORWARD_TEST)
    result = pytester.runpytest_subprocess("--attn-backend=torch,abort", "--attn-isolate=all", "--attn-suite=on",
                                           "--attn-cases=vit-1img-224", "-p", "no:cacheprovider", "-k",
                                           "test_forward or test_output_matches_reference or test_plan_matches")
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) == 0 and "never started" not in result.stdout.str(), result.stdout.str()
    # torch passes all three; abort's plan test runs no forward and passes, its two forwards crash
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines(["torch: 3 passed", "abort: 1 passed, 2 failed"])
    result.stdout.fnmatch_lines(["*test_output_matches_reference[[]abort-vit-1img-224[]] crashed its isolated "
                                 "subprocess during call: killed by SIGABRT*"])
    # the closing section gives, for each crash, the command that reruns it from here, with its backend
    seed = "--attn-seed=20261125"
    result.stdout.fnmatch_lines([
        "abort: 1 passed, 2 failed",
        f"  rerun: python3 -m pytest *--attn-backend=abort*{seed}",
        f"  rerun: python3 -m pytest *--attn-backend=abort*{seed}"])
    reruns = [line for line in result.stdout.lines if line.startswith("  rerun: ")]
    assert any("--pyargs pytest_attn.suite -k 'test_output_matches_reference[abort-vit-1img-224]'" in line
               for line in reruns), reruns
    assert any("'test_isolation_works_from_a_users_project_for_the_bundled_suite_and_its_own_tests.py::"
               "test_forward[abort]'" in line for line in reruns), reruns


# The user's project, as in issue 17: no pytest-attn option in its configuration, the bundled suite added
# because --attn-backend is given without test paths.
USERS_PROJECT_ADDOPTS = "-p no:hypothesispytest -W ignore::pytest.PytestAssertRewriteWarning"


def test_isolation_from_a_users_project_as_the_user_ran_it(pytester, crashers, monkeypatch):
    monkeypatch.setenv("PYTEST_ADDOPTS", USERS_PROJECT_ADDOPTS)
    pytester.makepyfile(test_mine="def test_trivial():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest_subprocess("--attn-backend=torch", "--attn-isolate=torch",
                                           "--attn-cases=vit-1img-224")
    assert "never started" not in result.stdout.str(), result.stdout.str()
    result.assert_outcomes(passed=5)  # the user's test, and torch's output, plan, trace and same-bits tests, each in a child
    result.stdout.fnmatch_lines(["*attn suite: the bundled validation suite*", "torch: 4 passed"])


# Each isolated child logs the tests it ran (from every report it made, so a bundled-suite test, outside
# this conftest's folder, would be logged too), to show it runs its one test and nothing else.
CHILD_LOG_CONFTEST = """
import os

def pytest_sessionfinish(session):
    if os.environ.get("PYTEST_ATTN_ISOLATED_CHILD"):
        stats = session.config.pluginmanager.get_plugin("terminalreporter").stats
        ran = sorted({r.nodeid for reports in stats.values() for r in reports if getattr(r, "when", "") == "setup"})
        with open(os.path.join(str(session.config.rootpath), "children.log"), "a") as f:
            f.write(" ".join(ran) + "\\n")
"""
FAILS_IN_ANOTHER_FILE = """
def test_forward(attn_backend):
    assert False, "test_two.py's test_forward fails"
"""


def test_an_isolated_test_is_reported_as_itself_when_addopts_add_other_tests(pytester, crashers, monkeypatch):
    """A project whose addopts add tests (another file, the bundled suite): each child runs its one
    test only, and a test of the same name in another file never stands in for it."""
    monkeypatch.setenv("PYTEST_ADDOPTS", USERS_PROJECT_ADDOPTS)
    pytester.makeini("[pytest]\naddopts = --attn-suite=on test_two.py\n")
    pytester.makeconftest(CHILD_LOG_CONFTEST)
    pytester.makepyfile(test_one=FORWARD_TEST, test_two=FAILS_IN_ANOTHER_FILE)
    result = pytester.runpytest_subprocess("test_one.py", "--attn-backend=torch", "--attn-isolate=torch",
                                           "--attn-cases=gqa-r2-kv1", "-k", "test_forward", "-p", "no:cacheprovider",
                                           "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["PASSED test_one.py::test_forward[[]torch[]]",
                                 "FAILED test_two.py::test_forward[[]torch[]] - AssertionError: test_two.py's *"])
    children = (pytester.path / "children.log").read_text().splitlines()
    assert sorted(children) == ["test_one.py::test_forward[torch]", "test_two.py::test_forward[torch]"], children


SPEED_TEST = """
def test_speed(attn_benchmark, attn_backend, make_attn_batch):
    attn_benchmark(attn_backend, make_attn_batch([16, 8], num_heads=2, head_dim=8))
"""
CHEAP_MACHINE_INFO = """
def pytest_benchmark_generate_machine_info(config):
    return {"machine": "test", "cpu": {"brand_raw": "test cpu"}}  # py-cpuinfo takes over a second
"""


def test_an_isolated_backends_benchmarks_are_recorded_in_this_run(pytester, monkeypatch):
    """pytest-benchmark keeps what it times in the process that ran the test: a benchmark run in a
    child would pass and leave no row in --benchmark-json (or --benchmark-compare)."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark switches itself off
    pytester.makeconftest(CHEAP_MACHINE_INFO)
    pytester.makepyfile(test_speed=SPEED_TEST, test_forward=FORWARD_TEST)
    result = pytester.runpytest_subprocess("--attn-backend=torch", "--attn-isolate=torch", "--attn-bench-iters=3",
                                           "--attn-bench-warmup=0", "--benchmark-json=out.json", "-p",
                                           "no:cacheprovider")
    result.assert_outcomes(passed=2)
    (row,) = json.loads((pytester.path / "out.json").read_text())["benchmarks"]
    assert row["name"] == "test_speed[torch]" and row["extra_info"]["backend"] == "torch"


# -- under xdist ----------------------------------------------------------------------------------
@pytest.mark.attn_long
def test_xdist_survives_a_crash_and_replaces_a_poisoned_worker(pytester, crashers):
    # test_forward[poison] is collected first, so its worker has another test queued behind it:
    # that test must not be blamed, but handed to a fresh worker and pass there.
    pytester.makepyfile(test_a=FORWARD_TEST, test_b=MORE_TESTS)
    result = pytester.runpytest_subprocess("--attn-backend=poison,segv,torch", "-n", "2", "-p", "no:cacheprovider",
                                           "test_a.py", "test_b.py")
    result.assert_outcomes(passed=7, failed=2)
    out = result.stdout.str()
    assert "crashed while running 'test_a.py::test_forward[segv]'" in out
    result.stdout.fnmatch_lines([
        "*the error ('illegal memory access') means this process's CUDA context is poisoned: worker gw* ends*",
        "gw* ended after test_a.py::test_forward[[]poison[]] poisoned its CUDA context ('illegal memory access');"
        " * ran on a fresh worker instead",
    ])
    assert out.count("replacing crashed worker") == 2


@pytest.mark.skipif(sys.platform == "win32", reason="signals")
def test_poisoned_context_markers_match_cuda_errors():
    from pytest_attn.plugin.xdist.gpu_workers import poisoned_context_reason

    assert poisoned_context_reason("torch.AcceleratorError: CUDA error: an illegal memory access was encountered")
    assert poisoned_context_reason("RuntimeError: CUDA_ERROR_ILLEGAL_ADDRESS") == "cuda_error_illegal_address"
    assert poisoned_context_reason("cudaErrorIllegalAddress") == "cudaerrorillegaladdress"
    assert poisoned_context_reason("device-side assert triggered") == "device-side assert"
    assert poisoned_context_reason("AssertionError: max |out - ref| = 1e-2 EXCEEDS") is None


# -- a real poisoned CUDA context (GPU only) ------------------------------------------------------
DEVICE_ASSERT = '''
import torch

from pytest_attn_backends.torch_sdpa import TorchSDPABackend


class DeviceAssert(TorchSDPABackend):
    """The torch backend, except that forward first reads past the end of q on the GPU: a real
    device-side assert, after which every CUDA call of the process fails."""

    def forward(self, q, k, v, metadata, plan, out=None):
        past_the_end = torch.arange(q.shape[0], device=q.device) + q.shape[0]
        q.index_select(0, past_the_end)
        torch.cuda.synchronize()
        return super().forward(q, k, v, metadata, plan, out)


device_assert = DeviceAssert("device-assert")
'''
CUDA_AFTERWARDS = """
import pytest
import torch

@pytest.mark.parametrize("i", range(4))
def test_cuda_still_works(i):
    assert torch.ones(8, device="cuda").sum().item() == 8
"""


@pytest.fixture
def device_assert(pytester, monkeypatch):
    site = write_backend_package(pytester, "assert_attn", DEVICE_ASSERT, {"device-assert": "assert_attn:device_assert"})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(test_a=FORWARD_TEST, test_b=CUDA_AFTERWARDS)


@pytest.mark.attn_gpu
@pytest.mark.attn_long
def test_a_real_device_side_assert_poisons_the_rest_of_an_unprotected_run(pytester, device_assert):
    result = pytester.runpytest_subprocess("--attn-backend=device-assert,torch", "-p", "no:cacheprovider",
                                           "test_a.py", "test_b.py")
    outcomes = result.parseoutcomes()
    # the culprit, and the CUDA tests after it in the same process, fail
    assert outcomes.get("failed", 0) >= 2 and "device-side assert" in result.stdout.str(), result.stdout.str()


@pytest.mark.attn_gpu
@pytest.mark.attn_long
def test_a_real_device_side_assert_fails_only_its_own_test_under_xdist(pytester, device_assert):
    result = pytester.runpytest_subprocess("--attn-backend=device-assert,torch", "-n", "2", "-p", "no:cacheprovider",
                                           "test_a.py", "test_b.py")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*test_forward[[]device-assert[]]*",
                                 "*the error ('device-side assert') means this process's CUDA context is poisoned*"])


@pytest.mark.attn_gpu
@pytest.mark.attn_long
def test_a_real_device_side_assert_fails_only_its_own_test_when_isolated(pytester, device_assert):
    result = pytester.runpytest_subprocess("--attn-backend=device-assert,torch", "--attn-isolate=device-assert",
                                           "-p", "no:cacheprovider", "test_a.py", "test_b.py")
    result.assert_outcomes(passed=5, failed=1)
    assert "device-side assert" in result.stdout.str()
