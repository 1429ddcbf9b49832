"""A new user's first hour: `pytest --attn-backend=NAME` in any project runs the bundled suite with
the project's own tests; a project that does not use pytest-attn does not notice it; every bad
option is a one-line usage error; the closing section says what ran, what was skipped and why, and
what failed; and the plugin runs without pytest-benchmark, xdist or hypothesis."""
import os
import subprocess
import sys

import pytest
from backend_packages import CASE_TEST

OWN_TEST = """
def test_my_kernel_on_a_ragged_batch(make_attn_batch, attn_backend):
    batch = make_attn_batch([64, 17], num_heads=4, head_dim=64, mask="causal")
    batch.assert_matches_reference(attn_backend)
"""


# -- pytest --attn-backend=NAME in any project ------------------------------------------------------------
def test_attn_backend_runs_the_bundled_suite_with_the_projects_own_tests(pytester):
    pytester.makepyfile(test_mine=OWN_TEST)
    result = pytester.runpytest("--attn-backend=torch", "--attn-suite=auto", "--attn-cases=hd64-ragged", "-v")
    result.stdout.fnmatch_lines([
        "attn suite: the bundled validation suite (pytest_attn.suite) runs with this run's tests; "
        "--attn-suite=off leaves it out",
        "*test_mine.py::test_my_kernel_on_a_ragged_batch[[]torch[]] PASSED*",
        "*test_correctness.py::test_output_matches_reference[[]torch-hd64-ragged[]] PASSED*",
        "*test_plans.py::test_plan_matches_the_batch[[]torch-hd64-ragged[]] PASSED*",
    ])
    result.assert_outcomes(passed=5)  # and the case's kernel trace and same-bits tests


def test_attn_suite_off_runs_only_the_projects_tests(pytester):
    pytester.makepyfile(test_mine=OWN_TEST)
    result = pytester.runpytest("--attn-backend=torch", "--attn-suite=off")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["attn suite: off (--attn-suite=off)"])


def test_explicit_test_paths_narrow_the_run_as_pytest_always_does(pytester):
    pytester.makepyfile(test_mine=OWN_TEST)
    result = pytester.runpytest("--attn-backend=torch", "--attn-suite=auto", "test_mine.py")
    result.assert_outcomes(passed=1)


def collected_count(result) -> int:
    import re

    found = re.search(r"(\d+)(?:/(\d+))? tests? collected", result.stdout.str())
    return int(found.group(2) or found.group(1))


def test_backend_specific_and_gpu_only_suite_tests_stay_out_of_a_cpu_run(pytester):
    options = ("--attn-suite=on", "--co", "-q", "--attn-cases=hd64-ragged", "--attn-device=cpu")
    torch_only = pytester.runpytest("--attn-backend=torch", *options)
    assert "test_flashinfer_gpu" not in torch_only.stdout.str() and "graph_replay" not in torch_only.stdout.str()
    with_fi = pytester.runpytest("--attn-backend=flashinfer", *options)
    # its module is collected for flashinfer (more tests), and its GPU-only tests deselected on CPU
    assert collected_count(with_fi) > collected_count(torch_only)
    assert "test_flashinfer_gpu" not in with_fi.stdout.str() and "deselected" in with_fi.stdout.str()
    strict = pytester.runpytest("--attn-backend=torch", "--attn-suite=on", "--attn-cases=hd64-ragged", "--attn-strict")
    strict.assert_outcomes(passed=4)  # nothing GPU-only is left to fail under --attn-strict on CPU


def test_correctness_runs_leave_the_benchmarks_out_and_print_no_benchmark_table(pytester):
    result = pytester.runpytest("--attn-backend=torch", "--attn-suite=on", "--attn-cases=hd64-ragged", "-p",
                                "no:xdist")
    result.assert_outcomes(passed=4)  # output, plan, kernel trace, same bits
    text = result.stdout.str()
    assert "deselected" in text and "benchmark:" not in text.split("collected")[1] and "Name (time in" not in text
    asked = pytester.runpytest("--attn-backend=torch", "--attn-suite=on", "-m", "attn_bench", "--attn-bench-iters=2",
                               "--attn-bench-warmup=0", "--attn-max-tokens=128", "-p", "no:xdist")
    asked.assert_outcomes(passed=1, skipped=1)  # seq 128 runs; the ViT mixes are all over 128 tokens
    assert "deselected" in asked.stdout.str()  # the correctness tests, this time


