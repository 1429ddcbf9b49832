"""Batch metadata, modelled on TensorRT-LLM's PyTorch ``AttentionMetadata``.

Lengths and offsets are plain Python tuples, so backends can make their plan decisions (and the
CPU tests can check them) without a GPU; ``*_tensor`` methods give int32 tensors on a device.

``kv_cache_manager is None`` means a ragged batch with no cache: every request is a context
request whose keys are its own new tokens (the ViT / encoder case), or, for cross-attention,
``kv_seq_lens`` keys of its own (encoder-decoder, VLM cross-attention). With a manager (a
``pytest_attn.core.kv_cache.PagedKVCacheManager``), metadata is made by its ``prepare``, which allocates
the pages of this step's tokens; a context request may then already have tokens in the cache
(chunked prefill, a reused prefix) and a generation request may bring several new tokens
(speculative decoding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Optional, Sequence

from pytest_attn.core.errors import AttnInputError, warn_deprecated

if TYPE_CHECKING:
    import torch
    from pytest_attn.core.layer import LayerSpec


def pages_for(tokens: int, page_size: int) -> int:
    """Cache pages that ``tokens`` tokens fill (the last one possibly in part)."""
    return -(-tokens // page_size)


def _as_lengths(values, what: str) -> tuple[int, ...]:
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    try:
        lengths = tuple(values)
    except TypeError:
        raise AttnInputError(f"{what} must be a sequence of ints, got {values!r}") from None
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int):
            raise AttnInputError(f"{what}[{i}] = {n!r} is not an int")
        if n < 0:
            raise AttnInputError(f"{what}[{i}] = {n} is negative: a request has zero or more tokens")
    return lengths


def lengths_from_offsets(offsets, what: str = "offsets") -> tuple[int, ...]:
    """Sequence lengths from cumulative offsets (cu_seqlens / indptr), which must start at 0 and
    never decrease."""
    offs = _as_lengths(offsets, what)
    if len(offs) < 2:
        raise AttnInputError(f"{what} needs at least two entries (0 and the total), got {list(offs)}")
    if offs[0] != 0:
        raise AttnInputError(f"{what} must start at 0, got {offs[0]}")
    for i in range(1, len(offs)):
        if offs[i] < offs[i - 1]:
            raise AttnInputError(
                f"{what} is not monotonic: {what}[{i}] = {offs[i]} < {what}[{i - 1}] = {offs[i - 1]}")
    return tuple(b - a for a, b in zip(offs, offs[1:]))


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    seq_lens: tuple[int, ...]  # new (query) tokens per request in this step
    num_contexts: int  # the first num_contexts requests are context (prefill) requests
    request_ids: tuple[int, ...] = ()
    kv_cache_manager: Optional["PagedKVCacheManager"] = None
    cached_lens: tuple[int, ...] = ()  # tokens each request had in the cache before this step
    block_tables: tuple[tuple[int, ...], ...] = ()  # the cache pages of each request, in order
    kv_seq_lens: tuple[int, ...] = ()  # no cache: keys per request when not seq_lens (cross-attention)
    _tensors: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        seq_lens = _as_lengths(self.seq_lens, "seq_lens")
        object.__setattr__(self, "seq_lens", seq_lens)
        n = len(seq_lens)
        if n == 0:
            raise AttnInputError("a batch needs at least one request (seq_lens is empty)")
        ids = tuple(self.request_ids) if self.request_ids else tuple(range(n))
        if len(ids) != n:
            raise AttnInputError(f"{len(ids)} request_ids for {n} requests: give one id per entry of seq_lens")
        if len(set(ids)) != n:
            raise AttnInputError(f"request_ids repeat an id: {list(ids)}")
        object.__setattr__(self, "request_ids", ids)
        if isinstance(self.num_contexts, bool) or not isinstance(self.num_contexts, int) or not 0 <= self.num_contexts <= n:
            raise AttnInputError(f"num_contexts={self.num_contexts!r} must be an int between 0 and the {n} requests")
        if self.kv_cache_manager is None:
            self._check_without_cache(seq_lens, ids)
        else:
            self._check_with_cache(seq_lens, ids)

    def _check_without_cache(self, seq_lens: tuple[int, ...], ids: tuple[int, ...]) -> None:
        """Every request a context request, each attending over its own tokens or its kv_seq_lens."""
        n = len(seq_lens)
        if self.num_contexts != n:
            raise AttnInputError(
                f"{n - self.num_contexts} generation request(s) but no kv_cache_manager: without a cache "
                "every request is a context request (set num_contexts=len(seq_lens) or pass a manager)")
        if any(self.cached_lens) or self.block_tables:
            raise AttnInputError("cached_lens and block_tables need a kv_cache_manager")
        object.__setattr__(self, "cached_lens", (0,) * n)
        kv = _as_lengths(self.kv_seq_lens, "kv_seq_lens") if self.kv_seq_lens else seq_lens
        if len(kv) != n:
            raise AttnInputError(f"{len(kv)} kv_seq_lens for {n} requests: give one per entry of seq_lens")
        for i, (q_len, kv_len) in enumerate(zip(seq_lens, kv)):
            if q_len and not kv_len:
                raise AttnInputError(f"request {ids[i]} has {q_len} queries but no keys (kv_seq_lens[{i}] = 0): "
                                     "a query with nothing to attend over has no defined output")
        object.__setattr__(self, "kv_seq_lens", kv)

    def _check_with_cache(self, seq_lens: tuple[int, ...], ids: tuple[int, ...]) -> None:
        """Cached lengths and block tables that hold every request's tokens, in pages the cache has."""
        n = len(seq_lens)
        if self.kv_seq_lens:
            raise AttnInputError("kv_seq_lens is for batches without a cache; with a kv_cache_manager the keys "
                                 "are the cached tokens plus the new ones")
        cached = _as_lengths(self.cached_lens or (0,) * n, "cached_lens")
        if len(cached) != n or len(self.block_tables) != n:
            raise AttnInputError("cached_lens and block_tables need one entry per request")
        object.__setattr__(self, "cached_lens", cached)
        manager = self.kv_cache_manager
        for i, table in enumerate(self.block_tables):
            need = pages_for(cached[i] + seq_lens[i], manager.page_size)
            if len(table) < need:
                raise AttnInputError(f"request {ids[i]} holds {cached[i] + seq_lens[i]} tokens but its block table "
                                     f"has {len(table)} pages of {manager.page_size}: {need} needed")
            bad = [p for p in table if not isinstance(p, int) or not 0 <= p < manager.num_pages]
            if bad:
                raise AttnInputError(f"request {ids[i]}'s block table names pages {bad} outside the cache's "
                                     f"{manager.num_pages}")
        for i in range(self.num_contexts, n):
            if cached[i] == 0:
                raise AttnInputError(
                    f"generation request {ids[i]} has nothing in the cache: run its context step first")

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def ragged(cls, seq_lens: Sequence[int], request_ids: Sequence[int] = ()) -> "AttentionMetadata":
        """A batch with no KV cache: each request attends over its own tokens."""
        lens = _as_lengths(seq_lens, "seq_lens")
        return cls(seq_lens=lens, num_contexts=len(lens), request_ids=tuple(request_ids))

    @classmethod
    def from_offsets(cls, cu_seqlens, request_ids: Sequence[int] = ()) -> "AttentionMetadata":
        """A no-cache batch from cumulative offsets (cu_seqlens), as FlashAttention takes them."""
        return cls.ragged(lengths_from_offsets(cu_seqlens, "cu_seqlens"), request_ids)

    @classmethod
    def cross(cls, q_lens: Sequence[int], kv_lens: Sequence[int], request_ids: Sequence[int] = ()) -> "AttentionMetadata":
        """A no-cache cross-attention batch: request i's q_lens[i] queries attend over kv_lens[i] keys
        of its own (an encoder's output), given to forward as k and v of sum(kv_lens) rows."""
        lens = _as_lengths(q_lens, "q_lens")
        return cls(seq_lens=lens, num_contexts=len(lens), request_ids=tuple(request_ids),
                   kv_seq_lens=_as_lengths(kv_lens, "kv_lens"))

    # -- derived --------------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)

    @property
    def num_generations(self) -> int:
        return self.num_requests - self.num_contexts

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def num_ctx_tokens(self) -> int:
        return sum(self.seq_lens[: self.num_contexts])

    @property
    def kv_lens(self) -> tuple[int, ...]:
        """Keys each request attends over: what was cached plus this step's tokens (without a
        cache: its own tokens, or its kv_seq_lens for cross-attention)."""
        if self.kv_cache_manager is None:
            return self.kv_seq_lens
        return tuple(c + s for c, s in zip(self.cached_lens, self.seq_lens))

    @property
    def num_kv_tokens(self) -> int:
        """Rows of the k and v given to forward: the new tokens, or without a cache every key."""
        return self.num_tokens if self.kv_cache_manager is not None else sum(self.kv_seq_lens)

    @property
    def is_cross(self) -> bool:
        """No cache, and some request's keys are not its own queries (cross-attention)."""
        return self.kv_cache_manager is None and self.kv_seq_lens != self.seq_lens

    @property
    def has_cached_context(self) -> bool:
        """A context request already has tokens in the cache (chunked prefill, a reused prefix)."""
        return any(self.cached_lens[: self.num_contexts])

    @property
    def max_generation_q(self) -> int:
        """Most new tokens of any generation request: 1 for plain decode, more for speculative."""
        return max(self.seq_lens[self.num_contexts:], default=0)

    @property
    def seq_lens_kv(self) -> tuple[int, ...]:
        """Deprecated (removed in the release after next): a second name of :attr:`kv_lens`."""
        warn_deprecated("AttentionMetadata.seq_lens_kv", "kv_lens")
        return self.kv_lens

    @property
    def qo_indptr(self) -> tuple[int, ...]:
        return (0, *accumulate(self.seq_lens))

    @property
    def kv_rows_indptr(self) -> tuple[int, ...]:
        """Offsets of each request's rows in the k and v given to ``forward``: with a cache its new
        tokens (the same as qo_indptr), without one every key of it (cross-attention:
        kv_seq_lens). To get a request's keys, call :meth:`request_kv`."""
        return (0, *accumulate(self.seq_lens if self.kv_cache_manager is not None else self.kv_seq_lens))

    @property
    def cu_kv_lens(self) -> tuple[int, ...]:
        """Cumulative keys per request, cached plus new (kv_lens): what varlen kernels take as
        cu_seqlens_k / cum_seq_lens_kv. With a cache these are no offsets into forward's k and v."""
        return (0, *accumulate(self.kv_lens))

    @property
    def kv_indptr(self) -> tuple[int, ...]:
        """Deprecated (removed in the release after next): it meant two things. Use
        :attr:`cu_kv_lens` (its value) or :attr:`kv_rows_indptr` (rows of forward's k and v)."""
        warn_deprecated("AttentionMetadata.kv_indptr", "cu_kv_lens (cumulative cached + new keys) or "
                        "kv_rows_indptr (offsets into forward's k and v rows); request_kv gives a request's keys")
        return self.cu_kv_lens

    @property
    def max_seq_len_q(self) -> int:
        return max(self.seq_lens)

    @property
    def max_seq_len_kv(self) -> int:
        return max(self.kv_lens)

    @property
    def has_cache(self) -> bool:
        return self.kv_cache_manager is not None

    @property
    def page_size(self) -> int:
        return self.kv_cache_manager.page_size if self.kv_cache_manager is not None else 0

    @property
    def paged_kv_indptr(self) -> tuple[int, ...]:
        """Offsets into paged_kv_indices, one run of pages per request (FlashInfer's layout)."""
        return (0, *accumulate(self._pages_used(i) for i in range(self.num_requests)))

    @property
    def paged_kv_indices(self) -> tuple[int, ...]:
        return tuple(p for i in range(self.num_requests) for p in self.block_tables[i][: self._pages_used(i)])

    @property
    def paged_kv_last_page_len(self) -> tuple[int, ...]:
        ps = self.page_size
        return tuple((n - 1) % ps + 1 if n else 0 for n in self.kv_lens)

    def _pages_used(self, i: int) -> int:
        ps = self.page_size
        return pages_for(self.kv_lens[i], ps) if ps else 0

    def subset(self, start: int, stop: int) -> "AttentionMetadata":
        """Requests [start, stop) as a batch of their own (context or generation part)."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.num_requests):
            raise AttnInputError(f"subset({start!r}, {stop!r}): need 0 <= start < stop <= {self.num_requests}")
        contexts = max(0, min(self.num_contexts, stop) - start)
        return AttentionMetadata(
            seq_lens=self.seq_lens[start:stop], num_contexts=contexts, request_ids=self.request_ids[start:stop],
            kv_cache_manager=self.kv_cache_manager,
            cached_lens=self.cached_lens[start:stop] if self.kv_cache_manager is not None else (),
            block_tables=self.block_tables[start:stop] if self.block_tables else (),
            kv_seq_lens=self.kv_seq_lens[start:stop] if self.kv_cache_manager is None else ())

    # -- tensors --------------------------------------------------------------------------------
    def int_tensor(self, name: str, device="cpu") -> "torch.Tensor":
        """An int32 tensor of one of the tuple fields above (cached per device)."""
        import torch

        if name not in _INT_FIELDS:
            raise AttnInputError(f"int_tensor({name!r}): one of {', '.join(_INT_FIELDS)}")
        key = (name, str(device))
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(getattr(self, name), dtype=torch.int32, device=device)
        return self._tensors[key]

    def request_kv(self, i: int, k, v, layer: "LayerSpec", dtype=None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Request ``i``'s keys and values, the way for a backend to reach them whether or not there
        is a cache: without one, its rows of ``k`` and ``v`` (at kv_rows_indptr); with one, its whole
        history (cached, then new) gathered from its pages as the cache holds them. Either way
        converted to ``dtype`` when given (a float8 cache dequantized with the layer's scales; a bf16
        cache under an fp16 layer converted). Call it after this step's K/V were written into the
        cache."""
        if self.kv_cache_manager is None:
            rows = slice(self.kv_rows_indptr[i], self.kv_rows_indptr[i + 1])
            return (k[rows], v[rows]) if dtype is None else (k[rows].to(dtype), v[rows].to(dtype))
        return self.kv_cache_manager.gather(layer.layer_idx, self.block_tables[i], self.kv_lens[i],
                                            scales=(layer.k_scale, layer.v_scale), dtype=dtype)

    def check_inputs(self, q, k, v, layer: "LayerSpec", *, require_contiguous: bool = False) -> None:
        """Raise AttnInputError, naming the problem, unless q/k/v fit this batch and layer. Strided
        q/k/v pass unless ``require_contiguous`` (pass your backend's ``requires_contiguous``): the
        same default as ``Plan.start_forward``, and the suite never gives strided inputs to a
        backend that declares ``requires_contiguous = True``."""
        check_qkv(q, k, v, layer, num_tokens=self.num_tokens, num_kv_tokens=self.num_kv_tokens,
                  require_contiguous=require_contiguous)

    def describe(self) -> str:
        def shown(values):
            values = list(values)
            return values if len(values) <= 8 else values[:8] + ["..."]

        if self.has_cache:
            where = f"paged cache ({self.kv_cache_manager.layout}, page {self.page_size})"
            if any(self.cached_lens):
                where += f", cached_lens {shown(self.cached_lens)}"
        else:
            where = f"no cache, kv_lens {shown(self.kv_lens)}" if self.is_cross else "no cache"
        return (f"{self.num_requests} requests ({self.num_contexts} ctx, {self.num_generations} gen), "
                f"seq_lens {shown(self.seq_lens)}, {where}")


