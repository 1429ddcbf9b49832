"""The differential with planted backends: each gets its own row (compared, skipped with the reason,
or BROKE with what broke), the good ones are compared all the same, NaN, Inf or an all-zero output
agree with nothing; the suite's test and `pytest-attn differential` fail naming the backend alone."""
import math
import re

import pytest

from backend_packages import write_backend_package
from pytest_attn.cli import args
from pytest_attn.cli import main as cli
from pytest_attn.cases.catalog import CATALOG
from pytest_attn.core.contract import Availability
from pytest_attn.check.differential import differential
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

CASE = CATALOG["hd64-ragged"]


class AssertsInForward(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None):
        assert False, "scratch buffer too small"


class ReadbackDisagrees(TorchSDPABackend):
    def readback(self, plan):
        return ["the live kernel ran 7 CTAs, the plan said 8"]


class WritesZeros(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None):
        return out.zero_()


class OneInf(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None):
        super().forward(q, k, v, metadata, plan, out=out)
        out[0, 0, 0] = math.inf
        return out


class Unavailable(TorchSDPABackend):
    def available(self):
        return Availability(False, "needs the widget library")


class AvailableRaises(TorchSDPABackend):
    def available(self):
        raise OSError("libwidget.so: cannot open shared object file")


def _rows(result) -> dict:
    return {line.split()[0]: line for line in result.lines()[1:] if line.startswith("  ") and " vs " not in line}


def test_a_backend_that_asserts_in_forward_is_reported_alone_and_the_others_are_compared():
    result = differential([TorchSDPABackend(name="a"), AssertsInForward(name="asserts"),
                           TorchSDPABackend(name="b")], CASE)
    assert [r.name for r in result.ran] == ["a", "b"] and all(r.passed for r in result.ran)
    assert result.problems() == ["asserts broke: AssertionError: scratch buffer too small"]
    assert "BROKE: AssertionError: scratch buffer too small" in _rows(result)["asserts"]
    assert list(result.pairwise()) == [("a", "b")]


def test_a_plan_the_live_kernel_disagrees_with_fails_that_backend_alone():
    result = differential([ReadbackDisagrees(name="liar"), TorchSDPABackend(name="a"), TorchSDPABackend(name="b")],
                          CASE)
    (problem,) = result.problems()
    assert problem == ("liar broke: failed a check: plan and live kernel disagree: the live kernel ran 7 CTAs, "
                       "the plan said 8")
    assert [r.name for r in result.ran] == ["a", "b"]


def test_an_all_zero_output_never_agrees_with_a_real_one():
    # relative to the first of the pair, an all-zero first output read as relative L2 0: agreement
    result = differential([WritesZeros(name="zeros"), TorchSDPABackend(name="a")], CASE)
    abs_err, rel = result.pairwise()[("zeros", "a")]
    assert abs_err > 0.1 and rel == pytest.approx(1.0)
    assert result.problems()[0].startswith("zeros disagrees with the reference")


def test_one_inf_element_makes_every_pair_with_it_fail():
    result = differential([OneInf(name="inf"), TorchSDPABackend(name="a"), TorchSDPABackend(name="b")], CASE)
    pairs = result.pairwise()
    assert pairs[("inf", "a")] == (math.inf, math.inf) and pairs[("inf", "b")] == (math.inf, math.inf)
    assert pairs[("a", "b")][1] < 1e-2
    assert _rows(result)["inf"].endswith("  inf  inf  FAILS (NaN or Inf in its output)")
    assert result.problems() == ["inf disagrees with the reference (relative L2 inf), with NaN or Inf in its output"]


def test_every_backend_keeps_its_row_in_order_unavailable_skipped_and_broken_availability_broke():
    result = differential([Unavailable(name="away"), TorchSDPABackend(name="a"), AvailableRaises(name="nolib"),
                           TorchSDPABackend(name="b")], CASE)
    assert [r.name for r in result.runs] == ["away", "a", "nolib", "b"]
    rows = _rows(result)
    assert rows["away"].endswith("skipped: unavailable here: needs the widget library")
    assert "BROKE: available() raised OSError: libwidget.so: cannot open shared object file" in rows["nolib"]
    assert [r.name for r in result.ran] == ["a", "b"]
    assert [p.split(":")[0] for p in result.problems()] == ["nolib broke"]