# -- a project that does not use pytest-attn --------------------------------------------------------------
UNRELATED_CONFTEST = """
import sys

def pytest_sessionfinish(session):
    leaked = [m for m in ("torch", "pytest_attn_backends", "pytest_attn.plugin.session") if m in sys.modules]
    with open("imported.txt", "w") as f:
        f.write(",".join(leaked))
"""


def test_an_unrelated_project_does_not_notice_the_plugin(pytester):
    pytester.makeconftest(UNRELATED_CONFTEST)
    pytester.makepyfile("def test_one():\n    assert 1 + 1 == 2\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # this project's own options aside
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider"], cwd=pytester.path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "attn" not in done.stdout.replace("plugins:", "").split("collected")[0].lower().replace("attn-0.1.0", "")
    assert "pytest-attn" not in done.stdout and "attn " not in done.stdout
    assert (pytester.path / "imported.txt").read_text() == "", "the plugin imported a backend or torch"


def test_markers_are_registered_for_strict_markers(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.attn_gpu
        @pytest.mark.attn_bench
        @pytest.mark.attn_cases("decode")
        @pytest.mark.attn_long
        def test_marked():
            pass
    """)
    result = pytester.runpytest("--strict-markers", "--attn-device=cpu", "-m", "not attn_bench")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout.str()  # deselected, not an error
    assert "is not a registered marker" not in result.stdout.str() + result.stderr.str()


# -- bad options: one line, exit 4, never a green run that tested nothing --------------------------------
BAD_OPTIONS = {
    "--attn-max-tokens=-5": "pytest-attn: --attn-max-tokens=-5: give a number of tokens >= 1, or 0 for no limit",
    "--attn-device=cuda": "pytest-attn: --attn-device=cuda but torch * sees no CUDA device; use --attn-device=cpu*",
    "--attn-device=gpu": "pytest-attn: --attn-device=gpu: use cpu, cuda or cuda:N",
    "--attn-device=cpu:1": "pytest-attn: --attn-device=cpu:1: use cpu, cuda or cuda:N",
    "--attn-bench-iters=0": "pytest-attn: --attn-bench-iters must be >= 1 and --attn-bench-warmup >= 0 (got 0 and 10)",
    "--attn-dtype=int8": "pytest-attn: unsupported dtype 'int8': use one of float16, bfloat16, float32 (or bf16, fp16, fp32)",
    "--attn-cases=no-such": "pytest-attn: unknown case name or tag no-such; known: *",
    "--attn-backend=nope": "pytest-attn: unknown attention backend 'nope'; registered: *",
    "--attn-isolate=nope": "pytest-attn: --attn-isolate names unknown backend(s) 'nope'; registered: *",
    "--attn-gpus=x": "pytest-attn: --attn-gpus='x': 'x' is not a GPU index or UUID*",
    "--attn-bench-metric=wall": "pytest-attn: --attn-bench-metric=wall: use device, eager, or both (device,eager)",
    # empty, as an unset $BACKENDS gives: never "no backend", which would test nothing
    "--attn-backend=": "pytest-attn: --attn-backend is empty (an unset variable?): name at least one value, or leave "
                      "the option out",
    "--attn-backend= , ": "pytest-attn: --attn-backend is empty *",
    "--attn-cases=": "pytest-attn: --attn-cases is empty *",
    "--attn-dtype=": "pytest-attn: --attn-dtype is empty *",
    "--attn-isolate=": "pytest-attn: --attn-isolate is empty *",
    "--attn-bench-metric=": "pytest-attn: --attn-bench-metric is empty *",
    "--attn-seed=-1": "pytest-attn: --attn-seed=-1 is out of range; give a seed from 0 to 9223372036854775807",
    "--attn-gpus=0": "pytest-attn: --attn-gpus=0 but this machine has no GPU (*); leave --attn-gpus out here",
    # numbers and choices are parsed by pytest-attn, not argparse: one line, not argparse's usage block
    "--attn-max-tokens=x": "pytest-attn: --attn-max-tokens='x' is not an integer",
    "--attn-bench-iters=many": "pytest-attn: --attn-bench-iters='many' is not an integer",
    "--attn-seed=abc": "pytest-attn: --attn-seed='abc' is not an integer; give a seed from 0 to 9223372036854775807",
    "--attn-suite=maybe": "pytest-attn: --attn-suite='maybe': use auto, on or off",
    "--attn-bench-graph=yes": "pytest-attn: --attn-bench-graph='yes': use auto, on or off",
}


@pytest.mark.parametrize("option", list(BAD_OPTIONS))
def test_a_bad_option_is_a_one_line_usage_error(pytester, option):
    pytester.makepyfile(OWN_TEST)
    result = pytester.runpytest(option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1, result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: {BAD_OPTIONS[option]}"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize("args", [["--attn-backend=torch"], []], ids=["with an option", "without any option"])
def test_a_bad_seed_in_the_environment_is_a_usage_error(pytester, monkeypatch, args):
    monkeypatch.setenv("PYTEST_ATTN_SEED", "abc")
    pytester.makepyfile(OWN_TEST)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.stderr.lines if line.strip()] == [
        "ERROR: pytest-attn: $PYTEST_ATTN_SEED='abc' is not an integer; give a seed from 0 to 9223372036854775807"]


# -- what a user sees ----------------------------------------------------------------------------------------
def test_the_closing_section_counts_groups_skip_reasons_and_names_failures(pytester, demo_backends, monkeypatch):
    monkeypatch.setenv("CI", "true")  # pytest then prints the short summary's lines whole, as in a CI log
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=narrow,forgets", "--attn-cases=hd64-ragged,hd80-ragged,hd96-ragged")
    result.stdout.fnmatch_lines([
        "*= pytest-attn =*",
        "narrow: 1 passed, 2 skipped",
        "  skipped 1: head_dim 80 not supported (supports [[]64[]])",
        "  skipped 1: head_dim 96 not supported (supports [[]64[]])",
        "forgets: 3 failed",
        "  rerun: python3 -m pytest 'test_the_closing_section_counts_groups_skip_reasons_and_names_failures.py::"
        "test_case[[]forgets-hd64-ragged[]]' --attn-backend=forgets --attn-cases=hd64-ragged --attn-seed=20261125",
    ])
    # the one-line cause is pytest's own short summary's, not repeated in the closing section
    result.stdout.fnmatch_lines(["FAILED *::test_case[[]forgets-hd64-ragged[]] - pytest_attn.AttnCheckFailure: "
                                 "hd64-ragged (causal mask, scale 0.125, 8/8 heads x 64, bfloat16): step 0: * output "
                                 "elements never written*"])
    assert result.stdout.str().count("elements never written (still the poison value") == 3 + 3  # report, summary


def test_a_failure_leads_with_the_comparison_not_the_harness(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=forgets", "--attn-cases=vit-ragged-mix")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    failure = text.split("test_case[forgets-vit-ragged-mix] _")[1].split("= pytest-attn =")[0]
    lines = failure.strip("_ \n").splitlines()
    assert lines[0] == "test_a_failure_leads_with_the_comparison_not_the_harness.py:4: in test_case", lines
    assert lines[2].startswith("E   pytest_attn.AttnCheckFailure: vit-ragged-mix (full mask, scale 0.1118, "
                               "16/16 heads x 80, bfloat16): step 0: 1280 of 2458880 output elements never written")
    assert "pytest_attn/" not in failure and "tensor(" not in failure and len(lines) < 20, failure
    assert "pytest-attn: rerun this test" in failure  # and how to rerun exactly it


def test_runs_without_pytest_benchmark_xdist_or_hypothesis(pytester):
    pytester.makepyfile(test_mine=OWN_TEST + """

def test_speed(attn_benchmark, attn_backend, make_attn_batch):
    attn_benchmark(attn_backend, make_attn_batch([64], num_heads=4, head_dim=64))
""")
    result = pytester.runpytest("--attn-backend=torch", "-p", "no:benchmark", "-p", "no:xdist", "-p",
                                "no:hypothesispytest", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*pytest-benchmark is not loaded (-p no:benchmark?)*"])
