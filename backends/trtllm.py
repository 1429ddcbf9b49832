"""TensorRT-LLM's own attention kernels, as FlashInfer 0.7.2.post1 ships them for Hopper: FMHAv2
(``flashinfer.prefill.trtllm_fmha_v2_prefill``, TensorRT-LLM's context attention) and XQA
(``flashinfer.decode.trtllm_batch_decode_with_kv_cache(backend="xqa")``, its generation kernel).

``trtllm`` routes a batch the way TensorRT-LLM's attention op does on Hopper: context requests (and
every request of a batch without a cache, the ViT encoder) through FMHAv2; one-token generation
requests through XQA where XQA takes the configuration. Where TensorRT-LLM would fall back to its
masked-MHA kernel (not in FlashInfer), and for speculative rows, generation goes through FMHAv2's
paged kernel instead, and the plan says so (``routing``). ``trtllm-fmha`` sends everything through
FMHAv2, for comparison.

What these kernels take, read from FlashInfer's source (and refused here before any launch, since
FMHAv2's dispatcher asserts are compiled out: an unsupported head dim launches nothing and leaves
``out`` as it was):

- FMHAv2 on SM90: head dims 32, 40, 48, 64, 80, 96, 104, 128, 160, 192, 256, the same for V;
  fp16/bf16 (e4m3 only with e4m3 Q, K and V together); every stride derived from the shapes, so
  inputs must be contiguous; causal masks aligned bottom-right; ``mask_mode`` "padding" (no mask),
  "causal", "sliding_window" (keys [i - window_left, i], causal only); the soft-cap value itself
  (not on SEPARATE_Q_K_V); sinks as one float32 per query head; softmax statistics (max, sum) only
  from CONTIGUOUS_Q_KV (any other layout calls exit(1)), without the sink; a paged cache as one
  [pages, 2, ...] pool with page-id block tables; page sizes that divide or are divided by its KV
  tile (powers of two).
- XQA: page sizes 16, 32, 64, 128; head dims multiples of 16 up to 256; fp16/bf16 Q with a KV cache
  of the same dtype or e4m3 (one scale for K and V: k_scale is folded into the Q scale); a softmax
  scale fixed at 1/sqrt(head_dim) times a Q scale; sinks; a sliding window of ``window_left + 1``
  tokens; no LSE, no soft-cap. Its workspace's first 8 MiB are semaphores that must start at zero.

Each FMHAv2 module (one per input layout and dtype) compiles 88 to 132 kernels on first use (88 s
for SEPARATE_Q_K_V bf16 on an H200) and each XQA configuration (page size, head dim, group size,
window, dtypes) is a build of its own, so builds are budgeted (:data:`JIT_ENV`).

Every decision is pure Python (:func:`decide`), so CPU tests cover it. Neither torch nor flashinfer
is imported at module import.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from pytest_attn.env import known_failures, torch_build
from pytest_attn.core.contract import Availability, Backend, BatchShape, Capabilities, LayerSpec, Plan
from pytest_attn.core.errors import AttnInputError, UnsupportedCase
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn.env.packages import flashinfer_version

FMHA = "trtllm_fmha_v2_prefill"
XQA = "xqa"
VARIANTS = {"trtllm": "op", "trtllm-fmha": "fmha"}
MIN_FLASHINFER = (0, 7, 2)  # the first release that ships both kernels as used here
ASSUMED_SM = (9, 0)  # plans made where no GPU is visible assume an H100
FMHA_SM90_HEAD_DIMS = (32, 40, 48, 64, 80, 96, 104, 128, 160, 192, 256)
FMHA_SM120_HEAD_DIMS = (64, 128, 256)
XQA_PAGE_SIZES = (16, 32, 64, 128)
XQA_MAX_GROUP = 32  # TensorRT-LLM's XQA dispatch limit (group x beam <= 32)
WORKSPACE_BYTES = 128 << 20  # XQA: 8 MiB of semaphores, the rest scratch
#: Known kernel failures: the decisions are Python here, their data in known_failures/trtllm.toml.
KNOWN = known_failures.Family("trtllm", Path(__file__).parent / "known_failures" / "trtllm.toml")
FMHA_WORKSPACE_BYTES = 1 << 20  # FMHAv2 keeps one tile counter in it (it memsets it every launch)
_HALF = ("float16", "bfloat16")
_DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "e4m3"}

#: "all" lifts the JIT budget; the default builds the modules below.
JIT_ENV = "PYTEST_ATTN_TRTLLM_JIT"
#: FMHAv2 modules built by default, (input layout, input dtype): the ViT encoder's ragged path and
#: context attention on an NHD paged cache.
#: FMHAv2 modules built by default, (input layout, input dtype): the ViT encoder's ragged path, the
#: seed's. Every other module (the paged ones for a KV cache, CONTIGUOUS_Q_KV for soft-caps and the
#: LSE, fp16, e4m3) and every XQA configuration comes with PYTEST_ATTN_TRTLLM_JIT=all: measured on an
#: H100, FlashInfer's default builds and this one alone fill a 5-minute first run.
DEFAULT_FMHA_MODULES = frozenset({("SEPARATE_Q_K_V", "bfloat16")})
#: XQA configurations built by default, (q dtype, kv dtype, page size, head dim, group, window).
DEFAULT_XQA = frozenset()


@dataclass(frozen=True)
class Budget:
    fmha: Optional[frozenset]  # None: every module
    xqa: Optional[frozenset]

    def allows_fmha(self, layout: str, dtype: str) -> bool:
        return self.fmha is None or (layout, dtype) in self.fmha

    def allows_xqa(self, key: tuple) -> bool:
        return self.xqa is None or key in self.xqa


FMHA_LAYOUTS = ("PACKED_QKV", "CONTIGUOUS_Q_KV", "SEPARATE_Q_K_V", "Q_PAGED_KV_NHD", "Q_PAGED_KV_HND")


def budget_from_env(environ: Mapping[str, str] = os.environ) -> Budget:
    """The builds this run may make: the default, "all", or a comma list adding bfloat16 FMHAv2
    layouts (e.g. q_paged_kv_nhd) and "xqa" (every XQA configuration) to the default."""
    value = environ.get(JIT_ENV, "").strip().lower()
    if value == "all":
        return Budget(None, None)
    if value in ("", "default"):
        return Budget(DEFAULT_FMHA_MODULES, DEFAULT_XQA)
    words = [w.strip() for w in value.split(",") if w.strip()]
    bad = [w for w in words if w != "xqa" and w.upper() not in FMHA_LAYOUTS]
    if bad:
        raise AttnInputError(f"{JIT_ENV}={value!r}: use 'all', or a comma list of xqa and FMHAv2 layouts "
                             f"({', '.join(l.lower() for l in FMHA_LAYOUTS)}), or leave it unset")
    fmha = DEFAULT_FMHA_MODULES | {(w.upper(), "bfloat16") for w in words if w != "xqa"}
    return Budget(fmha, None if "xqa" in words else DEFAULT_XQA)


def _sm_text(sm) -> str:
    return f"sm{sm[0]}{sm[1]}"


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# -- pure decisions ---------------------------------------------------------------------------------
def fmha_layout(metadata: AttentionMetadata, layer: LayerSpec) -> str:
    """The FMHAv2 input layout for this batch: the cache's, or for ragged K/V SEPARATE_Q_K_V, except
    where only CONTIGUOUS_Q_KV has the feature (soft-cap; softmax statistics for the LSE)."""
    if metadata.has_cache:
        return f"Q_PAGED_KV_{metadata.kv_cache_manager.layout}"
    if layer.logits_soft_cap > 0 or layer.return_lse:
        return "CONTIGUOUS_Q_KV"
    return "SEPARATE_Q_K_V"


def fmha_input_dtype(layer: LayerSpec, metadata: AttentionMetadata) -> str:
    """FMHAv2 reads Q, K and V in one dtype: an e4m3 cache means e4m3 Q too (Q is quantized)."""
    if metadata.has_cache and metadata.kv_cache_manager.dtype == "float8_e4m3fn":
        return "float8_e4m3fn"
    return layer.dtype


def fmha_mask_mode(layer: LayerSpec) -> str:
    if layer.window_left >= 0:
        return "sliding_window"  # "causal" with window_left 0 would be plain causal in FMHAv2
    return "causal" if layer.causal else "padding"


def fmha_hazards(layer: LayerSpec, metadata: AttentionMetadata, sm, budget: Budget, layout: str) -> list[str]:
    reasons = []
    if sm[0] not in (9, 12):
        reasons.append(f"FMHAv2 runs on sm90 and sm120 only, this is {_sm_text(sm)}")
        return reasons
    head_dims = FMHA_SM90_HEAD_DIMS if sm[0] == 9 else FMHA_SM120_HEAD_DIMS
    if layer.head_dim not in head_dims:
        reasons.append(f"FMHAv2 has no kernel for head_dim {layer.head_dim} on {_sm_text(sm)} (it has "
                       f"{', '.join(map(str, head_dims))}); with its asserts compiled out it would launch nothing")
    if layer.head_dim_v != layer.head_dim:
        reasons.append(f"FMHAv2 (this JIT) has no kernel for head_dim_vo {layer.head_dim_v} != head_dim {layer.head_dim}")
    if layer.dtype not in _HALF:
        reasons.append(f"FMHAv2 runs float16/bfloat16 (or e4m3) inputs, not {layer.dtype}")
    if layer.window_left >= 0 and not layer.causal:
        reasons.append("FMHAv2's sliding window is causal only (SLIDING_OR_CHUNKED_CAUSAL); mask 'padding' with a "
                       "window raises")
    if metadata.is_cross:
        # relative L2 error 0.94 on cross-attn-gqa, 0.90 on cross-attn-hd32 (full), 0.92 on cross-attn-causal on
        # an H100 (0.90 on each on an H200): FlashInfer's SM90 ragged layouts size the K/V TMA descriptors by the
        # query tokens
        reasons += KNOWN.reasons("fmha-ragged-cross", sm=sm)
    if layer.return_lse:
        if layout != "CONTIGUOUS_Q_KV":
            reasons.append(f"FMHAv2 saves softmax statistics only from CONTIGUOUS_Q_KV; {layout} would exit(1) the "
                           "process")
        if layer.sinks:
            reasons.append("FMHAv2's softmax statistics leave the sink out of the sum, but the LSE includes it")
    if metadata.has_cache:
        page = metadata.page_size
        if not _is_power_of_two(page):
            reasons.append(f"FMHAv2's paged kernels load pages by the KV tile, which a page of {page} tokens does not "
                           "divide (powers of two only)")
        if fmha_input_dtype(layer, metadata) == "float8_e4m3fn" and sm[0] != 9:
            reasons.append("FMHAv2 with e4m3 runs on sm90 only")
    dtype = fmha_input_dtype(layer, metadata)
    if not reasons and not budget.allows_fmha(layout, dtype):
        reasons.append(f"JIT budget: FMHAv2's {layout} {dtype} module is not built in this run (each module compiles "
                       f"88 to 132 kernels, about 90 s); set {JIT_ENV}=all to build it")
    return reasons


def xqa_key(layer: LayerSpec, metadata: AttentionMetadata) -> tuple:
    return (layer.dtype, metadata.kv_cache_manager.dtype, metadata.page_size, layer.head_dim, layer.group_size,
            layer.window_left >= 0)


def xqa_reasons(layer: LayerSpec, metadata: AttentionMetadata, sm) -> list[str]:
    """Why XQA cannot run this batch's one-token generation requests (empty: it can)."""
    reasons = []
    if sm[0] not in (9, 10, 12):
        reasons.append(f"XQA runs on sm90, sm100 and sm120, not {_sm_text(sm)}")
    if metadata.page_size not in XQA_PAGE_SIZES:
        reasons.append(f"XQA takes pages of {'/'.join(map(str, XQA_PAGE_SIZES))} tokens, not {metadata.page_size}")
    if layer.head_dim % 16 or not 16 <= layer.head_dim <= 256:
        reasons.append(f"XQA takes head dims that are multiples of 16 up to 256, not {layer.head_dim}")
    if layer.head_dim_v != layer.head_dim:
        reasons.append("XQA has one head dim for K and V")
    if layer.dtype not in _HALF:
        reasons.append(f"XQA runs float16/bfloat16 queries, not {layer.dtype}")
    if layer.group_size > XQA_MAX_GROUP:
        reasons.append(f"XQA takes at most {XQA_MAX_GROUP} query heads per KV head, not {layer.group_size}")
    if layer.logits_soft_cap > 0:
        reasons.append("XQA has no logit soft-cap")
    if layer.return_lse:
        reasons.append("XQA returns no LSE")
    return reasons


