"""One attention layer's parameters (:class:`LayerSpec`) and the dtype names everything else uses.

This sits at the bottom of the package: it imports nothing of pytest-attn but its errors, so the
metadata, the cache, the reference and the backend contract can all build on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from pytest_attn.core.errors import AttnInputError

if TYPE_CHECKING:  # torch is imported lazily: loading the plugin must not import it
    import torch

MASKS = ("causal", "full")
DTYPES = ("float16", "bfloat16", "float32")
#: Quantized KV-cache storage: the cache holds K/V divided by the layer's scale and rounded to this.
KV_DTYPES = ("float8_e4m3fn",)
KV_LAYOUTS = ("NHD", "HND")
LSE_BASES = ("e", "2")

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "e4m3": "float8_e4m3fn",
                  "float8_e4m3": "float8_e4m3fn"}


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16, 'bf16' or 'bfloat16'; the canonical names are DTYPES."""
    name = str(dtype).replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise AttnInputError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return name


def kv_dtype_name(dtype: Any) -> str:
    """A KV-cache storage dtype: one of DTYPES, or a quantized one of KV_DTYPES (fp8 = e4m3)."""
    name = _DTYPE_ALIASES.get(str(dtype).replace("torch.", ""), str(dtype).replace("torch.", ""))
    if name in KV_DTYPES:
        return name
    try:
        return dtype_name(name)
    except AttnInputError:
        raise AttnInputError(f"unsupported KV-cache dtype {dtype!r}: use one of {', '.join(DTYPES + KV_DTYPES)} "
                             "(or fp8 for float8_e4m3fn)") from None


