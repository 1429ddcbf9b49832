"""Failures a newcomer acts on (issue 17): a failure's first line names the case, the layer (mask,
window, soft-cap, sinks, scale, heads, dtypes, cache layout and page size) and the step; a mask bug
does not read as a scale bug; a backend's exception shows the backend's own frames and the
one-line verdict, not pytest-attn's; pytest's short summary gives each failure one line and the
closing section its rerun command, so the two do not repeat each other; and that command, pasted
where the user ran pytest, reruns exactly that test, which fails the same way.

The backends are tests/planted_backends.py's, installed through an entry point as a user's
package would be, and the runs are from a project outside this repository (pytester's)."""
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from backend_packages import CASE_TEST  # noqa: E402
from planted_backends import IgnoresCausalMask, write_planted_package  # noqa: E402

from pytest_attn.cases.catalog import CATALOG  # noqa: E402
from pytest_attn.core.errors import AttnCheckFailure  # noqa: E402
from pytest_attn.check.harness import assert_case_passes, run_case  # noqa: E402

SUITE = ("--attn-suite=on", "-p", "no:cacheprovider", "-k", "not test_backends_agree")  # the differential aside


@pytest.fixture
def planted(pytester, monkeypatch):
    """The planted backends installed; PYTHONPATH set so subprocesses and xdist workers see them."""
    path = write_planted_package(pytester)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    return path


def block(output: str, test_id: str) -> list[str]:
    """The lines of one test's report in the FAILURES section (its header line excluded)."""
    text = output.split(f" {test_id} _")[1]
    lines = text.splitlines()[1:]
    end = next(i for i, line in enumerate(lines) if line.startswith(("____", "====")))
    return lines[:end]


def verdicts(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("E   pytest_attn.")]


# -- what the first line says --------------------------------------------------------------------------
@pytest.mark.parametrize("case_name", ["hd64-ragged", "vit-causal", "llm-mixed-nhd", "tile-edge-63-64-65"])
def test_a_causal_mask_bug_reads_as_the_output_being_wrong_not_as_a_scale(case_name):
    """The issue's trial: a backend ignoring the causal mask was summarised as "the output is scaled
    by about 0.23069". Past the elementwise bound a slope says nothing; the verdict is the bound,
    beside the layer's mask."""
    backend, case = IgnoresCausalMask(), CATALOG[case_name]
    with pytest.raises(AttnCheckFailure) as info:
        assert_case_passes(run_case(backend, case, seed=0), backend, case)
    summary, message = info.value.summary, str(info.value)
    assert summary.startswith(f"{case_name} (causal mask, ") and ": step 0: max |out - ref| = " in summary, summary
    assert "EXCEEDS the allowed" in summary
    for misleading in ("scaled by", "factor", "systematic bias", "wrong scale"):
        assert misleading not in message, message


def test_a_cached_case_names_its_cache_layout_and_page_size():
    backend, case = IgnoresCausalMask(), CATALOG["llm-mixed-hnd"]
    with pytest.raises(AttnCheckFailure) as info:
        assert_case_passes(run_case(backend, case, seed=0), backend, case)
    assert info.value.summary.startswith("llm-mixed-hnd (causal mask, scale 0.08839, 16/4 heads x 128, bfloat16, "
                                         "paged HND cache, page 16): step 0: "), info.value.summary


# -- a backend's exception -----------------------------------------------------------------------------
RAISING_BLOCK_MAX_LINES = 11  # the backend's 2 frames, its error, pytest's chain line, the verdict, the rerun
# (and the user's own test's frame, 3 lines, when the test is theirs)