@dataclass(frozen=True)
class Route:
    kernel: str  # FMHA or XQA
    start: int
    stop: int
    why: str = ""


def route(metadata: AttentionMetadata, layer: LayerSpec, variant: str, sm=ASSUMED_SM,
          budget: Budget = Budget(DEFAULT_FMHA_MODULES, DEFAULT_XQA)) -> tuple[list[Route], list[str]]:
    """(launches, reasons not to run). Context requests come first in a batch."""
    if variant not in VARIANTS.values():
        raise AttnInputError(f"unknown TensorRT-LLM variant {variant!r}: one of {sorted(VARIANTS.values())}")
    n, c = metadata.num_requests, metadata.num_contexts
    layout = fmha_layout(metadata, layer)
    if not metadata.has_cache:
        return [Route(FMHA, 0, n)], fmha_hazards(layer, metadata, sm, budget, layout)
    gens = n - c
    if not gens:
        return [Route(FMHA, 0, n)], fmha_hazards(layer, metadata, sm, budget, layout)
    if variant == "fmha":
        return ([Route(FMHA, 0, n, "every request through FMHAv2's paged kernel (trtllm-fmha)")],
                fmha_hazards(layer, metadata, sm, budget, layout))
    why = ""
    if metadata.max_generation_q > 1:
        why = ("speculative rows through FMHAv2's paged kernel (bottom-right causal); XQA's spec-decoding mask "
               "format is not used here")
    else:
        cannot = xqa_reasons(layer, metadata, sm)
        if cannot:
            why = ("generation through FMHAv2's paged kernel: " + "; ".join(cannot) + " (TensorRT-LLM would use its "
                   "masked-MHA kernel, which FlashInfer does not ship)")
        elif not budget.allows_xqa(xqa_key(layer, metadata)):
            why = (f"generation through FMHAv2's paged kernel: JIT budget: XQA {xqa_key(layer, metadata)} is not built "
                   f"in this run; set {JIT_ENV}=all to build it")
    if why:
        return [Route(FMHA, 0, n, why)], fmha_hazards(layer, metadata, sm, budget, layout)
    routes, reasons = [], []
    if c:
        routes.append(Route(FMHA, 0, c))
        reasons += fmha_hazards(layer, metadata, sm, budget, layout)
    routes.append(Route(XQA, c, n))
    return routes, reasons


