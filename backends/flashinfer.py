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
kernels take ~100 s per (dtype, head_dim) family to build (220 s while other builds share the CPU,
measured on an H100), so by default none is built and the policy runs fa2 where it would have run
fa3; ``PYTEST_ATTN_FLASHINFER_JIT=all`` builds them (see :data:`JIT_ENV`).

Neither torch nor flashinfer is imported at module import; only inside methods.
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

RAGGED = "BatchPrefillWithRaggedKVCacheWrapper"
PAGED_PREFILL = "BatchPrefillWithPagedKVCacheWrapper"
DECODE = "BatchDecodeWithPagedKVCacheWrapper"
SINK = "BatchAttentionWithAttentionSinkWrapper"

#: Variants by name: the policy, or one FlashInfer backend forced for every wrapper.
VARIANTS = {"flashinfer": "policy", "flashinfer-fa2": "fa2", "flashinfer-fa3": "fa3", "flashinfer-auto": "auto"}

PINNED_VERSION = "0.7.2.post1"  # pyproject's flashinfer extra
TOKEN_UNITS_SINCE = (0, 7)  # cuDNN paths took element offsets up to 0.6.18, token offsets from 0.7.0
ASSUMED_SM = (9, 0)  # plans made where no GPU is visible assume an H100
FA3_HEAD_DIMS = (64, 128, 256)
CUDA_CORE_DECODE_GROUPS = (1, 2, 3, 4, 6, 8, 16)  # DISPATCH_GQA_GROUP_SIZE in decode.cuh
MAX_HEAD_DIM = 256
WORKSPACE_BYTES = 256 << 20

#: Environment variable lifting the JIT budget: "all" builds fa3 for every dtype and head dim.
JIT_ENV = "PYTEST_ATTN_FLASHINFER_JIT"
#: fa3 kernel families (dtype, head_dim) built by default: none. One family took 103 s alone and
#: 220 s beside the other first-run builds on an H100, the longest wait of a first run.
DEFAULT_FA3_FAMILIES = frozenset()

#: Known kernel failures: each decision below is Python; its data (thresholds, texts, versions,
#: architectures, upstream threads) is in known_failures/flashinfer.toml.
KNOWN = known_failures.Family("flashinfer", Path(__file__).parent / "known_failures" / "flashinfer.toml")


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
    """Token offsets (qo_indptr, kv_rows_indptr) in the units a kernel takes."""
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


FA3_HEAD_DIM_PAIRS = ((64, 64), (128, 128), (256, 256), (192, 128))


def predict_auto(sm: tuple[int, int], head_dim: int, head_dim_vo: Optional[int] = None, fp8_kv: bool = False) -> str:
    """What ``backend="auto"`` resolves to for 16-bit queries (determine_attention_backend): fa3 on
    Hopper for its head-dim pairs, unless the cache is FP8 (fa3 wants FP8 queries then); else fa2.
    (A first version ignored the pair and the FP8 cache; the read-back of the live wrappers on an
    H100 showed auto resolving otherwise at 192/128 and with an FP8 cache.)"""
    pair = (head_dim, head_dim if head_dim_vo is None else head_dim_vo)
    return "fa3" if sm[0] == 9 and pair in FA3_HEAD_DIM_PAIRS and not fp8_kv else "fa2"


def _predict(sm, layer: LayerSpec) -> str:
    return predict_auto(sm, layer.head_dim, layer.head_dim_v, layer.quantized_kv)


def _sm_text(sm) -> str:
    return f"sm{sm[0]}{sm[1]}"


