"""Run a catalog case through a backend and check every step of every layer against the reference.

Inputs come from a CPU generator seeded by (seed, case name, step, layer), so every backend sees the
same numbers and a test rerun with the same seed sees them again. The reference reads each
request's K/V from a history kept here, never from the backend's cache, so a cache bug cannot
hide; for an FP8 cache the history holds what the cache must hold (the quantized values, from
:func:`~pytest_attn.check.reference.as_stored_in_cache`).

Around every forward the harness also checks the contract: the backend writes into the poisoned
``out`` it is given (and the ``lse`` buffer when asked), leaves q, k and v as they were, and reads
no cache slot nothing wrote (poisoned, with NaN where it declares it never loads masked slots).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from pytest_attn.core import calls
from pytest_attn.cases.case import BatchCase
from pytest_attn.core.contract import Backend, LayerSpec, Plan
from pytest_attn.core.errors import AttnCheckFailure, AttnInputError, UnsupportedCase, warn_deprecated
from pytest_attn.core.kv_cache import PagedKVCacheManager
from pytest_attn.core.layer import torch_dtype
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn.core.poison import poisoned_like
from pytest_attn.check.history import KVHistory
from pytest_attn.check.reference import Comparison, compare, reference_attention

if TYPE_CHECKING:
    import torch


def derive_seed(seed: int, *parts) -> int:
    """A stable per-case seed: the same for every backend, worker and run."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def make_tensor(shape, dtype, device, seed: int, scale: float = 1.0) -> "torch.Tensor":
    """Standard-normal values (times ``scale``) drawn on the CPU, so every device gets the same numbers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if scale != 1.0:
        t = t * scale
    return t.to(device=device, dtype=torch_dtype(dtype))


def make_qkv(num_tokens: int, layer: LayerSpec, device, seed: int, *, num_kv_tokens: Optional[int] = None,
             input_scale: float = 1.0, logit_shift: float = 0.0, strided: bool = False):
    """q [num_tokens, H, D], k [num_kv_tokens, Hkv, D], v [num_kv_tokens, Hkv, Dv].

    input_scale multiplies q and k (logits grow by its square). logit_shift < 0 sets the first
    component of every q to a whole number a and of every k to -a, and rounds the others to halves:
    every logit is then shifted by -a^2 * scale (about logit_shift) and, for a power-of-two scale,
    computed exactly in float32 in any order, so the case tests what a kernel does with logits that
    low (a finite -inf sentinel above them) and not how float32 rounds products of 700.
    strided: q, k and v are views of one fused [tokens, (H + 2 Hkv) x D] projection, as engines
    produce them (non-contiguous; needs num_kv_tokens == num_tokens).
    A latent_kv (absorbed MLA) layer gets v = k[..., :head_dim_vo]: V is the latent c_kv part of K."""
    import torch

    num_kv_tokens = num_tokens if num_kv_tokens is None else num_kv_tokens
    for name, n in (("num_tokens", num_tokens), ("num_kv_tokens", num_kv_tokens)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise AttnInputError(f"{name} must be an int >= 0, got {n!r}")
    h, hkv, d, dv = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.head_dim_v
    if strided:
        if num_kv_tokens != num_tokens:
            raise AttnInputError("strided (fused QKV) inputs need as many keys as queries")
        fused = make_tensor((num_tokens, h * d + hkv * d + hkv * dv), "float32", "cpu", seed)
        q = fused[:, : h * d].unflatten(1, (h, d))
        k = fused[:, h * d: (h + hkv) * d].unflatten(1, (hkv, d))
        v = fused[:, (h + hkv) * d:].unflatten(1, (hkv, dv))
    else:
        q = make_tensor((num_tokens, h, d), "float32", "cpu", seed)
        k = make_tensor((num_kv_tokens, hkv, d), "float32", "cpu", seed + 1)
        v = make_tensor((num_kv_tokens, hkv, dv), "float32", "cpu", seed + 2)
    if input_scale != 1.0:
        q, k = q * input_scale, k * input_scale
    if logit_shift:
        a = float(round(math.sqrt(-logit_shift / layer.scale)))
        q, k = torch.round(q * 2) / 2, torch.round(k * 2) / 2
        q[..., 0] = a
        k[..., 0] = -a
    if layer.latent_kv:  # one latent cache: V is K's c_kv part, not numbers of its own
        v = k[..., :dv].clone()
    if strided:  # rebuild the fused buffer on the device and view into it
        fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1).to(device=device,
                                                                             dtype=torch_dtype(layer.dtype))
        return (fused[:, : h * d].unflatten(1, (h, d)), fused[:, h * d: (h + hkv) * d].unflatten(1, (hkv, d)),
                fused[:, (h + hkv) * d:].unflatten(1, (hkv, dv)))
    dtype = torch_dtype(layer.dtype)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


# -- one forward -----------------------------------------------------------------------------------
@dataclass
class Forward:
    """What one forward produced: the plan it ran, the output and (with return_lse) the LSE."""

    plan: Plan
    out: "torch.Tensor"
    lse: Optional["torch.Tensor"] = None

    def __iter__(self):  # (plan, out) = run_forward(...)
        return iter((self.plan, self.out))


def contiguity_reasons(backend: Backend, q, k, v) -> list[str]:
    if not backend.requires_contiguous:
        return []
    strided = [name for name, t in (("q", q), ("k", k), ("v", v)) if not t.is_contiguous()]
    if not strided:
        return []
    return [f"needs contiguous inputs (requires_contiguous = True) and {', '.join(strided)} are strided views "
            "(of one fused QKV projection, as engines produce them)"]


def run_forward(backend: Backend, q, k, v, metadata: AttentionMetadata, layer: LayerSpec, device,
                plan: Optional[Plan] = None) -> Forward:
    """Plan (unless given) and run one step into poisoned buffers, checking the contract: reasons
    before any launch, the output written where asked, the inputs left unchanged."""
    __tracebackhide__ = True  # failures show the backend's frames and the verdict, not the harness
    import torch

    reasons = calls.unsupported(backend, layer, metadata, str(device)) + contiguity_reasons(backend, q, k, v)
    if reasons:
        raise UnsupportedCase(backend.name, reasons)
    metadata.check_inputs(q, k, v, layer, require_contiguous=backend.requires_contiguous)
    if plan is None:
        plan = calls.plan(backend, metadata, layer, str(device))
    out = poisoned_like((q.shape[0], layer.num_heads, layer.head_dim_v), q.dtype, q.device)
    lse = (torch.full((q.shape[0], layer.num_heads), math.nan, dtype=torch.float32, device=q.device)
           if layer.return_lse else None)
    before = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    calls.forward(backend, q, k, v, metadata, plan, out, lse)
    calls.check_inputs_unchanged(backend, before, {"q": q, "k": k, "v": v})
    mismatches = calls.readback(backend, plan)
    if mismatches:
        raise AttnCheckFailure(f"backend {backend.name!r}: its plan and the live kernel disagree on "
                               f"{metadata.describe()}, layer {layer.describe()}:\n- "
                               + "\n- ".join(mismatches),
                               summary=f"plan and live kernel disagree: {mismatches[0]}")
    return Forward(plan, out, lse)


# -- the reference side ------------------------------------------------------------------------------
def compare_with_reference(backend: Backend, result: Forward, q, keys, values, metadata: AttentionMetadata,
                           layer: LayerSpec) -> Comparison:
    """``result`` (what :func:`run_forward` returned) against the reference in high precision, by
    the backend's tolerance (which the same math in the input precision sets); keys/values are each
    request's whole history as attention must use it. An output tensor in place of ``result`` (the
    form before 0.2) still works for one release, with a deprecation warning; its LSE is not
    compared."""
    __tracebackhide__ = True
    if not isinstance(result, Forward):
        warn_deprecated("compare_with_reference(backend, out, ...) with an output tensor",
                        "compare_with_reference(backend, forward, ...) with the Forward that run_forward returned")
        result = Forward(Plan(backend.name, "unknown", "unknown", "NHD", "tokens", metadata.has_cache, layer=layer),
                         result)
    refs = references(q, keys, values, metadata, layer)
    return compare_to(backend, result, refs, metadata, layer)


@dataclass
class References:
    high: "torch.Tensor"
    low: "torch.Tensor"
    lse_high: Optional["torch.Tensor"] = None
    lse_low: Optional["torch.Tensor"] = None


def references(q, keys, values, metadata: AttentionMetadata, layer: LayerSpec) -> References:
    __tracebackhide__ = True
    want = layer.return_lse
    high = reference_attention(q, keys, values, metadata.seq_lens, layer, precision="high", return_lse=want)
    low = reference_attention(q, keys, values, metadata.seq_lens, layer, precision="low", return_lse=want)
    if want:
        return References(high[0], low[0], high[1], low[1])
    return References(high, low)


def compare_to(backend: Backend, result: Forward, refs: References, metadata: AttentionMetadata,
               layer: LayerSpec) -> Comparison:
    __tracebackhide__ = True
    tolerance = calls.tolerance(backend, layer.dtype)
    lse_base = backend.capabilities.lse_base or "e"
    return compare(result.out, refs.high, refs.low, tolerance, metadata.qo_indptr, lse=result.lse,
                   lse_high=refs.lse_high, lse_low=refs.lse_low, lse_base=lse_base)


# -- a whole case --------------------------------------------------------------------------------------
@dataclass
class SoloCheck:
    """A request of a batch run again alone: its output must not move by more than the rule allows."""

    request: int
    max_diff: float
    allowed: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_diff) and self.max_diff <= self.allowed

    def message(self) -> str:
        return (f"request #{self.request} run alone differs from its rows of the batch by {self.max_diff:.3e} "
                f"(allowed {self.allowed:.3e}): the result depends on the rest of the batch")


@dataclass
class StepResult:
    index: int
    metadata: AttentionMetadata
    plan: Plan
    comparison: Comparison
    out: "torch.Tensor"
    layer_idx: int = 0
    solo: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.comparison.passed and all(s.passed for s in self.solo)


def first_step(case: BatchCase, device="cpu", layer_idx: int = 0) -> tuple[AttentionMetadata, LayerSpec]:
    """The metadata and layer of a case's first step, for plan checks (allocates no data)."""
    return next(step_metadata(case)), case.layer(layer_idx)


