"""PyTorch backend: ``scaled_dot_product_attention`` per sequence, or ``torch.nn.attention.varlen``
(one launch for the whole ragged batch) where it exists, on CUDA, for half-precision batches
without a cache. Reads the project's paged cache by gathering each request's pages.

The plan names the SDPA kernel, and forward runs under ``sdpa_kernel([that one])``, so what the
plan says is what runs: if torch cannot use that kernel it raises rather than falling back.
"""
from __future__ import annotations

from typing import Optional

from pytest_attn import torch_build
from pytest_attn.contract import Availability, Backend, Capabilities, LayerSpec, Plan
from pytest_attn.metadata import AttentionMetadata

SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
_HALF = ("float16", "bfloat16")


def needs_explicit_mask(metadata: AttentionMetadata, layer: LayerSpec) -> bool:
    """SDPA's is_causal aligns the mask top-left; when a request has more keys than queries the
    causal mask must be bottom-right (queries are the last tokens), so it is passed explicitly."""
    if layer.window_left >= 0:
        return True
    return layer.causal and any(q != kv for q, kv in zip(metadata.seq_lens, metadata.kv_lens))


def choose_sdpa_kernel(device_type: str, dtype: str, head_dim: int, explicit_mask: bool, gqa: bool) -> str:
    """Which SDPA implementation to ask for. Pure so that CPU tests cover the CUDA rules too."""
    if device_type == "cpu":
        return "flash"  # the CPU flash kernel takes every dtype, masks and GQA
    if dtype in _HALF and head_dim <= 256 and head_dim % 8 == 0 and not explicit_mask:
        return "flash"
    if head_dim % 8 == 0 and not gqa:
        return "efficient"  # takes float32 and explicit masks
    return "math"


def varlen_parameters() -> frozenset:
    """Keyword parameters of torch.nn.attention.varlen.varlen_attn (empty where it does not exist).
    They changed between releases: 2.10 takes is_causal, later ones window_size and enable_gqa."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_can_run(params: frozenset, layer: LayerSpec) -> bool:
    if not params or "scale" not in params:
        return False
    if layer.group_size > 1 and "enable_gqa" not in params:
        return False
    return "window_size" in params or "is_causal" in params


class TorchSDPABackend(Backend):
    description = "PyTorch scaled_dot_product_attention (per sequence) / torch.nn.attention.varlen"
    capabilities = Capabilities(sliding_window=True)
    requires_contiguous = False  # SDPA takes strided inputs

    def __init__(self, name: str = "torch", kernel: Optional[str] = None, use_varlen: bool = True):
        self.name = name
        self._forced_kernel = kernel
        self._use_varlen = use_varlen

    def available(self) -> Availability:
        # Not imported here: a process that only reports (an xdist controller) need not pay for it.
        if not torch_build.is_installed():
            return Availability(False, "torch is not installed: pip install torch")
        return Availability(True)

    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        if str(device).startswith("cuda") and self._forced_kernel == "flash" and layer.head_dim % 8:
            reasons.append(f"SDPA flash needs head_dim divisible by 8, got {layer.head_dim}")
        return reasons

    def plan(self, metadata: AttentionMetadata, layer: LayerSpec, device: str = "cpu") -> Plan:
        device_type = str(device).split(":")[0]
        layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
        if (self._use_varlen and self._forced_kernel is None and device_type == "cuda" and not metadata.has_cache
                and layer.dtype in _HALF and layer.head_dim % 8 == 0 and layer.head_dim <= 256
                and layer.window_left < 0 and 0 not in metadata.seq_lens
                and varlen_can_run(varlen_parameters(), layer)):
            return Plan(self.name, "varlen_attn", "flash", layout, "tokens", False, device=str(device),
                        layer=layer, details=(("launches", 1),))
        explicit = needs_explicit_mask(metadata, layer)
        kernel = self._forced_kernel or choose_sdpa_kernel(device_type, layer.dtype, layer.head_dim, explicit,
                                                           layer.group_size > 1)
        mask = "explicit" if explicit else ("is_causal" if layer.causal else "none")
        return Plan(self.name, "scaled_dot_product_attention", kernel, layout, "tokens", metadata.has_cache,
                    device=str(device), layer=layer,
                    details=(("launches", metadata.num_requests), ("mask", mask)))

    def forward(self, q, k, v, metadata: AttentionMetadata, plan: Plan, out=None):
        import torch

        layer = plan.layer
        metadata.check_inputs(q, k, v, layer, require_contiguous=False)
        if out is None:
            out = torch.empty_like(q)
        if plan.kernel == "varlen_attn":
            return self._varlen(q, k, v, metadata, layer, out)
        manager = metadata.kv_cache_manager
        if manager is not None:
            manager.write(layer.layer_idx, metadata, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[plan.kernel_backend]
        start = 0
        with sdpa_kernel([sdpa_backend]):
            for i, n in enumerate(metadata.seq_lens):
                if n == 0:
                    continue
                if manager is None:
                    ki, vi = k[start:start + n], v[start:start + n]
                else:
                    ki, vi = manager.gather(layer.layer_idx, metadata.block_tables[i], metadata.kv_lens[i])
                out[start:start + n] = self._attend(q[start:start + n], ki, vi, layer, plan)
                start += n
        return out

    def _attend(self, q, k, v, layer: LayerSpec, plan: Plan):
        import torch
        import torch.nn.functional as F

        lq, lk = q.shape[0], k.shape[0]
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, len, dim]
        gqa = layer.group_size > 1
        if gqa and plan.kernel_backend in ("efficient", "cudnn"):
            kh, vh = (t.repeat_interleave(layer.group_size, dim=1) for t in (kh, vh))
            gqa = False
        mask, is_causal = None, False
        if plan.detail("mask") == "explicit":
            qpos = torch.arange(lk - lq, lk, device=q.device)[:, None]
            kpos = torch.arange(lk, device=q.device)[None, :]
            mask = kpos <= qpos if layer.causal else torch.ones(lq, lk, dtype=torch.bool, device=q.device)
            if layer.window_left >= 0:
                mask = mask & (kpos >= qpos - layer.window_left)
        elif plan.detail("mask") == "is_causal":
            is_causal = True
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=layer.scale,
                                           enable_gqa=gqa)
        return o[0].transpose(0, 1)

    def _varlen(self, q, k, v, metadata, layer, out):
        from torch.nn.attention.varlen import varlen_attn

        params = varlen_parameters()
        cu = metadata.int_tensor("qo_indptr", q.device)
        kwargs = {"scale": layer.scale}
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0) if layer.causal else (-1, -1)
        else:
            kwargs["is_causal"] = layer.causal
        if layer.group_size > 1:
            kwargs["enable_gqa"] = True
        out.copy_(varlen_attn(q, k, v, cu, cu, metadata.max_seq_len_q, metadata.max_seq_len_q, **kwargs))
        return out


BACKENDS = [TorchSDPABackend()]