def kernel_hazards(kernel_backend: str, layer: LayerSpec, sm: tuple[int, int],
                   fa3_budget: Optional[frozenset] = DEFAULT_FA3_FAMILIES) -> list[str]:
    """Why ``kernel_backend`` must not launch for this layer here (empty: it may)."""
    hd = layer.head_dim
    if kernel_backend == "auto":
        resolved = _predict(sm, layer)
        why = ("fa3 covers head_dim 64/128/256 on Hopper" if resolved == "fa3"
               else f"fa3 needs head_dim 64/128/256 on Hopper, this is head_dim {hd} on {_sm_text(sm)}"
               + (" with an FP8 cache" if layer.quantized_kv else ""))
        return [f"backend='auto' resolves to {resolved} here ({why}): {r}"
                for r in kernel_hazards(resolved, layer, sm, fa3_budget)]
    if kernel_backend == "fa2":
        known = KNOWN.reasons("fa2-head-dim", sm=sm, holds=lambda p: hd % p["multiple_of"] != 0, hd=hd) or \
            KNOWN.reasons("fa2-head-dim-pair", sm=sm,
                          holds=lambda p: (hd, layer.head_dim_v) == (p["head_dim"], p["head_dim_vo"]))
        if known:
            return known
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
        if fa3_budget is not None and (layer.window_left >= 0 or layer.logits_soft_cap > 0):
            return [f"JIT budget: fa3 with a sliding window or a soft-cap is a build of its own (~100 s each, measured "
                    f"on an H100); set {JIT_ENV}=all to build it"]
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
    # conservative: only the head dims known good run (at 80 it is wrong, measured on an H100)
    reasons += KNOWN.reasons("cuda-core-decode-head-dim", sm=sm, holds=lambda p: layer.head_dim not in p["known_good"],
                             hd=layer.head_dim)
    return reasons


def feature_hazards(kernel_backend: str, kernel: str, layer: LayerSpec, metadata: AttentionMetadata,
                    sm: tuple[int, int] = ASSUMED_SM) -> list[str]:
    """What a FlashInfer kernel backend lacks of this layer's optional features (read from
    FlashInfer 0.7.2.post1's source; see the module docstring)."""
    reasons = []
    quantized = metadata.has_cache and metadata.kv_cache_manager.quantized
    if kernel_backend == "cudnn":
        if layer.window_left >= 0:
            reasons.append("FlashInfer's cuDNN path takes no sliding window (window_left)")
        if layer.logits_soft_cap > 0:
            reasons.append("FlashInfer's cuDNN path has no logit soft-cap")
        if quantized:
            reasons.append("FlashInfer's planned cuDNN path does not hand FP8 K/V scales to cuDNN")
    if kernel_backend == "fa3":
        if quantized:
            reasons.append("fa3 reads an FP8 KV cache only with FP8 queries (FlashInfer's is_fa3_backend_supported)")
        if layer.head_dim_v != layer.head_dim and (layer.head_dim, layer.head_dim_v) != (192, 128):
            reasons.append(f"fa3 has (head_dim, head_dim_vo) (64,64), (128,128), (256,256) and (192,128) only, not "
                           f"({layer.head_dim},{layer.head_dim_v})")
        if kernel in (PAGED_PREFILL, SINK) and layer.head_dim_v != layer.head_dim:
            reasons += KNOWN.reasons("fa3-paged-head-dim-vo", sm=sm)
    if kernel_backend == "fa2" and kernel == PAGED_PREFILL and layer.window_left >= 0 and not layer.causal \
            and metadata.has_cached_context:
        reasons += KNOWN.reasons("fa2-paged-noncausal-window-cached", sm=sm)
    if kernel == DECODE and layer.head_dim_v != layer.head_dim:
        reasons.append("the decode wrapper has one head dim for K and V")
    return reasons


def specialization_mismatches(where: str, live: dict, expected: dict, float_keys=()) -> list[str]:
    """Each key whose value a live wrapper recorded (``live``) differs from the plan's (``expected``),
    as a sentence; keys the wrapper does not record are skipped, floats compared to 1e-6."""
    mismatches = []
    for key, want in expected.items():
        got = live.get(key, _MISSING)
        if got is _MISSING:
            continue  # this wrapper does not record it
        same = math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=0.0) if key in float_keys else got == want
        if not same:
            name = key.lstrip("_")
            mismatches.append(f"{where}: the plan says {name}={want!r}, the live wrapper was planned with {name}={got!r}")
    return mismatches


@dataclass(frozen=True)
class Route:
    """One wrapper launch: requests [start, stop) of the batch through ``kernel``."""

    kernel: str
    kernel_backend: str
    start: int
    stop: int
    tensor_cores: bool = False  # decode only: run the prefill (tensor-core) kernels


def _hazards(kernel_backend: str, kernel: str, layer, metadata, sm, fa3_budget) -> list[str]:
    resolved = _predict(sm, layer) if kernel_backend == "auto" else kernel_backend
    return kernel_hazards(kernel_backend, layer, sm, fa3_budget) + feature_hazards(resolved, kernel, layer, metadata, sm)