def step_metadata(case: BatchCase):
    """The metadata of every step of a case, in order, on a cache with no storage (for plan checks:
    the pages are allocated, shared and freed as run_case does, and nothing is computed)."""
    manager = _cache_for(case, "meta", None, seed=None) if case.cache else None
    for _, _, metadata in case_step_metadata(case, manager):
        yield metadata


def case_step_metadata(case: BatchCase, manager, on_share=None):
    """(index, step, metadata) for every step of a case: without a cache (``manager`` None) ragged or
    cross-attention metadata; with one, the step's shared prefixes shared first (``on_share(new,
    source, tokens)`` told of each), and the step's finished requests freed once the caller is
    done with the step."""
    for index, step in enumerate(case.steps()):
        if manager is None:
            yield index, step, _no_cache_metadata(case, step)
            continue
        for new, source, tokens in step.shared:
            manager.share_prefix(source, new, tokens)
            if on_share is not None:
                on_share(new, source, tokens)
        yield index, step, manager.prepare(step.seq_lens, step.request_ids, step.num_contexts)
        for rid in step.finished:
            manager.free(rid)


def _no_cache_metadata(case: BatchCase, step) -> AttentionMetadata:
    if case.kv_seq_lens:
        return AttentionMetadata.cross(step.seq_lens, case.kv_seq_lens, step.request_ids)
    return AttentionMetadata.ragged(step.seq_lens, step.request_ids)


