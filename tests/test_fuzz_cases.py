"""--attn-fuzz: seeded random cases within each backend's capabilities. The same seed and tier give
the same cases; a fuzz failure prints the seed and a command that reruns exactly it; a backend that
declares a feature it gets wrong fails where the catalog's cases it runs would not show it."""
import dataclasses
import os
import shlex

import pytest

from planted_backends import Einsum
from shrink_planted import write_shrink_package

from pytest_attn.cases.serialize import cases_in_file
from pytest_attn.cases.fuzz import TIERS, fuzz_case, fuzz_cases, fuzz_name, tier
from pytest_attn.core.contract import Capabilities
from pytest_attn.core.errors import AttnInputError
from pytest_attn.env.registry import Registry
from pytest_attn.check.minimize import runs_every_step

SUITE = ("--attn-suite=on", "-p", "no:cacheprovider")


def test_case_i_depends_on_seed_backend_tier_and_i_alone():
    caps = Registry.discover().get("torch").capabilities
    few, many = fuzz_cases(5, "torch", caps, tier(4)), fuzz_cases(5, "torch", caps, tier(16))
    assert few == many[:4] and [c.name for c in few] == [fuzz_name(5, i) for i in range(4)]
    assert fuzz_cases(5, "torch", caps, tier(4)) == few  # again: the same
    assert fuzz_cases(6, "torch", caps, tier(4)) != few
    assert fuzz_cases(5, "flex", caps, tier(4)) != few
    assert all("fuzz" in c.tags for c in many)


def test_tiers():
    assert (TIERS["ci"].count, TIERS["nightly"].count) == (16, 256)
    assert max(max(c.seq_lens + c.joining) for c in fuzz_cases(1, "x", Capabilities(), TIERS["ci"])) <= 160
    assert tier("7").count == 7 and tier("7").max_len == TIERS["ci"].max_len
    for bad in ("0", "-3", "lots", ""):
        with pytest.raises(AttnInputError, match="give ci .* nightly .* or a number of cases"):
            tier(bad)


NARROW = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({"float16"}), head_dims=frozenset({64}),
                      masks=frozenset({"full"}), gqa=False, paged_cache=False, empty_sequences=False)


def test_cases_stay_within_the_capabilities():
    cases = fuzz_cases(3, "narrow", NARROW, TIERS["nightly"])
    assert len(cases) == 256
    for case in cases:
        spec = case.layer_spec
        assert (spec.dtype, spec.head_dim, spec.mask, spec.group_size, case.cache) == ("float16", 64, "full", 1, False)
        assert not spec.features() and not case.kv_seq_lens and 0 not in case.seq_lens


class RefusesLongBatches(Einsum):
    """Capabilities cannot say it: its unsupported() refuses a request of more than 100 tokens."""

    name = "short"

    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        return reasons + (["a request over 100 tokens"] if max(metadata.kv_lens, default=0) > 100 else [])


def test_a_draw_the_backend_refuses_is_redrawn():
    backend = RefusesLongBatches()
    accept = lambda case: runs_every_step(backend, case)  # noqa: E731
    cases = fuzz_cases(11, backend.name, backend.capabilities, TIERS["ci"], accept)
    assert len(cases) == 16 and all(c.max_tokens <= 100 for c in cases)
    unfiltered = fuzz_cases(11, backend.name, backend.capabilities, TIERS["ci"])
    assert any(c.max_tokens > 100 for c in unfiltered)  # the filter had something to do


@pytest.mark.parametrize("name", ["torch", "flex"])
def test_the_bundled_backends_accept_every_case_drawn_for_them(name):
    backend = Registry.discover().get(name)
    cases = [fuzz_case(20261125, name, backend.capabilities, TIERS["nightly"], i) for i in range(64)]
    assert all(c is not None and runs_every_step(backend, c) for c in cases)
    assert any(c.layer_spec.window_left >= 0 for c in cases) and any(c.cache for c in cases)


def test_a_capability_that_admits_nothing_gives_no_case():
    assert fuzz_case(1, "none", dataclasses.replace(Capabilities(), paged_cache=False, no_cache=False),
                     TIERS["ci"], 0) is None


# -- through the plugin ----------------------------------------------------------------------------------
@pytest.fixture
def shrink(pytester, monkeypatch):
    path = write_shrink_package(pytester)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    return path


