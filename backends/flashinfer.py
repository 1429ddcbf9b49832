"""FlashInfer backends: the ragged, paged-prefill and decode wrappers of ``flashinfer-python``.

Without a kv_cache_manager (the ViT encoder case) attention goes to
``BatchPrefillWithRaggedKVCacheWrapper`` with ``backend="cudnn"``, K/V in NHD, as TensorRT-LLM
PR #12911 does; its layout bug (TRT-LLM #13190) shipped because the test only looked at
``wrapper._backend``, so the plan here records layout and offset units too and the suite checks
the output. With a cache, context requests go to ``BatchPrefillWithPagedKVCacheWrapper`` and
one-token generation requests to ``BatchDecodeWithPagedKVCacheWrapper``, both reading the
project's paged cache (NHD or HND) directly.

Every decision is made by :func:`decide`, pure Python, so CPU tests cover it. Known crashes are
refused (``unsupported``) before anything launches: fa2 at head dims that are not multiples of 64
hits an illegal memory access or gives wrong results (FlashInfer issue #4299) and poisons the
CUDA context; fa3 has kernels for head dims 64/128/256 only. JIT builds are budgeted: fa3
kernels take ~100 s per (dtype, head_dim) family to build, so by default only one family is
built (see :data:`JIT_ENV`).

Neither torch nor flashinfer is imported at module import; only inside methods.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from pytest_attn import torch_build
from pytest_attn.contract import Availability, Backend, Capabilities, LayerSpec, Plan
from pytest_attn.errors import AttnInputError, UnsupportedCase
from pytest_attn.metadata import AttentionMetadata

RAGGED = "BatchPrefillWithRaggedKVCacheWrapper"
PAGED_PREFILL = "BatchPrefillWithPagedKVCacheWrapper"
DECODE = "BatchDecodeWithPagedKVCacheWrapper"

#: Variants by name: the policy, or one FlashInfer backend forced for every wrapper.
VARIANTS = {"flashinfer": "policy", "flashinfer-fa2": "fa2", "flashinfer-fa3": "fa3", "flashinfer-auto": "auto"}

PINNED_VERSION = "0.7.2.post1"  # pyproject's flashinfer extra
TOKEN_UNITS_SINCE = (0, 7)  # cuDNN paths took element offsets up to 0.6.18, token offsets from 0.7.0
ASSUMED_SM = (9, 0)  # plans made where no GPU is visible assume an H100
FA3_HEAD_DIMS = (64, 128, 256)
FA2_SAFE_HEAD_DIM_MULTIPLE = 64  # FlashInfer #4299: other head dims crash or compute garbage
CUDA_CORE_DECODE_GROUPS = (1, 2, 3, 4, 6, 8, 16)  # DISPATCH_GQA_GROUP_SIZE in decode.cuh
MAX_HEAD_DIM = 256
WORKSPACE_BYTES = 256 << 20

#: Environment variable lifting the JIT budget: "all" builds fa3 for every dtype and head dim.
JIT_ENV = "PYTEST_ATTN_FLASHINFER_JIT"
#: fa3 kernel families (dtype, head_dim) built by default: one build of ~100 s.
DEFAULT_FA3_FAMILIES = frozenset({("bfloat16", 128)})

_REASON_4299 = ("fa2 at head_dim {hd} is a known crash: head dims that are not multiples of 64 hit an "
                "illegal memory access (multiples of 16) or give wrong results (others), which poisons the "
                "CUDA context (FlashInfer issue #4299)")


# -- pure decisions ---------------------------------------------------------------------------------
def cudnn_index_units(version: str) -> str:
    """Units of the offsets FlashInfer's cuDNN paths take: "elements" (offset * heads * head_dim)
    up to 0.6.18, "tokens" from 0.7.0 on (0.7.2.post1 raises when given elements)."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release
    except InvalidVersion:
        raise AttnInputError(f"cannot parse the FlashInfer version {version!r}: expected e.g. {PINNED_VERSION}") from None
    return "tokens" if release[:2] >= TOKEN_UNITS_SINCE else "elements"


def kernel_offsets(offsets, units: str, heads: int, head_dim: int) -> tuple[int, ...]:
    """Token offsets (qo_indptr, kv_indptr) in the units a kernel takes."""
    if units == "tokens":
        return tuple(offsets)
    if units == "elements":
        return tuple(o * heads * head_dim for o in offsets)
    raise AttnInputError(f"offset units {units!r}: use 'tokens' or 'elements'")


