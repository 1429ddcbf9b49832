"""A real paged KV cache: fixed-size pages, per-request block tables, NHD or HND layout.

Pages are handed out from a free list in a scrambled (seeded) order, so a backend that assumes a
request's pages are contiguous reads the wrong keys and fails. Storage starts poisoned, as do
freed pages (see :mod:`pytest_attn.core.poison`: finite K = 0, V = -49152 by default, NaN for backends
that declare their kernels never load masked slots). Running out of pages raises
:class:`CacheFullError` before anything changes; nothing is ever silently overwritten.

Engines share the pages of a common prompt prefix between requests (TensorRT-LLM's KV-cache
reuse, vLLM's prefix caching): :meth:`share_prefix` gives a new request the first whole pages of
another, counted by reference, so a page goes back to the free list (poisoned) only when its last
user frees it. A float8 (e4m3) cache stores K / k_scale and V / v_scale, as TensorRT-LLM's FP8 KV
cache does; :meth:`write` takes the layer's scales.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional, Sequence

from pytest_attn.core.errors import AttnInputError, CacheFullError
from pytest_attn.core.layer import KV_DTYPES, KV_LAYOUTS, kv_dtype_name, torch_dtype
from pytest_attn.core.metadata import AttentionMetadata, _as_lengths, pages_for
from pytest_attn.core.poison import K_POISON, NAN, V_POISON

if TYPE_CHECKING:
    import torch

FP8_E4M3_MAX = 448.0  # largest finite e4m3 value: quantized values saturate there


class PagedKVCacheManager:
    def __init__(self, *, num_layers: int = 1, num_kv_heads: int, head_dim: int, page_size: int = 16,
                 num_pages: int, dtype="bfloat16", device="cpu", layout: str = "NHD",
                 scramble_seed: Optional[int] = 0, head_dim_v: Optional[int] = None, nan_poison: bool = False):
        import torch

        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("head_dim_v", head_dim_v), ("page_size", page_size), ("num_pages", num_pages)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AttnInputError(f"PagedKVCacheManager: {name} must be a positive int, got {value!r}")
        if layout not in KV_LAYOUTS:
            raise AttnInputError(f"PagedKVCacheManager: layout {layout!r} is not one of {KV_LAYOUTS}")
        self.num_layers, self.num_kv_heads, self.head_dim, self.head_dim_v = num_layers, num_kv_heads, head_dim, head_dim_v
        self.page_size, self.num_pages, self.layout = page_size, num_pages, layout
        self.nan_poison = bool(nan_poison)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise AttnInputError(f"PagedKVCacheManager: device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
        self.dtype = kv_dtype_name(dtype)
        if head_dim == head_dim_v:  # one [pages, 2, ...] pool per layer: K and V of a page side by side
            self._pools = [self._stacked_pool() for _ in range(num_layers)]
            self._k = [pool[:, 0] for pool in self._pools]
            self._v = [pool[:, 1] for pool in self._pools]
        else:  # K and V of different head dims cannot share one tensor
            self._pools = None
            self._k = [self._poisoned(self._shape(head_dim), K_POISON) for _ in range(num_layers)]
            self._v = [self._poisoned(self._shape(head_dim_v), V_POISON) for _ in range(num_layers)]
        free = list(range(num_pages))
        if scramble_seed is not None:
            random.Random(scramble_seed).shuffle(free)
        self._free: list[int] = free[::-1]  # pop() from the end hands out free[0] first
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._users: dict[int, int] = {}  # page -> how many requests hold it (shared prefixes: > 1)

    def _stacked_pool(self) -> "torch.Tensor":
        k_poison, v_poison = self.poison
        shape = self._shape(self.head_dim)
        pool = self._poisoned((shape[0], 2, *shape[1:]), k_poison)
        pool[:, 1] = v_poison
        return pool

    def _shape(self, dim: int) -> tuple[int, ...]:
        return ((self.num_pages, self.page_size, self.num_kv_heads, dim) if self.layout == "NHD"
                else (self.num_pages, self.num_kv_heads, self.page_size, dim))

    def _poisoned(self, shape, finite_value: float) -> "torch.Tensor":
        import torch

        if self.quantized:  # e4m3 cannot hold -49152: its largest value stands in for it
            finite_value = 0.0 if finite_value == 0 else -FP8_E4M3_MAX
        value = NAN if self.nan_poison else finite_value
        return torch.full(shape, value, dtype=torch_dtype(self.dtype), device=self.device)

    @property
    def quantized(self) -> bool:
        """The cache stores float8 values, each K / k_scale or V / v_scale of the layer."""
        return self.dtype in KV_DTYPES

    @property
    def poison(self) -> tuple[float, float]:
        """What unwritten and freed K and V slots hold."""
        if self.nan_poison:
            return NAN, NAN
        return (K_POISON, -FP8_E4M3_MAX) if self.quantized else (K_POISON, V_POISON)

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def active_requests(self) -> tuple[int, ...]:
        return tuple(self._lens)

    def seq_len(self, request_id: int) -> int:
        """Tokens stored for a request (0 for one the cache has not seen)."""
        return self._lens.get(request_id, 0)

    def block_table(self, request_id: int) -> tuple[int, ...]:
        self._known(request_id)
        return tuple(self._pages[request_id])

    def capacity_tokens(self) -> int:
        """Deprecated (removed in the release after next): nothing reads it; it is
        ``num_pages * page_size``."""
        from pytest_attn.core.errors import warn_deprecated

        warn_deprecated("PagedKVCacheManager.capacity_tokens()", "num_pages * page_size")
        return self.num_pages * self.page_size

    def _known(self, request_id: int) -> None:
        if request_id not in self._lens:
            raise AttnInputError(f"request {request_id} is not in the cache (active: {sorted(self._lens)})")

    def prepare(self, seq_lens: Sequence[int], request_ids: Sequence[int], num_contexts: Optional[int] = None) -> AttentionMetadata:
        """Allocate the pages for this step's new tokens and return the step's metadata.

        Context requests may be new; generation requests must already be in the cache. All or
        nothing: when the pages do not suffice, CacheFullError is raised and nothing changes.
        """
        lens = _as_lengths(seq_lens, "seq_lens")
        ids = tuple(request_ids)
        if len(ids) != len(lens):
            raise AttnInputError(f"{len(ids)} request_ids for {len(lens)} seq_lens")
        if len(set(ids)) != len(ids):
            raise AttnInputError(f"request_ids repeat an id: {list(ids)}")
        if num_contexts is None:
            num_contexts = sum(1 for rid in ids if rid not in self._lens)
        if isinstance(num_contexts, bool) or not isinstance(num_contexts, int) or not 0 <= num_contexts <= len(ids):
            raise AttnInputError(f"num_contexts={num_contexts!r} must be an int between 0 and the {len(ids)} requests")
        for i, rid in enumerate(ids):
            if i >= num_contexts and rid not in self._lens:
                raise AttnInputError(f"generation request {rid} is not in the cache: run its context step first")
        cached = tuple(self._lens.get(rid, 0) for rid in ids)
        needed = [self._pages_for(c + n) - len(self._pages.get(rid, ())) for rid, c, n in zip(ids, cached, lens)]
        if sum(needed) > len(self._free):
            raise CacheFullError(
                f"the KV cache is full: this step needs {sum(needed)} more pages of {self.page_size} tokens, "
                f"{len(self._free)} of {self.num_pages} are free. Free finished requests (free()) or build the "
                f"cache with more pages (num_pages).")
        for rid, c, n, extra in zip(ids, cached, lens, needed):
            pages = self._pages.setdefault(rid, [])
            for _ in range(extra):
                page = self._free.pop()
                self._users[page] = 1
                pages.append(page)
            self._lens[rid] = c + n
        return AttentionMetadata(seq_lens=lens, num_contexts=num_contexts, request_ids=ids, kv_cache_manager=self,
                                 cached_lens=cached, block_tables=tuple(tuple(self._pages[rid]) for rid in ids))

    def share_prefix(self, source_id: int, request_id: int, num_tokens: int) -> None:
        """Start request ``request_id`` with the first ``num_tokens`` tokens of ``source_id``, by
        sharing its pages (whole pages only, as engines reuse blocks). The new request then joins a
        step as a context request whose first ``num_tokens`` tokens are already cached."""
        self._known(source_id)
        if request_id in self._lens:
            raise AttnInputError(f"share_prefix: request {request_id} is already in the cache")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0 \
                or num_tokens % self.page_size or num_tokens > self._lens[source_id]:
            raise AttnInputError(f"share_prefix: {num_tokens!r} tokens must be a positive multiple of the page size "
                                 f"{self.page_size} and at most the {self._lens[source_id]} tokens request "
                                 f"{source_id} holds (only whole pages are shared)")
        shared = self._pages[source_id][: num_tokens // self.page_size]
        for page in shared:
            self._users[page] += 1
        self._pages[request_id] = list(shared)
        self._lens[request_id] = num_tokens

    def free(self, request_id: int) -> None:
        """Give a finished request's pages back, poisoned again so a stale read shows up. A page
        shared with another request stays until its last user frees it."""
        self._known(request_id)
        pages = self._pages.pop(request_id)
        del self._lens[request_id]
        released = []
        for page in pages:
            self._users[page] -= 1
            if not self._users[page]:
                del self._users[page]
                released.append(page)
        if released:
            k_poison, v_poison = self.poison
            for cache in self._k:
                cache[released] = k_poison
            for cache in self._v:
                cache[released] = v_poison
        self._free.extend(reversed(released))

    def _pages_for(self, tokens: int) -> int:
        return pages_for(tokens, self.page_size)

    # -- data -----------------------------------------------------------------------------------
    def kv_pool(self, layer_idx: int = 0) -> Optional["torch.Tensor"]:
        """The layer's cache as one contiguous tensor [pages, 2, page_size, kv_heads, head_dim] (NHD;
        HND: [pages, 2, kv_heads, page_size, head_dim]), K then V of each page side by side, as
        FlashInfer, vLLM and TensorRT-LLM keep it; k_cache and v_cache are views of it. None when
        V's head dim differs from K's."""
        return None if self._pools is None else self._pools[self._layer(layer_idx)]

    def k_cache(self, layer_idx: int = 0) -> "torch.Tensor":
        return self._k[self._layer(layer_idx)]

    def v_cache(self, layer_idx: int = 0) -> "torch.Tensor":
        return self._v[self._layer(layer_idx)]

    def _layer(self, layer_idx: int) -> int:
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise AttnInputError(f"layer {layer_idx!r} is out of range: the cache has {self.num_layers} layers")
        return layer_idx

    def _token_view(self, cache: "torch.Tensor") -> "torch.Tensor":
        """[num_pages, page_size, heads, dim] view of either layout (a view, so writes land)."""
        return cache if self.layout == "NHD" else cache.transpose(1, 2)

    def slot_mapping(self, metadata: AttentionMetadata) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(page, offset) of every new token of the step, in token order."""
        import torch

        if metadata.kv_cache_manager is not self:
            raise AttnInputError("this metadata was prepared by another cache manager (or none)")
        pages, offsets = [], []
        for table, start, n in zip(metadata.block_tables, metadata.cached_lens, metadata.seq_lens):
            for pos in range(start, start + n):
                pages.append(table[pos // self.page_size])
                offsets.append(pos % self.page_size)
        return (torch.tensor(pages, dtype=torch.long, device=self.device),
                torch.tensor(offsets, dtype=torch.long, device=self.device))

    def write(self, layer_idx: int, metadata: AttentionMetadata, k: "torch.Tensor", v: "torch.Tensor", *,
              k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Store the step's new K/V tokens ([num_tokens, kv_heads, head_dim]) at their slots. A
        float8 cache stores K / k_scale and V / v_scale, saturated at +-448 and rounded to e4m3:
        pass the layer's scales (``LayerSpec.k_scale``, ``v_scale``)."""
        if metadata.kv_cache_manager is not self:
            raise AttnInputError("this metadata was prepared by another cache manager (or none)")
        for name, t, dim in (("k", k, self.head_dim), ("v", v, self.head_dim_v)):
            expected = (metadata.num_tokens, self.num_kv_heads, dim)
            if tuple(t.shape) != expected:
                raise AttnInputError(f"cache write: {name} is {tuple(t.shape)}, expected {expected}")
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
                raise AttnInputError(f"cache write: {name} must be a positive number, got {scale!r}")
        pages, offsets = self.slot_mapping(metadata)
        self._token_view(self.k_cache(layer_idx))[pages, offsets] = self._stored(k, k_scale)
        self._token_view(self.v_cache(layer_idx))[pages, offsets] = self._stored(v, v_scale)

    def _stored(self, t: "torch.Tensor", scale: float) -> "torch.Tensor":
        """What the cache keeps of new tokens: as they are, or scaled and rounded to e4m3."""
        import torch

        storage = torch_dtype(self.dtype)
        if not self.quantized:
            return t.to(self.device, storage)
        return (t.to(self.device, torch.float32) / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(storage)

    def gather(self, layer_idx: int, block_table: Sequence[int], length: int, *, scales: Optional[tuple] = None,
               dtype=None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """The first ``length`` tokens stored under a block table, as contiguous [length, heads, dim]:
        as stored, or with ``scales=(k_scale, v_scale)`` and ``dtype`` the values they stand for
        (a float8 cache dequantized: stored x scale, in ``dtype``)."""
        import torch

        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise AttnInputError(f"gather: length must be an int >= 0, got {length!r}")
        bad = [p for p in block_table if not isinstance(p, int) or not 0 <= p < self.num_pages]
        if bad:
            raise AttnInputError(f"gather: page ids {bad} are outside this cache's {self.num_pages} pages")
        n_pages = self._pages_for(length)
        if n_pages > len(block_table):
            raise AttnInputError(f"{length} tokens need {n_pages} pages, the block table has {len(block_table)}")
        idx = torch.tensor(list(block_table[:n_pages]), dtype=torch.long, device=self.device)
        out = []
        for cache, dim in ((self.k_cache(layer_idx), self.head_dim), (self.v_cache(layer_idx), self.head_dim_v)):
            tokens = self._token_view(cache)[idx].reshape(n_pages * self.page_size, self.num_kv_heads, dim)
            out.append(tokens[:length].contiguous())
        if scales is not None and self.quantized:
            out = [(t.to(torch.float32) * scale).to(dtype or torch.float32) for t, scale in zip(out, scales)]
        elif dtype is not None:
            out = [t.to(dtype) for t in out]
        return out[0], out[1]

    def __repr__(self) -> str:
        dims = f"{self.head_dim}" if self.head_dim == self.head_dim_v else f"{self.head_dim}/{self.head_dim_v}"
        return (f"PagedKVCacheManager({self.layout}, {self.num_pages} pages x {self.page_size} tokens, "
                f"{self.num_kv_heads} kv heads x {dims}, {self.dtype}, {self.device}, "
                f"{len(self._free)} free)")