def test_fuzz_finds_a_declared_feature_done_wrong_and_reruns_exactly_that_case(pytester, shrink):
    """nowindow declares sliding windows and ignores them; the catalog's cases it is given here
    (no window) pass, the fuzz cases with a window fail, and each rerun command regenerates its case."""
    assert failing_fuzz_case(pytester).startswith("fuzz-5-")


def failing_fuzz_case(pytester) -> str:
    """The name of the first fuzz case that fails on nowindow (seed 5, ci), checked on the way."""
    result = pytester.runpytest("--attn-backend=nowindow", "--attn-fuzz=ci", "--attn-seed=5",
                                "--attn-cases=fuzz,hd64-ragged", "-k", "test_output_matches_reference", *SUITE)
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 1 and outcomes["passed"] >= 2, result.stdout.str()
    assert "test_output_matches_reference[nowindow-hd64-ragged] PASSED" in pytester.runpytest(
        "--attn-backend=nowindow", "--attn-cases=hd64-ragged", "-v", *SUITE).stdout.str()
    reruns = [line.strip().removeprefix("rerun: ") for line in result.stdout.lines if line.strip().startswith("rerun: ")]
    assert len(reruns) == outcomes["failed"]
    words = shlex.split(reruns[0])
    assert "--attn-fuzz=ci" in words and "--attn-seed=5" in words
    case = next(w for w in words if w.startswith("--attn-cases=")).removeprefix("--attn-cases=")
    assert case.startswith("fuzz-5-")
    again = pytester.runpytest(*words[3:], "-p", "no:cacheprovider")
    again.assert_outcomes(failed=1)
    assert f"test_output_matches_reference[nowindow-{case}]" in again.stdout.str()
    assert "window_left" in again.stdout.str()
    return case


def test_a_failing_fuzz_case_minimizes_from_its_name(pytester, shrink, capsys):
    from pytest_attn.cli.main import main

    case = failing_fuzz_case(pytester)
    out = pytester.path / "small.json"
    assert main(["minimize", case, "--backend", "nowindow", "--fuzz", "ci", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"minimizing {case} (" in printed and "seed 5" in printed
    (small,) = cases_in_file(out)
    assert small.layer_spec.window_left >= 0 and small.num_layers == 1  # the window is what it needs
    assert f"--attn-cases={case}-min --attn-seed=5" in printed
    assert main(["minimize", case, "--backend", "nowindow"]) == 4
    assert "is a fuzz case: give the --fuzz tier of its run" in capsys.readouterr().err


def test_fuzz_on_a_correct_backend_runs_every_case_and_passes(pytester, shrink):
    result = pytester.runpytest("--attn-backend=einsum", "--attn-fuzz=ci", "--attn-cases=fuzz",
                                "-k", "test_output_matches_reference or test_plan_matches_the_batch", *SUITE)
    result.assert_outcomes(passed=2 * TIERS["ci"].count)


def test_fuzz_cases_go_per_backend_beside_the_catalog(pytester, shrink):
    result = pytester.runpytest("--attn-backend=einsum,long65", "--attn-fuzz=3", "--attn-cases=hd64-ragged,fuzz",
                                "--collect-only", "-q", "-k", "test_output_matches_reference", *SUITE)
    ids = [line.split("[", 1)[1].rstrip("]") for line in result.stdout.lines if "[" in line]
    assert ids == [f"{b}-{c}" for b in ("einsum", "long65") for c in ("hd64-ragged", "fuzz-20261125-0",
                                                                      "fuzz-20261125-1", "fuzz-20261125-2")]


@pytest.mark.parametrize("value", ["0", "many", "-1"])
def test_a_bad_fuzz_value_is_a_usage_error(pytester, shrink, value):
    result = pytester.runpytest("--attn-backend=einsum", f"--attn-fuzz={value}", *SUITE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "give ci (16 small cases), nightly (256 larger ones) or a number of cases >= 1" in result.stderr.str()


def test_a_fuzz_name_needs_attn_fuzz(pytester, shrink):
    result = pytester.runpytest("--attn-backend=einsum", "--attn-cases=fuzz-20261125-0", *SUITE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "unknown case name or tag fuzz-20261125-0" in \
        result.stderr.str()