def decide(metadata: AttentionMetadata, layer: LayerSpec, variant: str = "op", *, name: Optional[str] = None,
           sm=ASSUMED_SM, budget: Budget = Budget(DEFAULT_FMHA_MODULES, DEFAULT_XQA), device: str = "cuda") -> Plan:
    """The plan for this batch and layer, decided without CUDA; UnsupportedCase on what the kernels lack."""
    name = name or next(k for k, v in VARIANTS.items() if v == variant)
    routes, reasons = route(metadata, layer, variant, sm, budget)
    if reasons:
        raise UnsupportedCase(name, reasons)
    layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
    qo = metadata.qo_indptr
    parts = []
    for r in routes:
        details = [("sm", _sm_text(sm))]
        details += (fmha_details(metadata, layer) if r.kernel == FMHA else xqa_details(metadata, layer))
        if r.why:
            details.append(("routing", r.why))
        units = "pages" if metadata.has_cache else "tokens"
        parts.append(Plan(name, r.kernel, "fmha_v2" if r.kernel == FMHA else "xqa", layout, units,
                          metadata.has_cache, device=str(device), layer=layer, details=tuple(details),
                          requests=(r.start, r.stop), tokens=(qo[r.start], qo[r.stop])))
    made_for = BatchShape.of(metadata)
    if len(parts) == 1:
        return dataclasses.replace(parts[0], made_for=made_for)
    return Plan(name, "+".join(p.kernel for p in parts), "+".join(p.kernel_backend for p in parts), layout,
                parts[0].index_units, True, device=str(device), layer=layer, parts=tuple(parts), made_for=made_for)