def _cache_for(case: BatchCase, device, backend: Optional[Backend], seed: Optional[int]) -> PagedKVCacheManager:
    layer = case.layer(0)
    nan = bool(backend is not None and backend.capabilities.never_reads_masked_slots)
    return PagedKVCacheManager(num_layers=case.num_layers, num_kv_heads=case.layer_spec.num_kv_heads, head_dim=case.layer_spec.head_dim,
                               head_dim_v=layer.head_dim_v, page_size=case.page_size, num_pages=case.pages_needed(),
                               dtype=layer.cache_dtype, device=device, layout=case.kv_layout, nan_poison=nan,
                               scramble_seed=0 if seed is None else derive_seed(seed, case.name, "pages"))


def run_case(backend: Backend, case: BatchCase, *, device="cpu", seed: int = 0) -> list[StepResult]:
    """Every step and layer of a case through the backend, each compared with the reference."""
    __tracebackhide__ = True  # failures show the backend's frames and the verdict, not the harness
    manager = _cache_for(case, device, backend, seed) if case.cache else None
    history = KVHistory()  # (layer, request) -> its K and V as the cache stores them
    results = []

    def share(new, source, tokens):
        for layer_idx in range(case.num_layers):
            history.share_prefix((layer_idx, new), (layer_idx, source), tokens)

    for index, step, metadata in case_step_metadata(case, manager, on_share=share):
        for layer_idx in range(case.num_layers):
            try:
                results.append(_run_layer(backend, case, metadata, layer_idx, index, history, device, seed))
            except calls.BackendError as exc:  # raised on this step: say which
                name_the_step(exc, case, metadata, index, layer_idx)
                raise
        for rid in step.finished:  # the cache frees them when the loop moves on
            for layer_idx in range(case.num_layers):
                history.drop((layer_idx, rid))
    return results


