"""compare(): the elementwise rule, the signed bias slope, the LSE, and the one-line summary."""
import math

import pytest
import torch

from pytest_attn.core.contract import LayerSpec, Tolerance
from pytest_attn.core.errors import AttnInputError
from pytest_attn.check.harness import make_qkv
from pytest_attn.check.reference import POISON, compare, compare_lse, reference_attention


def refs(dtype="bfloat16", tokens=64, heads=4, dim=32, seed=1, **layer_kw):
    layer = LayerSpec(heads, heads, dim, dtype, "causal", **layer_kw)
    q, k, v = make_qkv(tokens, layer, "cpu", seed)
    high = reference_attention(q, [k], [v], [tokens], layer, precision="high")
    low = reference_attention(q, [k], [v], [tokens], layer, precision="low")
    return high, low


# -- the elementwise rule ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_the_exact_answer_rounded_to_the_dtype_passes(dtype):
    high, low = refs(dtype)
    out = high.to(getattr(torch, dtype))
    result = compare(out, high, low, Tolerance())
    assert result.passed and result.max_abs_err <= result.rounding_err
    # even where the low-precision reference happens to be exact, the rounding floor lets it pass
    assert compare(out, high, high.clone(), Tolerance()).passed


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_element_fails_whatever_the_tolerance(value):
    high, low = refs()
    out = high.to(torch.bfloat16)
    out[3, 1, 2] = value
    result = compare(out, high, low, Tolerance(multiple=1e9, floor=1e9, bias_floor=1e9))
    assert not result.passed and result.nonfinite == 1 and not result.elementwise_passed
    assert result.summary() == f"1 of {out.numel()} output elements are NaN or Inf"


def test_an_element_still_holding_the_poison_fails_as_never_written():
    high, low = refs()
    out = high.to(torch.bfloat16)
    out[-1] = POISON  # the last token never written
    result = compare(out, high, low, Tolerance())
    assert not result.passed and result.unwritten == 4 * 32 and result.nonfinite == 0
    assert result.summary() == (f"{4 * 32} of {out.numel()} output elements never written "
                                f"(still the poison value {POISON})")
    assert "the backend never wrote them" in result.message()


def test_one_element_off_by_more_than_allowed_fails_and_is_located():
    high, low = refs("float16")
    out = high.to(torch.float16)
    base = compare(out, high, low, Tolerance())
    out[17, 2, 5] += 4 * base.allowed
    result = compare(out, high, low, Tolerance(), qo_indptr=(0, 10, 64))
    assert not result.elementwise_passed and not result.passed
    assert result.max_abs_err > result.allowed == pytest.approx(base.allowed)
    assert result.worst_index == (17, 2, 5) and result.worst_request == 1
    assert "EXCEEDS" in result.summary() and "\n" not in result.summary()


def test_the_allowed_error_is_the_documented_formula():
    high, low = refs()
    tol = Tolerance(multiple=3.0, floor=5.0)
    result = compare(low, high, low, tol)
    low_err = float((low.float() - high).abs().max())
    assert result.low_precision_err == pytest.approx(low_err)
    assert result.allowed == pytest.approx(3.0 * low_err + 5.0 * result.rounding_err)
    assert result.rounding_err >= 0.5 * torch.finfo(torch.bfloat16).eps * float(high.abs().max())


# -- the bias slope -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_refs():
    """One 224-pixel image through the ViT layer: 256 tokens x 16 heads x 80."""
    layer = LayerSpec(16, 16, 80, "bfloat16", "full")
    q, k, v = make_qkv(256, layer, "cpu", 7)
    return (reference_attention(q, [k], [v], [256], layer), reference_attention(q, [k], [v], [256], layer,
                                                                               precision="low"))


def test_an_unscaled_float32_output_rounded_to_bf16_passes_the_bias_check(vit_refs):
    high, low = vit_refs
    result = compare(high.to(torch.bfloat16), high, low, Tolerance())
    assert result.passed and result.bias_passed, result.message()
    assert abs(result.bias) < result.bias_allowed / 4
    # bias_multiple * |slope of ref_low| + bias_floor * u / sqrt(n), u = bf16's unit roundoff
    u = 0.5 * torch.finfo(torch.bfloat16).eps
    assert result.bias_allowed == pytest.approx(2.0 * abs(result.bias_low) + 16.0 * u / math.sqrt(high.numel()))


@pytest.mark.parametrize("factor", [1.002, 0.998])
def test_an_output_scaled_by_0_2_percent_fails_the_bias_check_but_not_the_elementwise_one(vit_refs, factor):
    high, low = vit_refs
    result = compare((high * factor).to(torch.bfloat16), high, low, Tolerance())
    assert result.elementwise_passed, "the bias hides under the elementwise bound"
    assert not result.bias_passed and not result.passed
    assert result.bias == pytest.approx(factor - 1, rel=0.05)  # signed
    sign = "+" if factor > 1 else "-"
    assert result.summary().startswith(f"systematic bias <out - ref, ref>/<ref, ref> = {sign}")
    assert "EXCEEDS" in result.summary() and f"off by a factor of about {1 + result.bias:.5f}" in result.summary()
    assert "\n" not in result.summary() and "systematic bias" in result.message()


