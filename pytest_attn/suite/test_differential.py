"""Do the backends agree? One case through every backend of the run, each compared with the reference
and with each other; the table is attached to the test's report (pytest -rA shows it) and to its
junit properties. It fails when a backend fails the reference or breaks (raises, or breaks its
contract), naming that backend alone: the others' rows and comparisons are still in the table."""
import pytest

from pytest_attn.cases.catalog import CATALOG
from pytest_attn.check.differential import differential

pytestmark = pytest.mark.attn_differential

#: One case per family of kernels: the ViT seed, a mixed paged step, a window, sinks, an FP8 cache,
#: the LSE and a 192/128 head-dim pair (where cutlass and fa2 disagreed, flashinfer #1663).
DIFFERENTIAL_CASES = ("vit-ragged-mix", "llm-mixed-nhd", "swa-causal-ragged", "sinks-decode", "fp8-kv-scales",
                      "lse-ragged", "hd192-vo128-ragged-full", "softcap-50-decode")


@pytest.mark.parametrize("case_name", DIFFERENTIAL_CASES)
def test_backends_agree(case_name, attn_session, attn_device, attn_seed, request, record_property):
    case = CATALOG[case_name]
    if attn_session.max_tokens and case.max_tokens > attn_session.max_tokens:
        pytest.skip(f"case {case_name} is over --attn-max-tokens={attn_session.max_tokens}")
    # every backend of the run gets a row: one unavailable here is listed as skipped, with the reason
    result = differential(attn_session.selected, case, device=attn_device, seed=attn_seed,
                          availability=attn_session.availability)
    table = "\n".join(result.lines())
    request.node.add_report_section("call", "differential", table)
    for run in result.runs:
        if run.trace:  # where a broken backend raised
            request.node.add_report_section("call", f"{run.name} broke", run.trace)
    record_property("differential", table)
    problems = result.problems()  # each names its backend alone: a broken one fails no other
    assert not problems, f"on {case_name}: " + "; ".join(problems) + f"\n{table}"
    if len(result.ran) < 2:
        pytest.skip(f"fewer than two of this run's backends run {case_name}: "
                    + "; ".join(f"{r.name}: {r.skipped}" for r in result.runs if r.skipped))
