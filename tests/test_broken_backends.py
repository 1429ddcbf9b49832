"""A broken backend is reported for itself alone, everywhere; NaN never agrees; the CLI says what did
not run and takes bad arguments in one line (issue 17)."""
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend_packages import write_backend_package
from pytest_attn.cli import args as cli_args
from pytest_attn.cli import main as cli
from pytest_attn.cases.catalog import CATALOG
from pytest_attn.check.differential import differential
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

CASE = CATALOG["hd64-ragged"]


class ReturnsNaN(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None):
        out.fill_(float("nan"))
        return out


class UnsupportedRaises(TorchSDPABackend):
    def unsupported(self, layer, metadata, device="cpu"):
        raise KeyError("head_dim")


def test_nan_output_disagrees_with_every_backend_never_agrees():
    result = differential([TorchSDPABackend(name="a"), ReturnsNaN(name="nan"), TorchSDPABackend(name="b")], CASE)
    pairs = result.pairwise()
    assert all(math.isinf(pairs[p][1]) for p in pairs if "nan" in p), pairs
    assert pairs[("a", "b")][1] < 1e-2  # the two good ones still agree
    assert result.problems() == [f"nan disagrees with the reference (relative L2 {result.runs[1].rel_l2_err:.3e}), "
                                 "with NaN or Inf in its output"]
    assert "nan vs b: inf  inf  (NaN or Inf: never agrees)" in "\n".join(result.lines())


def test_a_broken_backend_is_reported_alone_and_the_others_keep_their_results():
    result = differential([TorchSDPABackend(name="a"), UnsupportedRaises(name="broken"),
                           TorchSDPABackend(name="b")], CASE)
    assert [r.name for r in result.ran] == ["a", "b"] and all(r.passed for r in result.ran)
    (problem,) = result.problems()
    assert problem.startswith("broken broke: backend 'broken' (") and "raised in unsupported(): KeyError" in problem
    assert ("a", "b") in result.pairwise()


BROKEN_PACKAGE = """
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

class Broken(TorchSDPABackend):
    def unsupported(self, layer, metadata, device="cpu"):
        raise KeyError("head_dim")

BACKENDS = [Broken(name="broken"), TorchSDPABackend(name="good")]
"""


def test_the_suites_differential_fails_naming_the_broken_backend_alone(pytester):
    write_backend_package(pytester, "brk_attn", BROKEN_PACKAGE, {"brk": "brk_attn:BACKENDS"})
    result = pytester.runpytest("--attn-backend=broken,good,torch", "--attn-suite=on", "-k",
                                "test_backends_agree and vit-ragged-mix", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*on vit-ragged-mix: broken broke: backend 'broken' (*raised in unsupported()*",
                                 "*  good *passes", "*  torch *passes", "*good vs torch:*"])
    assert "good disagrees" not in result.stdout.str() and "torch disagrees" not in result.stdout.str()


def test_cli_differential_names_a_backend_that_did_not_run_and_fails(capsys):
    code = cli.main(["differential", "hd64-ragged", "--backends", "flashinfer,torch,flex", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "flashinfer" in out and "skipped: unavailable here: no CUDA device" in out
    assert "pytest-attn differential: FAILED: named but did not run the case: flashinfer" in err
    assert cli.main(["differential", "hd64-ragged", "--backends", "torch,flex", "--device", "cpu"]) == 0


def test_cli_differential_with_a_broken_backend_reports_it_and_the_rest(pytester, capsys):
    write_backend_package(pytester, "brk_attn", BROKEN_PACKAGE, {"brk": "brk_attn:BACKENDS"})
    code = cli.main(["differential", "hd64-ragged", "--backends", "broken,good,torch", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert "broken    BROKE: backend 'broken'" in out and "good vs torch:" in out
    assert "FAILED: broken broke:" in err


def test_seed_table_with_a_broken_backend_keeps_the_others_rows(pytester, capsys):
    write_backend_package(pytester, "brk_attn", BROKEN_PACKAGE, {"brk": "brk_attn:BACKENDS"})
    code = cli.main(["seed-table", "--backends", "broken,torch", "--seq-lens", "64", "--iters", "2", "--warmup", "0",
                     "--no-mix", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    row = next(line for line in out.splitlines() if line.strip().startswith("64 |"))
    assert row.split("|")[1].strip() == "n/a" and "(" in row.split("|")[2]  # torch timed, with its spread
    assert "broken: BROKE at 64: backend 'broken'" in out and "FAILED: broken broke" in err


def test_backends_lists_a_broken_backend_with_its_reason_and_every_other(pytester, capsys):
    write_backend_package(pytester, "brk_attn", "raise RuntimeError('no driver')\n", {"brk": "brk_attn:X"})
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "brk" in out and "failed to import: RuntimeError: no driver" in out
    assert "torch" in out and "flex" in out


# -- bad arguments: one line, exit 4, never a traceback ------------------------------------------------------
BAD_VALUES = st.sampled_from(["-1", "abc", "", "0.5", "1e3", " ", "-0x1", "-99999999999999999999999999", "1,x"])
ARGUMENT_SETS = st.one_of(
    st.tuples(st.just(["seed-table"]), st.sampled_from(["--iters", "--warmup", "--max-seq", "--seed", "--seq-lens"]),
              BAD_VALUES),
    st.tuples(st.just(["differential", "hd64-ragged"]), st.sampled_from(["--seed", "--backends"]), BAD_VALUES),
)


def _usage_error(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(ARGUMENT_SETS)
def test_random_bad_cli_arguments_are_one_line_and_exit_4(capsys, args):
    command, flag, value = args
    code, err = _usage_error([*command, flag, value, "--device", "cpu"], capsys)
    if flag == "--backends" and value.strip() and not value.strip().startswith("-"):
        assert code == cli_args.USAGE and err.startswith("pytest-attn differential: unknown attention backend")
        return
    assert code == cli_args.USAGE, (flag, value, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["seed-table", "--iters", "-1"], "pytest-attn seed-table: argument --iters: -1: give 1 or more timed samples"),
    (["seed-table", "--seq-lens", "abc"], "pytest-attn seed-table: argument --seq-lens: 'abc' is not an integer"),
    (["seed-table", "--max-seq", "-5"], "pytest-attn seed-table: argument --max-seq: -5: give a length >= 1, or 0"),
    (["differential", "hd64-ragged", "--backends", ""], "pytest-attn differential: argument --backends: is empty"),
])
def test_the_reported_bad_arguments_exit_4_in_one_line_from_a_real_process(argv, message):
    done = subprocess.run([sys.executable, "-m", "pytest_attn.cli.main", *argv, "--device", "cpu"], capture_output=True,
                          text=True)
    assert done.returncode == 4, done.stderr
    assert done.stderr.strip().startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
