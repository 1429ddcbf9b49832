"""pytest-attn minimize: planted backends whose bug needs a length, a mixed step or three requests
shrink to the smallest case that shows it, failing the same way; the CLI writes it and the pytest
command it prints reruns it and fails."""
import json
import os
import shlex

import pytest

from shrink_planted import RaisesOnThreeRequests, WrongFromLength65, WrongOnMixedStep, write_shrink_package

from pytest_attn.cases.catalog import CATALOG
from pytest_attn.cases.serialize import cases_in_file, dump_cases
from pytest_attn.check.minimize import failure_of, minimize
from pytest_attn.cli.main import main
from planted_backends import Einsum


def test_a_length_bug_shrinks_to_one_request_of_65_tokens_and_one_head():
    result = minimize(WrongFromLength65(), CATALOG["hd128-ragged"], seed=1)
    case = result.case
    assert case.seq_lens == (65,) and not case.cache and case.num_layers == 1
    assert (case.layer_spec.num_heads, case.layer_spec.num_kv_heads, case.layer_spec.head_dim) == (1, 1, 128)
    assert case.name == "hd128-ragged-min" and result.failure.kind == "wrong"
    assert failure_of(Einsum(), case, seed=1) is None  # the control: the minimal case is fine on a correct backend


def test_a_length_bug_on_a_paged_case_keeps_failing_in_prefill():
    """It first fails in the prefill step: 64 tokens and a decode step (65 keys, a decode step) fail
    another way and are not taken; decode steps, requests, heads and pages all go."""
    result = minimize(WrongFromLength65(), CATALOG["llm-decode-gqa-nhd"], seed=1)
    case = result.case
    assert (case.seq_lens, case.decode_steps, case.joining, case.page_size) == ((65,), 0, (), 1)
    assert (case.layer_spec.num_heads, case.layer_spec.num_kv_heads) == (1, 1)
    assert (result.failure.kind, result.failure.step) == ("wrong", "prefill")


def test_a_mixed_step_bug_keeps_one_prompt_decoding_beside_one_joining():
    result = minimize(WrongOnMixedStep(), CATALOG["llm-mixed-nhd"], seed=1)
    case = result.case
    assert (case.seq_lens, case.joining, case.decode_steps, case.page_size) == ((1,), (1,), 1, 1)
    assert (case.layer_spec.num_heads, case.layer_spec.num_kv_heads) == (1, 1)
    assert (result.failure.kind, result.failure.step) == ("wrong", "mixed")
    steps = list(case.steps())
    assert steps[1].num_contexts == 1 and len(steps[1].request_ids) == 2  # the mixed step is all that is left


def test_a_backend_error_stays_the_same_error():
    result = minimize(RaisesOnThreeRequests(), CATALOG["hd64-ragged"], seed=1)
    assert result.case.seq_lens == (1, 1, 1) and result.failure.kind == "error: IndexError"
    assert (result.case.layer_spec.num_heads, result.case.layer_spec.num_kv_heads) == (1, 1)


@pytest.mark.parametrize("name", ["reuse-scale", "reuse-mask", "extreme-logits-300", "page64-partial-last"])
def test_layers_and_features_the_bug_does_not_need_go(name):
    result = minimize(WrongFromLength65(), CATALOG[name], seed=1)
    case = result.case
    assert case.num_layers == 1 and not case.layer_overrides and case.seq_lens == (65,)
    assert case.input_scale == 1.0 and case.decode_steps == 0 and not case.joining


def test_a_case_that_passes_is_not_minimized():
    assert minimize(Einsum(), CATALOG["hd64-ragged"], seed=1) is None


@pytest.fixture
def shrink(pytester, monkeypatch):
    path = write_shrink_package(pytester)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    return path


def test_the_cli_writes_the_minimal_case_and_its_rerun_fails_in_pytest(pytester, shrink, capsys):
    out = pytester.path / "small.json"
    assert main(["minimize", "tile-edge-63-64-65", "--backend", "long65", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    (case,) = cases_in_file(out)
    assert case.name == "tile-edge-63-64-65-min" and case.seq_lens == (65,)
    assert f"smallest case: {case.name}: 1/1x128 bfloat16 causal seq_lens=[65] no cache" in printed
    command = printed.splitlines()[-1].removeprefix("rerun: ")
    assert command == (f"pytest --attn-backend=long65 --attn-case-file={out} --attn-cases={case.name} "
                       "--attn-seed=20261125 --attn-device=cpu")
    result = pytester.runpytest_subprocess(*shlex.split(command)[1:], "--attn-suite=on", "-p", "no:cacheprovider",
                                           "-k", "test_output_matches_reference or test_plan_matches_the_batch")
    result.assert_outcomes(failed=1, passed=1)  # the output is wrong; its plan is fine
    assert f"test_output_matches_reference[long65-{case.name}]" in result.stdout.str()


def test_the_cli_minimizes_a_case_file_and_says_when_a_case_does_not_fail(pytester, shrink, capsys):
    source = pytester.path / "mine.jsonl"
    dump_cases([CATALOG["llm-mixed-hnd"], CATALOG["hd64-ragged"]], source)
    assert main(["minimize", str(source), "--backend", "mixedbug", "--case", "llm-mixed-hnd",
                 "--out", str(pytester.path / "m.json")]) == 0
    assert json.loads((pytester.path / "m.json").read_text())["joining"] == [1]
    capsys.readouterr()
    assert main(["minimize", str(source), "--backend", "mixedbug", "--case", "hd64-ragged"]) == 1
    assert "hd64-ragged does not fail on mixedbug" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["minimize", "no-such-case", "--backend", "torch"], "'no-such-case' is neither a catalog case"),
    (["minimize", "hd64-ragged", "--backend", "nope"], "unknown attention backend 'nope'"),
    (["minimize", "hd64-ragged"], "the following arguments are required: --backend"),
])
def test_bad_minimize_arguments_are_one_line_and_exit_4(argv, says, capsys):
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from the parser
        status = exc.code
    err = capsys.readouterr().err
    assert status == 4 and says in err and len(err.strip().splitlines()) == 1, err


def test_a_file_of_several_cases_needs_case(tmp_path, capsys):
    source = tmp_path / "two.json"
    dump_cases([CATALOG["hd64-ragged"], CATALOG["hd80-ragged"]], source)
    assert main(["minimize", str(source), "--backend", "torch"]) == 4
    assert "holds 2 cases (hd64-ragged, hd80-ragged); pick one with --case NAME" in capsys.readouterr().err


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=TEXT.filter(lambda t: t not in CATALOG and not os.path.exists(t) and not t.startswith("-")),
       fuzz=st.one_of(st.none(), TEXT), seed=st.one_of(st.none(), TEXT))
def test_random_bad_minimize_arguments_are_one_line_and_exit_4(case, fuzz, seed, capsys):
    argv = ["minimize", "--backend=torch", *([f"--fuzz={fuzz}"] if fuzz is not None else []),
            *([f"--seed={seed}"] if seed is not None else []), "--", case]
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 4 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