def _first_clean(candidates, kernel: str, layer, metadata, sm, fa3_budget) -> tuple[str, list[str]]:
    """The first kernel backend with no hazard for this launch, or the first one and every
    candidate's reasons."""
    every = []
    for backend in candidates:
        reasons = _hazards(backend, kernel, layer, metadata, sm, fa3_budget)
        if not reasons:
            return backend, []
        every += [f"{backend}: {r}" for r in reasons]
    return candidates[0], ["no FlashInfer kernel backend runs this: " + "; ".join(every)]


def route(metadata: AttentionMetadata, layer: LayerSpec, variant: str, sm: tuple[int, int] = ASSUMED_SM,
          fa3_budget: Optional[frozenset] = DEFAULT_FA3_FAMILIES,
          version: str = PINNED_VERSION) -> tuple[list[Route], list[str], str]:
    """(launches, reasons not to run, why this routing). Context requests come first in a batch."""
    if variant not in VARIANTS.values():
        raise AttnInputError(f"unknown FlashInfer variant {variant!r}: one of {sorted(VARIANTS.values())}")
    n, c, hd = metadata.num_requests, metadata.num_contexts, layer.head_dim
    if layer.sinks:
        return _sink_route(metadata, layer, variant, sm, fa3_budget)
    if not metadata.has_cache:
        if variant == "policy":
            backend, reasons = _first_clean(("cudnn", "fa3", "fa2"), RAGGED, layer, metadata, sm, fa3_budget)
            why = "" if backend == "cudnn" else f"{backend}: the cuDNN path lacks a feature of this layer"
        else:
            backend, reasons, why = variant, _hazards(variant, RAGGED, layer, metadata, sm, fa3_budget), ""
        return [Route(RAGGED, backend, 0, n)], reasons, why
    if variant == "policy":
        prefill, reasons = _first_clean(("fa3", "fa2", "cudnn"), PAGED_PREFILL, layer, metadata, sm, fa3_budget)
        if reasons:
            return [Route(PAGED_PREFILL, prefill, 0, n)], reasons, ""
    else:
        prefill = variant
    multi_token_generation = any(s != 1 for s in metadata.seq_lens[c:])
    if prefill == "cudnn" and cudnn_index_units(version) == "elements":
        return [], [f"cuDNN paged prefill in FlashInfer {version} takes element offsets and block tables that this "
                    "backend does not build: install flashinfer-python>=0.7 for head_dim "
                    f"{hd} with a cache"], ""
    if prefill == "cudnn" or multi_token_generation or layer.head_dim_v != hd:
        why = (f"all requests through the paged prefill wrapper: fa2/fa3 and the decode kernels are unsafe at "
               f"head_dim {hd} (FlashInfer #4299)" if prefill == "cudnn" else
               "all requests through the paged prefill wrapper: the decode wrapper takes one query token per request"
               if multi_token_generation else
               "all requests through the paged prefill wrapper: the decode wrapper has one head dim for K and V")
        return [Route(PAGED_PREFILL, prefill, 0, n)], _hazards(prefill, PAGED_PREFILL, layer, metadata, sm,
                                                               fa3_budget), why
    routes, reasons = [], []
    if c:
        routes.append(Route(PAGED_PREFILL, prefill, 0, c))
        reasons += _hazards(prefill, PAGED_PREFILL, layer, metadata, sm, fa3_budget)
    if n > c:
        if variant in ("fa2", "fa3"):  # forced: the decode wrapper runs that backend's tensor-core kernels
            decode = Route(DECODE, variant, c, n, tensor_cores=True)
        else:
            cuda_core = layer.group_size in CUDA_CORE_DECODE_GROUPS and (variant == "auto" or hd in FA3_HEAD_DIMS)
            backend = "auto" if variant == "auto" else ("fa2" if cuda_core else prefill)
            decode = Route(DECODE, backend, c, n, tensor_cores=not cuda_core)
        routes.append(decode)
        decode_reasons = decode_hazards(decode.kernel_backend, decode.tensor_cores, layer, sm, fa3_budget)
        if decode.tensor_cores:
            decode_reasons += feature_hazards(decode.kernel_backend, DECODE, layer, metadata, sm)
        reasons += [r for r in decode_reasons if r not in reasons]
    return routes, reasons, ""


