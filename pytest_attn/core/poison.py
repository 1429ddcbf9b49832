"""What memory holds before anything legitimate is written to it.

Output buffers are filled with :data:`POISON` before a backend runs: attention outputs are convex
combinations of V rows, so with V ~ N(0, 1) no real output comes near it, and it is exact in
float16, bfloat16 and float32; an element still holding it was never written.

The paged cache starts (and freed pages return to) K = 0, V = POISON: attending to a slot nothing
wrote gives it a fair share of the softmax and pulls the output towards -49152, far outside any
tolerance. That poison is finite on purpose: kernels may legitimately load whole pages and mask
the slots past a request's length, and a NaN there turns the masked 0 weight into 0 * NaN = NaN
(seen with FlashInfer's cuDNN paged prefill on an H100). A backend that declares its kernels
never load masked slots gets NaN instead (``Capabilities.never_reads_masked_slots``), which also
catches a kernel that loads a masked slot and multiplies it by zero (flashinfer #941,
flash-attention #1745).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

POISON = -49152.0
K_POISON, V_POISON = 0.0, POISON  # what unwritten and freed cache slots hold (finite poison)
NAN = float("nan")


def poisoned_like(shape, dtype, device) -> "torch.Tensor":
    import torch

    return torch.full(shape, POISON, dtype=dtype, device=device)
