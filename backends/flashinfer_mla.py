"""FlashInfer's absorbed-MLA kernels: ``flashinfer.mla.BatchMLAPagedAttentionWrapper``.

Absorbed multi-head latent attention (DeepSeek-V2/V3/R1, Kimi K2) is multi-query attention over one
latent KV head: K = [c_kv | k_pe] (512 + 64), V = c_kv. This project's ``LayerSpec.latent_kv``
layers are exactly that, and this backend runs them through FlashInfer's MLA wrapper, reading only
the K pages of the paged cache: the cache's K page tensor, [pages, page_size, 1, 576] (NHD or HND:
with one KV head they hold the same bytes), seen as [pages, page_size, 576], is the packed
``kv_cache`` (ckv = its first 512 channels, kpe = the rest). A batch without a cache runs as a cache
of one-token pages over the batch's own K. Every request of a step, prefill chunks, decoding and
speculative rows alike, goes through one wrapper (FlashInfer's MLA is causal bottom-right: a
request's queries are its last tokens).

``flashinfer-mla`` runs ``backend="fa2"`` (SM80 and newer), ``flashinfer-mla-fa3`` ``backend="fa3"``
(Hopper only). Every decision is made by :func:`decide`, pure Python, so CPU tests cover it; what
FlashInfer's planner refuses (read from flashinfer-python 0.7.2.post1, ``flashinfer/mla/_batch_mla/
_backends/_fa_common.py``: ``_validate_generated_fa_plan`` and ``_validate_fa_causal_tile_bound``)
is refused here first, with the reason, before anything launches. TensorRT-LLM's MLA through
FlashInfer (``backend="trtllm-gen"``, ``trtllm_batch_decode_with_kv_cache_mla``) needs SM100/SM103/
SM107 (Blackwell; ``_validate_trtllm_gen_mla_device_capability`` in ``trtllm_gen_backend.py``), so it
is not offered on the Hopper machines this project measures on.

Neither torch nor flashinfer is imported at module import; only inside methods.
"""
from __future__ import annotations

from typing import Optional

from pytest_attn.core.contract import Backend, BatchShape, Capabilities, LayerSpec, Plan
from pytest_attn.core.errors import AttnInputError, UnsupportedCase
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn.env import torch_build
from pytest_attn_backends.flashinfer import (ASSUMED_SM, PINNED_VERSION, FlashInferBackend,
                                              specialization_mismatches, workspace)

WRAPPER = "BatchMLAPagedAttentionWrapper"
#: Variants by name: the FlashInfer MLA backend each forces (``backend=`` of the wrapper).
VARIANTS = {"flashinfer-mla": "fa2", "flashinfer-mla-fa3": "fa3"}
FA3_CKV_WIDTHS = (128, 256, 512)  # fa3's PV WGMMA takes N = c_kv / 2 of 64, 128 or 256
CKV_MULTIPLE, KPE_MULTIPLE = 128, 64
FP8_WIDTHS = (512, 64)  # FlashInfer's FP8 MLA: DeepSeek's widths only
#: Query rows per work tile of FlashInfer's MLA scheduler: 64, or 128 when a request averages more
#: than 64 query rows (tokens x heads). A tile ending inside a token's heads can drop a visible key.
QUERY_TILE_ROWS = (64, 128)
MAX_WORK_ITEMS = 16384  # FlashInfer's native capacity of (query tile) work items

_FP8 = "float8_e4m3fn"


def _sm_text(sm) -> str:
    return f"sm{sm[0]}{sm[1]}"


# -- pure decisions ---------------------------------------------------------------------------------
def kv_widths(layer: LayerSpec) -> tuple[int, int]:
    """(head_dim_ckv, head_dim_kpe) of an absorbed MLA layer: V's width and the rope part's."""
    return layer.head_dim_v, layer.head_dim_rope


def query_tile_rows(q_lens, num_heads: int) -> int:
    """The query tile FlashInfer's MLA plan picks for a batch: 128 rows (a cluster of two) when the
    average request has more than 64 query rows, else 64."""
    live = list(q_lens)
    return QUERY_TILE_ROWS[1] if sum(live) * num_heads // max(len(live), 1) > 64 else QUERY_TILE_ROWS[0]