def _sink_route(metadata, layer, variant, sm, fa3_budget) -> tuple[list[Route], list[str], str]:
    """Attention sinks: every request through BatchAttentionWithAttentionSinkWrapper (a paged prefill
    wrapper; q_len 1 is its decode). The plain wrappers drop ``sinks=`` for fa2/fa3 without a word."""
    n = metadata.num_requests
    reasons = []
    if not metadata.has_cache:
        reasons.append("attention sinks need a paged cache here: the ragged wrapper takes no sinks, and "
                       "BatchAttentionWithAttentionSinkWrapper is a paged wrapper")
    backend = "fa2" if variant == "policy" else variant  # fa2: one sink build; fa3 would be one more (~100 s)
    if layer.logits_soft_cap > 0:
        reasons.append("the sink wrapper's AttentionSink variant has no logit soft-cap")
    if layer.return_lse:
        reasons.append("whether the sink wrapper's LSE counts the sink is not established; not offered")
    if metadata.has_cache and metadata.kv_cache_manager.quantized:
        reasons.append("the sink wrapper with an FP8 KV cache is not offered (its scales are unverified)")
    reasons += kernel_hazards(backend, layer, sm, fa3_budget)
    return [Route(SINK, backend, 0, n)], reasons, "every request through the attention-sink wrapper"


def expected_specialization(part: "Plan") -> dict:
    """What the live wrapper of one part must have been planned with (plan_wrapper below does it)."""
    layer = part.layer
    spec = {"kernel": part.kernel, "kv_layout": part.detail("kernel_kv_layout", part.layout),
            "window_left": layer.window_left, "logits_soft_cap": float(layer.logits_soft_cap),
            "sm_scale": layer.scale, "q_data_type": layer.dtype, "kv_data_type": part.detail("kv_data_type")}
    if part.kernel != DECODE:
        spec["causal"] = layer.causal
    else:
        spec["use_tensor_cores"] = bool(part.detail("tensor_cores"))
    backend = part.detail("predicted_backend") or part.kernel_backend
    if not (part.kernel == DECODE and not part.detail("tensor_cores")):
        spec["backend"] = backend
    return spec