def fa3_budget_from_env(environ: Mapping[str, str] = os.environ) -> Optional[frozenset]:
    """fa3 families this run may build; None: every family (``PYTEST_ATTN_FLASHINFER_JIT=all``)."""
    value = environ.get(JIT_ENV, "").strip().lower()
    if value == "all":
        return None
    if value not in ("", "default"):
        raise AttnInputError(f"{JIT_ENV}={value!r}: use 'all' (build every fa3 kernel family) or leave it unset")
    return DEFAULT_FA3_FAMILIES


def predict_auto(sm: tuple[int, int], head_dim: int) -> str:
    """What ``backend="auto"`` resolves to for 16-bit prefill (determine_attention_backend)."""
    return "fa3" if sm[0] == 9 and head_dim in FA3_HEAD_DIMS else "fa2"


def _sm_text(sm) -> str:
    return f"sm{sm[0]}{sm[1]}"


def kernel_hazards(kernel_backend: str, layer: LayerSpec, sm: tuple[int, int],
                   fa3_budget: Optional[frozenset] = DEFAULT_FA3_FAMILIES) -> list[str]:
    """Why ``kernel_backend`` must not launch for this layer here (empty: it may)."""
    hd = layer.head_dim
    if kernel_backend == "auto":
        resolved = predict_auto(sm, hd)
        why = ("fa3 covers head_dim 64/128/256 on Hopper" if resolved == "fa3"
               else f"fa3 needs head_dim 64/128/256 on Hopper, this is head_dim {hd} on {_sm_text(sm)}")
        return [f"backend='auto' resolves to {resolved} here ({why}): {r}"
                for r in kernel_hazards(resolved, layer, sm, fa3_budget)]
    if kernel_backend == "fa2":
        if hd % FA2_SAFE_HEAD_DIM_MULTIPLE:
            return [_REASON_4299.format(hd=hd)]
        return [] if hd <= MAX_HEAD_DIM else [f"fa2 supports head_dim up to {MAX_HEAD_DIM}, not {hd}"]
    if kernel_backend == "fa3":
        if sm[0] != 9:
            return [f"fa3 needs a Hopper (sm90) GPU, this is {_sm_text(sm)}"]
        if hd not in FA3_HEAD_DIMS:
            return [f"fa3 is built for head dims 64/128/256 only (a static assert in its kernels), not {hd}"]
        if fa3_budget is not None and (layer.dtype, hd) not in fa3_budget:
            allowed = ", ".join(f"{d} head_dim {h}" for d, h in sorted(fa3_budget)) or "none"
            return [f"JIT budget: fa3 kernels for {layer.dtype} head_dim {hd} are not built in this run (each "
                    f"fa3 family takes ~100 s to build; this run builds {allowed}); set {JIT_ENV}=all to build it"]
        return []
    if kernel_backend == "cudnn":
        reasons = []
        if sm < (8, 0):
            reasons.append(f"cuDNN attention needs sm80 or newer, this is {_sm_text(sm)}")
        if hd % 8 or hd > MAX_HEAD_DIM:
            reasons.append(f"cuDNN attention needs head_dim a multiple of 8 up to {MAX_HEAD_DIM}, not {hd}")
        return reasons
    raise AttnInputError(f"unknown FlashInfer kernel backend {kernel_backend!r}")


def decode_hazards(kernel_backend: str, tensor_cores: bool, layer: LayerSpec, sm: tuple[int, int],
                   fa3_budget: Optional[frozenset] = DEFAULT_FA3_FAMILIES) -> list[str]:
    if tensor_cores:  # the decode wrapper runs the prefill kernels; "auto" picks fa2 for 16-bit data
        resolved = "fa2" if kernel_backend == "auto" else kernel_backend
        prefix = "tensor-core decode with backend='auto' resolves to fa2: " if kernel_backend == "auto" else ""
        return [prefix + r for r in kernel_hazards(resolved, layer, sm, fa3_budget)]
    reasons = []
    if layer.group_size not in CUDA_CORE_DECODE_GROUPS:
        reasons.append(f"CUDA-core decode supports query groups {CUDA_CORE_DECODE_GROUPS}, not {layer.group_size}")
    if layer.head_dim not in FA3_HEAD_DIMS:  # conservative: same kernel family as #4299
        # Measured on an H100 (FlashInfer 0.7.2.post1): at head_dim 80 this kernel returns wrong
        # outputs (relative error 0.6-0.8) without any error; its tensor-core form crashes (#4299).
        reasons.append(f"CUDA-core decode is not trusted at head_dim {layer.head_dim}: only 64/128/256 are "
                       "known good; at head_dim 80 it silently returns wrong outputs (relative error 0.6-0.8 "
                       "measured on an H100) and fa2-family kernels crash there (FlashInfer issue #4299)")
    return reasons


