"""The reference and the tolerance rule: right answers pass, wrong ones fail with a clear reason."""
import math
import subprocess
import sys

import pytest
import torch

from pytest_attn.contract import LayerSpec, Tolerance
from pytest_attn.harness import make_qkv
from pytest_attn.reference import POISON, compare, reference_attention


def naive(q, k, v, layer):
    """Textbook attention, one query at a time, float64, bottom-right causal."""
    lq, lk = q.shape[0], k.shape[0]
    out = torch.zeros(lq, layer.num_heads, layer.head_dim, dtype=torch.float64)
    for h in range(layer.num_heads):
        kh = h // layer.group_size
        for i in range(lq):
            limit = lk - lq + i if layer.causal else lk - 1
            s = [float(q[i, h].double() @ k[j, kh].double()) * layer.scale for j in range(limit + 1)]
            m = max(s)
            w = [math.exp(x - m) for x in s]
            out[i, h] = sum(wj * v[j, kh].double() for j, wj in enumerate(w)) / sum(w)
    return out


@pytest.mark.parametrize("mask", ["causal", "full"])
def test_reference_is_textbook_attention_with_gqa_and_bottom_right_causal(mask):
    layer = LayerSpec(4, 2, 16, "float32", mask)
    q, _, _ = make_qkv(3, layer, "cpu", 1)
    _, k, v = make_qkv(7, layer, "cpu", 2)  # 3 queries over 7 keys: the queries are the last 3 tokens
    got = reference_attention(q, [k], [v], [3], layer)
    assert torch.allclose(got, naive(q, k, v, layer), atol=1e-12)


def test_reference_chunks_long_sequences_without_changing_the_answer(monkeypatch):
    import pytest_attn.reference as reference

    layer = LayerSpec(2, 2, 8, "float32", "causal")
    q, k, v = make_qkv(50, layer, "cpu", 3)
    whole = reference_attention(q, [k], [v], [50], layer)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 64)  # 16 query rows per chunk
    assert torch.allclose(reference_attention(q, [k], [v], [50], layer), whole, rtol=0, atol=1e-12)


def _outputs(dtype="bfloat16"):
    layer = LayerSpec(4, 4, 32, dtype, "causal")
    q, k, v = make_qkv(64, layer, "cpu", 4)
    high = reference_attention(q, [k], [v], [64], layer, precision="high")
    low = reference_attention(q, [k], [v], [64], layer, precision="low")
    return high, low


def test_the_low_precision_reference_passes_and_sets_a_nonzero_bar():
    high, low = _outputs()
    result = compare(low.clone(), high, low, Tolerance())
    assert result.passed and result.low_precision_err > 0 and result.allowed > result.low_precision_err


@pytest.mark.parametrize("corrupt, expected", [
    (lambda o: o.flip(1), "EXCEEDS"),  # heads swapped: a layout bug
    (lambda o: o.index_fill_(0, torch.tensor([5]), float("nan")), "NaN or Inf"),
    (lambda o: o.index_fill_(0, torch.tensor([63]), POISON), "never wrote them"),
    (lambda o: o + 0.05, "EXCEEDS"),  # a small bias, well above bf16 error
])
def test_wrong_outputs_fail_with_the_reason(corrupt, expected):
    high, low = _outputs()
    out = corrupt(low.clone())
    result = compare(out, high, low, Tolerance(), qo_indptr=(0, 64))
    assert not result.passed
    assert expected in result.message()


def test_infinite_values_never_pass_even_when_everything_else_is_wrong():
    high, low = _outputs("float32")
    out = low.clone()
    out[0, 0, 0] = float("inf")
    result = compare(out, high, low, Tolerance(multiple=1e9, floor=1e9))
    assert not result.passed and result.nonfinite == 1


def test_worst_element_is_located_by_request():
    high, low = _outputs("float32")
    out = low.clone()
    out[40, 2, 3] += 1.0
    result = compare(out, high, low, Tolerance(), qo_indptr=(0, 30, 64))
    assert result.worst_index == (40, 2, 3) and result.worst_request == 1
    assert "(request #1)" in result.message()


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.float32), ("float16", torch.float32),
                                             ("float32", torch.float64)])
def test_the_reference_is_float32_for_16_bit_inputs_and_float64_for_float32_on_cpu(dtype, expected):
    layer = LayerSpec(2, 2, 8, dtype, "causal")
    q, k, v = make_qkv(5, layer, "cpu", 5)
    assert reference_attention(q, [k], [v], [5], layer).dtype == expected
    assert reference_attention(q, [k], [v], [5], layer, precision="low").dtype == q.dtype


@pytest.mark.attn_long
def test_comparing_imports_neither_sympy_nor_torch_fx():
    """torch.unravel_index would: it costs 0.3 s to 2 s in every process that checks an output."""
    code = ("import sys, torch\n"
            "from pytest_attn.contract import LayerSpec, Tolerance\n"
            "from pytest_attn.harness import make_qkv\n"
            "from pytest_attn.reference import compare, reference_attention\n"
            "layer = LayerSpec(2, 2, 8, 'bfloat16', 'causal')\n"
            "q, k, v = make_qkv(6, layer, 'cpu', 1)\n"
            "hi = reference_attention(q, [k], [v], [6], layer)\n"
            "lo = reference_attention(q, [k], [v], [6], layer, precision='low')\n"
            "out = lo.clone(); out[4, 1, 3] += 1\n"
            "result = compare(out, hi, lo, Tolerance())\n"
            "assert result.worst_index == (4, 1, 3), result.worst_index\n"
            "heavy = [m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