@pytest.mark.parametrize("where", ["bundled suite", "own test"])
def test_a_backend_exception_shows_the_backends_frames_and_the_verdict_not_the_harness(pytester, planted, where):
    """Before: about 60 lines of harness frames and tensor dumps (the issue), 15 on main (the
    bundled suite's test frame, pytest-attn's). Now: the backend's frames, its error, the verdict."""
    if where == "own test":
        pytester.makepyfile(test_mine=CASE_TEST)
        result = pytester.runpytest("--attn-backend=raises", "--attn-cases=hd64-ragged")
        test_id = "test_case[raises-hd64-ragged]"
    else:
        result = pytester.runpytest("--attn-backend=raises", "--attn-cases=hd64-ragged", *SUITE)
        test_id = "test_output_matches_reference[raises-hd64-ragged]"
    output = result.stdout.str()
    lines = block(output, test_id)
    text = "\n".join(lines)
    assert len(lines) <= RAISING_BLOCK_MAX_LINES + (3 if where == "own test" else 0), text
    assert re.search(r"planted_backends\.py:\d+: in forward\n    reshape_heads\(q\)", text), text
    assert re.search(r"planted_backends\.py:\d+: in reshape_heads\n    return q\.view\(-1, 7, 13\)", text), text
    assert "E   RuntimeError: shape '[-1, 7, 13]' is invalid" in text
    assert ("E   pytest_attn.core.calls.BackendError: backend 'raises' (package planted_attn 0.1, entry point 'planted = "
            "planted_attn:BACKENDS') raised in forward(): RuntimeError: shape '[-1, 7, 13]' is invalid") in text
    assert "(the traceback above shows where). Case hd64-ragged (causal mask, scale 0.125, 8/8 heads x 64, " \
        "bfloat16), step 0." in text
    assert "pytest_attn" + os.sep not in text and "test_correctness.py" not in text and "tensor(" not in text, text
    if where == "own test":  # the user's own test is theirs to see
        assert "test_mine.py:4: in test_case" in lines, text
    assert " pytest-attn: rerun this test " in lines[-2] and lines[-1].startswith("python3 -m pytest "), text


def test_full_trace_still_shows_everything(pytester, planted):
    """--full-trace (and --tb=long/native) is pytest's way to ask for every frame: it is kept."""
    pytester.makepyfile(test_mine=CASE_TEST)
    short = pytester.runpytest("--attn-backend=raises", "--attn-cases=hd64-ragged").stdout.str()
    full = pytester.runpytest("--attn-backend=raises", "--attn-cases=hd64-ragged", "--full-trace").stdout.str()
    assert "harness.py" not in short and "harness.py" in full and "calls.py" in full


# -- the closing section and pytest's short summary ------------------------------------------------------
CAUSAL_CASES = "hd64-ragged,hd80-ragged,tile-edge-63-64-65"


