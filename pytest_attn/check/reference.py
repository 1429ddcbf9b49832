"""High-precision reference attention and the tolerance rule.

The reference is computed per sequence in float32, as FlashAttention's own tests do: for bf16 and
fp16 inputs its error (~1e-7) is four orders of magnitude below theirs. float32 inputs get float64,
on a GPU too (in float32 the reference and its low-precision twin would be the same computation,
allowing no error at all: seen failing every fused kernel's float32 cases on an H100). It runs in query chunks, so an 8192-token
sequence never materialises a whole score matrix. The same math done in the input precision gives
the error this precision costs anyway; a backend passes when its error stays within a small
multiple of that, plus a rounding floor (FlashAttention's rule; see
:class:`~pytest_attn.core.contract.Tolerance`). NaN and Inf never pass, and an element still holding
:data:`~pytest_attn.core.poison.POISON` was never written.

Everything a layer can ask for is computed here from its definition in :class:`LayerSpec`, and
nothing here is shared with a backend: bottom-right causal alignment, sliding windows, logit
soft-caps, attention sinks, a V head dim of its own, cross-attention, and the log-sum-exp. A
cache whose dtype is not the layer's (FP8 with scales, or another 16-bit dtype) is modelled by
:func:`as_stored_in_cache`: the values attention must use are the stored ones, so both references
start from them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from pytest_attn.core.contract import Tolerance
from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.layer import LayerSpec
from pytest_attn.core.metadata import _as_lengths
from pytest_attn.core.poison import POISON

if TYPE_CHECKING:
    import torch

# Score elements per chunk. On CPU, 16 MiB of float64: under glibc's largest mmap threshold
# (32 MiB), so each chunk reuses the memory the last one freed instead of faulting in fresh pages
# (with 256 MiB chunks, page faults were half the reference's time). On a GPU, large chunks keep
# the number of launches down.
_CHUNK_ELEMENTS = 1 << 21
_GPU_CHUNK_ELEMENTS = 1 << 25
_E4M3_MAX = 448.0
_LOG2E, _LN2 = 1.0 / math.log(2.0), math.log(2.0)
BIAS_UNIT_FLOOR = 2.0 ** -16


def as_stored_in_cache(t: "torch.Tensor", layer: LayerSpec, which: str) -> "torch.Tensor":
    """The values attention must use for K or V (``which``) of this layer: what its paged cache
    holds. A cache in the layer's dtype holds the tensor itself; a cache in another 16-bit (or
    32-bit) dtype holds it rounded to that dtype (an fp16 layer over a bf16 cache, as engines run
    when the KV-cache dtype is configured apart from the model's), returned in the cache's dtype;
    a float8 cache holds t / scale saturated and rounded to e4m3, returned times scale (float32)."""
    import torch

    if layer.cache_dtype == layer.dtype:
        return t
    if not layer.quantized_kv:
        return t.to(getattr(torch, layer.cache_dtype))
    scale = layer.k_scale if which == "k" else layer.v_scale
    stored = (t.to(torch.float32) / scale).clamp(-_E4M3_MAX, _E4M3_MAX).to(getattr(torch, layer.cache_dtype))
    return stored.to(torch.float32) * scale


def _softmax_base2(scores, want_lse: bool):
    """softmax(scores) the way fused kernels compute it: the logits are converted to base 2 (times
    log2 e) in the working precision, then exp2 of their difference from the row maximum. In float32
    that conversion costs absolute precision at large logits (the ulp of 8.7e4 is 2^-7), which every
    flash-style float32 kernel pays: measured on an H200, SDPA's efficient kernel and flex both erred
    4.85e-3 on extreme-negative-logits-fp32, against an allowed 1.3e-6 from a natural-base twin (2.6e-3
    is this twin's own error there, on CPU). -> (probs, natural LSE)."""
    import torch

    s2 = scores * _LOG2E
    top = s2.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp2(s2 - top)
    total = weights.sum(dim=-1, keepdim=True)
    lse = ((top + torch.log2(total)) * _LN2).squeeze(-1) if want_lse else None
    return weights / total, lse


def _visible_keys(layer: LayerSpec, start: int, stop: int, lk: int, offset: int, device):
    """[stop - start, lk] booleans: which keys queries ``start:stop`` see under the layer's causal
    mask and window (query i at key position offset + i); None when they see every key."""
    import torch

    if not (layer.causal or layer.window_left >= 0):
        return None
    qpos = torch.arange(start, stop, device=device)[:, None] + offset
    kpos = torch.arange(lk, device=device)[None, :]
    visible = torch.ones((stop - start, lk), dtype=torch.bool, device=device)
    if layer.causal:
        visible &= kpos <= qpos
    if layer.window_left >= 0:
        visible &= kpos >= qpos - layer.window_left
    return visible


def _attend_one(q, k, v, layer: LayerSpec, compute_dtype, softmax_dtype, want_lse: bool, base2: bool = False):
    """q [Lq, H, D], k [Lk, Hkv, D], v [Lk, Hkv, Dv] of one sequence -> ([Lq, H, Dv], [Lq, H] or None).
    ``base2``: the softmax of fused kernels (see _softmax_base2), for the low-precision twin."""
    import torch

    lq, lk = q.shape[0], k.shape[0]
    out = torch.zeros((lq, layer.num_heads, layer.head_dim_v), dtype=compute_dtype, device=q.device)
    lse = torch.full((lq, layer.num_heads), -math.inf, dtype=softmax_dtype, device=q.device) if want_lse else None
    if lq == 0 or lk == 0:
        return out, lse
    qh = q.to(compute_dtype).transpose(0, 1)  # [H, Lq, D]
    kh = k.to(compute_dtype).repeat_interleave(layer.group_size, dim=1).transpose(0, 1)  # [H, Lk, D]
    vh = v.to(compute_dtype).repeat_interleave(layer.group_size, dim=1).transpose(0, 1)  # [H, Lk, Dv]
    sinks = (torch.tensor(layer.sinks, dtype=softmax_dtype, device=q.device).view(-1, 1, 1)
             if layer.sinks else None)
    chunk = _CHUNK_ELEMENTS if q.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    rows = max(1, chunk // max(1, layer.num_heads * (lk + 1)))
    offset = lk - lq  # bottom-right alignment: query i sits at key position offset + i
    cap = layer.logits_soft_cap
    for start in range(0, lq, rows):
        stop = min(lq, start + rows)
        scores = torch.matmul(qh[:, start:stop], kh.transpose(1, 2)) * layer.scale  # [H, r, Lk]
        if cap > 0:
            scores = torch.tanh(scores / cap) * cap
        scores = scores.to(softmax_dtype)
        visible = _visible_keys(layer, start, stop, lk, offset, q.device)
        if visible is not None:
            scores = scores.masked_fill(~visible, -math.inf)
        if sinks is not None:  # the sink is one more logit of the softmax, with no value
            scores = torch.cat([scores, sinks.expand(-1, stop - start, 1)], dim=-1)
        if base2:
            probs, row_lse = _softmax_base2(scores, want_lse)
            if want_lse:
                lse[start:stop] = row_lse.transpose(0, 1)
        else:
            if want_lse:
                lse[start:stop] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
            probs = torch.softmax(scores, dim=-1)
        if sinks is not None:
            probs = probs[..., :lk]
        if visible is not None:  # a query that sees no key at all: output 0, not 0/0
            probs = torch.where(visible.any(dim=-1)[None, :, None], probs, torch.zeros_like(probs))
        out[start:stop] = torch.matmul(probs.to(compute_dtype), vh).transpose(0, 1)
    return out, lse


def _precision_dtypes(q, precision: str):
    import torch

    if precision == "high":  # float32 inputs need float64, or the low-precision twin would be the reference
        compute = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32
        return compute, compute
    if precision == "low":
        return q.dtype, q.dtype
    raise AttnInputError(f"precision must be 'high' or 'low', got {precision!r}")


def reference_attention(q: "torch.Tensor", keys: Sequence["torch.Tensor"], values: Sequence["torch.Tensor"],
                        q_lens: Sequence[int], layer: LayerSpec, *, precision: str = "high",
                        return_lse: bool = False):
    """Attention of each request's queries over its keys.

    q: [sum(q_lens), H, D]; keys[i]: [kv_len_i, Hkv, D], values[i]: [kv_len_i, Hkv, Dv], the whole
    history of request i (cached tokens first), as attention must use it (for an FP8 cache: the
    dequantized values, see :func:`as_stored_in_cache`). The queries of request i are its last
    q_lens[i] tokens. precision "high": float32, or float64 for float32 inputs; "low": the input
    dtype throughout, the way an unfused low-precision implementation does it; for float32 inputs
    with the softmax in base 2 as fused kernels take it (in 16 bits the rounding of the logits to the
    input dtype dominates that conversion, and the 16-bit twin stays FlashAttention's).

    Returns the output [sum(q_lens), H, Dv], or (output, lse) with ``return_lse``: the natural
    log-sum-exp of each query's logits [sum(q_lens), H] (the sink included). A query that sees no
    key has output 0 and LSE -inf (the sink's logit, with sinks).
    """
    import torch

    q_lens = _as_lengths(q_lens, "q_lens")
    if len(keys) != len(q_lens) or len(values) != len(q_lens):
        raise AttnInputError(f"{len(keys)} key and {len(values)} value tensors for {len(q_lens)} requests")
    if q.dim() != 3 or tuple(q.shape[1:]) != (layer.num_heads, layer.head_dim):
        raise AttnInputError(f"q is {tuple(q.shape)}, expected [*, {layer.num_heads}, {layer.head_dim}]")
    if sum(q_lens) != q.shape[0]:
        raise AttnInputError(f"q has {q.shape[0]} rows but q_lens add up to {sum(q_lens)}")
    compute, softmax_dtype = _precision_dtypes(q, precision)
    outs, lses, start = [], [], 0
    for n, k, v in zip(q_lens, keys, values):
        if (k.dim() != 3 or v.dim() != 3 or k.shape[0] != v.shape[0]
                or tuple(k.shape[1:]) != (layer.num_kv_heads, layer.head_dim)
                or tuple(v.shape[1:]) != (layer.num_kv_heads, layer.head_dim_v)):
            raise AttnInputError(f"a request's k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                                 f"[kv_len, {layer.num_kv_heads}, {layer.head_dim}] and "
                                 f"[kv_len, {layer.num_kv_heads}, {layer.head_dim_v}]")
        out, lse = _attend_one(q[start:start + n], k, v, layer, compute, softmax_dtype, return_lse,
                               base2=precision == "low" and q.dtype == torch.float32)
        outs.append(out)
        lses.append(lse)
        start += n
    out = torch.cat(outs) if outs else q.new_empty((0, layer.num_heads, layer.head_dim_v), dtype=compute)
    if not return_lse:
        return out
    lse = torch.cat(lses) if lses else q.new_empty((0, layer.num_heads), dtype=softmax_dtype)
    return out, lse


# -- the comparison ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LseComparison:
    max_abs_err: float
    low_precision_err: float
    allowed: float
    nonfinite: int  # NaN, or an infinity where the reference is finite
    base: str

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and self.max_abs_err <= self.allowed

    def message(self) -> str:
        verdict = "within" if self.max_abs_err <= self.allowed else "EXCEEDS"
        bad = (f"; {self.nonfinite} LSE values NaN, or infinite where the reference's are finite, or finite where it "
               "is -inf (a query with no visible key)" if self.nonfinite else "")
        return (f"LSE (base {self.base}): max |lse - ref| = {self.max_abs_err:.3e} {verdict} the allowed "
                f"{self.allowed:.3e} (low-precision reference error {self.low_precision_err:.3e}){bad}")


@dataclass(frozen=True)
class Comparison:
    """How an output compares with the reference; ``message()`` explains a failure."""

    max_abs_err: float
    low_precision_err: float
    rounding_err: float
    allowed: float
    rel_l2_err: float
    nonfinite: int
    unwritten: int
    worst_index: tuple  # (token, head, dim) of the largest error
    worst_request: Optional[int]
    numel: int
    bias: float = 0.0  # <out - ref, ref> / <ref, ref>
    bias_low: float = 0.0  # the same slope of the low-precision reference
    bias_allowed: float = math.inf
    lse: Optional[LseComparison] = None

    @property
    def elementwise_passed(self) -> bool:
        return self.nonfinite == 0 and self.unwritten == 0 and self.max_abs_err <= self.allowed

    @property
    def bias_passed(self) -> bool:
        return abs(self.bias) <= self.bias_allowed

    @property
    def passed(self) -> bool:
        return self.elementwise_passed and self.bias_passed and (self.lse is None or self.lse.passed)

    def summary(self) -> str:
        """One line: the first thing that failed (or the elementwise figures when all passed)."""
        if self.unwritten:
            return f"{self.unwritten} of {self.numel} output elements never written (still the poison value {POISON})"
        if self.nonfinite:
            return f"{self.nonfinite} of {self.numel} output elements are NaN or Inf"
        if self.max_abs_err > self.allowed or self.passed:
            return (f"max |out - ref| = {self.max_abs_err:.3e} {'within' if self.max_abs_err <= self.allowed else 'EXCEEDS'} "
                    f"the allowed {self.allowed:.3e}; relative L2 error {self.rel_l2_err:.3e}")
        if not self.bias_passed:
            return self._bias_line()
        return self.lse.message()

    def _bias_line(self) -> str:
        """Shown only when the elementwise bound held: then a systematic slope is the finding (a
        scale bug). Past the bound, a slope says little (a wrong mask moves every row too)."""
        verdict = "within" if self.bias_passed else "EXCEEDS"
        return (f"systematic bias <out - ref, ref>/<ref, ref> = {self.bias:+.3e} {verdict} the allowed "
                f"{self.bias_allowed:.3e} (the low-precision reference's is {self.bias_low:+.3e}), within the "
                f"elementwise bound: every output is off by a factor of about {1 + self.bias:.5f}, as from a wrong "
                "scale")

    def message(self) -> str:
        lines = []
        if self.unwritten:
            lines.append(f"{self.unwritten} of {self.numel} output elements still hold the poison value "
                         f"{POISON}: the backend never wrote them")
        if self.nonfinite:
            lines.append(f"{self.nonfinite} output elements are NaN or Inf")
        verdict = "within" if self.max_abs_err <= self.allowed else "EXCEEDS"
        lines.append(
            f"max |out - ref| = {self.max_abs_err:.3e} {verdict} the allowed {self.allowed:.3e} "
            f"(low-precision reference error {self.low_precision_err:.3e}, rounding {self.rounding_err:.3e}); "
            f"relative L2 error {self.rel_l2_err:.3e}; worst at token/head/dim {self.worst_index}"
            + (f" (request #{self.worst_request})" if self.worst_request is not None else ""))
        if not self.bias_passed and self.elementwise_passed:
            lines.append(self._bias_line())
        if self.lse is not None and not self.lse.passed:
            lines.append(self.lse.message())
        return "\n".join(lines)


def _unravel(flat: int, shape: tuple) -> tuple:
    """The index of element ``flat`` of a C-contiguous tensor of ``shape``. (torch.unravel_index
    imports torch.fx's symbolic shapes and sympy on its first call: 0.3 s or more per process.)"""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _slope(err: "torch.Tensor", ref: "torch.Tensor", ref_norm2: float) -> float:
    """<err, ref> / <ref, ref>: how much of the answer the error adds (a scale of 1 + slope)."""
    return float((err.double() * ref.double()).sum()) / ref_norm2 if ref_norm2 else 0.0


def compare(out: "torch.Tensor", ref_high: "torch.Tensor", ref_low: "torch.Tensor", tolerance: Tolerance,
            qo_indptr: Sequence[int] = (), *, lse: Optional["torch.Tensor"] = None,
            lse_high: Optional["torch.Tensor"] = None, lse_low: Optional["torch.Tensor"] = None,
            lse_base: str = "e") -> Comparison:
    """``out`` against the references by ``tolerance``; with ``lse``, the backend's log-sum-exp
    (in ``lse_base``) against the references' natural ones."""
    import torch

    if tuple(out.shape) != tuple(ref_high.shape):
        raise AssertionError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref_high.shape)}")
    hi = ref_high.to(out.device)
    got = out.to(hi.dtype)
    unwritten = int((out == POISON).sum())
    finite = torch.isfinite(got)
    nonfinite = int((~finite).sum())
    diff = torch.where(finite, (got - hi).abs(), torch.full_like(hi, math.inf))
    if diff.numel():
        flat = int(torch.argmax(diff))
        max_err = float(diff.reshape(-1)[flat])
        worst = _unravel(flat, tuple(diff.shape))
    else:
        max_err, worst = 0.0, ()
    low = ref_low.to(hi.device, hi.dtype)
    low_err = float((low - hi).abs().max()) if hi.numel() else 0.0
    # Rounding the exact answer to the output dtype: measured, and never below half an ulp at the
    # output's largest magnitude (the measured value is 0 when the answer happens to be exact).
    half_ulp = 0.5 * torch.finfo(out.dtype).eps * float(hi.abs().max()) if hi.numel() else 0.0
    rounding = max(half_ulp, float((hi.to(out.dtype).to(hi.dtype) - hi).abs().max()) if hi.numel() else 0.0)
    allowed = tolerance.multiple * low_err + tolerance.floor * rounding
    norm2 = float((hi.double() ** 2).sum())
    rel = math.sqrt(float(((torch.where(finite, got, hi) - hi).double() ** 2).sum()) / norm2) if norm2 else 0.0
    rel = math.inf if nonfinite else rel  # a NaN is infinitely far, never "0 relative error" beside an inf max
    bias = _slope(torch.where(finite, got, hi) - hi, hi, norm2)
    bias_low = _slope(low - hi, hi, norm2)
    # Below 16-bit precision the elementwise rule already sees a bias of this size, and float32
    # outputs carry accumulation errors larger than their rounding: the unit is at least 2^-16.
    unit_roundoff = max(0.5 * torch.finfo(out.dtype).eps, BIAS_UNIT_FLOOR)
    bias_allowed = (tolerance.bias_multiple * abs(bias_low)
                    + tolerance.bias_floor * unit_roundoff / math.sqrt(max(1, hi.numel())))
    request = None
    if worst and qo_indptr:
        request = max(i for i, start in enumerate(qo_indptr[:-1]) if start <= worst[0])
    lse_cmp = None
    if lse is not None:
        lse_cmp = compare_lse(lse, lse_high, lse_low, tolerance, lse_base)
    return Comparison(max_err, low_err, rounding, allowed, rel, nonfinite, unwritten, worst, request, out.numel(),
                      bias, bias_low, bias_allowed, lse_cmp)


def compare_lse(lse: "torch.Tensor", lse_high: "torch.Tensor", lse_low: "torch.Tensor", tolerance: Tolerance,
                base: str = "e") -> LseComparison:
    """A backend's LSE (in ``base``) against the natural-log references, elementwise like the output:
    max error <= multiple * the low-precision reference's + floor * float32 rounding."""
    import torch

    if base not in ("e", "2"):
        raise AttnInputError(f"LSE base {base!r}: 'e' or '2'")
    if tuple(lse.shape) != tuple(lse_high.shape):
        raise AssertionError(f"LSE shape {tuple(lse.shape)} differs from the reference's {tuple(lse_high.shape)}")
    hi = lse_high.to(lse.device, torch.float64)
    got = lse.to(torch.float64) * (math.log(2.0) if base == "2" else 1.0)
    low = lse_low.to(lse.device, torch.float64)
    both_minus_inf = torch.isneginf(hi) & torch.isneginf(got)
    finite_ref = torch.isfinite(hi)
    nonfinite = int((finite_ref & ~torch.isfinite(got)).sum() + (~finite_ref & ~both_minus_inf).sum())
    diff = torch.where(finite_ref & torch.isfinite(got), (got - hi).abs(), torch.zeros_like(hi))
    low_diff = torch.where(finite_ref & torch.isfinite(low), (low - hi).abs(), torch.zeros_like(hi))
    max_err = float(diff.max()) if diff.numel() else 0.0
    low_err = float(low_diff.max()) if low_diff.numel() else 0.0
    scale = float(hi[finite_ref].abs().max()) if bool(finite_ref.any()) else 0.0
    allowed = tolerance.multiple * low_err + tolerance.floor * torch.finfo(torch.float32).eps * max(1.0, scale)
    return LseComparison(max_err, low_err, allowed, nonfinite, base)
