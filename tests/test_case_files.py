"""--attn-case-file: cases from files run beside the catalog's, are selected by name, count for the
run's verdict and rerun with their file; a bad, empty or missing file, or a name the catalog has, is
a usage error (exit 4, one line), never a green run that tested nothing."""
import json
import os
import re
import shlex

import pytest

from planted_backends import write_planted_package

from pytest_attn.cases.catalog import CATALOG
from pytest_attn.cases.serialize import dump_cases

SUITE = ("--attn-suite=on", "-p", "no:cacheprovider")
TWO_TESTS = ("-k", "test_output_matches_reference or test_plan_matches_the_batch")  # of the suite's case tests
MINE = {"name": "mine", "layer_spec": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 64}, "seq_lens": [70, 5]}


@pytest.fixture
def planted(pytester, monkeypatch):
    path = write_planted_package(pytester)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    return path


def write(pytester, name: str, *cases) -> str:
    path = pytester.path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    else:
        path.write_text(json.dumps(cases[0] if len(cases) == 1 else list(cases)))
    return name


def test_a_file_case_runs_in_the_bundled_suite_beside_the_catalog(pytester, planted):
    write(pytester, "mine.json", MINE)
    result = pytester.runpytest("--attn-backend=einsum", "--attn-case-file=mine.json", "--attn-cases=mine,hd64-ragged",
                                "-v", *TWO_TESTS, *SUITE)
    output = result.stdout.str()
    for test in ("test_output_matches_reference", "test_plan_matches_the_batch"):
        for case in ("mine", "hd64-ragged"):
            assert f"{test}[einsum-{case}] PASSED" in output, output
    result.assert_outcomes(passed=4)


def test_without_a_filter_file_cases_join_every_catalog_case(pytester, planted):
    write(pytester, "a.jsonl", MINE, {**MINE, "name": "mine2", "cache": True, "decode_steps": 1})
    write(pytester, "b.json", {**MINE, "name": "mine3"})
    result = pytester.runpytest("--attn-backend=einsum", "--attn-case-file=a.jsonl,b.json", "--collect-only", "-q",
                                "--attn-max-tokens=0", *SUITE)
    ids = [line for line in result.stdout.lines if "test_output_matches_reference[" in line]
    assert len(ids) == len(CATALOG) + 3
    assert {i.split("[")[1] for i in ids} >= {"einsum-mine]", "einsum-mine2]", "einsum-mine3]"}


def test_a_failing_file_case_reruns_with_its_file(pytester, planted):
    """The planted bug: a backend that ignores the causal mask; the file case catches it, and the
    rerun command the run prints names the file, and reruns that one failure."""
    os.mkdir(pytester.path / "cases")
    write(pytester, "cases/mine.jsonl", MINE)
    result = pytester.runpytest("--attn-backend=nocausal,einsum", "--attn-case-file=cases", "--attn-cases=mine",
                                *TWO_TESTS, *SUITE)
    result.assert_outcomes(failed=1, passed=3)
    reruns = [line.strip().removeprefix("rerun: ") for line in result.stdout.lines if line.strip().startswith("rerun: ")]
    assert len(reruns) == 1, result.stdout.str()
    assert "--attn-case-file=" + os.path.join("cases", "mine.jsonl") in reruns[0] and "--attn-cases=mine" in reruns[0]
    args = shlex.split(reruns[0])[3:]  # after python3 -m pytest
    again = pytester.runpytest(*args, "-p", "no:cacheprovider")
    again.assert_outcomes(failed=1)
    assert "test_output_matches_reference[nocausal-mine]" in again.stdout.str()


@pytest.mark.parametrize("content, says", [
    ("{not json", r"bad\.json:1: not JSON"),
    (json.dumps({**MINE, "pages": 1}), r"bad\.json: case 'mine': field 'pages': unknown field"),
    (json.dumps({**MINE, "seq_lens": "70"}), r"bad\.json: case 'mine': field 'seq_lens': '70' is not a list"),
    (json.dumps({**MINE, "seq_lens": [-1]}), r"bad\.json: case 'mine': seq_lens"),
    ("[]", r"bad\.json: holds no case"),
    (json.dumps({**MINE, "name": "hd64-ragged"}), r"case 'hd64-ragged' in bad\.json has the name of the catalog "
                                                   r"case 'hd64-ragged'; rename the one in bad\.json"),
])
def test_a_bad_case_file_is_a_usage_error_in_one_line(pytester, planted, content, says):
    (pytester.path / "bad.json").write_text(content)
    result = pytester.runpytest("--attn-backend=einsum", "--attn-case-file=bad.json", *SUITE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1 and re.search(says, errors[0]), result.stderr.str()


@pytest.mark.parametrize("option", ["--attn-case-file=missing.json", "--attn-case-file=", "--attn-case-file=empty"])
def test_a_missing_or_empty_path_is_a_usage_error(pytester, planted, option):
    (pytester.path / "empty").mkdir()
    (pytester.path / "empty" / "blank.jsonl").write_text("\n")
    result = pytester.runpytest("--attn-backend=einsum", option, *SUITE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    assert len([line for line in result.stderr.lines if line.strip()]) == 1, result.stderr.str()


def test_a_file_case_that_runs_nothing_fails_the_run(pytester, planted):
    """--attn-cases naming a file case longer than the CPU limit: deselected, so the verdict fails
    the run and says why (the verdict reads cases from the session: catalog and files)."""
    write(pytester, "long.json", {**MINE, "name": "long", "seq_lens": [3000]})
    result = pytester.runpytest("--attn-backend=einsum", "--attn-case-file=long.json", "--attn-cases=long", *SUITE)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "--attn-cases=long selected no test: its 1 case(s) are all longer than the 2048-token limit" in \
        result.stdout.str()


def test_a_file_case_is_known_to_attn_cases_only_with_its_file(pytester, planted):
    result = pytester.runpytest("--attn-backend=einsum", "--attn-cases=mine", *SUITE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "unknown case name or tag mine" in result.stderr.str()


def test_an_exported_catalog_case_runs_as_the_catalog_one(pytester, planted):
    """What export-cases writes, renamed, runs the same steps as the catalog case."""
    case = CATALOG["llm-mixed-nhd"]
    import dataclasses

    dump_cases([dataclasses.replace(case, name="copy")], pytester.path / "copy.json")
    result = pytester.runpytest("--attn-backend=einsum", "--attn-case-file=copy.json", "--attn-cases=copy", "-v",
                                *TWO_TESTS, *SUITE)
    result.assert_outcomes(passed=2)


def test_file_and_fuzz_cases_run_isolated(pytester, planted):
    """--attn-isolate runs each test in a child, which must be given the file and the fuzz tier too."""
    write(pytester, "mine.json", MINE)
    result = pytester.runpytest("--attn-backend=einsum", "--attn-case-file=mine.json", "--attn-fuzz=1",
                                "--attn-cases=mine,fuzz", "--attn-isolate=all", "-k", "test_output_matches_reference",
                                *SUITE)
    result.assert_outcomes(passed=2)
