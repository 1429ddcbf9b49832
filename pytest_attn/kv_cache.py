"""A real paged KV cache: fixed-size pages, per-request block tables, NHD or HND layout.

Pages are handed out from a free list in a scrambled (seeded) order, so a backend that assumes a
request's pages are contiguous reads the wrong keys and fails. Storage starts poisoned (K = 0,
V = POISON), as do freed pages: attending to a slot nothing wrote gives it a fair share of the
softmax and pulls the output towards -49152, far outside any tolerance. The poison is finite on
purpose: kernels legitimately load whole pages and mask the slots past a request's length, and a
NaN there would turn the masked 0 weight into 0 * NaN = NaN (seen with FlashInfer's cuDNN paged
prefill on an H100). Running out of pages raises :class:`CacheFullError` before anything changes;
nothing is ever silently overwritten.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional, Sequence

from .contract import KV_LAYOUTS, dtype_name, torch_dtype
from .errors import AttnInputError, CacheFullError
from .metadata import AttentionMetadata, _as_lengths, pages_for
from .reference import POISON

K_POISON, V_POISON = 0.0, POISON  # what unwritten and freed slots hold (see the module docstring)

if TYPE_CHECKING:
    import torch


class PagedKVCacheManager:
    def __init__(self, *, num_layers: int = 1, num_kv_heads: int, head_dim: int, page_size: int = 16,
                 num_pages: int, dtype="bfloat16", device="cpu", layout: str = "NHD",
                 scramble_seed: Optional[int] = 0):
        import torch

        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("page_size", page_size), ("num_pages", num_pages)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AttnInputError(f"PagedKVCacheManager: {name} must be a positive int, got {value!r}")
        if layout not in KV_LAYOUTS:
            raise AttnInputError(f"PagedKVCacheManager: layout {layout!r} is not one of {KV_LAYOUTS}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.num_pages, self.layout = page_size, num_pages, layout
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise AttnInputError(f"PagedKVCacheManager: device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
        self.dtype = dtype_name(dtype)
        shape = ((num_pages, page_size, num_kv_heads, head_dim) if layout == "NHD"
                 else (num_pages, num_kv_heads, page_size, head_dim))
        self._k = [torch.full(shape, K_POISON, dtype=torch_dtype(dtype), device=self.device) for _ in range(num_layers)]
        self._v = [torch.full(shape, V_POISON, dtype=torch_dtype(dtype), device=self.device) for _ in range(num_layers)]
        free = list(range(num_pages))
        if scramble_seed is not None:
            random.Random(scramble_seed).shuffle(free)
        self._free: list[int] = free[::-1]  # pop() from the end hands out free[0] first
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}

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
            pages.extend(self._free.pop() for _ in range(extra))
            self._lens[rid] = c + n
        return AttentionMetadata(seq_lens=lens, num_contexts=num_contexts, request_ids=ids, kv_cache_manager=self,
                                 cached_lens=cached, block_tables=tuple(tuple(self._pages[rid]) for rid in ids))

    def free(self, request_id: int) -> None:
        """Give a finished request's pages back, poisoned again so a stale read shows up."""
        self._known(request_id)
        pages = self._pages.pop(request_id)
        del self._lens[request_id]
        if pages:
            for cache in self._k:
                cache[pages] = K_POISON
            for cache in self._v:
                cache[pages] = V_POISON
        self._free.extend(reversed(pages))

    def _pages_for(self, tokens: int) -> int:
        return pages_for(tokens, self.page_size)

    # -- data -----------------------------------------------------------------------------------
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

    def write(self, layer_idx: int, metadata: AttentionMetadata, k: "torch.Tensor", v: "torch.Tensor") -> None:
        """Store the step's new K/V tokens ([num_tokens, kv_heads, head_dim]) at their slots."""
        if metadata.kv_cache_manager is not self:
            raise AttnInputError("this metadata was prepared by another cache manager (or none)")
        expected = (metadata.num_tokens, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected:
                raise AttnInputError(f"cache write: {name} is {tuple(t.shape)}, expected {expected}")
        pages, offsets = self.slot_mapping(metadata)
        self._token_view(self.k_cache(layer_idx))[pages, offsets] = k.to(self.device, self._k[0].dtype)
        self._token_view(self.v_cache(layer_idx))[pages, offsets] = v.to(self.device, self._v[0].dtype)

    def gather(self, layer_idx: int, block_table: Sequence[int], length: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """The first ``length`` tokens stored under a block table, as contiguous [length, heads, dim]."""
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
        for cache in (self.k_cache(layer_idx), self.v_cache(layer_idx)):
            tokens = self._token_view(cache)[idx].reshape(n_pages * self.page_size, self.num_kv_heads, self.head_dim)
            out.append(tokens[:length].contiguous())
        return out[0], out[1]

    def __repr__(self) -> str:
        return (f"PagedKVCacheManager({self.layout}, {self.num_pages} pages x {self.page_size} tokens, "
                f"{self.num_kv_heads} kv heads x {self.head_dim}, {self.dtype}, {self.device}, "
                f"{len(self._free)} free)")