# -- the suite's test_backends_agree ---------------------------------------------------------------------------
PLANTED = """
from pytest_attn.core.contract import Availability
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

class AssertsInForward(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None):
        assert False, "scratch buffer too small"

class ReturnsNaN(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None):
        return out.fill_(float("nan"))

class AvailableRaises(TorchSDPABackend):
    def available(self):
        raise OSError("libwidget.so: cannot open shared object file")

class Unavailable(TorchSDPABackend):
    def available(self):
        return Availability(False, "needs the widget library")

class NoHeadDim64(TorchSDPABackend):
    def unsupported(self, layer, metadata, device="cpu"):
        return ["head_dim 64 is not built"] if layer.head_dim == 64 else []

BACKENDS = [AssertsInForward(name="asserts"), ReturnsNaN(name="nan"), AvailableRaises(name="nolib"),
            Unavailable(name="away"), NoHeadDim64(name="no64")]
"""


@pytest.fixture
def planted(pytester):
    return write_backend_package(pytester, "planted_attn", PLANTED, {"planted": "planted_attn:BACKENDS"})


@pytest.mark.parametrize("broken, message", [
    ("asserts", "*on vit-ragged-mix: asserts broke: AssertionError: scratch buffer too small*"),
    ("nan", "*on vit-ragged-mix: nan disagrees with the reference (relative L2 *), with NaN or Inf in its output*"),
])
def test_the_suites_differential_fails_naming_the_broken_backend_alone(pytester, planted, broken, message):
    result = pytester.runpytest(f"--attn-backend={broken},torch,flex", "--attn-suite=on", "-k",
                                "test_backends_agree and vit-ragged-mix", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([message, "*  torch *passes", "*  flex *passes", "*torch vs flex:*"])
    if broken == "asserts":  # where it raised, for the one who fixes it
        result.stdout.fnmatch_lines(["*Captured asserts broke call*", "Traceback (most recent call last):",
                                     "*in forward", "*assert False*"])
    assert "torch disagrees" not in result.stdout.str() and "flex disagrees" not in result.stdout.str()


# -- pytest-attn differential ----------------------------------------------------------------------------------
def test_cli_all_lists_the_unavailable_and_fails_for_the_broken_one_alone(planted, capsys):
    code = cli.main(["differential", "hd64-ragged", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == args.FAILED and "Traceback" not in out + err
    for row in (r"away +skipped: unavailable here: needs the widget library",
                r"flashinfer +skipped: unavailable here: no CUDA device", r"nolib +BROKE: available\(\) raised OSError",
                r"asserts +BROKE: AssertionError: scratch buffer too small",
                r"no64 +skipped: head_dim 64 is not built"):  # no64 under 'all': listed, no failure
        assert re.search(r"\n  " + row, out), row  # one column of names, as wide as the longest
    assert "flex vs torch:" in out and "torch vs nan: inf  inf  (NaN or Inf: never agrees)" in out
    failures = [line.removeprefix("pytest-attn differential: FAILED: ").split(" ")[0] for line in err.splitlines()]
    assert sorted(failures) == ["asserts", "nan", "nolib"], err


def test_cli_named_backend_that_cannot_run_the_case_gets_its_row_and_fails(planted, capsys):
    code = cli.main(["differential", "hd64-ragged", "--backends", "no64,torch,flex", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == args.FAILED
    assert "no64      skipped: head_dim 64 is not built" in out and "torch vs flex:" in out
    assert err == ("pytest-attn differential: FAILED: named but did not run the case: no64 (the reasons are "
                   "above)\n")


def test_cli_all_passes_when_the_ones_left_out_are_only_unavailable(capsys):
    assert cli.main(["differential", "hd64-ragged", "--backends", "all", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"\n  trtllm +skipped: unavailable here: no CUDA device", out) and err == ""