@dataclass(frozen=True)
class Route:
    """One wrapper launch: requests [start, stop) of the batch through ``kernel``."""

    kernel: str
    kernel_backend: str
    start: int
    stop: int
    tensor_cores: bool = False  # decode only: run the prefill (tensor-core) kernels


def route(metadata: AttentionMetadata, layer: LayerSpec, variant: str, sm: tuple[int, int] = ASSUMED_SM,
          fa3_budget: Optional[frozenset] = DEFAULT_FA3_FAMILIES,
          version: str = PINNED_VERSION) -> tuple[list[Route], list[str], str]:
    """(launches, reasons not to run, why this routing). Context requests come first in a batch."""
    if variant not in VARIANTS.values():
        raise AttnInputError(f"unknown FlashInfer variant {variant!r}: one of {sorted(VARIANTS.values())}")
    n, c, hd = metadata.num_requests, metadata.num_contexts, layer.head_dim
    if not metadata.has_cache:
        backend = "cudnn" if variant == "policy" else variant
        return [Route(RAGGED, backend, 0, n)], kernel_hazards(backend, layer, sm, fa3_budget), ""
    if variant == "policy":
        if sm[0] == 9 and hd in FA3_HEAD_DIMS and (fa3_budget is None or (layer.dtype, hd) in fa3_budget):
            prefill = "fa3"
        elif hd % FA2_SAFE_HEAD_DIM_MULTIPLE == 0 and hd <= MAX_HEAD_DIM:
            prefill = "fa2"
        else:
            prefill = "cudnn"  # fa2 and fa3 would crash (#4299) or have no kernel at this head dim
    else:
        prefill = variant
    multi_token_generation = any(s != 1 for s in metadata.seq_lens[c:])
    if prefill == "cudnn" and cudnn_index_units(version) == "elements":
        return [], [f"cuDNN paged prefill in FlashInfer {version} takes element offsets and block tables that this "
                    "backend does not build: install flashinfer-python>=0.7 for head_dim "
                    f"{hd} with a cache"], ""
    if prefill == "cudnn" or multi_token_generation:
        why = (f"all requests through the paged prefill wrapper: fa2/fa3 and the decode kernels are unsafe at "
               f"head_dim {hd} (FlashInfer #4299)" if prefill == "cudnn" else
               "all requests through the paged prefill wrapper: the decode wrapper takes one query token per request")
        return [Route(PAGED_PREFILL, prefill, 0, n)], kernel_hazards(prefill, layer, sm, fa3_budget), why
    routes, reasons = [], []
    if c:
        routes.append(Route(PAGED_PREFILL, prefill, 0, c))
        reasons += kernel_hazards(prefill, layer, sm, fa3_budget)
    if n > c:
        if variant in ("fa2", "fa3"):  # forced: the decode wrapper runs that backend's tensor-core kernels
            decode = Route(DECODE, variant, c, n, tensor_cores=True)
        else:
            cuda_core = layer.group_size in CUDA_CORE_DECODE_GROUPS and (variant == "auto" or hd in FA3_HEAD_DIMS)
            backend = "auto" if variant == "auto" else ("fa2" if cuda_core else prefill)
            decode = Route(DECODE, backend, c, n, tensor_cores=not cuda_core)
        routes.append(decode)
        reasons += [r for r in decode_hazards(decode.kernel_backend, decode.tensor_cores, layer, sm, fa3_budget)
                    if r not in reasons]
    return routes, reasons, ""