def kernel_reasons(kernel_backend: str, layer: LayerSpec, metadata: AttentionMetadata,
                   sm: tuple[int, int] = ASSUMED_SM) -> list[str]:
    """Why FlashInfer's MLA ``kernel_backend`` must not plan this layer on this batch here ([]: it may)."""
    if kernel_backend not in VARIANTS.values():
        raise AttnInputError(f"unknown FlashInfer MLA backend {kernel_backend!r}: one of {sorted(VARIANTS.values())}")
    if not layer.latent_kv:
        return ["FlashInfer's MLA wrapper runs absorbed MLA layers only (LayerSpec.latent_kv: one latent KV head, "
                "V = K[..., :head_dim_vo]); other layers run through the flashinfer backends"]
    reasons = []
    ckv, kpe = kv_widths(layer)
    if ckv % CKV_MULTIPLE or kpe % KPE_MULTIPLE:
        reasons.append(f"FlashInfer's MLA needs head_dim_ckv a multiple of {CKV_MULTIPLE} and head_dim_kpe a multiple "
                       f"of {KPE_MULTIPLE}, not {ckv} + {kpe}")
    if kernel_backend == "fa3":
        if sm[0] != 9:
            reasons.append(f"fa3 MLA needs a Hopper (sm90) GPU, this is {_sm_text(sm)}")
        if ckv not in FA3_CKV_WIDTHS:
            reasons.append(f"fa3 MLA takes head_dim_ckv {'/'.join(map(str, FA3_CKV_WIDTHS))}, not {ckv}")
    elif sm < (8, 0):
        reasons.append(f"fa2 MLA needs sm80 or newer, this is {_sm_text(sm)}")
    if layer.quantized_kv:
        if sm[0] != 9:
            reasons.append(f"FlashInfer's FP8 MLA cache needs a Hopper (sm90) GPU, this is {_sm_text(sm)}")
        if layer.dtype != "bfloat16":
            reasons.append(f"FlashInfer's FP8 MLA cache takes bfloat16 queries only, not {layer.dtype}")
        if (ckv, kpe) != FP8_WIDTHS:
            reasons.append(f"FlashInfer's FP8 MLA cache takes head_dim_ckv 512 and head_dim_kpe 64 only, not {ckv} + {kpe}")
    q_lens = metadata.seq_lens
    if layer.causal and any(n > 1 for n in q_lens) and query_tile_rows(q_lens, layer.num_heads) % layer.num_heads:
        # _validate_fa_causal_tile_bound: the scheduler rounds a tile's last query up, the kernels
        # down; FlashInfer refuses the shapes where that drops a key. Refused here whenever the
        # tile can end inside a token's heads (conservative: which keys land on a KV tile edge
        # depends on the GPU's shared memory).
        reasons.append(f"causal MLA with {layer.num_heads} heads, which do not divide the "
                       f"{query_tile_rows(q_lens, layer.num_heads)}-row query tile: FlashInfer's planner refuses the "
                       "shapes where a tile ending inside a token's heads would drop a visible key "
                       "(_validate_fa_causal_tile_bound)")
    tiles = sum(-(-n * layer.num_heads // query_tile_rows(q_lens, layer.num_heads)) for n in q_lens)
    if tiles > MAX_WORK_ITEMS:
        reasons.append(f"{tiles} query tiles exceed FlashInfer's MLA work capacity of {MAX_WORK_ITEMS}")
    return reasons


def mla_pages(metadata: AttentionMetadata) -> dict:
    """The wrapper's paged view of a batch: with a cache, the cache's pages; without one, the batch's
    own K as one-token pages (request i's keys are pages kv_rows_indptr[i]..[i+1])."""
    if metadata.has_cache:
        return {"page_size": metadata.page_size, "kv_indptr": "paged_kv_indptr", "kv_indices": "paged_kv_indices",
                "kv_source": "the cache's K pages, [pages, page_size, c_kv + rope]: ckv = K[..., :c_kv], kpe = the rest"}
    return {"page_size": 1, "kv_indptr": "kv_rows_indptr", "kv_indices": "arange(num_kv_tokens)",
            "kv_source": "no cache: the batch's K as one-token pages"}


def decide(metadata: AttentionMetadata, layer: LayerSpec, variant: str = "fa2", *, name: Optional[str] = None,
           sm: tuple[int, int] = ASSUMED_SM, version: str = PINNED_VERSION, device: str = "cuda") -> Plan:
    """The plan for this batch and layer, decided without CUDA; UnsupportedCase with FlashInfer's
    reasons when its MLA planner would refuse it."""
    name = name or next(k for k, v in VARIANTS.items() if v == variant)
    reasons = kernel_reasons(variant, layer, metadata, sm)
    if reasons:
        raise UnsupportedCase(name, reasons)
    ckv, kpe = kv_widths(layer)
    pages = mla_pages(metadata)
    layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
    kv_dtype = metadata.kv_cache_manager.dtype if metadata.has_cache else layer.dtype
    details = (("head_dim_ckv", ckv), ("head_dim_kpe", kpe), ("page_size", pages["page_size"]),
               ("causal", layer.causal), ("sm_scale", layer.scale), ("q_data_type", layer.dtype),
               ("kv_data_type", kv_dtype), ("lse_mode", "base2" if layer.return_lse else "none"),
               ("kv_indptr", pages["kv_indptr"]), ("kv_indices", pages["kv_indices"]), ("kv_source", pages["kv_source"]),
               ("flashinfer_version", version), ("sm", _sm_text(sm)))
    if layer.quantized_kv:
        details += (("kv_scales", f"ckv_scale = kpe_scale = k_scale {layer.k_scale:g} (one latent cache, one scale)"),)
    return Plan(name, WRAPPER, variant, layout, "pages", metadata.has_cache, device=str(device), layer=layer,
                details=details, made_for=BatchShape.of(metadata))


def expected_specialization(plan: Plan) -> dict:
    """What the live wrapper must have been planned with, by the attributes it keeps."""
    return {"_planned_backend_name": plan.kernel_backend, "_sm_scale": plan.detail("sm_scale"),
            "_causal": plan.detail("causal"), "_page_size": plan.detail("page_size"),
            "_head_dim_ckv": plan.detail("head_dim_ckv"), "_q_data_type": f"torch.{plan.detail('q_data_type')}",
            "_kv_data_type": f"torch.{plan.detail('kv_data_type')}"}


def call_form(mla_module) -> str:
    """How this FlashInfer's wrapper takes a plan: "canonical" (``metadata=MLAPlanMetadata.csr(...)``,
    packed ``query=``/``kv_cache=``, the form of 0.7.2.post1, whose flat form warns) or "flat" (the
    positional CSR form of the releases before it)."""
    return "canonical" if hasattr(mla_module, "MLAPlanMetadata") else "flat"



# -- the backend ------------------------------------------------------------------------------------
class FlashInferMLABackend(Backend):
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({"float16", "bfloat16"}), head_dim_vo=True, latent_kv=True,
        chunked_prefill=True, multi_token_generation=True, kv_dtypes=frozenset({_FP8}),
        lse_base="2",  # run(return_lse=True) without return_lse_base_on_e: base 2
        empty_sequences=False)
    requires_contiguous = True  # the no-cache path views k as one-token pages

    def __init__(self, name: str = "flashinfer-mla"):
        if name not in VARIANTS:
            raise ValueError(f"unknown FlashInfer MLA variant {name!r}: one of {', '.join(VARIANTS)}")
        self.name, self.variant = name, VARIANTS[name]
        self.description = f"FlashInfer's absorbed-MLA wrapper ({WRAPPER}, backend={self.variant!r}) over the K pages"

    # The same environment as the flashinfer backends: installed, torch, a CUDA device, a version.
    available = FlashInferBackend.available
    version = FlashInferBackend.version
    sm = FlashInferBackend.sm

    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        if not layer.latent_kv:  # not an MLA layer: say that first
            return kernel_reasons(self.variant, layer, metadata, self.sm(device)) + reasons
        return reasons or kernel_reasons(self.variant, layer, metadata, self.sm(device))

    def _decide(self, metadata, layer, device) -> Plan:
        return decide(metadata, layer, self.variant, name=self.name, sm=self.sm(device),
                      version=self.version() or PINNED_VERSION, device=str(device))

    # -- plan ---------------------------------------------------------------------------------------
    def plan(self, metadata: AttentionMetadata, layer: LayerSpec, device: str = "cuda") -> Plan:
        """The decision; on a GPU also the planned wrapper (``handle``). Without a GPU, the decision alone."""
        reasons = Backend.unsupported(self, layer, metadata, device)
        if reasons:
            raise UnsupportedCase(self.name, reasons)
        if not (str(device).startswith("cuda") and torch_build.cuda_available()):
            return self._decide(metadata, layer, device)
        import torch

        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        plan = self._decide(metadata, layer, device)
        return plan.with_handle(self._planned_wrapper(plan, metadata, device))

    def _planned_wrapper(self, plan: Plan, metadata: AttentionMetadata, device):
        import torch
        import flashinfer.mla as mla

        layer = plan.layer
        qo_indptr = metadata.int_tensor("qo_indptr", device)
        kv_len = metadata.int_tensor("kv_lens", device)
        if metadata.has_cache:
            kv_indptr = metadata.int_tensor("paged_kv_indptr", device)
            kv_indices = metadata.int_tensor("paged_kv_indices", device)
        else:
            kv_indptr = metadata.int_tensor("kv_rows_indptr", device)
            kv_indices = torch.arange(metadata.num_kv_tokens, dtype=torch.int32, device=device)
        wrapper = mla.BatchMLAPagedAttentionWrapper(workspace(device), backend=self.variant)
        shape = dict(num_heads=layer.num_heads, head_dim_ckv=plan.detail("head_dim_ckv"),
                     head_dim_kpe=plan.detail("head_dim_kpe"), page_size=plan.detail("page_size"),
                     causal=layer.causal, sm_scale=float(layer.scale), q_data_type=getattr(torch, layer.dtype),
                     kv_data_type=getattr(torch, plan.detail("kv_data_type")))
        if call_form(mla) == "canonical":
            wrapper.plan(metadata=mla.MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, kv_len),
                         query_layout="packed", kv_cache_layout="packed", lse_mode=plan.detail("lse_mode"), **shape)
        else:
            wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_len, *shape.values())
        return wrapper

    def readback(self, plan: Plan) -> Optional[list[str]]:
        """How the planned wrapper's record of what it was planned with (backend, scale, mask, page
        size, c_kv width, dtypes) differs from the plan; None for a plan made without a GPU."""
        if plan.handle is None:
            return None
        expected = expected_specialization(plan)
        live = {key: getattr(plan.handle, key) for key in expected if hasattr(plan.handle, key)}
        live = {key: str(got) if key.endswith("_data_type") else got for key, got in live.items()}
        return specialization_mismatches(WRAPPER, live, expected, ("_sm_scale",))

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, q, k, v, metadata: AttentionMetadata, plan: Plan, out=None, lse=None):
        layer, out = self.start_forward(q, k, v, metadata, plan, out, cuda_only="FlashInfer's MLA kernels run")
        if plan.handle is None:
            raise AttnInputError("this plan was made without a GPU (no planned wrapper): plan on a CUDA device")
        if (lse is not None) != layer.return_lse:
            raise AttnInputError("lse= is given exactly when the layer has return_lse")
        manager = metadata.kv_cache_manager  # start_forward wrote this step's K/V into it
        if manager is not None:
            pages = manager.k_cache(layer.layer_idx)  # [pages, page_size, 1, D] or [pages, 1, page_size, D]
            kv_cache = pages.view(manager.num_pages, manager.page_size, layer.head_dim)
        else:
            kv_cache = k.view(k.shape[0], 1, layer.head_dim)  # one-token pages over the batch's K
        scales = {}
        if layer.quantized_kv:
            scales = {"ckv_scale": layer.k_scale, "kpe_scale": layer.k_scale}
        import flashinfer.mla as mla

        wrapper, ckv = plan.handle, plan.detail("head_dim_ckv")
        if call_form(mla) == "canonical":
            wrapper.run(query=q, kv_cache=kv_cache, out=out, lse=lse, return_lse=lse is not None, **scales)
        else:
            wrapper.run(q[..., :ckv], q[..., ckv:], kv_cache[..., :ckv], kv_cache[..., ckv:], out=out, lse=lse,
                        return_lse=lse is not None, **scales)
        return out


BACKENDS = [FlashInferMLABackend(name) for name in VARIANTS]