def test_the_short_summary_gives_one_line_per_failure_and_the_closing_section_the_reruns(pytester, planted,
                                                                                        monkeypatch):
    """Where CI is set (GitHub Actions, GitLab) pytest prints each failure's crash message whole in
    its short summary: it was each failure's whole report again. Now one line, the verdict, and the
    closing section gives what that line cannot: the rerun command."""
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(test_mine=CASE_TEST)
    result = pytester.runpytest("--attn-backend=nocausal,einsum", f"--attn-cases={CAUSAL_CASES}", "-ra")
    result.assert_outcomes(failed=3, passed=3)
    output = result.stdout.str()
    closing = output.split("= pytest-attn =")[1].split("= short test summary info =")[0]
    short = output.split("= short test summary info =")[1]
    failed = [line for line in short.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 3 and len(short.strip().splitlines()) == 1 + 3 + 1, short  # nothing but those lines
    for line in failed:
        assert re.search(r"::test_case\[nocausal-(\S+)\] - pytest_attn\.AttnCheckFailure: \1 \(causal mask, "
                         r".*\): step 0: max \|out - ref\| = \S+ EXCEEDS the allowed \S+; relative L2 error \S+$", line)
    reruns = [line for line in closing.splitlines() if line.startswith("  rerun: ")]
    assert [r.split("[")[1].split("]")[0] for r in reruns] == [f"nocausal-{c}" for c in CAUSAL_CASES.split(",")]
    assert "EXCEEDS" not in closing and "FAILED" not in closing  # the causes are pytest's lines, not repeated
    assert "einsum: 3 passed" in closing and "nocausal: 3 failed" in closing
    # each failure's verdict: once in its report, once in the short summary
    assert output.count("): step 0: max |out - ref| = ") == 3 * 2


def test_with_tb_no_the_closing_section_lists_every_rerun(pytester, planted, monkeypatch):
    """Past MAX_FAILURES_SHOWN the section points at the reports' own rerun commands; with --tb=no
    there are no reports, so it lists them all."""
    monkeypatch.setattr("pytest_attn.plugin.summary.MAX_FAILURES_SHOWN", 1)
    pytester.makepyfile(test_mine=CASE_TEST)
    capped = pytester.runpytest("--attn-backend=nocausal", f"--attn-cases={CAUSAL_CASES}")
    assert capped.stdout.str().count("  rerun: ") == 1
    capped.stdout.fnmatch_lines(["  ... and 2 more (each failure's report above ends with its rerun command)"])
    everything = pytester.runpytest("--attn-backend=nocausal", f"--attn-cases={CAUSAL_CASES}", "--tb=no")
    assert everything.stdout.str().count("  rerun: ") == 3 and "= FAILURES =" not in everything.stdout.str()


@pytest.mark.attn_long
def test_rerun_commands_travel_from_xdist_workers(pytester, planted):
    """A worker's reports reach the controller without their items: the command is made on the
    worker, where the item is, and travels in the report's user properties."""
    pytester.makepyfile(test_mine=CASE_TEST)
    result = pytester.runpytest_subprocess("--attn-backend=nocausal", f"--attn-cases={CAUSAL_CASES}", "-n", "1",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["nocausal: 3 failed", "  rerun: python3 -m pytest 'test_mine.py::test_case[[]nocausal-*"
                                 "[]]' --attn-backend=nocausal --attn-cases=* --attn-seed=20261125"])


# -- the rerun command -------------------------------------------------------------------------------
def rerun(command: str, cwd, pythonpath: str) -> subprocess.CompletedProcess:
    """The printed command, run as pasted where the user ran pytest (this interpreter for python3)."""
    assert command.startswith("python3 -m pytest ")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "CI")}
    env["PYTHONPATH"] = pythonpath
    return subprocess.run(command.replace("python3", f"'{sys.executable}'", 1) + " -p no:cacheprovider", shell=True,
                          cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.attn_long
@pytest.mark.parametrize("where", ["bundled suite", "own test outside the directory pytest ran in"])
def test_the_rerun_command_reruns_exactly_that_test_from_where_pytest_ran(pytester, planted, monkeypatch, where):
    """The issue's trial: `test_correctness.py::...[mykernel-vit-causal]` could not be pasted back
    from the user's project. The command printed in the closing section, run from the same
    directory, runs that one test, and it fails with the same verdict."""
    project = pytester.mkdir("project")
    here = project / "sub"
    here.mkdir()
    monkeypatch.chdir(here)
    if where == "bundled suite":
        args, test_id = SUITE, "test_output_matches_reference[nocausal-hd64-ragged]"
    else:
        (project / "test_mine.py").write_text(CASE_TEST)
        args, test_id = (str(project / "test_mine.py"),), "test_case[nocausal-hd64-ragged]"
    first = pytester.runpytest("--attn-backend=nocausal", "--attn-cases=hd64-ragged,vit-1img-224", *args)
    first.assert_outcomes(failed=1, passed=1 if where != "bundled suite" else first.parseoutcomes()["passed"])
    commands = [line.removeprefix("  rerun: ") for line in first.stdout.lines if line.startswith("  rerun: ")]
    assert len(commands) == 1 and test_id in commands[0], first.stdout.str()
    if where != "bundled suite":  # outside the directory pytest ran in: by its absolute path
        assert f"{project / 'test_mine.py'}::{test_id}" in commands[0]
    again = rerun(commands[0], here, planted)
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-2000:]
    assert re.search(r"^=+ 1 failed(, \d+ deselected)? in ", again.stdout, re.M), again.stdout[-2000:]
    assert verdicts(again.stdout) == verdicts(first.stdout.str()) != [], again.stdout[-3000:]


def test_a_plan_the_live_kernel_disagrees_with_names_the_batch_and_the_layer():
    """A readback mismatch is a failed check on a step: its message names the batch and the layer;
    its one line stays what the differential prints ("plan and live kernel disagree: ...")."""
    from planted_backends import Einsum

    class Liar(Einsum):
        def readback(self, plan):
            return ["the live kernel ran with window_left 63, the plan said -1"]

    backend, case = Liar(), CATALOG["llm-mixed-nhd"]
    with pytest.raises(AttnCheckFailure) as info:
        run_case(backend, case, seed=0)
    assert info.value.summary == "plan and live kernel disagree: the live kernel ran with window_left 63, the plan said -1"
    assert str(info.value).startswith("backend 'einsum': its plan and the live kernel disagree on 2 requests (2 ctx, 0 "
                                      "gen), seq_lens [50, 20], paged cache (NHD, page 16), layer causal mask, scale "
                                      "0.08839, 16/4 heads x 128, bfloat16:\n- the live kernel ran with"), str(info.value)
