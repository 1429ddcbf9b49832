"""forward()'s output contract (issue 17): what it returns is the `out` buffer it was given, in
shape, dtype, device and storage, and with `lse=` the log-sum-exp is in the buffer given. Each
broken rule fails naming what was expected and what came back, and the step it happened on; the
correct backend passes the same cases."""
import re

import pytest

torch = pytest.importorskip("torch")

from planted_backends import (Einsum, IgnoresCausalMask, ReturnsOutAndLse, ReturnsOwnTensor,  # noqa: E402
                              ReturnsViewOfOut, WritesOwnLse)

from pytest_attn.cases.catalog import CATALOG  # noqa: E402
from pytest_attn.core.calls import BackendError, returned_problems  # noqa: E402
from pytest_attn.check.harness import assert_case_passes, run_case  # noqa: E402

CASES = ("hd64-ragged", "llm-mixed-nhd")  # no cache; a paged cache with prefill and decode steps


def run(backend, case_name: str) -> None:
    case = CATALOG[case_name]
    assert_case_passes(run_case(backend, case, seed=0), backend, case)


def contract_error(backend, case_name: str) -> str:
    with pytest.raises(BackendError) as info:
        run(backend, case_name)
    return str(info.value)


@pytest.mark.parametrize("case_name", CASES + ("lse-ragged", "lse-decode-gqa"))
def test_the_correct_backend_passes(case_name):
    run(Einsum(), case_name)


@pytest.mark.parametrize("case_name", CASES)
def test_a_view_of_out_with_another_shape_fails_naming_both_shapes(case_name):
    message = contract_error(ReturnsViewOfOut(), case_name)
    out = re.search(r"forward\(\) returned shape \((\d+), (\d+)\), expected \((\d+), (\d+), (\d+)\) \(a view of `out` "
                    r"with another shape: return `out` itself\)", message)
    assert out, message
    tokens, flat, tokens2, heads, dim = map(int, out.groups())
    assert tokens == tokens2 and flat == heads * dim
    layer = CATALOG[case_name].layer()
    assert (heads, dim) == (layer.num_heads, layer.head_dim_v)


def test_the_failure_names_the_case_the_layer_the_cache_and_the_step():
    message = contract_error(ReturnsViewOfOut(), "llm-mixed-nhd")
    assert message.startswith("backend 'viewout' (planted_backends.ReturnsViewOfOut): forward() returned "), message
    assert message.endswith(" Case llm-mixed-nhd (causal mask, scale 0.08839, 16/4 heads x 128, bfloat16, paged NHD "
                            "cache, page 16), step 0."), message


@pytest.mark.parametrize("make, expected", [
    (lambda t: t.reshape(t.shape[0], -1).clone(), r"shape \((\d+), \d+\), expected \(\1, \d+, \d+\)(?! \(a view)"),
    (lambda t: t.float(), r"dtype float32, expected bfloat16"),
    (lambda t: t.to("meta"), r"device meta, expected cpu"),
    (lambda t: t.clone(), r"a tensor that is not the `out` buffer it was given"),
    (lambda t: t.transpose(0, 1).contiguous().transpose(0, 1), r"a tensor that is not the `out` buffer"),
    (lambda t: None, r"None, not a tensor"),
    (lambda t: [t], r"a list of 1 \(a tensor \(200, 8, 64\) bfloat16 on cpu\), not a tensor"),
], ids=["fresh tensor, wrong shape", "wrong dtype", "wrong device", "a copy", "a copy laid out otherwise", "None",
        "a list"])
def test_a_tensor_of_its_own_fails_naming_what_was_expected_and_what_came_back(make, expected):
    message = contract_error(ReturnsOwnTensor(make), "hd64-ragged")
    assert re.search(rf"forward\(\) returned {expected}", message), message
    assert "The contract: write into the `out` it is given ((200, 8, 64) bfloat16 on cpu) and return it" in message
    assert "tensor([" not in message  # described by shape, dtype and device, never by its values


def test_several_differences_are_all_named():
    message = contract_error(ReturnsOwnTensor(lambda t: t.reshape(t.shape[0], -1).float()), "hd64-ragged")
    assert "returned shape (200, 512), expected (200, 8, 64); dtype float32, expected bfloat16." in message


def test_returning_out_and_lse_names_the_pair():
    message = contract_error(ReturnsOutAndLse(), "lse-ragged")
    assert "forward() returned a tuple of two (out, lse), not `out` alone" in message, message
    assert "and write the log-sum-exp into `lse` ((134, 8) float32 on cpu)" in message


def test_an_lse_written_elsewhere_fails_naming_the_buffer():
    message = contract_error(WritesOwnLse(), "lse-ragged")
    assert "forward() left the `lse` buffer it was given ((134, 8) float32 on cpu) all NaN, as the suite filled it: " \
        "unwritten" in message, message


def test_a_pair_with_buffers_of_its_own_names_what_each_differs_in():
    out = torch.empty(4, 2, 8, dtype=torch.bfloat16)
    lse = torch.empty(4, 2)
    problems = returned_problems((out.clone(), lse[:, :1]), out, lse)
    assert problems[0].startswith("a tuple of two (out, lse)")
    assert problems[1].startswith("its first a tensor that is not the `out` buffer")
    assert problems[2] == "its second shape (4, 1), expected (4, 2) (a view of `lse` with another shape: return `lse` itself)"
    assert returned_problems(out, out, lse) == [] and returned_problems(out.view(4, 2, 8), out) == []


def test_the_mask_bug_passes_the_contract_and_fails_the_comparison():
    """The contract checks what comes back, not the numbers: a backend that ignores the causal
    mask returns `out` and fails on the output (tests/test_failure_reports.py: how that reads)."""
    with pytest.raises(AssertionError) as info:
        run(IgnoresCausalMask(), "hd64-ragged")
    assert not isinstance(info.value, BackendError)
    run(IgnoresCausalMask(), "vit-1img-224")  # a full-mask case: the mutant is right there