def fmha_scales(layer: LayerSpec, q_scale: float = 1.0) -> tuple[float, float]:
    """(bmm1_scale, bmm2_scale): the plain softmax scale (FMHAv2 multiplies by log2(e) itself), times
    the dequantization scales of e4m3 Q and K; the output times V's."""
    if layer.quantized_kv:
        return layer.scale * q_scale * layer.k_scale, layer.v_scale
    return layer.scale, 1.0


def fmha_details(metadata: AttentionMetadata, layer: LayerSpec) -> list:
    layout = fmha_layout(metadata, layer)
    dtype = fmha_input_dtype(layer, metadata)
    out_dtype = layer.dtype if dtype == "float8_e4m3fn" else dtype
    bmm1, bmm2 = fmha_scales(layer)
    return [("input_layout", layout), ("mask_mode", fmha_mask_mode(layer)), ("window_left", layer.window_left),
            ("logits_soft_cap_scale", layer.logits_soft_cap or None), ("sinks", bool(layer.sinks)),
            ("save_softmax_stats", layer.return_lse), ("bmm1_scale", bmm1), ("bmm2_scale", bmm2),
            ("module", f"trtllm_fmha_v2_{layout.lower()}_{_DTYPE_SHORT[dtype]}_{_DTYPE_SHORT[out_dtype]}")]


def xqa_details(metadata: AttentionMetadata, layer: LayerSpec) -> list:
    q_dtype, kv_dtype, page, head_dim, group, window = xqa_key(layer, metadata)
    bmm1, bmm2 = ((layer.scale * layer.k_scale, layer.v_scale) if layer.quantized_kv else (layer.scale, 1.0))
    return [("kv_layout", metadata.kv_cache_manager.layout), ("page_size", page), ("group_size", group),
            ("sliding_win_size", layer.window_left + 1 if window else 0), ("sinks", bool(layer.sinks)),
            ("bmm1_scale", bmm1), ("bmm2_scale", bmm2),
            ("module", f"xqa_input_{_DTYPE_SHORT[q_dtype]}_kv_cache_{_DTYPE_SHORT[kv_dtype]}_page_size_{page}_head_dim_"
                       f"{head_dim}_head_group_ratio_{group}_use_sliding_window_{window}")]