def decide(metadata: AttentionMetadata, layer: LayerSpec, variant: str = "policy", *, name: Optional[str] = None,
           sm: tuple[int, int] = ASSUMED_SM, version: str = PINNED_VERSION, device: str = "cuda",
           fa3_budget: Optional[frozenset] = DEFAULT_FA3_FAMILIES) -> Plan:
    """The plan for this batch and layer, decided without CUDA; UnsupportedCase on a known hazard."""
    name = name or next(k for k, v in VARIANTS.items() if v == variant)
    routes, reasons, why = route(metadata, layer, variant, sm, fa3_budget, version)
    if reasons:
        raise UnsupportedCase(name, reasons)
    common = (("flashinfer_version", version), ("sm", _sm_text(sm)))
    layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
    qo = metadata.qo_indptr
    parts = []
    for r in routes:
        units = "pages" if r.kernel == DECODE else (cudnn_index_units(version) if r.kernel_backend == "cudnn" else "tokens")
        details = [("requests", (r.start, r.stop)), ("tokens", (qo[r.start], qo[r.stop]))]
        if r.kernel == DECODE:
            details.append(("tensor_cores", r.tensor_cores))
        elif r.kernel == PAGED_PREFILL:
            details.append(("kv_index_units", "pages"))
        if r.kernel_backend == "auto":
            details.append(("predicted_backend", "fa2" if r.kernel == DECODE else predict_auto(sm, layer.head_dim)))
        parts.append(Plan(name, r.kernel, r.kernel_backend, layout, units, metadata.has_cache, device=str(device),
                          layer=layer, details=tuple(details) + common))
    batch = (("num_requests", metadata.num_requests), ("num_contexts", metadata.num_contexts),
             ("num_tokens", metadata.num_tokens))
    extra = (("routing", why),) if why else ()
    if len(parts) == 1:
        return dataclasses.replace(parts[0], details=parts[0].details + batch + extra)
    prefill_part = parts[0]
    return Plan(name, "+".join(p.kernel for p in parts), "+".join(p.kernel_backend for p in parts), layout,
                prefill_part.index_units, True, device=str(device), layer=layer, parts=tuple(parts),
                details=common + batch + extra)