def decide(metadata: AttentionMetadata, layer: LayerSpec, variant: str = "policy", *, name: Optional[str] = None,
           sm: tuple[int, int] = ASSUMED_SM, version: str = PINNED_VERSION, device: str = "cuda",
           fa3_budget: Optional[frozenset] = DEFAULT_FA3_FAMILIES, routed=None) -> Plan:
    """The plan for this batch and layer, decided without CUDA; UnsupportedCase on a known hazard.
    ``routed``: what :func:`route` already returned for this batch and layer (it is not run again)."""
    name = name or next(k for k, v in VARIANTS.items() if v == variant)
    routes, reasons, why = routed or route(metadata, layer, variant, sm, fa3_budget, version)
    if reasons:
        raise UnsupportedCase(name, reasons)
    common = (("flashinfer_version", version), ("sm", _sm_text(sm)))
    layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
    kv_dtype = metadata.kv_cache_manager.dtype if metadata.has_cache else layer.dtype
    qo = metadata.qo_indptr
    parts = []
    for r in routes:
        units = "pages" if r.kernel == DECODE else (cudnn_index_units(version) if r.kernel_backend == "cudnn" else "tokens")
        details = [("kv_data_type", kv_dtype)]  # the layer's own parameters are read from part.layer
        if r.kernel == DECODE:
            details.append(("tensor_cores", r.tensor_cores))
        elif r.kernel in (PAGED_PREFILL, SINK):
            details.append(("kv_index_units", "pages"))
        if r.kernel_backend == "auto":
            details.append(("predicted_backend", "fa2" if r.kernel == DECODE else _predict(sm, layer)))
        parts.append(Plan(name, r.kernel, r.kernel_backend, layout, units, metadata.has_cache, device=str(device),
                          layer=layer, details=tuple(details) + common, requests=(r.start, r.stop),
                          tokens=(qo[r.start], qo[r.stop])))
    made_for = BatchShape.of(metadata)
    extra = (("routing", why),) if why else ()
    if len(parts) == 1:
        return dataclasses.replace(parts[0], details=parts[0].details + extra, made_for=made_for)
    prefill_part = parts[0]
    return Plan(name, "+".join(p.kernel for p in parts), "+".join(p.kernel_backend for p in parts), layout,
                prefill_part.index_units, True, device=str(device), layer=layer, parts=tuple(parts),
                details=common + extra, made_for=made_for)


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
    suite_modules = ("pytest_attn_backends.suites.test_flashinfer_gpu",)
    capabilities = Capabilities(
        devices=frozenset({"cuda"}), dtypes=frozenset({"float16", "bfloat16"}), max_head_dim=MAX_HEAD_DIM,
        sliding_window=True, soft_cap=True, sinks=True, head_dim_vo=True, cross_attention=True,
        # A 16-bit cache in the other 16-bit dtype (bf16 under fp16) is not declared: its wrappers
        # are planned with q_data_type and kv_data_type, but its 16-bit kernels are instantiated for
        # equal ones, and forward converts nothing.
        chunked_prefill=True, multi_token_generation=True, kv_dtypes=frozenset({"float8_e4m3fn"}),
        lse_base="2",  # fa2/fa3 write base-2 LSE; cuDNN's is converted to base 2 (lse_base="log2")
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
        return flashinfer_version()

    def sm(self, device) -> tuple[int, int]:
        if str(device).startswith("cuda") and torch_build.cuda_available():
            import torch

            return tuple(torch.cuda.get_device_capability(device))
        return ASSUMED_SM

    def _route(self, metadata, layer, device):
        """route() for this batch and layer, once: the suite asks unsupported() and then plan() of
        the same metadata object, and the decision is made once (the last one is kept)."""
        key = (layer, self.sm(device), fa3_budget_from_env(), self.version() or PINNED_VERSION)
        last = self.__dict__.get("_last_route")
        if last is not None and last[0] is metadata and last[1] == key:
            return last[2]
        routed = route(metadata, layer, self.variant, *key[1:])
        self.__dict__["_last_route"] = (metadata, key, routed)
        return routed

    def _decide(self, metadata, layer, device) -> Plan:
        sm, budget, version = self.sm(device), fa3_budget_from_env(), self.version() or PINNED_VERSION
        return decide(metadata, layer, self.variant, name=self.name, sm=sm, version=version, device=str(device),
                      fa3_budget=budget, routed=self._route(metadata, layer, device))

    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        if reasons:
            return reasons
        return self._route(metadata, layer, device)[1]

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
        for part in plan.launches:
            wrapper = self._planned_wrapper(part, self._subset(metadata, *part.request_range(metadata)), device)
            resolved = _resolved_backend(wrapper)
            known = resolved == "fa2" and KNOWN.reasons("fa2-head-dim", sm=self.sm(device), hd=layer.head_dim,
                                                        holds=lambda p: layer.head_dim % p["multiple_of"] != 0)
            if known:  # the live wrapper chose fa2 where it is a known crash: refuse before the launch
                raise UnsupportedCase(self.name, [f"{part.kernel} resolved to fa2: {reason}" for reason in known])
            kv_layout = self.ragged_kv_layout if part.kernel == RAGGED else part.layout
            parts.append(dataclasses.replace(part, details=part.details + (("resolved_backend", resolved),
                                                                           ("kernel_kv_layout", kv_layout))))
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
               layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.head_dim_v, layer.dtype,
               part.detail("kv_data_type"), layer.mask, layer.window_left, layer.scale, layer.logits_soft_cap)
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            wrapper = self._wrappers[key] = self._make_wrapper(part, layout, tensor_cores, device)
        batch = (metadata.qo_indptr, metadata.cu_kv_lens)
        if metadata.has_cache:
            batch += (metadata.paged_kv_indptr, metadata.paged_kv_indices, metadata.paged_kv_last_page_len,
                      metadata.page_size)
        if self._planned_for.get(key) != batch:
            self._planned_for.pop(key, None)  # a plan() that raises leaves the wrapper unplanned
            self._plan_wrapper(wrapper, part, metadata, device)
            self._planned_for[key] = batch
        return wrapper

    def _make_wrapper(self, part: Plan, layout: str, tensor_cores: bool, device, **graph_buffers):
        import flashinfer
        import torch

        ws = workspace(device)
        kernel, kernel_backend = part.kernel, part.kernel_backend
        if kernel == RAGGED:
            return flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, kv_layout=layout, backend=kernel_backend)
        if kernel == PAGED_PREFILL:
            return flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, kv_layout=layout, backend=kernel_backend)
        if kernel == SINK:
            layer = part.layer
            return flashinfer.BatchAttentionWithAttentionSinkWrapper(
                ws, kv_layout=layout, backend=kernel_backend, q_data_type=getattr(torch, layer.dtype),
                kv_data_type=getattr(torch, part.detail("kv_data_type")), head_dim_qk=layer.head_dim,
                head_dim_vo=layer.head_dim_v, window_left=layer.window_left)
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, kv_layout=layout, use_tensor_cores=tensor_cores,
                                                            backend=kernel_backend, **graph_buffers)

    def _plan_wrapper(self, wrapper, part: Plan, md: AttentionMetadata, device) -> None:
        import torch

        layer = part.layer
        dtype = getattr(torch, layer.dtype)
        kv_dtype = getattr(torch, part.detail("kv_data_type"))
        heads, kv_heads, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
        features = dict(window_left=layer.window_left, sm_scale=layer.scale, q_data_type=dtype, kv_data_type=kv_dtype)
        if part.kernel != SINK:
            features["logits_soft_cap"] = layer.logits_soft_cap or None

        def ints(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        if part.kernel == DECODE:
            wrapper.plan(md.int_tensor("paged_kv_indptr", device), md.int_tensor("paged_kv_indices", device),
                         md.int_tensor("paged_kv_last_page_len", device), heads, kv_heads, hd, md.page_size,
                         pos_encoding_mode="NONE", **features)
            return
        units = part.index_units
        qo_indptr = ints(kernel_offsets(md.qo_indptr, units, heads, hd))
        common = dict(causal=layer.causal, head_dim_vo=layer.head_dim_v, **features)
        if part.kernel == RAGGED:
            if part.kernel_backend == "cudnn":  # maxima in tokens, whatever the offsets' units
                common.update(max_token_per_sequence=md.max_seq_len_q, max_sequence_kv=md.max_seq_len_kv)
                if units == "elements":  # before 0.7 cuDNN took the lengths separately, [batch, 1, 1, 1]
                    common.update(seq_lens=md.int_tensor("kv_lens", device).view(-1, 1, 1, 1),
                                  seq_lens_q=md.int_tensor("seq_lens", device).view(-1, 1, 1, 1))
            wrapper.plan(qo_indptr, ints(kernel_offsets(md.kv_rows_indptr, units, kv_heads, hd)), heads, kv_heads, hd,
                         **common)
        else:
            wrapper.plan(qo_indptr, md.int_tensor("paged_kv_indptr", device), md.int_tensor("paged_kv_indices", device),
                         md.int_tensor("paged_kv_last_page_len", device), heads, kv_heads, hd, md.page_size, **common)

    # -- the plan, read back from the live wrappers -------------------------------------------------
    def readback(self, plan: Plan) -> Optional[list[str]]:
        """Each way a planned wrapper's own record of what it was specialized with (resolved backend,
        layout, window, soft-cap, scale, mask, dtypes, tensor cores, sinks wrapper) differs from the
        plan, as a sentence; [] when they agree; None for a plan made without a GPU (no wrappers)."""
        if not plan.handle:
            return None
        mismatches = []
        for part, wrapper in zip(plan.launches, plan.handle):
            mismatches += specialization_mismatches(part.kernel, live_specialization(wrapper, part.kernel),
                                                    expected_specialization(part), ("sm_scale", "logits_soft_cap"))
        return mismatches

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, q, k, v, metadata: AttentionMetadata, plan: Plan, out=None, lse=None):
        layer, out = self.start_forward(q, k, v, metadata, plan, out, cuda_only="FlashInfer runs")
        manager = metadata.kv_cache_manager  # start_forward wrote this step's K/V into it
        cache = None
        if manager is not None:
            pool = manager.kv_pool(layer.layer_idx)
            cache = pool if pool is not None else (manager.k_cache(layer.layer_idx), manager.v_cache(layer.layer_idx))
        for part in plan.launches:
            start, stop = part.request_range(metadata)
            t0, t1 = part.token_range(metadata)
            wrapper = self._planned_wrapper(part, self._subset(metadata, start, stop), q.device)
            extra = {}
            if lse is not None:
                extra.update(lse=lse[t0:t1], return_lse=True)
            if part.kernel == RAGGED:
                self._ragged_run(wrapper, q, k, v, out, layer, **extra)
                continue
            extra["window_left"] = layer.window_left
            if manager.quantized:
                extra.update(k_scale=layer.k_scale, v_scale=layer.v_scale)
            if part.kernel == SINK:
                wrapper.run(q[t0:t1], cache, _sinks_tensor(layer, q.device), layer.scale, out=out[t0:t1], **extra)
            else:
                wrapper.run(q[t0:t1], cache, out=out[t0:t1], **extra)
        return out

    def _ragged_run(self, wrapper, q, k, v, out, layer: LayerSpec, **extra) -> None:
        """The ragged launch; K/V are [tokens, kv_heads, head_dim] (NHD), as the wrapper was built."""
        wrapper.run(q, k, v, out=out, **extra)

    # -- CUDA-graph decode ----------------------------------------------------------------------------
    def graph_decoder(self, manager, layer: LayerSpec, max_batch: int, device) -> Optional["GraphDecoder"]:
        """A decode step that can be captured in a CUDA graph once and replayed with new lengths,
        page tables and a smaller live batch (padded to ``max_batch``): a BatchDecodeWithPagedKVCache
        wrapper built with ``use_cuda_graph=True`` over fixed buffers, re-planned in place before each
        replay. None where this variant's decode route cannot run the layer."""
        return GraphDecoder(self, manager, layer, max_batch, device)

    # -- what runs, as the profiler names it ----------------------------------------------------------
    def expected_kernels(self, plan: Plan) -> list:
        """Per part, the kernels of the backend it resolved to (read from FlashInfer 0.7.2.post1's
        sources): cuDNN's generated SDPA kernels; fa2's ``flashinfer::BatchPrefillWithRaggedKVCacheKernel``,
        ``BatchPrefillWithPagedKVCacheKernel`` (paged prefill, the sink wrapper, tensor-core decode)
        and ``BatchDecodeWithPagedKVCacheKernel`` (CUDA-core decode); fa3's Hopper
        ``PrefillWithKVCacheKernel``; and the split-KV merge kernels (``MergeStates*``,
        ``VariableLengthMergeStates*``, ``AttentionSum*``), which may run or not."""
        from pytest_attn.check.traces import KernelFamily

        cudnn = (r"(?i)cudnn", r"(?i)sdpa", r"flash_fprop")
        fa3 = (r"\b(FP8)?PrefillWithKVCacheKernel",)
        families = []
        for part in plan.parts or (plan,):
            backend = part.detail("resolved_backend") or part.detail("predicted_backend") or part.kernel_backend
            if part.kernel == DECODE and not part.detail("tensor_cores"):
                patterns, what = (r"BatchDecodeWithPagedKVCacheKernel",), "fa2 decode (CUDA cores)"
            elif backend == "cudnn":
                patterns, what = cudnn, "cuDNN SDPA"
            elif backend == "fa3":
                patterns, what = fa3, "fa3 prefill (Hopper)"
            elif part.kernel == RAGGED:
                patterns, what = (r"BatchPrefillWithRaggedKVCacheKernel",), "fa2 ragged prefill"
            else:
                patterns, what = (r"BatchPrefillWithPagedKVCacheKernel",), "fa2 paged prefill"
            families.append(KernelFamily(f"{part.kernel}: {what}", patterns))
        families.append(KernelFamily("FlashInfer split-KV merge", (r"MergeState", r"AttentionSum"), required=False))
        return families


