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
from typing import TYPE_CHECKING, Any, Optional

from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.layer import DTYPES, KV_LAYOUTS, MASKS, LayerSpec

if TYPE_CHECKING:  # torch is imported lazily: loading the plugin must not import it
    import torch
    from pytest_attn.core.metadata import AttentionMetadata


@dataclass(frozen=True)
class Plan:
    """What a backend will run, decided without running anything. Tests assert on these fields.

    ``parts`` holds one sub-plan per kernel for batches that need several (context requests
    through a prefill wrapper, generation requests through a decode wrapper); ``launches`` is the
    plan's kernel launches either way, each with the ``requests`` and query ``tokens`` it covers.
    ``made_for`` is the batch the plan was made for (``calls.plan`` records it for every plan).
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
    requests: Optional[tuple[int, int]] = None  # [start, stop) of the batch's requests; None: all of them
    tokens: Optional[tuple[int, int]] = None  # [start, stop) of q's rows; None: all of them
    made_for: Optional["BatchShape"] = None
    handle: Any = field(default=None, compare=False, repr=False)

    @property
    def launches(self) -> tuple["Plan", ...]:
        """The kernel launches of this plan: its parts, or the plan itself when it is one launch."""
        return self.parts or (self,)

    def request_range(self, metadata: "AttentionMetadata") -> tuple[int, int]:
        """[start, stop) of the requests this launch covers in ``metadata``."""
        return self.requests if self.requests is not None else (0, metadata.num_requests)

    def token_range(self, metadata: "AttentionMetadata") -> tuple[int, int]:
        """[start, stop) of the query rows this launch covers in ``metadata``."""
        return self.tokens if self.tokens is not None else (0, metadata.num_tokens)

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
        for name in ("requests", "tokens"):
            if getattr(self, name) is not None:
                out[name] = list(getattr(self, name))
        if self.made_for is not None:
            out["made_for"] = dataclasses.asdict(self.made_for)
        if self.layer is not None:
            out["layer"] = dataclasses.asdict(self.layer)
        if self.parts:
            out["parts"] = [p.as_dict() for p in self.parts]
        return out

    def with_handle(self, handle: Any) -> "Plan":
        return dataclasses.replace(self, handle=handle)

    def start_forward(self, q, k, v, metadata: "AttentionMetadata", out=None, *, require_contiguous: bool = False,
                      cuda_only: Optional[str] = None) -> tuple[LayerSpec, "torch.Tensor"]:
        """What every forward starts with: its layer, the inputs checked against it and the batch
        (and, for ``cuda_only`` = the kernels' name, their device), and the output buffer, ``out``
        or a new one. Returns ``(layer, out)``. Strided inputs pass unless ``require_contiguous``;
        in a backend's forward, ``self.start_forward(q, k, v, metadata, plan, out)``
        (:meth:`Backend.start_forward`) passes the backend's ``requires_contiguous`` itself."""
        layer = self.layer
        if layer is None:
            raise AttnInputError("the plan carries no layer: make it with this backend's plan()")
        metadata.check_inputs(q, k, v, layer, require_contiguous=require_contiguous)
        if cuda_only and q.device.type != "cuda":
            raise AttnInputError(f"{cuda_only} on CUDA tensors; q is on {q.device}: move q, k, v to a GPU")
        self.check_batch(metadata)
        manager = metadata.kv_cache_manager
        if manager is not None:  # this step's K/V go into the cache once, before any kernel reads it
            manager.write(layer.layer_idx, metadata, k, v, k_scale=layer.k_scale, v_scale=layer.v_scale)
        if out is None:
            out = q.new_empty((q.shape[0], layer.num_heads, layer.head_dim_v))
        return layer, out

    def check_batch(self, metadata: "AttentionMetadata") -> None:
        """Raise unless this plan was made for this batch (every plan made through the suite's calls
        records it in ``made_for``)."""
        if self.made_for is not None and self.made_for != BatchShape.of(metadata):
            raise AttnInputError(f"the plan was made for another batch ({self.made_for.describe()}; this batch: "
                                 f"{metadata.describe()}): plan this batch first")

    def for_batch(self, metadata: "AttentionMetadata") -> "Plan":
        """This plan with ``made_for`` recorded (kept when the backend recorded it)."""
        return self if self.made_for is not None else dataclasses.replace(self, made_for=BatchShape.of(metadata))


@dataclass(frozen=True)
class BatchShape:
    """What a plan depends on of its batch: how many requests, of them contexts, and query tokens."""

    num_requests: int
    num_contexts: int
    num_tokens: int

    @classmethod
    def of(cls, metadata: "AttentionMetadata") -> "BatchShape":
        return cls(metadata.num_requests, metadata.num_contexts, metadata.num_tokens)

    def describe(self) -> str:
        return f"{self.num_requests} requests ({self.num_contexts} ctx), {self.num_tokens} tokens"


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run. ``None`` in head_dims means any head dim. Optional features default
    to unsupported, so a backend that predates one gets a skip with the reason, not a failure."""

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
    soft_cap: bool = False  # LayerSpec.logits_soft_cap
    sinks: bool = False  # LayerSpec.sinks
    head_dim_vo: bool = False  # V and output head dim other than q/k's
    cross_attention: bool = False  # no cache, kv_seq_lens other than seq_lens
    chunked_prefill: bool = False  # context requests with tokens already cached (chunks, reused prefixes)
    multi_token_generation: bool = False  # generation requests with several new tokens (speculative decoding)
    #: Cache dtypes other than the layer's that it reads: "float8_e4m3fn" (with scales), or a 16-bit
    #: dtype under a layer of the other one (a bf16 cache under an fp16 layer, as engines configure
    #: the KV-cache dtype apart from the model's). A cache in the layer's own dtype always works.
    kv_dtypes: frozenset = frozenset()
    lse_base: Optional[str] = None  # "e" or "2": the log-sum-exp it returns with return_lse; None: none
    #: Its kernels never load cache slots past a request's length: the cache's unused slots are then
    #: poisoned with NaN (which also catches a load multiplied by a zero weight), not a finite value.
    never_reads_masked_slots: bool = False
    #: The same inputs give the same bits, output and LSE, every run (no run-dependent reduction
    #: order: atomics, a split chosen by timing). None: not declared; measured and reported, not
    #: required (``pytest-attn properties``). True: a run that differs fails.
    deterministic: Optional[bool] = None
    #: A request's rows are the same bits whatever else is in its batch (its position, the batch's
    #: size, long requests or decodes beside it), each batch planned anew: no split-KV or tile choice
    #: that depends on the batch. None: measured and reported, not required. True: a difference fails.
    batch_invariant: Optional[bool] = None
    #: Absorbed MLA layers (LayerSpec.latent_kv: one latent KV head, V = K[..., :head_dim_vo]).
    latent_kv: bool = False


@dataclass(frozen=True)
class Tolerance:
    """How close to the reference a backend's output must be. Three checks, each relative to the
    same math done in the input precision (``ref_low``), whose error is what this precision costs
    anyway; ``ref_high`` is the reference in high precision:

    1. elementwise, the largest error over the batch (FlashAttention's rule, with multiple=2)::

           max |out - ref_high| <= multiple * max |ref_low - ref_high| + floor * rounding

       where ``rounding`` is the error of just rounding ref_high to the output dtype;
    2. the signed slope of the error along the answer, which catches a systematic bias (an
       output scaled by 1.002) that hides under the elementwise bound::

           |<out - ref_high, ref_high>| / <ref_high, ref_high>
               <= bias_multiple * |slope of ref_low| + bias_floor * u / sqrt(n)

       with u the unit roundoff of the output dtype (at least 2^-16) and n the number of
       elements (unbiased rounding errors cancel like a random walk; a bias does not). Measured
       with torch's SDPA on CPU over the catalog and 5 seeds: a correct backend stays under
       2 x |slope of ref_low| + 7 u / sqrt(n), and an output scaled by 1.002 before its final
       rounding, which passes the elementwise rule in 163 of 165 steps, lands at 25 to 1000;
    3. with ``return_lse``, the log-sum-exp elementwise, like 1.
    """

    multiple: float = 2.0
    floor: float = 2.0
    bias_multiple: float = 2.0
    bias_floor: float = 16.0


#: float32 through a fused kernel: the online softmax rescales its running sums and split-KV decoding
#: merges partial results, a summation order of its own, so its error is a few times the one-pass
#: twin's where the bf16 rule's output rounding no longer hides it. Measured on an H100 on fp32-decode:
#: flex 6.6e-7 and SDPA's efficient kernel 5.2e-7 against a twin error of 1.4e-7 and 4.3e-7 allowed by
#: the default (relative L2 error 3e-7). Still 3 orders of magnitude below a wrong mask or scale.
FUSED_FLOAT32_TOLERANCE = Tolerance(multiple=4.0, floor=8.0)


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
    #: Dotted names of test modules that test this backend alone (its own suite, kept beside it):
    #: a run that selects this backend collects them; a run that does not leaves them out.
    suite_modules: tuple[str, ...] = ()
    #: K/V layouts of the paged cache this backend reads; the cache fixture builds one per layout.
    requires_contiguous: bool = True

    def available(self) -> Availability:
        """Whether this backend can run at all here (libraries, devices). Never raises."""
        return Availability(True)

    def tolerance(self, dtype: str) -> Tolerance:
        """The tolerance for outputs of this dtype (see :class:`Tolerance`)."""
        return Tolerance()

    # -- what it supports ---------------------------------------------------------------------
    def unsupported(self, layer: LayerSpec, metadata: "AttentionMetadata", device: str = "cpu") -> list[str]:
        """Reasons this backend cannot run this layer on this batch and device; empty if it can.

        Backends extend this (call super) for hazards that capabilities cannot express.
        """
        device_type = str(device).split(":")[0]
        if device_type not in self.capabilities.devices:
            device_reasons = [f"runs on {'/'.join(sorted(self.capabilities.devices))}, not {device_type}"]
        else:
            device_reasons = []
        return device_reasons + _layer_reasons(self.capabilities, layer) + _batch_reasons(self.capabilities, layer,
                                                                                          metadata)

    # -- the work -----------------------------------------------------------------------------
    @abc.abstractmethod
    def plan(self, metadata: "AttentionMetadata", layer: LayerSpec, device: str = "cpu") -> Plan:
        """Decide how to run this layer on this batch. Runs no kernel."""

    @abc.abstractmethod
    def forward(self, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", metadata: "AttentionMetadata",
                plan: Plan, out: Optional["torch.Tensor"] = None, lse: Optional["torch.Tensor"] = None) -> "torch.Tensor":
        """Attention of q over this batch's keys; writes into ``out`` when given and returns it.

        q: [num_tokens, num_heads, head_dim]; k, v: [num_kv_tokens, num_kv_heads, head_dim (v:
        head_dim_v)], the new tokens (without a cache, every key: for cross-attention
        ``metadata.kv_seq_lens`` per request). With a kv_cache_manager, k and v are first written
        into the cache at the slots the metadata allocated (``start_forward`` does it:
        ``manager.write(layer.layer_idx, metadata, k, v, k_scale=..., v_scale=...)``) and attention
        reads the cache. out: [num_tokens,
        num_heads, head_dim_v]. When the layer has ``return_lse``, forward is also given
        ``lse=`` a float32 [num_tokens, num_heads] buffer to fill, in the base
        ``capabilities.lse_base`` says. The layer is ``plan.layer``."""

    # -- what forward starts with ------------------------------------------------------------------
    def check_inputs(self, q, k, v, metadata: "AttentionMetadata", layer: LayerSpec) -> None:
        """Raise AttnInputError, naming the problem, unless q, k, v fit this batch and layer, and are
        contiguous where this backend declares ``requires_contiguous``: the contiguity check is
        taken from the backend, so no call site chooses it."""
        metadata.check_inputs(q, k, v, layer, require_contiguous=self.requires_contiguous)

    def start_forward(self, q, k, v, metadata: "AttentionMetadata", plan: Plan, out=None, *,
                      cuda_only: Optional[str] = None) -> tuple[LayerSpec, "torch.Tensor"]:
        """What every forward starts with, as :meth:`Plan.start_forward` does it (the plan's layer,
        the inputs checked, the plan checked against the batch, ``out`` or a new buffer; with
        ``cuda_only``, the kernels' name, q refused off a GPU), the contiguity check taken from this
        backend's ``requires_contiguous``. Returns ``(layer, out)``."""
        return plan.start_forward(q, k, v, metadata, out, require_contiguous=self.requires_contiguous,
                                  cuda_only=cuda_only)

    # -- optional --------------------------------------------------------------------------------
    def readback(self, plan: Plan) -> Optional[list[str]]:
        """After a forward with ``plan``: how the live kernel's own record of what it was specialized
        with (a planned wrapper's backend, layout, window, soft-cap, scale, dtypes; a JIT module's
        name) differs from the plan, one sentence each; [] when they agree. None (the default):
        nothing to read back. The suite checks it beside the output, so a feature passed at run time
        but not at plan time fails (sglang #33915, PR #31501)."""
        return None

    def expected_kernels(self, plan: Plan) -> Optional[list]:
        """The kernel families a forward of ``plan`` launches, as
        :class:`pytest_attn.check.traces.KernelFamily` objects (or regular-expression strings, each a
        family of its own that need not launch), matched against the names a profiler records: CUDA
        kernels on a GPU, operator names (``aten::...``) on CPU. A launch outside them (and outside
        the data movement every backend does: copies, fills, indexing) fails the plan's trace test,
        naming the kernel; a required family that launched nothing fails it too. None (the
        default): no declaration, so traces are recorded and reported only."""
        return None

    def graph_decoder(self, manager, layer: LayerSpec, max_batch: int, device) -> Optional[Any]:
        """A decode step that can be captured in a CUDA graph once and replayed: an object with
        ``plan(metadata) -> Plan`` (outside the capture: writes the step's lengths and page table
        into fixed buffers, padding the live batch to ``max_batch`` one-token requests) and
        ``run(q, out)`` (what is captured: attention of q [max_batch, heads, head_dim] over
        ``manager``'s cache for the planned step). None (the default): not offered. Raises
        UnsupportedCase for a layer its graph path cannot run."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _layer_reasons(caps: Capabilities, layer: LayerSpec) -> list[str]:
    """What the capabilities rule out of a layer: its dtype, head dims, mask and features."""
    checks = [
        (layer.dtype not in caps.dtypes, f"dtype {layer.dtype} not supported (supports {', '.join(sorted(caps.dtypes))})"),
        (caps.head_dims is not None and layer.head_dim not in (caps.head_dims or ()),
         f"head_dim {layer.head_dim} not supported (supports {sorted(caps.head_dims or ())})"),
        (caps.max_head_dim is not None and layer.head_dim > (caps.max_head_dim or 0),
         f"head_dim {layer.head_dim} exceeds the maximum {caps.max_head_dim}"),
        (layer.mask not in caps.masks, f"mask {layer.mask!r} not supported"),
        (layer.group_size > 1 and not caps.gqa,
         f"grouped-query attention ({layer.num_heads} over {layer.num_kv_heads} KV heads) not supported"),
        (layer.window_left >= 0 and not caps.sliding_window, "sliding-window attention not supported"),
        (layer.logits_soft_cap > 0 and not caps.soft_cap, "logits soft-cap not supported"),
        (bool(layer.sinks) and not caps.sinks, "attention sinks not supported"),
        (layer.head_dim_v != layer.head_dim and not caps.head_dim_vo,
         f"head_dim_vo {layer.head_dim_v} != head_dim {layer.head_dim} not supported"),
        (layer.latent_kv and not caps.latent_kv,
         "absorbed MLA (latent_kv: one latent KV head, V = K's first head_dim_vo channels) not supported"),
        (layer.return_lse and caps.lse_base is None, "returning the log-sum-exp (LSE) not supported"),
    ]
    return [reason for ruled_out, reason in checks if ruled_out]


def _batch_reasons(caps: Capabilities, layer: LayerSpec, metadata: "AttentionMetadata") -> list[str]:
    """What the capabilities rule out of a batch: its shape and its cache."""
    reasons = []
    if metadata.is_cross and not caps.cross_attention:
        reasons.append("cross-attention (keys other than the queries' own tokens, without a cache) not supported")
    if metadata.has_cached_context and not caps.chunked_prefill:
        reasons.append("context requests with tokens already in the cache (chunked prefill, reused prefixes) "
                       "not supported")
    if metadata.max_generation_q > 1 and not caps.multi_token_generation:
        reasons.append(f"generation requests with {metadata.max_generation_q} new tokens (speculative decoding) "
                       "not supported")
    manager = metadata.kv_cache_manager
    if manager is None and not caps.no_cache:
        reasons.append("needs a kv_cache_manager (no ragged no-cache path)")
    if manager is not None:
        if not caps.paged_cache:
            reasons.append("no paged KV cache path")
        elif manager.layout not in caps.kv_layouts:
            reasons.append(f"paged cache layout {manager.layout} not supported")
        if manager.dtype != layer.dtype and manager.dtype not in caps.kv_dtypes:
            reasons.append(f"a {manager.dtype} KV cache under a {layer.dtype} layer not supported"
                           + (f" (reads {', '.join(sorted(caps.kv_dtypes))})" if caps.kv_dtypes else ""))
    if not caps.empty_sequences and 0 in metadata.seq_lens:
        reasons.append("requests with zero new tokens are not supported")
    return reasons