# -- the backend ------------------------------------------------------------------------------------
_BUFFERS: dict = {}


def _buffer(kind: str, device, nbytes: int):
    """One zeroed workspace per (kind, device): XQA's semaphores must start at zero, and FMHAv2's tile
    counter (memset on every launch) must not land in them, so the two never share one."""
    import torch

    key = (kind, str(device))
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    return _BUFFERS[key]


class TrtllmBackend(Backend):
    suite_modules = ("pytest_attn_backends.suites.test_trtllm_gpu",)
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({"float16", "bfloat16"}), sliding_window=True, soft_cap=True,
        sinks=True, lse_base="e", chunked_prefill=True, multi_token_generation=True,
        # A 16-bit cache in the other 16-bit dtype is not declared: its kernels take q and a
        # 16-bit KV cache in one dtype, and forward converts nothing.
        kv_dtypes=frozenset({"float8_e4m3fn"}), cross_attention=True)  # cross: refused per batch (fmha_hazards)
    requires_contiguous = True  # FMHAv2 derives every stride from the shapes

    def __init__(self, name: str = "trtllm"):
        if name not in VARIANTS:
            raise ValueError(f"unknown TensorRT-LLM variant {name!r}: one of {', '.join(VARIANTS)}")
        self.name, self.variant = name, VARIANTS[name]
        self.description = ("TensorRT-LLM's kernels as its attention op routes them on Hopper: FMHAv2 for context "
                            "(and no-cache) attention, XQA for generation" if self.variant == "op" else
                            "TensorRT-LLM's FMHAv2 for every request")
        self.launches: list[dict] = []  # what forward passed to each kernel, last call first cleared

    # -- environment --------------------------------------------------------------------------------
    def available(self) -> Availability:
        version = flashinfer_version() if importlib.util.find_spec("flashinfer") is not None else None
        if version is None:
            return Availability(False, "flashinfer is not installed: its TensorRT-LLM kernels come with "
                                       "pip install flashinfer-python>=0.7.2")
        from packaging.version import InvalidVersion, Version

        try:
            if Version(version).release[:3] < MIN_FLASHINFER:
                return Availability(False, f"flashinfer {version} predates trtllm_fmha_v2_prefill; install "
                                           "flashinfer-python>=0.7.2")
        except InvalidVersion:
            return Availability(False, f"cannot read flashinfer's version {version!r}: reinstall flashinfer-python")
        if not torch_build.is_installed():
            return Availability(False, "torch is not installed: pip install torch")
        if not torch_build.cuda_available():
            return Availability(False, "no CUDA device (TensorRT-LLM's kernels run on NVIDIA GPUs only)")
        sm = self.sm("cuda")
        if sm[0] not in (9, 12):
            return Availability(False, f"FMHAv2 runs on sm90 and sm120 only, this GPU is {_sm_text(sm)}")
        return Availability(True)

    def sm(self, device) -> tuple[int, int]:
        if str(device).startswith("cuda") and torch_build.cuda_available():
            import torch

            return tuple(torch.cuda.get_device_capability(device))
        return ASSUMED_SM

    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        if layer.latent_kv:
            reasons.append("absorbed MLA: TensorRT-LLM's MLA kernels as FlashInfer ships them (trtllm-gen: "
                           "trtllm_batch_decode_with_kv_cache_mla, BatchMLAPagedAttentionWrapper(backend='trtllm-gen')) "
                           "need SM100/SM103/SM107, Blackwell (FlashInfer 0.7.2.post1, "
                           "_validate_trtllm_gen_mla_device_capability), and these ports are FMHAv2 and XQA for "
                           "Hopper: run MLA layers with flashinfer-mla or flashinfer-mla-fa3")
        if reasons:
            return reasons
        return route(metadata, layer, self.variant, self.sm(device), budget_from_env())[1]

    # -- plan ---------------------------------------------------------------------------------------
    def plan(self, metadata: AttentionMetadata, layer: LayerSpec, device: str = "cuda") -> Plan:
        reasons = Backend.unsupported(self, layer, metadata, device)
        if reasons:
            raise UnsupportedCase(self.name, reasons)
        plan = decide(metadata, layer, self.variant, name=self.name, sm=self.sm(device), budget=budget_from_env(),
                      device=str(device))
        if not str(device).startswith("cuda") or not torch_build.cuda_available():
            return plan
        # the index tensors each launch reads, made now: copies from host memory cannot be captured
        # in a CUDA graph, so forward must not make them
        handles = []
        for part in plan.launches:
            start, stop = part.request_range(metadata)
            sub = metadata if (start, stop) == (0, metadata.num_requests) else metadata.subset(start, stop)
            handles.append(self._index_tensors(sub, device))
        return plan.with_handle(tuple(handles))

    def _index_tensors(self, md: AttentionMetadata, device) -> dict:
        tensors = {"seq_lens": self._ints(md.kv_lens, device), "cum_seq_lens_q": self._ints(md.qo_indptr, device),
                   "cum_seq_lens_kv": self._ints(md.cu_kv_lens, device)}
        if md.has_cache:
            tensors["block_tables"] = self._block_tables(md, device)
        return tensors

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, q, k, v, metadata: AttentionMetadata, plan: Plan, out=None, lse=None):
        layer, out = self.start_forward(q, k, v, metadata, plan, out, cuda_only="TensorRT-LLM's kernels run")
        self.launches = []
        handles = plan.handle or (None,) * len(plan.launches)
        for part, index in zip(plan.launches, handles):  # start_forward wrote this step's K/V to the cache
            start, stop = part.request_range(metadata)
            t0, t1 = part.token_range(metadata)
            sub = metadata if (start, stop) == (0, metadata.num_requests) else metadata.subset(start, stop)
            index = index or self._index_tensors(sub, q.device)
            if part.kernel == FMHA:
                self._fmha(part, sub, index, q[t0:t1], k, v, out[t0:t1], None if lse is None else lse[t0:t1])
            else:
                self._xqa(part, sub, index, q[t0:t1], out[t0:t1])
        return out

    # -- the plan, against what the kernels were given ------------------------------------------------
    def readback(self, plan: Plan) -> Optional[list[str]]:
        """FMHAv2 and XQA keep no planned state to read: what they are specialized with is the JIT
        module (layout and dtypes; for XQA also page size, head dim, group and window) and the
        arguments of the call. So: every argument forward gave each kernel against the plan, and the
        module the plan names among those FlashInfer has built in this process."""
        if not self.launches:
            return None
        parts = plan.launches
        if len(parts) != len(self.launches):
            return [f"the plan has {len(parts)} kernel launches, forward made {len(self.launches)}"]
        built = _built_modules()
        mismatches = []
        for part, launch in zip(parts, self.launches):
            details = dict(part.details)
            wanted = {"kernel": part.kernel, "window_left": part.layer.window_left, "sinks": bool(part.layer.sinks),
                      "bmm2_scale": details["bmm2_scale"]}
            if part.kernel == FMHA:
                wanted.update(input_layout=details["input_layout"], mask_mode=details["mask_mode"],
                              logits_soft_cap_scale=details["logits_soft_cap_scale"],
                              save_softmax_stats=details["save_softmax_stats"])
                if not part.layer.quantized_kv:  # with e4m3 the call folds in Q's own (per-call) scale
                    wanted["bmm1_scale"] = details["bmm1_scale"]
            else:
                wanted.update(kv_layout=details["kv_layout"], page_size=details["page_size"],
                              bmm1_scale=details["bmm1_scale"])
            for key, want in wanted.items():
                got = launch.get(key)
                if isinstance(want, float) and isinstance(got, float):
                    same = math.isclose(got, want, rel_tol=1e-6)
                else:
                    same = got == want
                if not same:
                    mismatches.append(f"{part.kernel}: the plan says {key}={want!r}, the kernel was called with "
                                      f"{key}={got!r}")
            if built is not None and not _module_built(built, part):
                mismatches.append(f"{part.kernel}: the plan names the JIT module {details['module']}, which FlashInfer "
                                  "has not built in this process")
        return mismatches

    # -- CUDA-graph decode ----------------------------------------------------------------------------
    def graph_decoder(self, manager, layer: LayerSpec, max_batch: int, device):
        """XQA over fixed page-table and length buffers: ``plan`` writes a step into them (padding the
        live batch with one-token requests), ``run`` is captured. Only where XQA runs this layer."""
        return XqaGraphDecoder(self, manager, layer, max_batch, device)

    @staticmethod
    def _ints(values, device):
        import torch

        return torch.tensor(list(values), dtype=torch.int32, device=device)

    def _block_tables(self, metadata: AttentionMetadata, device):
        """[requests, most pages of any request] page ids; the tail of shorter rows repeats a page of
        their own (never read: the lengths stop before it)."""
        import torch

        pages = [metadata.block_tables[i][: -(-metadata.kv_lens[i] // metadata.page_size)]
                 for i in range(metadata.num_requests)]
        width = max(1, max(len(p) for p in pages))
        rows = [list(p) + [p[-1] if p else 0] * (width - len(p)) for p in pages]
        return torch.tensor(rows, dtype=torch.int32, device=device)

    def _fmha(self, part: Plan, md: AttentionMetadata, index: dict, q, k, v, out, lse) -> None:
        import torch
        from flashinfer.prefill import trtllm_fmha_v2_prefill

        layer = part.layer
        layout = part.detail("input_layout")
        device = q.device
        kwargs = dict(input_layout=layout, workspace_buffer=_buffer("fmha", device, FMHA_WORKSPACE_BYTES),
                      seq_lens=index["seq_lens"], max_q_len=max(1, md.max_seq_len_q),
                      max_kv_len=max(1, md.max_seq_len_kv), batch_size=md.num_requests,
                      cum_seq_lens_q=index["cum_seq_lens_q"], cum_seq_lens_kv=index["cum_seq_lens_kv"],
                      mask_mode=part.detail("mask_mode"), window_left=layer.window_left,
                      logits_soft_cap_scale=layer.logits_soft_cap or None, save_softmax_stats=layer.return_lse)
        q_scale = 1.0
        if md.has_cache:
            pool = md.kv_cache_manager.kv_pool(layer.layer_idx)
            if md.kv_cache_manager.quantized:  # FMHAv2 reads Q in the cache's e4m3 too: quantize it
                q_scale = max(float(q.abs().max()), 1e-6) / 448.0
                q = (q.float() / q_scale).to(torch.float8_e4m3fn)
                kwargs["out_dtype"] = out.dtype
            qkv = (q, pool)
            kwargs["block_tables"] = index["block_tables"]
        elif layout == "CONTIGUOUS_Q_KV":
            qkv = (q, torch.stack([k, v], dim=1))
        else:
            qkv = (q, k, v)
        kwargs["bmm1_scale"], kwargs["bmm2_scale"] = fmha_scales(layer, q_scale)
        if layer.sinks:
            kwargs["sinks"] = self._sinks(layer, device)
        self.launches.append({"kernel": FMHA, **{k: v for k, v in kwargs.items() if not torch.is_tensor(v)},
                              "sinks": bool(layer.sinks)})
        result = trtllm_fmha_v2_prefill(qkv, out=out, **kwargs)
        if layer.return_lse:
            _, stats = result
            # stats are (max, sum) per row; the max is stored divided by sqrt(head_dim) and, without a
            # soft-cap, before the softmax scale (FlashInfer's own test derives the LSE the same way)
            if layer.logits_soft_cap > 0:
                row_max = stats[..., 0] * math.sqrt(layer.head_dim)
            else:
                row_max = stats[..., 0] * math.sqrt(layer.head_dim) * kwargs["bmm1_scale"]
            lse.copy_(row_max + torch.log(stats[..., 1]))

    _SINKS: dict = {}

    def _sinks(self, layer: LayerSpec, device):
        """The layer's sinks as a float32 device tensor, made once (not inside a graph capture)."""
        import torch

        key = (layer.sinks, str(device))
        if key not in self._SINKS:
            self._SINKS[key] = torch.tensor(layer.sinks, dtype=torch.float32, device=device)
        return self._SINKS[key]

    def _xqa(self, part: Plan, md: AttentionMetadata, index: dict, q, out) -> None:
        import torch
        from flashinfer.decode import trtllm_batch_decode_with_kv_cache

        layer = part.layer
        device = q.device
        pool = md.kv_cache_manager.kv_pool(layer.layer_idx)
        kwargs = dict(max_seq_len=md.max_seq_len_kv, bmm1_scale=part.detail("bmm1_scale"),
                      bmm2_scale=part.detail("bmm2_scale"), window_left=layer.window_left,
                      kv_layout=md.kv_cache_manager.layout, backend="xqa")
        if layer.sinks:
            kwargs["sinks"] = self._sinks(layer, device)
        self.launches.append({"kernel": XQA, **{k: v for k, v in kwargs.items() if not torch.is_tensor(v)},
                              "page_size": md.page_size, "sinks": bool(layer.sinks)})
        trtllm_batch_decode_with_kv_cache(q, pool, _buffer("xqa", device, WORKSPACE_BYTES), index["block_tables"],
                                          index["seq_lens"], out=out, **kwargs)

    # -- what runs, as the profiler names it ----------------------------------------------------------
    def expected_kernels(self, plan: Plan) -> list:
        """Per part: FMHAv2's generated kernels, ``fmha_v2_[il_]flash_attention_<dtype>_..._sm90_kernel``
        (the names FlashInfer's fmha_v2 generator gives them), or XQA's ``kernel_mha`` (csrc/xqa);
        FMHAv2's tile-counter memset is data movement."""
        from pytest_attn.check.traces import KernelFamily

        families = []
        for part in plan.parts or (plan,):
            if part.kernel == FMHA:
                families.append(KernelFamily("FMHAv2 (TensorRT-LLM context attention)", (r"fmha_v2_",)))
            else:
                families.append(KernelFamily("XQA (TensorRT-LLM generation)", (r"kernel_mha",)))
        return families


def _built_modules() -> Optional[set]:
    """The JIT modules FlashInfer has generated in this process (None where this version does not say,
    or where no kernel of it has run in this process)."""
    import sys

    if "flashinfer.jit.core" not in sys.modules:
        return None
    from flashinfer.jit.core import jit_spec_registry
    return set(jit_spec_registry.get_all_specs())


def _module_built(built: set, part: Plan) -> bool:
    details = dict(part.details)
    if part.kernel == FMHA:
        return details["module"] in built
    layer = part.layer
    tokens = (f"page_size_{details['page_size']}_", f"head_dim_{layer.head_dim}_",
              f"head_group_ratio_{layer.group_size}_", f"use_sliding_window_{layer.window_left >= 0}")
    return any(name.startswith("xqa") and all(t in name for t in tokens) for name in built)


class XqaGraphDecoder:
    """One XQA decode step, captured once and replayed with new lengths, page tables and a smaller
    live batch: block tables and lengths live in fixed device buffers that ``plan`` rewrites (outside
    the capture) and the captured ``run`` reads."""

    def __init__(self, backend: TrtllmBackend, manager, layer: LayerSpec, max_batch: int, device):
        import torch

        self.backend, self.manager, self.layer, self.max_batch = backend, manager, layer, max_batch
        self.device = torch.device(device)
        probe = AttentionMetadata(seq_lens=(1,), num_contexts=1, kv_cache_manager=manager, cached_lens=(0,),
                                  block_tables=((0,),))
        reasons = xqa_reasons(layer, probe, backend.sm(device))
        if backend.variant != "op":
            reasons.append("trtllm-fmha has no graph decode path (FMHAv2 is its only kernel)")
        if not budget_from_env().allows_xqa(xqa_key(layer, probe)):
            reasons.append(f"JIT budget: XQA {xqa_key(layer, probe)} is not built in this run; set {JIT_ENV}=all")
        if layer.sinks or layer.return_lse:
            reasons.append("the graph decoder covers plain decode (no sinks, no LSE)")
        if reasons:
            raise UnsupportedCase(backend.name, reasons)
        self.max_pages = manager.num_pages
        self.block_tables = torch.zeros((max_batch, self.max_pages), dtype=torch.int32, device=self.device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=self.device)
        bmm1, bmm2 = ((layer.scale * layer.k_scale, layer.v_scale) if layer.quantized_kv else (layer.scale, 1.0))
        self.scales = dict(bmm1_scale=bmm1, bmm2_scale=bmm2)

    def plan(self, metadata: AttentionMetadata) -> Plan:
        import torch

        live = metadata.num_requests
        if metadata.num_contexts or metadata.max_generation_q != 1 or live > self.max_batch:
            raise AttnInputError(f"a graph decode step takes up to {self.max_batch} one-token generation requests, "
                                 f"not {metadata.describe()}")
        rows = [list(metadata.block_tables[i][: -(-metadata.kv_lens[i] // metadata.page_size)]) for i in range(live)]
        table = torch.zeros((self.max_batch, self.max_pages), dtype=torch.int32)
        for i, pages in enumerate(rows):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        lens = torch.ones(self.max_batch, dtype=torch.int32)  # padded requests: one token of page 0
        lens[:live] = torch.tensor(metadata.kv_lens, dtype=torch.int32)
        self.block_tables.copy_(table)
        self.seq_lens.copy_(lens)
        return Plan(self.backend.name, XQA, "xqa", self.manager.layout, "pages", True, device=str(self.device),
                    layer=self.layer, details=(("cuda_graph", True), ("live_requests", live),
                                               ("padded_to", self.max_batch)))

    def run(self, q, out) -> None:
        from flashinfer.decode import trtllm_batch_decode_with_kv_cache

        layer = self.layer
        trtllm_batch_decode_with_kv_cache(q, self.manager.kv_pool(layer.layer_idx),
                                          _buffer("xqa", self.device, WORKSPACE_BYTES), self.block_tables,
                                          self.seq_lens, max_seq_len=self.max_pages * self.manager.page_size,
                                          window_left=layer.window_left, out=out, kv_layout=self.manager.layout,
                                          backend="xqa", **self.scales)


BACKENDS = [TrtllmBackend(name) for name in VARIANTS]