_MISSING = object()
_SINKS: dict = {}


def _sinks_tensor(layer: LayerSpec, device):
    """The layer's sinks on the device, made once (a copy from the host cannot be captured in a graph)."""
    import torch

    key = (layer.sinks, str(device))
    if key not in _SINKS:
        _SINKS[key] = torch.tensor(layer.sinks, dtype=torch.float32, device=device)
    return _SINKS[key]


def _dtype_text(value) -> Optional[str]:
    return None if value is None else str(value).replace("torch.", "")


def live_specialization(wrapper, kernel: str) -> dict:
    """What a planned FlashInfer wrapper records of its specialization (attribute names of 0.7.2.post1;
    an attribute this version does not set is left out, not guessed)."""
    found = {"kernel": type(wrapper).__name__}
    for key, attr in (("kv_layout", "_kv_layout"), ("window_left", "_window_left"),
                      ("logits_soft_cap", "_logits_soft_cap"), ("sm_scale", "_sm_scale"), ("causal", "_causal"),
                      ("use_tensor_cores", "_use_tensor_cores")):
        value = getattr(wrapper, attr, _MISSING)
        if value is not _MISSING and value is not None:
            found[key] = value
    for key, attr in (("q_data_type", "_cached_q_data_type"), ("kv_data_type", "_cached_kv_data_type")):
        value = getattr(wrapper, attr, None)
        if value is not None:
            found[key] = _dtype_text(value)
    if kernel != DECODE or getattr(wrapper, "_use_tensor_cores", False):
        found["backend"] = _resolved_backend(wrapper)
    return found