def _run_layer(backend, case: BatchCase, metadata: AttentionMetadata, layer_idx: int, index: int, history, device,
               seed: int) -> StepResult:
    __tracebackhide__ = True
    layer = case.layer(layer_idx)
    parts = (seed, case.name, index) if layer_idx == 0 else (seed, case.name, index, "layer", layer_idx)
    q, k, v = make_qkv(metadata.num_tokens, layer, device, derive_seed(*parts), num_kv_tokens=metadata.num_kv_tokens,
                       input_scale=case.input_scale, logit_shift=case.logit_shift, strided=case.strided)
    kv_lens = metadata.seq_lens if metadata.has_cache else metadata.kv_seq_lens
    history.add_rows([(layer_idx, rid) for rid in metadata.request_ids], kv_lens, k, v, layer)
    result = run_forward(backend, q, k, v, metadata, layer, device)
    keys, values = history.keys_values((layer_idx, rid) for rid in metadata.request_ids)
    refs = references(q, keys, values, metadata, layer)
    comparison = compare_to(backend, result, refs, metadata, layer)
    solo = solo_checks(backend, q, k, v, metadata, layer, device, result, refs) if case.check_solo else []
    return StepResult(index, metadata, result.plan, comparison, result.out, layer_idx, solo)


def solo_checks(backend: Backend, q, k, v, metadata: AttentionMetadata, layer: LayerSpec, device, batched: Forward,
                refs: References) -> list[SoloCheck]:
    """Each request of a no-cache batch run alone: how far its output moves from its rows of the
    batch, against what the rule allows that request (bugs where batch >= 2 changes the answer)."""
    __tracebackhide__ = True
    if metadata.has_cache:
        raise AttnInputError("solo checks run on batches without a cache")
    tolerance = calls.tolerance(backend, layer.dtype)
    checks = []
    q_off, kv_off = metadata.qo_indptr, metadata.kv_rows_indptr
    for i in range(metadata.num_requests):
        if not metadata.seq_lens[i]:
            continue
        qs, ks, vs = (t.contiguous() for t in (q[q_off[i]:q_off[i + 1]], k[kv_off[i]:kv_off[i + 1]],
                                               v[kv_off[i]:kv_off[i + 1]]))
        alone = (AttentionMetadata.cross([metadata.seq_lens[i]], [metadata.kv_lens[i]]) if metadata.is_cross
                 else AttentionMetadata.ragged([metadata.seq_lens[i]]))
        out = run_forward(backend, qs, ks, vs, alone, layer, device).out
        rows = slice(q_off[i], q_off[i + 1])
        hi, lo = refs.high[rows], refs.low[rows]
        low_err = float((lo.to(hi.dtype) - hi).abs().max())
        rounding = float((hi.to(out.dtype).to(hi.dtype) - hi).abs().max())
        rounding = max(rounding, 0.5 * _eps(out) * float(hi.abs().max()))
        allowed = tolerance.multiple * low_err + tolerance.floor * rounding
        diff = (out.float() - batched.out[rows].float()).abs()
        checks.append(SoloCheck(i, float(diff.max()) if bool(diff.isfinite().all()) else math.inf, allowed))
    return checks


