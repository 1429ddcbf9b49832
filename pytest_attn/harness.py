"""Run a catalog case through a backend and check every step against the reference.

Inputs come from a CPU generator seeded by (seed, case name, step), so every backend sees the same
numbers and a test rerun with the same seed sees them again. The reference reads each request's
K/V from a history kept here, never from the backend's cache, so a cache bug cannot hide.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .cases import BatchCase
from .contract import Backend, LayerSpec, Plan, torch_dtype
from .errors import AttnInputError, UnsupportedCase
from .kv_cache import PagedKVCacheManager
from .metadata import AttentionMetadata
from .reference import Comparison, compare, poisoned_like, reference_attention

if TYPE_CHECKING:
    import torch


def derive_seed(seed: int, *parts) -> int:
    """A stable per-case seed: the same for every backend, worker and run."""
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


def make_tensor(shape, dtype, device, seed: int) -> "torch.Tensor":
    """Standard-normal values drawn on the CPU (so every device gets the same numbers)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=torch_dtype(dtype))


def make_qkv(num_tokens: int, layer: LayerSpec, device, seed: int):
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise AttnInputError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    q = make_tensor((num_tokens, layer.num_heads, layer.head_dim), layer.dtype, device, seed)
    k = make_tensor((num_tokens, layer.num_kv_heads, layer.head_dim), layer.dtype, device, seed + 1)
    v = make_tensor((num_tokens, layer.num_kv_heads, layer.head_dim), layer.dtype, device, seed + 2)
    return q, k, v


def split_tokens(t: "torch.Tensor", lens) -> list["torch.Tensor"]:
    if sum(lens) != t.shape[0]:
        raise AttnInputError(f"lengths add up to {sum(lens)} but the tensor has {t.shape[0]} rows")
    out, start = [], 0
    for n in lens:
        out.append(t[start:start + n])
        start += n
    return out


@dataclass
class StepResult:
    index: int
    metadata: AttentionMetadata
    plan: Plan
    comparison: Comparison
    out: "torch.Tensor"


def run_forward(backend: Backend, q, k, v, metadata: AttentionMetadata, layer: LayerSpec, device,
                plan: Optional[Plan] = None) -> tuple[Plan, "torch.Tensor"]:
    """Plan (unless given) and run one step into a poisoned output buffer; checks the contract."""
    reasons = backend.unsupported(layer, metadata, str(device))
    if reasons:
        raise UnsupportedCase(backend.name, reasons)
    metadata.check_inputs(q, k, v, layer, require_contiguous=backend.requires_contiguous)
    if plan is None:
        plan = backend.plan(metadata, layer, device=str(device))
    out = poisoned_like(q.shape, q.dtype, q.device)
    result = backend.forward(q, k, v, metadata, plan, out=out)
    if result is not out and (result is None or result.data_ptr() != out.data_ptr()):
        raise AssertionError(f"backend {backend.name!r} did not write into the `out` buffer it was given "
                             "(the contract: write into out and return it)")
    return plan, out


def first_step(case: BatchCase, device="cpu") -> tuple[AttentionMetadata, LayerSpec]:
    """The metadata and layer of a case's first step, for plan checks (allocates no data)."""
    step = next(case.steps())
    if not case.cache:
        return AttentionMetadata.ragged(step.seq_lens, step.request_ids), case.layer()
    manager = PagedKVCacheManager(num_kv_heads=case.num_kv_heads, head_dim=case.head_dim, page_size=case.page_size,
                                  num_pages=case.pages_needed(), dtype=case.dtype, device="meta",
                                  layout=case.kv_layout)
    return manager.prepare(step.seq_lens, step.request_ids, step.num_contexts), case.layer()


def run_case(backend: Backend, case: BatchCase, *, device="cpu", seed: int = 0) -> list[StepResult]:
    """Every step of a case through the backend, each compared with the reference."""
    layer = case.layer()
    manager = None
    if case.cache:
        manager = PagedKVCacheManager(num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
                                      page_size=case.page_size, num_pages=case.pages_needed(),
                                      dtype=case.dtype, device=device, layout=case.kv_layout,
                                      scramble_seed=derive_seed(seed, case.name, "pages"))
    history: dict[int, tuple[list, list]] = {}
    results = []
    for index, step in enumerate(case.steps()):
        if manager is None:
            metadata = AttentionMetadata.ragged(step.seq_lens, step.request_ids)
        else:
            metadata = manager.prepare(step.seq_lens, step.request_ids, step.num_contexts)
        q, k, v = make_qkv(metadata.num_tokens, layer, device, derive_seed(seed, case.name, index))
        for rid, kk, vv in zip(metadata.request_ids, split_tokens(k, metadata.seq_lens), split_tokens(v, metadata.seq_lens)):
            ks, vs = history.setdefault(rid, ([], []))
            ks.append(kk)
            vs.append(vv)
        plan, out = run_forward(backend, q, k, v, metadata, layer, device)
        results.append(StepResult(index, metadata, plan, check_output(backend, out, q, history, metadata, layer), out))
        for rid in step.finished:
            history.pop(rid, None)
            if manager is not None:
                manager.free(rid)
    return results


def check_output(backend: Backend, out, q, history, metadata: AttentionMetadata, layer: LayerSpec) -> Comparison:
    import torch

    keys = [torch.cat(history[rid][0]) for rid in metadata.request_ids]
    values = [torch.cat(history[rid][1]) for rid in metadata.request_ids]
    return compare_with_reference(backend, out, q, keys, values, metadata, layer)


def compare_with_reference(backend: Backend, out, q, keys, values, metadata: AttentionMetadata,
                           layer: LayerSpec) -> Comparison:
    """``out`` against the reference in high precision, by the backend's tolerance (which the
    same math in the input precision sets)."""
    high = reference_attention(q, keys, values, metadata.seq_lens, layer, precision="high")
    low = reference_attention(q, keys, values, metadata.seq_lens, layer, precision="low")
    return compare(out, high, low, backend.tolerance(layer.dtype), metadata.qo_indptr)


def assert_case_passes(results: list[StepResult], backend: Backend, case: BatchCase) -> None:
    failures = [r for r in results if not r.comparison.passed]
    if failures:
        lines = [f"backend {backend.name!r} is wrong on case {case.name!r} in {len(failures)} of {len(results)} step(s):"]
        for r in failures:
            lines.append(f"- step {r.index}: {r.metadata.describe()}\n  plan: {r.plan.describe()}\n  "
                         + r.comparison.message().replace("\n", "\n  "))
        raise AssertionError("\n".join(lines))