class GraphDecoder:
    """One decode step, captured once and replayed: FlashInfer's ``use_cuda_graph=True`` decode wrapper
    over buffers sized for ``max_batch`` requests. ``plan(metadata)`` (outside the capture) writes the
    step's lengths and page table into those buffers, padding the live batch with one-token requests
    on a page of its own; ``run(q, out)`` is what gets captured."""

    def __init__(self, backend: FlashInferBackend, manager, layer: LayerSpec, max_batch: int, device):
        import torch

        self.backend, self.manager, self.layer, self.max_batch = backend, manager, layer, max_batch
        self.device = torch.device(device)
        group_ok = layer.group_size in CUDA_CORE_DECODE_GROUPS and layer.head_dim in FA3_HEAD_DIMS
        self.tensor_cores = not group_ok
        self.kernel_backend = "fa2"
        reasons = decode_hazards(self.kernel_backend, self.tensor_cores, layer, backend.sm(device),
                                 fa3_budget_from_env())
        if layer.sinks or layer.head_dim_v != layer.head_dim or layer.return_lse:
            reasons.append("the graph decoder covers plain decode (no sinks, one head dim, no LSE)")
        if reasons:
            raise UnsupportedCase(backend.name, reasons)
        self.indptr = torch.zeros(max_batch + 1, dtype=torch.int32, device=self.device)
        self.indices = torch.zeros(manager.num_pages + max_batch, dtype=torch.int32, device=self.device)
        self.last_page_len = torch.ones(max_batch, dtype=torch.int32, device=self.device)
        import flashinfer

        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace(self.device), kv_layout=manager.layout, use_cuda_graph=True, use_tensor_cores=self.tensor_cores,
            backend=self.kernel_backend, paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.indices,
            paged_kv_last_page_len_buffer=self.last_page_len)
        self.pad_page = 0  # padded requests read one token of page 0; their rows are never compared
        self.planned: Optional[Plan] = None

    def plan(self, metadata: AttentionMetadata) -> Plan:
        import torch

        live = metadata.num_requests
        if metadata.num_contexts or metadata.max_generation_q != 1 or live > self.max_batch:
            raise AttnInputError(f"a graph decode step takes up to {self.max_batch} one-token generation requests, "
                                 f"not {metadata.describe()}")
        pad = self.max_batch - live
        indptr = list(metadata.paged_kv_indptr)
        indptr += [indptr[-1] + i + 1 for i in range(pad)]
        indices = list(metadata.paged_kv_indices) + [self.pad_page] * pad
        last = list(metadata.paged_kv_last_page_len) + [1] * pad
        layer = self.layer
        self.wrapper.plan(torch.tensor(indptr, dtype=torch.int32), torch.tensor(indices, dtype=torch.int32),
                          torch.tensor(last, dtype=torch.int32), layer.num_heads, layer.num_kv_heads, layer.head_dim,
                          metadata.page_size, pos_encoding_mode="NONE", window_left=layer.window_left,
                          logits_soft_cap=layer.logits_soft_cap or None, sm_scale=layer.scale,
                          q_data_type=getattr(torch, layer.dtype),
                          kv_data_type=getattr(torch, metadata.kv_cache_manager.dtype))
        self.planned = Plan(self.backend.name, DECODE, self.kernel_backend, metadata.kv_cache_manager.layout, "pages",
                            True, device=str(self.device), layer=layer,
                            details=(("cuda_graph", True), ("live_requests", live), ("padded_to", self.max_batch),
                                     ("tensor_cores", self.tensor_cores)))
        return self.planned

    def run(self, q, out) -> None:
        layer, manager = self.layer, self.manager
        pool = manager.kv_pool(layer.layer_idx)
        extra = {"window_left": layer.window_left}
        if manager.quantized:
            extra.update(k_scale=layer.k_scale, v_scale=layer.v_scale)
        self.wrapper.run(q, pool, out=out, **extra)


BACKENDS = [FlashInferBackend(name) for name in VARIANTS]