def _eps(t) -> float:
    import torch

    return torch.finfo(t.dtype).eps


MAX_STEPS_SHOWN = 3  # failing steps a report details; the rest are counted


def layer_and_cache(layer: LayerSpec, metadata: AttentionMetadata) -> str:
    """What a failure names beside the case: the layer (mask, window, soft-cap, sinks, scale, heads,
    dtypes) and, with a cache, its layout and page size."""
    if metadata.has_cache:
        return f"{layer.describe()}, paged {metadata.kv_cache_manager.layout} cache, page {metadata.page_size}"
    return layer.describe() + (", cross-attention" if metadata.is_cross else "")


def step_label(case: BatchCase, index: int, layer_idx: int) -> str:
    return f"step {index}" + (f", layer {layer_idx}" if case.num_layers > 1 else "")


def verdict_prefix(case: BatchCase, layer: LayerSpec, metadata: AttentionMetadata, index: int, layer_idx: int) -> str:
    """'case (layer, cache): step N: ', the start of every one-line verdict on a step."""
    return f"{case.name} ({layer_and_cache(layer, metadata)}): {step_label(case, index, layer_idx)}: "


def name_the_step(exc: Exception, case: BatchCase, metadata: AttentionMetadata, index: int, layer_idx: int) -> None:
    """End a backend's error raised while running a step with the case, layer and step (the same
    exception, so its chain to the backend's own exception stays; its first words stay its own)."""
    layer = layer_and_cache(case.layer(layer_idx), metadata)
    message = str(exc).rstrip(".")
    exc.args = (f"{message}. Case {case.name} ({layer}), {step_label(case, index, layer_idx)}.",)


def assert_case_passes(results: list[StepResult], backend: Backend, case: BatchCase) -> None:
    """Raise AttnCheckFailure unless every step passed. Its first line is the one-line verdict (the
    case, the step, the layer, what failed); the next lines detail the first failing steps."""
    __tracebackhide__ = True  # a failure report shows the user's test and this verdict, not the harness
    failures = [r for r in results if not r.passed]
    if not failures:
        return
    where = "step" if case.num_layers == 1 else "step/layer"
    details, summary, first_layer = [], None, None
    for r in failures:
        found = ([r.comparison.summary()] if not r.comparison.passed else []) + \
            [solo.message() for solo in r.solo if not solo.passed]
        layer = case.layer(r.layer_idx)
        summary = summary or verdict_prefix(case, layer, r.metadata, r.index, r.layer_idx) + found[0]
        first_layer = first_layer or layer
        if len(details) < MAX_STEPS_SHOWN:
            lines = [f"- {step_label(case, r.index, r.layer_idx)}: {r.metadata.describe()}"]
            if layer != first_layer:  # the verdict's first line names the first failing step's layer
                lines.append(f"  layer: {layer.describe()}")
            lines.append(f"  plan: {r.plan.describe()}")
            if not r.comparison.passed:
                lines.append("  " + r.comparison.message().replace("\n", "\n  "))
            lines += ["  " + solo.message() for solo in r.solo if not solo.passed]
            details.append("\n".join(lines))
    hidden = len(failures) - len(details)
    more = [f"... and {hidden} more failing {where}(s)"] if hidden > 0 else []
    raise AttnCheckFailure("\n".join([summary, f"backend {backend.name!r} is wrong on case {case.name!r} in "
                                              f"{len(failures)} of {len(results)} {where}(s):", *details, *more]),
                           summary=summary)