def torch_dtype(dtype: Any) -> "torch.dtype":
    import torch

    return getattr(torch, kv_dtype_name(dtype))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer, as TensorRT-LLM's attention module carries it.

    - ``mask``: "causal" (each query sees keys up to its own position; when a request has more keys
      than queries, the queries are its *last* tokens: bottom-right alignment) or "full".
    - ``window_left``: sliding window. A query at position i sees keys j with i - window_left <= j
      (and j <= i when causal); -1 means no window. ``window_left=W`` is a window of W + 1 tokens
      with the query's own, what TensorRT-LLM calls an attention window of W + 1.
    - ``sm_scale``: scale of the logits q.k (default 1/sqrt(head_dim)).
    - ``logits_soft_cap``: when > 0, each scaled logit s becomes cap * tanh(s / cap) (Gemma 2, Grok).
    - ``sinks``: one logit per query head that joins every softmax denominator without a value
      (GPT-OSS): p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k)). The sink is not scaled or capped.
    - ``head_dim_vo``: head dim of V and of the output when it differs from q/k's (192/128).
    - ``kv_dtype``: what the paged cache stores, when not ``dtype``: "float8_e4m3fn" stores K / k_scale
      and V / v_scale rounded to e4m3, and attention uses the dequantized values (stored * scale);
      another 16-bit dtype ("bfloat16" under a "float16" layer, or the reverse) stores K and V
      rounded to it, and attention uses those rounded values. The reference reads what the cache
      holds, so a backend that keeps the unrounded K/V instead is wrong.
    - ``return_lse``: the backend also returns each query's log-sum-exp of its logits (the sink
      included), in the base its capabilities declare.
    - ``latent_kv``: absorbed multi-head latent attention (MLA: DeepSeek-V2/V3/R1, Kimi K2): K is
      [c_kv | k_pe] of head_dim = head_dim_ckv + head_dim_kpe (512 + 64) with num_kv_heads == 1, and
      V is K's first head_dim_vo (= head_dim_ckv) channels, so one latent cache serves both; q is
      [q_nope absorbed | q_pe]. Inputs of such a layer come with v == k[..., :head_dim_vo] (the
      reference needs nothing else), and a backend may read only the K pages of the cache
      (ckv = k[..., :head_dim_vo], kpe = k[..., head_dim_vo:]). MLA's scale is the un-absorbed one,
      1/sqrt(qk_nope_head_dim + qk_rope_head_dim) (1/sqrt(192) for DeepSeek-V3), set as sm_scale.
    - ``layer_idx``: which layer of the paged cache this is.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    mask: str = "causal"
    sm_scale: Optional[float] = None  # None: 1/sqrt(head_dim)
    window_left: int = -1  # -1: no sliding window
    layer_idx: int = 0
    logits_soft_cap: float = 0.0  # 0: no soft-cap
    sinks: tuple = ()  # () or one float per query head
    head_dim_vo: Optional[int] = None  # None: head_dim
    kv_dtype: Optional[str] = None  # None: dtype
    k_scale: float = 1.0
    v_scale: float = 1.0
    return_lse: bool = False
    latent_kv: bool = False  # absorbed MLA: one latent KV head, V = K[..., :head_dim_vo]

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if not _positive_int(getattr(self, name)):
                raise AttnInputError(f"LayerSpec.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise AttnInputError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}: "
                "grouped-query attention needs a whole number of query heads per KV head")
        if self.mask not in MASKS:
            raise AttnInputError(f"mask {self.mask!r} is not one of {MASKS}")
        if isinstance(self.window_left, bool) or not isinstance(self.window_left, int) or self.window_left < -1:
            raise AttnInputError(f"window_left must be -1 (no window) or >= 0, got {self.window_left!r}")
        if self.sm_scale is not None and not (_finite_number(self.sm_scale) and self.sm_scale > 0):
            raise AttnInputError(f"sm_scale must be positive, got {self.sm_scale!r}")
        if isinstance(self.layer_idx, bool) or not isinstance(self.layer_idx, int) or self.layer_idx < 0:
            raise AttnInputError(f"layer_idx must be an int >= 0, got {self.layer_idx!r}")
        if not (_finite_number(self.logits_soft_cap) and self.logits_soft_cap >= 0):
            raise AttnInputError(f"logits_soft_cap must be 0 (none) or a positive number, got {self.logits_soft_cap!r}")
        sinks = tuple(self.sinks)
        if sinks and (len(sinks) != self.num_heads or not all(_finite_number(s) for s in sinks)):
            raise AttnInputError(f"sinks must be empty or {self.num_heads} finite numbers (one per query head), "
                                 f"got {len(sinks)}")
        object.__setattr__(self, "sinks", tuple(float(s) for s in sinks))
        if self.head_dim_vo is not None and not _positive_int(self.head_dim_vo):
            raise AttnInputError(f"LayerSpec.head_dim_vo must be None or a positive int, got {self.head_dim_vo!r}")
        if self.kv_dtype is not None:
            object.__setattr__(self, "kv_dtype", kv_dtype_name(self.kv_dtype))
        for name in ("k_scale", "v_scale"):
            value = getattr(self, name)
            if not (_finite_number(value) and value > 0):
                raise AttnInputError(f"LayerSpec.{name} must be a positive number, got {value!r}")
        if not isinstance(self.return_lse, bool):
            raise AttnInputError(f"LayerSpec.return_lse must be True or False, got {self.return_lse!r}")
        self._check_latent_kv()

    def _check_latent_kv(self) -> None:
        if not isinstance(self.latent_kv, bool):
            raise AttnInputError(f"LayerSpec.latent_kv must be True or False, got {self.latent_kv!r}")
        if not self.latent_kv:
            return
        if self.num_kv_heads != 1:
            raise AttnInputError(f"latent_kv (absorbed MLA) has one latent KV head, not num_kv_heads={self.num_kv_heads}")
        if self.head_dim_vo is None or self.head_dim_vo >= self.head_dim:
            raise AttnInputError(f"latent_kv (absorbed MLA) needs head_dim_vo (the latent c_kv width, e.g. 512) below "
                                 f"head_dim (c_kv + rope, e.g. 576), got {self.head_dim}/{self.head_dim_vo}")
        if self.k_scale != self.v_scale:
            raise AttnInputError(f"latent_kv (absorbed MLA) stores K and V as one latent cache with one scale: "
                                 f"k_scale {self.k_scale:g} != v_scale {self.v_scale:g}")

    @property
    def scale(self) -> float:
        return self.sm_scale if self.sm_scale is not None else self.head_dim ** -0.5

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    @property
    def head_dim_v(self) -> int:
        """Head dim of V and the output."""
        return self.head_dim_vo if self.head_dim_vo is not None else self.head_dim

    @property
    def head_dim_rope(self) -> int:
        """Absorbed MLA: the width of the rope part of q and K (head_dim - head_dim_vo); 0 otherwise."""
        return self.head_dim - self.head_dim_v if self.latent_kv else 0

    @property
    def cache_dtype(self) -> str:
        """What the paged KV cache stores for this layer."""
        return self.kv_dtype or self.dtype

    @property
    def quantized_kv(self) -> bool:
        return self.cache_dtype in KV_DTYPES

    def describe(self) -> str:
        """One line a failure report shows: mask, window, soft-cap, sinks, scale, heads, dtypes."""
        parts = [f"{self.mask} mask" + (f", window_left {self.window_left}" if self.window_left >= 0 else "")]
        if self.logits_soft_cap > 0:
            parts.append(f"soft-cap {self.logits_soft_cap:g}")
        if self.sinks:
            parts.append(f"{len(self.sinks)} sinks")
        scale = "" if self.sm_scale is None else " (sm_scale)"
        parts.append(f"scale {self.scale:.4g}{scale}")
        heads = f"{self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}"
        if self.latent_kv:
            heads = (f"absorbed MLA {self.num_heads} heads over one latent KV head x {self.head_dim} "
                     f"(c_kv {self.head_dim_v} + rope {self.head_dim_rope}; V = c_kv)")
        parts.append(heads + (f"/{self.head_dim_vo}" if self.head_dim_vo is not None and not self.latent_kv else ""))
        parts.append(self.dtype + (f", cache {self.kv_dtype} (k_scale {self.k_scale:g}, v_scale {self.v_scale:g})"
                                   if self.kv_dtype is not None and self.kv_dtype != self.dtype else ""))
        if self.return_lse:
            parts.append("LSE")
        return ", ".join(parts)

    def features(self) -> tuple[str, ...]:
        """The optional features this layer uses, by the names Capabilities gives them."""
        found = []
        if self.window_left >= 0:
            found.append("sliding_window")
        if self.logits_soft_cap > 0:
            found.append("soft_cap")
        if self.sinks:
            found.append("sinks")
        if self.head_dim_v != self.head_dim:
            found.append("head_dim_vo")
        if self.return_lse:
            found.append("lse")
        if self.latent_kv:
            found.append("latent_kv")
        return tuple(found)
