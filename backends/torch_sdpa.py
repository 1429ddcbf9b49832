"""PyTorch backends: ``scaled_dot_product_attention`` per sequence, or ``torch.nn.attention.varlen``
(one launch for the whole ragged batch) where it exists, on CUDA, for half-precision self-attention
batches without a cache. Reads the project's paged cache by gathering each request's pages.

``torch`` picks the SDPA kernel per batch; ``torch-cudnn``, ``torch-flash`` and ``torch-efficient``
force one (CUDA only), so one run compares every way torch can compute a shape. The plan names the
SDPA kernel, and forward runs under ``sdpa_kernel([that one])``, so what the plan says is what
runs: if torch cannot use that kernel it raises rather than falling back.

What SDPA can express, these backends do: bottom-right causal masks, sliding windows, chunked
prefill and speculative rows through explicit masks; a custom scale; cross-attention; a V head dim
of its own (math kernel), and so absorbed MLA (``latent_kv``: one latent KV head, V the first
head_dim_vo channels of K); attention sinks as one extra key of zeros whose logit is the sink (an
additive mask column; its value row is zero); an FP8 cache by dequantizing what it gathers. A
logit soft-cap cannot be expressed (no score modification in SDPA): the ``flex`` backend does it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pytest_attn.env import known_failures, torch_build
from pytest_attn.core.contract import (FUSED_FLOAT32_TOLERANCE, Availability, Backend, Capabilities, LayerSpec, Plan,
                                  Tolerance)
from pytest_attn.core.metadata import AttentionMetadata

SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")
_HALF = ("float16", "bfloat16")
#: Forced-kernel variants (CUDA only): name -> SDPA kernel.
FORCED = {"torch-cudnn": "cudnn", "torch-flash": "flash", "torch-efficient": "efficient"}


def needs_explicit_mask(metadata: AttentionMetadata, layer: LayerSpec) -> bool:
    """SDPA's is_causal aligns the mask top-left; when a request has more keys than queries the
    causal mask must be bottom-right (queries are the last tokens), so it is passed explicitly,
    except for one query, which sees every key. Windows and sinks always need one."""
    if layer.window_left >= 0 or layer.sinks:
        return True
    return layer.causal and any(1 < q != kv for q, kv in zip(metadata.seq_lens, metadata.kv_lens))


def choose_sdpa_kernel(device_type: str, dtype: str, head_dim: int, explicit_mask: bool, gqa: bool,
                       head_dim_v: Optional[int] = None) -> str:
    """Which SDPA implementation to ask for. Pure so that CPU tests cover the CUDA rules too."""
    if head_dim_v is not None and head_dim_v != head_dim:
        return "math"  # the fused kernels want one head dim for q, k and v
    if device_type == "cpu":
        return "flash"  # the CPU flash kernel takes every dtype, masks and GQA
    if dtype in _HALF and head_dim <= 256 and head_dim % 8 == 0 and not explicit_mask:
        return "flash"
    if head_dim % 8 == 0 and not gqa and dtype in _HALF:
        return "efficient"  # takes explicit masks
    # float32: the math kernel. SDPA's efficient kernel in float32 (forced by torch-efficient) is a
    # flash-style kernel: on an H200 it erred 4.85e-3 at logits near -6e4 and 2.1x the unfused twin
    # on fp32-decode; math passed every float32 case there.
    return "math"


#: Known kernel failures: the decisions are Python here, their data in known_failures/torch_sdpa.toml.
KNOWN = known_failures.Family("torch_sdpa", Path(__file__).parent / "known_failures" / "torch_sdpa.toml")


def forced_kernel_reasons(kernel: str, layer: LayerSpec, explicit_mask: bool,
                          kv_lens: tuple[int, ...] = (), sm: Optional[tuple[int, int]] = None) -> list[str]:
    """Why a forced SDPA kernel cannot run this layer on CUDA (the variants' ``unsupported``);
    ``sm``: the GPU's compute capability (None: not known, every architecture's entries hold)."""
    reasons = []
    if kernel == "cudnn" and 1 in kv_lens:
        reasons += KNOWN.reasons("sdpa-cudnn-one-key", sm=sm)
    if layer.head_dim_v != layer.head_dim:
        reasons.append(f"SDPA {kernel} needs one head dim for q, k and v, not {layer.head_dim}/{layer.head_dim_v}")
    if kernel in ("flash", "cudnn"):
        if layer.dtype not in _HALF:
            reasons.append(f"SDPA {kernel} runs float16/bfloat16 only, not {layer.dtype}")
        if layer.head_dim % 8 or layer.head_dim > 256:
            reasons.append(f"SDPA {kernel} needs head_dim a multiple of 8 up to 256, not {layer.head_dim}")
        if explicit_mask:
            reasons.append(f"SDPA {kernel} takes no explicit attention mask (needed here for a bottom-right causal "
                           "mask, a window or sinks)")
    if kernel == "efficient" and layer.head_dim % 8:
        reasons.append(f"SDPA efficient needs head_dim a multiple of 8, not {layer.head_dim}")
    return reasons


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


def _compute_capability(device) -> Optional[tuple[int, int]]:
    if not torch_build.cuda_available():
        return None
    import torch

    return tuple(torch.cuda.get_device_capability(device))


class TorchSDPABackend(Backend):
    description = "PyTorch scaled_dot_product_attention (per sequence) / torch.nn.attention.varlen"
    capabilities = Capabilities(sliding_window=True, sinks=True, head_dim_vo=True, cross_attention=True,
                                chunked_prefill=True, multi_token_generation=True,
                                # request_kv converts what the cache holds to q's dtype
                                kv_dtypes=frozenset({"float8_e4m3fn", "bfloat16", "float16"}),
                                never_reads_masked_slots=True,
                                # absorbed MLA is MQA with head_dim_vo < head_dim: the math kernel
                                latent_kv=True)
    requires_contiguous = False  # SDPA takes strided inputs

    def __init__(self, name: str = "torch", kernel: Optional[str] = None, use_varlen: bool = True):
        self.name = name
        self._forced_kernel = kernel
        self._use_varlen = use_varlen and kernel is None
        if kernel is not None:
            self.description = f"PyTorch scaled_dot_product_attention with the {kernel} kernel forced (CUDA)"
            self.capabilities = Capabilities(**{**TorchSDPABackend.capabilities.__dict__,
                                                "devices": frozenset({"cuda"})})

    def available(self) -> Availability:
        # Not imported here: a process that only reports (an xdist controller) need not pay for it.
        if not torch_build.is_installed():
            return Availability(False, "torch is not installed: pip install torch")
        if self._forced_kernel is not None and not torch_build.cuda_available():
            return Availability(False, f"SDPA's {self._forced_kernel} kernel runs on CUDA only; torch sees no GPU")
        return Availability(True)

    def tolerance(self, dtype: str) -> Tolerance:
        return FUSED_FLOAT32_TOLERANCE if dtype == "float32" else Tolerance()

    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        if str(device).startswith("cuda") and self._forced_kernel is not None:
            reasons += forced_kernel_reasons(self._forced_kernel, layer, needs_explicit_mask(metadata, layer),
                                             metadata.kv_lens, _compute_capability(device))
        return reasons

    def plan(self, metadata: AttentionMetadata, layer: LayerSpec, device: str = "cpu") -> Plan:
        device_type = str(device).split(":")[0]
        layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
        if (self._use_varlen and device_type == "cuda" and not metadata.has_cache and not metadata.is_cross
                and layer.dtype in _HALF and layer.head_dim % 8 == 0 and layer.head_dim <= 256
                and not layer.features() and 0 not in metadata.seq_lens
                and varlen_can_run(varlen_parameters(), layer)):
            return Plan(self.name, "varlen_attn", "flash", layout, "tokens", False, device=str(device),
                        layer=layer, details=(("launches", 1),))
        explicit = needs_explicit_mask(metadata, layer)
        kernel = self._forced_kernel or choose_sdpa_kernel(device_type, layer.dtype, layer.head_dim, explicit,
                                                           layer.group_size > 1, layer.head_dim_v)
        mask = "explicit" if explicit else ("is_causal" if layer.causal and self._needs_causal(metadata) else "none")
        details = [("launches", metadata.num_requests), ("mask", mask)]
        if layer.sinks:
            details.append(("sinks", "one zero key per head whose logit is the sink (additive mask column)"))
        if metadata.has_cache and metadata.kv_cache_manager.quantized:
            details.append(("kv_cache", f"{metadata.kv_cache_manager.dtype}, dequantized to {layer.dtype} on gather"))
        return Plan(self.name, "scaled_dot_product_attention", kernel, layout, "tokens", metadata.has_cache,
                    device=str(device), layer=layer, details=tuple(details))

    @staticmethod
    def _needs_causal(metadata: AttentionMetadata) -> bool:
        return any(q > 1 for q in metadata.seq_lens)

    def forward(self, q, k, v, metadata: AttentionMetadata, plan: Plan, out=None, lse=None):
        if lse is not None:
            raise NotImplementedError("torch's SDPA returns no log-sum-exp; this backend declares lse_base=None")
        layer, out = self.start_forward(q, k, v, metadata, plan, out)
        if plan.kernel == "varlen_attn":
            return self._varlen(q, k, v, metadata, layer, out)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[plan.kernel_backend]
        q_off = metadata.qo_indptr
        with sdpa_kernel([sdpa_backend]):
            for i, n in enumerate(metadata.seq_lens):
                if n == 0:
                    continue
                ki, vi = metadata.request_kv(i, k, v, layer, dtype=q.dtype)
                out[q_off[i]:q_off[i + 1]] = self._attend(q[q_off[i]:q_off[i + 1]], ki, vi, layer, plan)
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
            visible = kpos <= qpos if layer.causal else torch.ones(lq, lk, dtype=torch.bool, device=q.device)
            if layer.window_left >= 0:
                visible = visible & (kpos >= qpos - layer.window_left)
            mask = visible
            if layer.sinks:  # one more key of zeros (score 0) whose additive mask entry is the sink
                kh = torch.cat([kh, kh.new_zeros(kh.shape[:2] + (1, kh.shape[3]))], dim=2)
                vh = torch.cat([vh, vh.new_zeros(vh.shape[:2] + (1, vh.shape[3]))], dim=2)
                bias = torch.zeros((1, layer.num_heads, lq, lk + 1), dtype=torch.float32, device=q.device)
                bias[..., :lk].masked_fill_(~visible, float("-inf"))
                bias[..., lk] = torch.tensor(layer.sinks, dtype=torch.float32, device=q.device)[:, None]
                mask = bias.to(q.dtype)
        elif plan.detail("mask") == "is_causal" and lq > 1:
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

    # -- what runs, as the profiler names it ----------------------------------------------------------
    def expected_kernels(self, plan: Plan) -> list:
        """The SDPA implementation the plan names, and only it, so a fallback to another fails the
        trace. CPU: its operator. CUDA: FlashAttention-2 in ``pytorch_flash::`` (split-KV and its
        combine kernel included; varlen_attn runs it too), the memory-efficient CUTLASS kernels
        (``fmha_cutlassF_*``), cuDNN's generated SDPA kernels, or the math path's GEMMs (its softmax
        and masking are ATen kernels, allowed as data movement)."""
        from pytest_attn.check.traces import KernelFamily

        cpu_ops = {"flash": (r"^aten::_scaled_dot_product_flash_attention_for_cpu$",),
                   "math": (r"^aten::_scaled_dot_product_attention_math$",)}
        cuda_kernels = {"flash": (r"flash_fwd", r"FlashAttnFwd"),  # FlashAttention-2, or 3 where torch activates it
                        "efficient": (r"fmha_cutlassF", r"AttentionKernel", r"attention_kernel"),
                        "cudnn": (r"(?i)cudnn", r"(?i)sdpa", r"flash_fprop"),
                        # the math path: GEMMs and the softmax between them (an H200 ran softmax_warp_forward)
                        "math": (r"(?i)gemm", r"(?i)gemv", r"xmma", r"nvjet", r"(?i)cublas", r"softmax_warp_forward")}  # not "cutlass": FA2 names it in its template arguments
        device_type = str(plan.device).split(":")[0]
        implementation = "flash" if plan.kernel == "varlen_attn" else plan.kernel_backend
        names = cpu_ops if device_type == "cpu" else cuda_kernels
        families = [KernelFamily(f"SDPA {implementation} ({device_type})", names[implementation])]
        if device_type == "cpu":  # the dispatcher's own operator, above whichever implementation runs
            families.append(KernelFamily("SDPA dispatcher", (r"^aten::scaled_dot_product_attention$",), required=False))
        return families


BACKENDS = [TorchSDPABackend(), *(TorchSDPABackend(name, kernel=kernel, use_varlen=False)
                                   for name, kernel in FORCED.items())]
