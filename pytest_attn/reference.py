"""High-precision reference attention and the tolerance rule.

The reference is computed per sequence in float32, as FlashAttention's own tests do: for bf16 and
fp16 inputs its error (~1e-7) is four orders of magnitude below theirs. float32 inputs get float64
on CPU (float32 on a GPU, where float64 is slow). It runs in query chunks, so an 8192-token
sequence never materialises a whole score matrix. The
same math done in the input precision gives the error this precision costs anyway; a backend
passes when its error stays within a small multiple of that, plus a rounding floor
(FlashAttention's rule; see :class:`~pytest_attn.contract.Tolerance`). NaN and Inf never pass,
and an element still holding :data:`POISON` was never written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from .contract import LayerSpec, Tolerance
from .errors import AttnInputError

if TYPE_CHECKING:
    import torch

#: Output buffers are filled with this before a backend runs. Attention outputs are convex
#: combinations of V rows, so with V ~ N(0, 1) no real output comes near it; it is exact in
#: float16, bfloat16 and float32.
POISON = -49152.0
# Score elements per chunk. On CPU, 16 MiB of float64: under glibc's largest mmap threshold
# (32 MiB), so each chunk reuses the memory the last one freed instead of faulting in fresh pages
# (with 256 MiB chunks, page faults were half the reference's time). On a GPU, large chunks keep
# the number of launches down.
_CHUNK_ELEMENTS = 1 << 21
_GPU_CHUNK_ELEMENTS = 1 << 25


def poisoned_like(shape, dtype, device) -> "torch.Tensor":
    import torch

    return torch.full(shape, POISON, dtype=dtype, device=device)


def _attend_one(q, k, v, layer: LayerSpec, compute_dtype, softmax_dtype) -> "torch.Tensor":
    """q [Lq, H, D], k/v [Lk, Hkv, D] of one sequence -> [Lq, H, D] in compute_dtype."""
    import torch

    lq, lk = q.shape[0], k.shape[0]
    out = torch.empty((lq, layer.num_heads, layer.head_dim), dtype=compute_dtype, device=q.device)
    if lq == 0:
        return out
    if lk == 0:
        raise AttnInputError("a query with no keys to attend over has no defined output")
    qh = q.to(compute_dtype).transpose(0, 1)  # [H, Lq, D]
    kh = k.to(compute_dtype).repeat_interleave(layer.group_size, dim=1).transpose(0, 1)  # [H, Lk, D]
    vh = v.to(compute_dtype).repeat_interleave(layer.group_size, dim=1).transpose(0, 1)
    chunk = _CHUNK_ELEMENTS if q.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    rows = max(1, chunk // max(1, layer.num_heads * lk))
    offset = lk - lq  # bottom-right alignment: query i sits at key position offset + i
    for start in range(0, lq, rows):
        stop = min(lq, start + rows)
        scores = torch.matmul(qh[:, start:stop], kh.transpose(1, 2)) * layer.scale  # [H, r, Lk]
        if layer.causal or layer.window_left >= 0:
            qpos = torch.arange(start, stop, device=q.device)[:, None] + offset
            kpos = torch.arange(lk, device=q.device)[None, :]
            allowed = torch.ones_like(qpos - kpos, dtype=torch.bool)
            if layer.causal:
                allowed &= kpos <= qpos
            if layer.window_left >= 0:
                allowed &= kpos >= qpos - layer.window_left
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.to(softmax_dtype), dim=-1).to(compute_dtype)
        out[start:stop] = torch.matmul(probs, vh).transpose(0, 1)
    return out


def reference_attention(q: "torch.Tensor", keys: Sequence["torch.Tensor"], values: Sequence["torch.Tensor"],
                        q_lens: Sequence[int], layer: LayerSpec, *, precision: str = "high") -> "torch.Tensor":
    """Attention of each request's queries over its keys.

    q: [sum(q_lens), H, D]; keys[i], values[i]: [kv_len_i, Hkv, D] (the whole history of
    request i, cached tokens first). precision "high": float32, or float64 for float32 inputs on
    CPU; "low": the input dtype throughout, the way an unfused low-precision implementation does it.
    """
    import torch

    from .metadata import _as_lengths

    q_lens = _as_lengths(q_lens, "q_lens")
    if len(keys) != len(q_lens) or len(values) != len(q_lens):
        raise AttnInputError(f"{len(keys)} key and {len(values)} value tensors for {len(q_lens)} requests")
    if sum(q_lens) != q.shape[0]:
        raise AttnInputError(f"q has {q.shape[0]} rows but q_lens add up to {sum(q_lens)}")
    if precision == "high":
        wide_input = q.dtype in (torch.float32, torch.float64)
        compute = torch.float64 if wide_input and q.device.type == "cpu" else torch.float32
        softmax_dtype = compute
    elif precision == "low":
        compute = softmax_dtype = q.dtype
    else:
        raise AttnInputError(f"precision must be 'high' or 'low', got {precision!r}")
    if q.dim() != 3 or q.shape[1:] != (layer.num_heads, layer.head_dim):
        raise AttnInputError(f"q is {tuple(q.shape)}, expected [*, {layer.num_heads}, {layer.head_dim}]")
    outs, start = [], 0
    for n, k, v in zip(q_lens, keys, values):
        if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != (layer.num_kv_heads, layer.head_dim):
            raise AttnInputError(f"a request's k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                                 f"[kv_len, {layer.num_kv_heads}, {layer.head_dim}]")
        if k.shape[0] < n:
            raise AttnInputError(f"a request has {n} queries but only {k.shape[0]} keys")
        outs.append(_attend_one(q[start:start + n], k, v, layer, compute, softmax_dtype))
        start += n
    return torch.cat(outs) if outs else q.new_empty((0, layer.num_heads, layer.head_dim), dtype=compute)


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

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and self.unwritten == 0 and self.max_abs_err <= self.allowed

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
        return "\n".join(lines)


def _unravel(flat: int, shape: tuple) -> tuple:
    """The index of element ``flat`` of a C-contiguous tensor of ``shape``. (torch.unravel_index
    imports torch.fx's symbolic shapes and sympy on its first call: 0.3 s or more per process.)"""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def compare(out: "torch.Tensor", ref_high: "torch.Tensor", ref_low: "torch.Tensor", tolerance: Tolerance,
            qo_indptr: Sequence[int] = ()) -> Comparison:
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
    low_err = float((ref_low.to(hi.device, hi.dtype) - hi).abs().max()) if hi.numel() else 0.0
    # Rounding the exact answer to the output dtype: measured, and never below half an ulp at the
    # output's largest magnitude (the measured value is 0 when the answer happens to be exact).
    half_ulp = 0.5 * torch.finfo(out.dtype).eps * float(hi.abs().max()) if hi.numel() else 0.0
    rounding = max(half_ulp, float((hi.to(out.dtype).to(hi.dtype) - hi).abs().max()) if hi.numel() else 0.0)
    allowed = tolerance.multiple * low_err + tolerance.floor * rounding
    denom = float(hi.norm())
    rel = float((torch.where(finite, got, hi) - hi).norm()) / denom if denom else 0.0
    request = None
    if worst and qo_indptr:
        request = max(i for i, start in enumerate(qo_indptr[:-1]) if start <= worst[0])
    return Comparison(max_err, low_err, rounding, allowed, rel, nonfinite, unwritten, worst, request, out.numel())
