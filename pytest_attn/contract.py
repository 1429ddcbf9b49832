"""The Backend contract: what every attention backend in ``backends/`` (or an entry point) provides.

A backend declares what it supports and answers, for a case it cannot run, *why* (as xformers'
operators do), so the suite can skip with a reason before anything is launched. ``plan`` decides
everything (wrapper, kernel backend, layout, index units, cache use) and returns an inspectable
:class:`Plan` without running a kernel; ``forward`` runs that plan.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from .errors import AttnInputError

if TYPE_CHECKING:  # torch is imported lazily: loading the plugin must not import it
    import torch
    from .metadata import AttentionMetadata

MASKS = ("causal", "full")
DTYPES = ("float16", "bfloat16", "float32")
KV_LAYOUTS = ("NHD", "HND")


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16, 'bf16' or 'bfloat16'; the canonical names are DTYPES."""
    name = str(dtype).replace("torch.", "")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise AttnInputError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return name


def torch_dtype(dtype: Any) -> "torch.dtype":
    import torch

    return getattr(torch, dtype_name(dtype))


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer's parameters: what TensorRT-LLM's attention module carries."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    mask: str = "causal"
    sm_scale: Optional[float] = None  # None: 1/sqrt(head_dim)
    window_left: int = -1  # -1: no sliding window
    layer_idx: int = 0

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise AttnInputError(f"LayerSpec.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise AttnInputError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}: "
                "grouped-query attention needs a whole number of query heads per KV head")
        if self.mask not in MASKS:
            raise AttnInputError(f"mask {self.mask!r} is not one of {MASKS}")
        if isinstance(self.window_left, bool) or not isinstance(self.window_left, int) or self.window_left < -1:
            raise AttnInputError(f"window_left must be -1 (no window) or >= 0, got {self.window_left!r}")
        if self.sm_scale is not None and (isinstance(self.sm_scale, bool) or not isinstance(self.sm_scale, (int, float))
                                          or not self.sm_scale > 0):
            raise AttnInputError(f"sm_scale must be positive, got {self.sm_scale!r}")
        if isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, int) or self.layer_idx < 0:
            raise AttnInputError(f"layer_idx must be an int >= 0, got {self.layer_idx!r}")

    @property
    def scale(self) -> float:
        return self.sm_scale if self.sm_scale is not None else self.head_dim ** -0.5

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def causal(self) -> bool:
        return self.mask == "causal"


