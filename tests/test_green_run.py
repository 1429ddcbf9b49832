"""A green run means the named backends were tested (issue 17): a named backend that ran nothing,
or --attn-cases that selected nothing, fails the run with one line; no combination of the
documented options, markers and fixtures ends in an INTERNALERROR."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend_packages import CASE_TEST

NARROWED_TEST = """
import pytest

@pytest.mark.attn_cases("decode")
def test_decode_only(attn_backend, attn_case):
    assert attn_case.name
"""


def verdict_lines(result) -> list[str]:
    return [line for line in result.stdout.lines if line.startswith("pytest-attn: FAILED")]


def test_a_named_backend_that_is_unavailable_fails_the_run_in_one_line(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=ghost,torch", "--attn-cases=hd64-ragged,hd80-ragged")
    result.assert_outcomes(passed=2, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert verdict_lines(result) == [
        "pytest-attn: FAILED: --attn-backend=ghost ran none of its 2 tests: all skipped (2: is unavailable here: needs "
        "the ghost library (pip install ghost-attn)). Run where it is available, or pass --attn-allow-unavailable to "
        "accept that"]


def test_allow_unavailable_lets_a_cpu_only_job_name_a_gpu_backend(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=ghost,torch", "--attn-cases=hd64-ragged", "--attn-allow-unavailable")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK and not verdict_lines(result)


def test_a_named_backend_that_supports_none_of_the_named_cases_fails_even_when_unavailable_is_allowed(
        pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=narrow", "--attn-cases=hd80-ragged,hd96-ragged",
                                "--attn-allow-unavailable")
    result.assert_outcomes(skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert verdict_lines(result) == [
        "pytest-attn: FAILED: --attn-backend=narrow ran none of its 2 tests: all skipped (1: head_dim 80 not "
        "supported (supports [64]) (and 1 other reason(s))). Name cases it supports (--attn-cases), or another "
        "backend"]


def test_all_keeps_its_meaning_unavailable_backends_skip(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=all", "--attn-cases=hd64-ragged")
    assert not verdict_lines(result)  # ghost and the GPU backends skip; 'forgets' fails on its own
    result.stdout.fnmatch_lines(["ghost: 1 skipped", "forgets: 1 failed"])


def test_a_named_backend_not_collected_at_all_is_left_to_the_user(pytester, demo_backends):
    """-k (or one test ID) choosing another backend's tests is the user's choice, not a silent pass."""
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=ghost,torch", "--attn-cases=hd64-ragged", "-k", "torch")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK


def test_collect_only_is_not_a_run_that_tested_nothing(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=ghost", "--attn-cases=hd64-ragged", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK and not verdict_lines(result)


def test_cases_longer_than_the_token_limit_select_nothing_and_fail(pytester):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=torch", "--attn-cases=vit-4096")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert verdict_lines(result) == [
        "pytest-attn: FAILED: --attn-cases=vit-4096 selected no test: its 1 case(s) are all longer than the "
        "2048-token limit (--attn-max-tokens=0 runs them)"]


def test_a_marker_and_cases_with_nothing_in_common_skip_with_a_reason_not_an_internal_error(pytester):
    pytester.makepyfile(NARROWED_TEST)
    result = pytester.runpytest("--attn-backend=torch", "--attn-cases=vit-1img-224", "-rs")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * no catalog case is in both @pytest.mark.attn_cases('decode') and "
                                 "--attn-cases=vit-1img-224"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # torch ran nothing, and the cases selected nothing
    assert len(verdict_lines(result)) == 2


def test_a_serial_run_gives_torch_half_the_cores(pytester, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # this project's own workers set it
    pytester.makepyfile("""
        import os, torch

        def test_threads(attn_backend):
            assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
            assert os.environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())
    """)
    result = pytester.runpytest_subprocess("--attn-backend=torch", "-p", "no:xdist")
    result.assert_outcomes(passed=1)


def test_an_explicit_thread_count_wins(pytester, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torch caps it at the cores; 2 is not half of 2
    pytester.makepyfile("""
        import torch

        def test_threads(attn_backend):
            assert torch.get_num_threads() == 2
    """)
    pytester.runpytest_subprocess("--attn-backend=torch", "-p", "no:xdist").assert_outcomes(passed=1)


# -- no INTERNALERROR from any combination -----------------------------------------------------------------
OPTION_VALUES = {
    "--attn-backend": ["torch", "flex", "torch,flex", "all", "", "nope", ",", "torch-cudnn", "ghost"],
    "--attn-cases": ["vit-1img-224", "decode", "swa,soft-cap", "", "nope", "vit-4096", "hd64-ragged"],
    "--attn-dtype": ["bf16", "fp32", "float16,bf16", "", "int8"],
    "--attn-seed": ["0", "-1", "abc", "7", "99999999999999999999"],
    "--attn-max-tokens": ["0", "-3", "64", "x"],
    "--attn-device": ["cpu", "cuda", "gpu", "cuda:x", ""],
    "--attn-suite": ["auto", "on", "off", "maybe"],
    "--attn-isolate": ["", "nope"],
    "--attn-bench-metric": ["device", "eager,device", "", "wall"],
    "--attn-gpus": ["0", "x", ""],
    "--attn-report": ["r.html", "r.md", "r.json", "r.txt", ""],
}
FLAGS = ["--attn-strict", "--attn-allow-unavailable"]
MARKERS = ["", '@pytest.mark.attn_cases("decode")', '@pytest.mark.attn_cases("vit", "swa")',
           '@pytest.mark.attn_cases("no-such-tag")', '@pytest.mark.attn_cases()', "@pytest.mark.attn_gpu"]
FIXTURES = ["attn_backend, attn_case", "attn_backend", "attn_case", "make_attn_batch", "attn_session, attn_seed"]

option_lists = st.lists(st.sampled_from(sorted(OPTION_VALUES)).flatmap(
    lambda flag: st.sampled_from(OPTION_VALUES[flag]).map(lambda value: f"{flag}={value}")), max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=option_lists, flags=st.lists(st.sampled_from(FLAGS), max_size=2, unique=True),
       marker=st.sampled_from(MARKERS), fixtures=st.sampled_from(FIXTURES))
def test_no_combination_of_options_markers_and_fixtures_is_an_internal_error(pytester, demo_backends, options, flags,
                                                                              marker, fixtures):
    """Any mix of documented options (good, bad and empty values), markers and fixtures ends in a
    verdict: exit 0 or 1 (tests ran or the run tested nothing of what it named), 4 (one line saying
    what was wrong), 5 (nothing collected), or 2 for a marker naming no catalog case (the test
    file's own error, one line); never 3, pytest's INTERNALERROR, nor a traceback."""
    pytester.makepyfile(test_generated=f"""
import pytest

{marker}
def test_one({fixtures}):
    pass
""")
    result = pytester.runpytest(*options, *flags, "--attn-max-tokens=64", "-p", "no:cacheprovider")
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output and "Traceback" not in output and "pluggy/_" not in output, output
    assert result.ret in (0, 1, 4, 5) or (result.ret == 2 and "no-such-tag" in marker), output
    if result.ret == pytest.ExitCode.USAGE_ERROR:
        errors = [line for line in result.stderr.lines if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("ERROR: "), errors