def installed_version() -> Optional[str]:
    """flashinfer's version from package metadata (no import), or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("flashinfer-python", "flashinfer"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    if importlib.util.find_spec("flashinfer") is None:
        return None
    import flashinfer

    return getattr(flashinfer, "__version__", None)


# -- the backend ------------------------------------------------------------------------------------
_WORKSPACES: dict = {}  # one float workspace per device, shared by every wrapper and layer


def workspace(device) -> "object":
    import torch

    key = str(device)
    if key not in _WORKSPACES:
        # zeroed: the decode wrapper needs a zeroed buffer on first use
        _WORKSPACES[key] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _WORKSPACES[key]


def _resolved_backend(wrapper) -> str:
    resolved = getattr(wrapper, "resolved_backend", None)  # the decode wrapper's own answer
    return str(resolved if isinstance(resolved, str) else getattr(wrapper, "_backend", "unknown"))


class FlashInferBackend(Backend):
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({"float16", "bfloat16"}), max_head_dim=MAX_HEAD_DIM,
        sliding_window=False,  # cuDNN rejects window_left; not offered on the other paths either
        empty_sequences=False)
    #: K/V layout given to the ragged wrapper. cuDNN's ragged graph reads NHD only (TRT-LLM #13190).
    ragged_kv_layout = "NHD"

    def __init__(self, name: str = "flashinfer"):
        if name not in VARIANTS:
            raise ValueError(f"unknown FlashInfer variant {name!r}: one of {', '.join(VARIANTS)}")
        self.name, self.variant = name, VARIANTS[name]
        self.description = ("FlashInfer: cuDNN ragged prefill without a cache; paged prefill + decode with one"
                            if self.variant == "policy" else f"FlashInfer with backend={self.variant!r} for every wrapper")
        self._wrappers: dict = {}  # (device, kernel, backend, layout, tensor cores, layer) -> wrapper
        self._planned_for: dict = {}  # same key -> the batch its wrapper was last planned for

    # -- environment --------------------------------------------------------------------------------
    def available(self) -> Availability:
        if importlib.util.find_spec("flashinfer") is None:
            return Availability(False, "flashinfer is not installed: pip install flashinfer-python "
                                       f"(pytest-attn[flashinfer] pins {PINNED_VERSION})")
        if not torch_build.is_installed():
            return Availability(False, "torch is not installed: pip install torch")
        if not torch_build.cuda_available():  # (a CPU build of torch answers without being imported)
            return Availability(False, "no CUDA device (FlashInfer runs on NVIDIA GPUs only)")
        version = self.version()
        if version is None:
            return Availability(False, "cannot read flashinfer's version: reinstall flashinfer-python")
        return Availability(True)

    def version(self) -> Optional[str]:
        return installed_version()

    def sm(self, device) -> tuple[int, int]:
        if str(device).startswith("cuda") and torch_build.cuda_available():
            import torch

            return tuple(torch.cuda.get_device_capability(device))
        return ASSUMED_SM

    def _decide(self, metadata, layer, device) -> Plan:
        return decide(metadata, layer, self.variant, name=self.name, sm=self.sm(device),
                      version=self.version() or PINNED_VERSION, device=str(device), fa3_budget=fa3_budget_from_env())

    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        if reasons:
            return reasons
        _, hazards, _ = route(metadata, layer, self.variant, self.sm(device), fa3_budget_from_env(),
                              self.version() or PINNED_VERSION)
        return hazards

    # -- plan ---------------------------------------------------------------------------------------
    def plan(self, metadata: AttentionMetadata, layer: LayerSpec, device: str = "cuda") -> Plan:
        """The decision; on a GPU also the planned wrappers (``handle``, one per part) and what each
        resolved to (``resolved_backend``). Without a GPU, the decision alone (handle None)."""
        import torch

        reasons = Backend.unsupported(self, layer, metadata, device)  # what the capabilities rule out
        if reasons:
            raise UnsupportedCase(self.name, reasons)
        if not (str(device).startswith("cuda") and torch.cuda.is_available()):
            return self._decide(metadata, layer, device)
        device = torch.device(device)
        if device.index is None:  # one wrapper cache and workspace per GPU, whichever way it is named
            device = torch.device("cuda", torch.cuda.current_device())
        plan = self._decide(metadata, layer, device)
        parts, wrappers = [], []
        for part in plan.parts or (plan,):
            start, stop = part.detail("requests")
            wrapper = self._planned_wrapper(part, self._subset(metadata, start, stop), device)
            resolved = _resolved_backend(wrapper)
            if resolved == "fa2" and layer.head_dim % FA2_SAFE_HEAD_DIM_MULTIPLE:
                raise UnsupportedCase(self.name, [f"{part.kernel} resolved to fa2: " + _REASON_4299.format(hd=layer.head_dim)])
            parts.append(dataclasses.replace(part, details=part.details + (("resolved_backend", resolved),)))
            wrappers.append(wrapper)
        if plan.parts:
            resolved = "+".join(p.detail("resolved_backend") for p in parts)
            plan = dataclasses.replace(plan, parts=tuple(parts), details=plan.details + (("resolved_backend", resolved),))
        else:
            plan = parts[0]
        return plan.with_handle(tuple(wrappers))

    @staticmethod
    def _subset(metadata: AttentionMetadata, start: int, stop: int) -> AttentionMetadata:
        return metadata if (start, stop) == (0, metadata.num_requests) else metadata.subset(start, stop)

    def _planned_wrapper(self, part: Plan, metadata: AttentionMetadata, device):
        """The wrapper for this part's parameters (made once), planned for this batch (again only
        when the batch changed)."""
        layer = part.layer
        tensor_cores = bool(part.detail("tensor_cores", False))
        layout = self.ragged_kv_layout if part.kernel == RAGGED else part.layout
        key = (str(device), part.kernel, part.kernel_backend, layout, tensor_cores, part.index_units,
               layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.dtype, layer.mask, layer.window_left,
               layer.scale)
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            wrapper = self._wrappers[key] = self._make_wrapper(part.kernel, part.kernel_backend, layout,
                                                               tensor_cores, device)
        batch = (metadata.qo_indptr, metadata.kv_indptr)
        if metadata.has_cache:
            batch += (metadata.paged_kv_indptr, metadata.paged_kv_indices, metadata.paged_kv_last_page_len,
                      metadata.page_size)
        if self._planned_for.get(key) != batch:
            self._planned_for.pop(key, None)  # a plan() that raises leaves the wrapper unplanned
            self._plan_wrapper(wrapper, part, metadata, device)
            self._planned_for[key] = batch
        return wrapper

    def _make_wrapper(self, kernel: str, kernel_backend: str, layout: str, tensor_cores: bool, device):
        import flashinfer

        ws = workspace(device)
        if kernel == RAGGED:
            return flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, kv_layout=layout, backend=kernel_backend)
        if kernel == PAGED_PREFILL:
            return flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, kv_layout=layout, backend=kernel_backend)
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, kv_layout=layout, use_tensor_cores=tensor_cores,
                                                            backend=kernel_backend)

    def _plan_wrapper(self, wrapper, part: Plan, md: AttentionMetadata, device) -> None:
        import torch

        layer = part.layer
        dtype = getattr(torch, layer.dtype)
        heads, kv_heads, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim

        def ints(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        if part.kernel == DECODE:
            wrapper.plan(md.int_tensor("paged_kv_indptr", device), md.int_tensor("paged_kv_indices", device),
                         md.int_tensor("paged_kv_last_page_len", device), heads, kv_heads, hd, md.page_size,
                         pos_encoding_mode="NONE", window_left=-1, sm_scale=layer.scale,
                         q_data_type=dtype, kv_data_type=dtype)
            return
        units = part.index_units
        qo_indptr = ints(kernel_offsets(md.qo_indptr, units, heads, hd))
        common = dict(causal=layer.causal, sm_scale=layer.scale, q_data_type=dtype, kv_data_type=dtype)
        if part.kernel == RAGGED:
            if part.kernel_backend == "cudnn":  # maxima in tokens, whatever the offsets' units
                common.update(max_token_per_sequence=md.max_seq_len_q, max_sequence_kv=md.max_seq_len_kv)
                if units == "elements":  # before 0.7 cuDNN took the lengths separately, [batch, 1, 1, 1]
                    common.update(seq_lens=md.int_tensor("kv_lens", device).view(-1, 1, 1, 1),
                                  seq_lens_q=md.int_tensor("seq_lens", device).view(-1, 1, 1, 1))
            wrapper.plan(qo_indptr, ints(kernel_offsets(md.kv_indptr, units, kv_heads, hd)), heads, kv_heads, hd,
                         **common)
        else:
            wrapper.plan(qo_indptr, md.int_tensor("paged_kv_indptr", device), md.int_tensor("paged_kv_indices", device),
                         md.int_tensor("paged_kv_last_page_len", device), heads, kv_heads, hd, md.page_size, **common)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, q, k, v, metadata: AttentionMetadata, plan: Plan, out=None):
        import torch

        layer = plan.layer
        if layer is None:
            raise AttnInputError("the plan carries no layer: make it with this backend's plan()")
        metadata.check_inputs(q, k, v, layer, require_contiguous=True)
        if q.device.type != "cuda":
            raise AttnInputError(f"FlashInfer runs on CUDA tensors; q is on {q.device}: move q, k, v to a GPU")
        made_for = (plan.detail("num_requests"), plan.detail("num_contexts"), plan.detail("num_tokens"))
        if made_for != (metadata.num_requests, metadata.num_contexts, metadata.num_tokens):
            raise AttnInputError(f"the plan was made for another batch (requests, contexts, tokens = {made_for}, "
                                 f"this batch: {metadata.describe()}): plan this batch first")
        if out is None:
            out = torch.empty_like(q)
        manager = metadata.kv_cache_manager
        if manager is not None:
            manager.write(layer.layer_idx, metadata, k, v)
            cache = (manager.k_cache(layer.layer_idx), manager.v_cache(layer.layer_idx))
        for part in plan.parts or (plan,):
            start, stop = part.detail("requests")
            t0, t1 = part.detail("tokens")
            wrapper = self._planned_wrapper(part, self._subset(metadata, start, stop), q.device)
            if part.kernel == RAGGED:
                self._ragged_run(wrapper, q, k, v, out, layer)
            else:
                wrapper.run(q[t0:t1], cache, out=out[t0:t1])
        return out

    def _ragged_run(self, wrapper, q, k, v, out, layer: LayerSpec) -> None:
        """The ragged launch; K/V are [tokens, kv_heads, head_dim] (NHD), as the wrapper was built."""
        wrapper.run(q, k, v, out=out)


BACKENDS = [FlashInferBackend(name) for name in VARIANTS]