@dataclass(frozen=True)
class Plan:
    """What a backend will run, decided without running anything. Tests assert on these fields.

    ``parts`` holds one sub-plan per kernel for batches that need several (context requests
    through a prefill wrapper, generation requests through a decode wrapper).
    ``handle`` is the backend's private state (a planned wrapper, say); it takes no part in
    comparisons or repr.
    """

    backend: str
    kernel: str  # the wrapper or function that runs, e.g. "BatchPrefillWithRaggedKVCacheWrapper"
    kernel_backend: str  # which implementation under it, e.g. "cudnn", "fa2", "flash", "math"
    layout: str  # layout of K/V as the kernel reads them: "NHD" or "HND"
    index_units: str  # units of the offsets the kernel is given: "tokens", "elements" or "pages"
    reads_cache: bool
    device: str = "cpu"
    layer: Optional[LayerSpec] = None  # what forward() needs of the layer: scale, mask, layer_idx
    parts: tuple["Plan", ...] = ()
    details: tuple[tuple[str, Any], ...] = ()
    handle: Any = field(default=None, compare=False, repr=False)

    @property
    def kernels(self) -> tuple[str, ...]:
        """Every kernel this plan launches, sub-plans included."""
        if not self.parts:
            return (self.kernel,)
        return tuple(k for p in self.parts for k in p.kernels)

    def detail(self, key: str, default: Any = None) -> Any:
        return dict(self.details).get(key, default)

    def describe(self) -> str:
        """One line for reports and benchmark rows."""
        if self.parts:
            return " + ".join(p.describe() for p in self.parts)
        cache = "paged cache" if self.reads_cache else "no cache"
        return f"{self.kernel}[{self.kernel_backend}] {self.layout} {self.index_units} {cache}"

    def as_dict(self) -> dict:
        out = {
            "backend": self.backend, "kernel": self.kernel, "kernel_backend": self.kernel_backend,
            "layout": self.layout, "index_units": self.index_units, "reads_cache": self.reads_cache,
            "device": self.device, "details": {k: _jsonable(v) for k, v in self.details},
        }
        if self.layer is not None:
            out["layer"] = dataclasses.asdict(self.layer)
        if self.parts:
            out["parts"] = [p.as_dict() for p in self.parts]
        return out

    def with_handle(self, handle: Any) -> "Plan":
        return dataclasses.replace(self, handle=handle)


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run. ``None`` in head_dims means any head dim."""

    devices: frozenset = frozenset({"cpu", "cuda"})
    dtypes: frozenset = frozenset(DTYPES)
    head_dims: Optional[frozenset] = None
    masks: frozenset = frozenset(MASKS)
    gqa: bool = True
    no_cache: bool = True
    paged_cache: bool = True
    kv_layouts: frozenset = frozenset(KV_LAYOUTS)
    sliding_window: bool = False
    empty_sequences: bool = True  # requests with zero new tokens
    max_head_dim: Optional[int] = None


@dataclass(frozen=True)
class Tolerance:
    """The output passes when, elementwise maximum over the batch,

        |out - ref_high| <= multiple * |ref_low - ref_high| + floor * rounding

    where ref_high is the reference in high precision, ref_low the same math done in the input
    precision (its error is what this precision costs anyway), and ``rounding`` the error of just
    rounding ref_high to the input dtype. FlashAttention's tests use this rule with multiple=2.
    """

    multiple: float = 2.0
    floor: float = 2.0


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class Backend(abc.ABC):
    """Subclass this in a module of ``backends/`` (or a package's ``pytest_attn.backends`` entry
    point) and expose instances through a module-level ``BACKENDS`` list or a ``backends()``
    function."""

    name: str = ""
    description: str = ""
    capabilities: Capabilities = Capabilities()
    #: K/V layouts of the paged cache this backend reads; the cache fixture builds one per layout.
    requires_contiguous: bool = True

    def available(self) -> Availability:
        """Whether this backend can run at all here (libraries, devices). Never raises."""
        return Availability(True)

    def tolerance(self, dtype: str) -> Tolerance:
        return Tolerance()

    # -- what it supports ---------------------------------------------------------------------
    def unsupported(self, layer: LayerSpec, metadata: "AttentionMetadata", device: str = "cpu") -> list[str]:
        """Reasons this backend cannot run this layer on this batch and device; empty if it can.

        Backends extend this (call super) for hazards that capabilities cannot express.
        """
        caps, reasons = self.capabilities, []
        device_type = str(device).split(":")[0]
        if device_type not in caps.devices:
            reasons.append(f"runs on {'/'.join(sorted(caps.devices))}, not {device_type}")
        if layer.dtype not in caps.dtypes:
            reasons.append(f"dtype {layer.dtype} not supported (supports {', '.join(sorted(caps.dtypes))})")
        if caps.head_dims is not None and layer.head_dim not in caps.head_dims:
            reasons.append(f"head_dim {layer.head_dim} not supported (supports {sorted(caps.head_dims)})")
        if caps.max_head_dim is not None and layer.head_dim > caps.max_head_dim:
            reasons.append(f"head_dim {layer.head_dim} exceeds the maximum {caps.max_head_dim}")
        if layer.mask not in caps.masks:
            reasons.append(f"mask {layer.mask!r} not supported")
        if layer.group_size > 1 and not caps.gqa:
            reasons.append(f"grouped-query attention ({layer.num_heads} over {layer.num_kv_heads} KV heads) not supported")
        if layer.window_left >= 0 and not caps.sliding_window:
            reasons.append("sliding-window attention not supported")
        manager = metadata.kv_cache_manager
        if manager is None and not caps.no_cache:
            reasons.append("needs a kv_cache_manager (no ragged no-cache path)")
        if manager is not None:
            if not caps.paged_cache:
                reasons.append("no paged KV cache path")
            elif manager.layout not in caps.kv_layouts:
                reasons.append(f"paged cache layout {manager.layout} not supported")
        if not caps.empty_sequences and 0 in metadata.seq_lens:
            reasons.append("requests with zero new tokens are not supported")
        return reasons

    # -- the work -----------------------------------------------------------------------------
    @abc.abstractmethod
    def plan(self, metadata: "AttentionMetadata", layer: LayerSpec, device: str = "cpu") -> Plan:
        """Decide how to run this layer on this batch. Runs no kernel."""

    @abc.abstractmethod
    def forward(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor",
                metadata: "AttentionMetadata", plan: Plan, out: Optional["torch.Tensor"] = None) -> "torch.Tensor":
        """Attention of q over this batch's keys. q: [num_tokens, num_heads, head_dim]; k, v: the
        new tokens [num_tokens, num_kv_heads, head_dim]. With a kv_cache_manager, k and v are
        first written into the cache (at the slots the metadata allocated) and attention reads
        the cache. Writes into ``out`` when given and returns it."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def check_backend(obj: Any, origin: str) -> Backend:
    """Fail early, naming the origin, when something registered is not a usable backend."""
    if not isinstance(obj, Backend):
        raise TypeError(f"{origin} registered {obj!r}, which is not a pytest_attn.Backend instance")
    if not obj.name or not isinstance(obj.name, str) or "," in obj.name or obj.name == "all":
        raise TypeError(f"{origin}: backend {obj!r} needs a name without commas (and not 'all')")
    return obj
