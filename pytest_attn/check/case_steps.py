"""A case's steps through a backend without the reference: the same inputs, cache and plans as
:func:`pytest_attn.check.harness.run_case`, for checks that look at what ran (traces) or compare a
backend with itself (determinism) and need no high-precision answer."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from pytest_attn.cases.case import BatchCase
from pytest_attn.check.harness import _cache_for, case_step_metadata, contiguity_reasons, derive_seed, make_qkv
from pytest_attn.core import calls as guard
from pytest_attn.core.contract import Backend, Plan
from pytest_attn.core.errors import UnsupportedCase
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn.core.poison import poisoned_like

if TYPE_CHECKING:
    import torch


@dataclass
class StepOutput:
    """One forward of a case's step: where it was, its plan, its output and (with return_lse) LSE."""

    index: int
    layer_idx: int
    metadata: AttentionMetadata
    plan: Plan
    out: "torch.Tensor"
    lse: Optional["torch.Tensor"] = None


def forward_once(backend: Backend, q, k, v, metadata: AttentionMetadata, layer, device,
                 around: Optional[Callable] = None, index: int = 0) -> tuple[Plan, "torch.Tensor", Optional["torch.Tensor"]]:
    """Plan and run one forward into poisoned buffers; ``around(index, plan, call)`` runs ``call``
    (the forward alone: to trace it). UnsupportedCase before any launch, as the harness does."""
    __tracebackhide__ = True
    import torch

    reasons = guard.unsupported(backend, layer, metadata, str(device)) + contiguity_reasons(backend, q, k, v)
    if reasons:
        raise UnsupportedCase(backend.name, reasons)
    plan = guard.plan(backend, metadata, layer, str(device))
    out = poisoned_like((q.shape[0], layer.num_heads, layer.head_dim_v), q.dtype, q.device)
    lse = (torch.full((q.shape[0], layer.num_heads), math.nan, dtype=torch.float32, device=q.device)
           if layer.return_lse else None)

    def call():
        return guard.forward(backend, q, k, v, metadata, plan, out, lse)

    if around is None:
        call()
    else:
        around(index, plan, call)
    return plan, out, lse


def forward_steps(backend: Backend, case: BatchCase, *, device="cpu", seed: int = 0,
                  around: Optional[Callable] = None) -> Iterator[StepOutput]:
    """Every step and layer of ``case`` through ``backend``, with the harness's inputs; nothing is
    compared. ``around(index, plan, call)`` wraps each forward (see :func:`forward_once`)."""
    __tracebackhide__ = True
    manager = _cache_for(case, device, backend, seed) if case.cache else None
    for index, step, metadata in case_step_metadata(case, manager):
        for layer_idx in range(case.num_layers):
            layer = case.layer(layer_idx)
            parts = (seed, case.name, index) if layer_idx == 0 else (seed, case.name, index, "layer", layer_idx)
            q, k, v = make_qkv(metadata.num_tokens, layer, device, derive_seed(*parts),
                               num_kv_tokens=metadata.num_kv_tokens, input_scale=case.input_scale,
                               logit_shift=case.logit_shift, strided=case.strided)
            plan, out, lse = forward_once(backend, q, k, v, metadata, layer, device, around, index)
            yield StepOutput(index, layer_idx, metadata, plan, out, lse)