def test_errors_of_the_same_size_without_a_sign_pass_the_bias_check(vit_refs):
    high, low = vit_refs
    signs = torch.randint(0, 2, high.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = compare((high * (1 + 0.002 * signs)).to(torch.bfloat16), high, low, Tolerance())
    assert result.passed, result.message()


def test_the_bias_unit_is_at_least_2_to_the_minus_16():
    """float32 outputs: u = max(2^-24, 2^-16), as the rule documents."""
    high, low = refs("float32")
    result = compare(high.float(), high, low, Tolerance(bias_multiple=3.0, bias_floor=10.0))
    expected = 3.0 * abs(result.bias_low) + 10.0 * 2.0 ** -16 / math.sqrt(high.numel())
    assert result.bias_allowed == pytest.approx(expected)


# -- the LSE -------------------------------------------------------------------------------------------
def lse_refs():
    """Causal, 6 queries over 4 keys: the first two queries see no key (LSE -inf)."""
    layer = LayerSpec(4, 2, 16, "bfloat16", "causal", return_lse=True)
    q, _, _ = make_qkv(6, layer, "cpu", 3)
    _, k, v = make_qkv(4, layer, "cpu", 4)
    high, lse_high = reference_attention(q, [k], [v], [6], layer, return_lse=True)
    low, lse_low = reference_attention(q, [k], [v], [6], layer, precision="low", return_lse=True)
    assert torch.isneginf(lse_high[:2]).all() and torch.isfinite(lse_high[2:]).all()
    return high, low, lse_high, lse_low


def test_lse_in_base_2_passes_when_declared_and_fails_when_read_as_natural():
    high, low, lse_high, lse_low = lse_refs()
    lse_e = lse_high.float()
    lse_2 = lse_e / math.log(2)
    out = high.to(torch.bfloat16)
    for lse, base, ok in ((lse_e, "e", True), (lse_2, "2", True), (lse_2, "e", False), (lse_e, "2", False)):
        result = compare(out, high, low, Tolerance(), lse=lse, lse_high=lse_high, lse_low=lse_low, lse_base=base)
        assert result.lse.passed is ok and result.passed is ok, (base, result.lse.message())
        assert result.lse.base == base
        if not ok:
            assert result.elementwise_passed and result.bias_passed
            assert result.summary() == result.lse.message()
            assert result.summary().startswith(f"LSE (base {base}): max |lse - ref|") and "EXCEEDS" in result.summary()


def test_lse_minus_inf_matches_minus_inf_and_nothing_else():
    _, _, lse_high, lse_low = lse_refs()
    good = lse_high.float()
    assert compare_lse(good, lse_high, lse_low, Tolerance()).passed
    for where, value in (((0, 1), 0.0), ((0, 1), math.inf), ((4, 2), -math.inf), ((4, 2), math.nan),
                         ((0, 0), math.nan)):
        bad = good.clone()
        bad[where] = value
        result = compare_lse(bad, lse_high, lse_low, Tolerance())
        assert not result.passed and result.nonfinite == 1, (where, value)
        assert "1 LSE values NaN, or infinite where the reference's are finite, or finite where it is -inf" \
            in result.message()


def test_lse_errors_and_bad_bases():
    _, _, lse_high, lse_low = lse_refs()
    off = lse_high.float().clone()
    off[3, 0] += 0.5
    result = compare_lse(off, lse_high, lse_low, Tolerance())
    assert not result.passed and result.nonfinite == 0 and result.max_abs_err == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(AttnInputError, match="LSE base '10': 'e' or '2'"):
        compare_lse(lse_high, lse_high, lse_low, Tolerance(), base="10")
    with pytest.raises(AssertionError, match=r"LSE shape \(6, 3\) differs from the reference's \(6, 4\)"):
        compare_lse(lse_high[:, :3], lse_high, lse_low, Tolerance())


# -- the summary: the first failing thing, in one line ---------------------------------------------------
def test_summary_names_the_first_failing_thing():
    high, low, lse_high, lse_low = lse_refs()
    good = high.to(torch.bfloat16)

    def summary(out, lse=None):
        lse = lse_high.float() if lse is None else lse
        result = compare(out, high, low, Tolerance(), lse=lse, lse_high=lse_high, lse_low=lse_low)
        line = result.summary()
        assert "\n" not in line
        return result, line

    bad_lse = lse_high.float() + 1.0
    scaled = (high * 1.05).to(torch.bfloat16)  # a bias, and (5 %) past the elementwise bound too
    everything = scaled.clone()
    everything[0, 0, 0] = POISON
    everything[1, 0, 0] = math.nan
    result, line = summary(everything, bad_lse)
    assert line.startswith("1 of 384 output elements never written")
    nan_too = scaled.clone()
    nan_too[1, 0, 0] = math.nan
    assert summary(nan_too, bad_lse)[1] == "1 of 384 output elements are NaN or Inf"
    result, line = summary(scaled, bad_lse)
    assert not result.elementwise_passed and not result.bias_passed
    assert line.startswith("max |out - ref|") and "EXCEEDS" in line
    slightly = (high * 1.004).to(torch.bfloat16)
    result, line = summary(slightly, bad_lse)
    assert result.elementwise_passed and not result.bias_passed and line.startswith("systematic bias")
    result, line = summary(good, bad_lse)
    assert result.elementwise_passed and result.bias_passed and line.startswith("LSE (base e)")
    result, line = summary(good)
    assert result.passed and line.startswith("max |out - ref|") and "within" in line
