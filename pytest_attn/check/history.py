"""Each request's K/V history, as attention must use it, kept by the suite apart from any backend's
cache (so a cache bug cannot hide): the harness, hand-built batches and graph replay all keep it here.
"""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Optional, Sequence

from pytest_attn.check.reference import as_stored_in_cache
from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.layer import LayerSpec


def split_tokens(t, lengths: Sequence[int]) -> list:
    """``t`` cut along its first dimension into consecutive pieces of these lengths."""
    if sum(lengths) != t.shape[0]:
        raise AttnInputError(f"lengths add up to {sum(lengths)} but the tensor has {t.shape[0]} rows")
    out, start = [], 0
    for n in lengths:
        out.append(t[start:start + n])
        start += n
    return out


class KVHistory:
    """K and V chunks per key (a request id, or (layer, request)), in the order they arrived. With a
    layer, chunks are kept as the paged cache stores them (rounded to its dtype, FP8 with scales)."""

    def __init__(self):
        self._chunks: dict[Hashable, tuple[list, list]] = {}

    def add(self, key: Hashable, k, v, layer: Optional[LayerSpec] = None) -> None:
        ks, vs = self._chunks.setdefault(key, ([], []))
        ks.append(as_stored_in_cache(k, layer, "k") if layer is not None else k)
        vs.append(as_stored_in_cache(v, layer, "v") if layer is not None else v)

    def add_rows(self, keys: Iterable[Hashable], lengths: Sequence[int], k, v,
                 layer: Optional[LayerSpec] = None) -> None:
        """This step's k and v rows, ``lengths[i]`` of them for ``keys[i]``."""
        for key, kk, vv in zip(keys, split_tokens(k, lengths), split_tokens(v, lengths)):
            self.add(key, kk, vv, layer)

    def share_prefix(self, new: Hashable, source: Hashable, tokens: int) -> None:
        """``new`` starts with the first ``tokens`` of ``source``'s history (a shared prefix)."""
        k, v = self.get(source)
        self._chunks[new] = ([k[:tokens]], [v[:tokens]])

    def drop(self, key: Hashable) -> None:
        self._chunks.pop(key, None)

    def get(self, key: Hashable) -> tuple[Any, Any]:
        """The whole K and V of ``key``, concatenated."""
        import torch

        ks, vs = self._chunks[key]
        return (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks), torch.cat(vs))

    def keys_values(self, keys: Iterable[Hashable]) -> tuple[list, list]:
        """Lists of each key's whole K and of its whole V, in the order given."""
        pairs = [self.get(key) for key in keys]
        return [k for k, _ in pairs], [v for _, v in pairs]
