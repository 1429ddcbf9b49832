"""The catalog of named batch cases that drives the suite (as vLLM's batch specs do).

A case is a layer (heads, head dim, dtype, mask) and a schedule of steps. Without a cache it is
one ragged step. With a paged cache it is a prefill step of the prompts, then decode steps of one
token per request, optionally with new prompts joining a decode step (a mixed batch), and
requests finishing (their pages freed) along the way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

from .contract import KV_LAYOUTS, LayerSpec, dtype_name
from .errors import AttnInputError
from .metadata import _as_lengths, pages_for

# The seed's model: the Nemotron/RADIO ViT encoder (hidden 1280 = 16 heads x 80).
VIT_HEADS, VIT_HEAD_DIM = 16, 80
VIT_TOKENS_224 = (224 // 14) ** 2  # one 224-pixel image at patch 14: 256 tokens


@dataclass(frozen=True)
class Step:
    seq_lens: tuple[int, ...]
    request_ids: tuple[int, ...]
    num_contexts: int
    finished: tuple[int, ...] = ()  # requests whose pages are freed after this step


@dataclass(frozen=True)
class BatchCase:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    seq_lens: tuple[int, ...]  # prompt lengths (the whole batch when there is no cache)
    dtype: str = "bfloat16"
    mask: str = "causal"
    cache: bool = False
    kv_layout: str = "NHD"
    page_size: int = 16
    decode_steps: int = 0
    joining: tuple[int, ...] = ()  # prompts that join the first decode step as context requests
    tags: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "seq_lens", _as_lengths(self.seq_lens, f"case {self.name}: seq_lens"))
        object.__setattr__(self, "joining", _as_lengths(self.joining, f"case {self.name}: joining"))
        if not self.seq_lens:
            raise AttnInputError(f"case {self.name}: seq_lens is empty; a case needs at least one request")
        self.layer()  # heads, head_dim, dtype and mask are checked there
        if self.kv_layout not in KV_LAYOUTS:
            raise AttnInputError(f"case {self.name}: kv_layout {self.kv_layout!r} is not one of {KV_LAYOUTS}")
        for name in ("page_size", "decode_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "page_size" else 0):
                raise AttnInputError(f"case {self.name}: {name} must be an int >= {1 if name == 'page_size' else 0}, got {value!r}")
        if not self.cache and (self.decode_steps or self.joining):
            raise AttnInputError(f"case {self.name}: decode steps and joining prompts need cache=True")

    def layer(self, layer_idx: int = 0) -> LayerSpec:
        return LayerSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.dtype, self.mask, layer_idx=layer_idx)

    def with_dtype(self, dtype) -> "BatchCase":
        return dataclasses.replace(self, dtype=dtype_name(dtype))

    @property
    def max_tokens(self) -> int:
        """The longest key sequence any step attends over (sizes the cache and the CPU limit)."""
        longest = max(self.seq_lens + self.joining) if (self.seq_lens or self.joining) else 0
        return longest + self.decode_steps

    @property
    def total_tokens(self) -> int:
        return sum(self.seq_lens) + sum(self.joining) + self.decode_steps * (len(self.seq_lens) + len(self.joining))

    @property
    def work(self) -> float:
        """Attention score elements over all steps (a cost estimate for scheduling)."""
        return float(sum(n * n for n in self.seq_lens + self.joining) * self.num_heads) * (1 + self.decode_steps / 16)

    def steps(self) -> Iterator[Step]:
        n = len(self.seq_lens)
        first = tuple(range(n))
        yield Step(self.seq_lens, first, num_contexts=n, finished=() if self.decode_steps else first)
        joined = tuple(range(n, n + len(self.joining)))
        active = list(first)
        for i in range(self.decode_steps):
            new = joined if i == 0 else ()
            ids = new + tuple(active)  # context requests come first, as in TensorRT-LLM
            lens = (self.joining if i == 0 else ()) + (1,) * len(active)
            last = i == self.decode_steps - 1
            # the first request finishes after the first decode step: its pages go back mid-run
            done = tuple(ids) if last else ((active[0],) if i == 0 and len(active) > 1 else ())
            yield Step(lens, ids, num_contexts=len(new), finished=done)
            active = [r for r in ids if r not in done]

    def pages_needed(self) -> int:
        per_request = [pages_for(s + self.decode_steps, self.page_size) for s in self.seq_lens + self.joining]
        return sum(per_request) + 2  # two spare pages


def _vit(name, seq_lens, mask="full", tags=(), description=""):
    return BatchCase(name, VIT_HEADS, VIT_HEADS, VIT_HEAD_DIM, tuple(seq_lens), "bfloat16", mask,
                     tags=("vit", "no-cache") + tuple(tags), description=description)


CATALOG: dict[str, BatchCase] = {c.name: c for c in [
    # The seed: ViT encoder, no cache, full (bidirectional) attention, head_dim 80.
    _vit("vit-1img-224", [VIT_TOKENS_224], description="one 224-pixel image: 256 tokens"),
    _vit("vit-1024", [1024]),
    _vit("vit-2048", [2048]),
    _vit("vit-4096", [4096], tags=("large",)),
    _vit("vit-8192", [8192], tags=("large",)),
    _vit("vit-ragged-mix", [256, 1024, 576, 64, 1], description="several images of different sizes, and a 1-token edge"),
    _vit("vit-ragged-many", [256] * 12 + [16, 49, 100], description="many small images"),
    _vit("vit-causal", [300, 128], mask="causal"),
    # LLM prefill with grouped-query attention, no cache.
    BatchCase("llm-prefill-gqa", 32, 8, 128, (512, 300, 17), mask="causal", tags=("llm", "gqa", "no-cache")),
    BatchCase("llm-prefill-mha-full", 8, 8, 128, (200, 64), mask="full", tags=("llm", "no-cache")),
    # Head dims 64, 80, 128, 256.
    BatchCase("hd64-ragged", 8, 8, 64, (129, 64, 7), mask="causal", tags=("head-dim", "no-cache")),
    BatchCase("hd80-ragged", 16, 16, 80, (129, 64, 7), mask="causal", tags=("head-dim", "no-cache")),
    BatchCase("hd128-ragged", 8, 2, 128, (129, 64, 7), mask="causal", tags=("head-dim", "gqa", "no-cache")),
    BatchCase("hd256-ragged", 4, 4, 256, (129, 64, 7), mask="full", tags=("head-dim", "no-cache")),
    BatchCase("fp16-ragged", 8, 8, 128, (100, 33), dtype="float16", mask="causal", tags=("dtype", "no-cache")),
    # Paged KV cache: prefill, then decode steps, a mixed step, and requests finishing.
    BatchCase("llm-decode-gqa-nhd", 32, 8, 128, (37, 100, 16), mask="causal", cache=True, decode_steps=4,
              tags=("llm", "gqa", "cache", "decode")),
    BatchCase("llm-decode-gqa-hnd", 32, 8, 128, (37, 100, 16), mask="causal", cache=True, kv_layout="HND",
              decode_steps=4, tags=("llm", "gqa", "cache", "decode")),
    BatchCase("llm-mixed-nhd", 16, 4, 128, (50, 20), mask="causal", cache=True, decode_steps=3, joining=(33, 5),
              tags=("llm", "gqa", "cache", "mixed")),
    BatchCase("llm-mixed-hnd", 16, 4, 128, (50, 20), mask="causal", cache=True, kv_layout="HND", decode_steps=3,
              joining=(33, 5), tags=("llm", "gqa", "cache", "mixed")),
    BatchCase("hd64-decode-page1", 8, 8, 64, (5, 3), mask="causal", cache=True, page_size=1, decode_steps=2,
              tags=("cache", "decode")),
    BatchCase("hd80-decode", 16, 16, 80, (70, 9), mask="causal", cache=True, decode_steps=2, tags=("cache", "decode")),
    BatchCase("hd256-decode", 4, 2, 256, (40,), mask="causal", cache=True, decode_steps=2, tags=("cache", "decode")),
    BatchCase("cache-full-mask", 8, 8, 128, (64, 31), mask="full", cache=True, decode_steps=2, tags=("cache",)),
]}


def select(names_or_tags: Optional[list[str]] = None) -> list[BatchCase]:
    """Cases whose name or one of whose tags is listed; all when the list is empty."""
    if not names_or_tags:
        return list(CATALOG.values())
    chosen = [c for c in CATALOG.values() if c.name in names_or_tags or set(c.tags) & set(names_or_tags)]
    known = set(CATALOG) | {t for c in CATALOG.values() for t in c.tags}
    unknown = [n for n in names_or_tags if n not in known]
    if unknown:
        raise AttnInputError(f"unknown case name or tag {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return chosen