_INT_FIELDS = ("seq_lens", "cached_lens", "kv_lens", "qo_indptr", "kv_rows_indptr", "cu_kv_lens", "kv_indptr",
               "paged_kv_indptr",
               "paged_kv_indices", "paged_kv_last_page_len")


def check_qkv(q, k, v, layer: "LayerSpec", *, num_tokens: int, num_kv_tokens: Optional[int] = None,
              require_contiguous: bool = False) -> None:
    import torch

    num_kv_tokens = num_tokens if num_kv_tokens is None else num_kv_tokens
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttnInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise AttnInputError(f"{name} must be [num_tokens, heads, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttnInputError(f"q, k and v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one")
    if not (q.device == k.device == v.device):
        raise AttnInputError(f"q, k and v are on different devices ({q.device}, {k.device}, {v.device}): move them to one")
    if str(q.dtype).replace("torch.", "") != layer.dtype:
        raise AttnInputError(f"tensors are {q.dtype} but the layer is {layer.dtype}")
    if q.shape[0] != num_tokens or k.shape[0] != num_kv_tokens or v.shape[0] != num_kv_tokens:
        kv_what = "" if num_kv_tokens == num_tokens else f" and {num_kv_tokens} keys (sum of kv_seq_lens)"
        raise AttnInputError(
            f"the batch has {num_tokens} new tokens (sum of seq_lens){kv_what} but q, k, v have "
            f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]} rows: offsets and tensors disagree")
    if q.shape[1] != layer.num_heads or q.shape[2] != layer.head_dim:
        raise AttnInputError(f"q is {tuple(q.shape)}, expected [*, {layer.num_heads}, {layer.head_dim}]")
    for name, t, dim in (("k", k, layer.head_dim), ("v", v, layer.head_dim_v)):
        if t.shape[1] != layer.num_kv_heads or t.shape[2] != dim:
            raise AttnInputError(f"{name} is {tuple(t.shape)}, expected [*, {layer.num_kv_heads}, {dim}]")
    if require_contiguous:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not t.is_contiguous():
                raise AttnInputError(f"{name} is not contiguous (strides {t.stride()}); this backend needs "
                                     f"contiguous inputs: pass {name}.contiguous()")
