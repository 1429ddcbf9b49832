"""Seeded random cases within a backend's capabilities (``--attn-fuzz``).

Case ``i`` of a run is drawn from a generator seeded by (seed, backend, size tier, i) alone, so it is
the same case whatever the number of cases asked for, on every machine, and a failing one is rerun
by giving the same seed, tier and name. Each draw takes its features from what the backend's
:class:`~pytest_attn.core.contract.Capabilities` declares (dtypes, masks, head dims, the paged cache,
windows, soft-caps, sinks, chunks, draft tokens, cross-attention, cache dtypes, the LSE), then must
pass ``accept`` (the plugin asks the backend's own ``unsupported`` of every step); a draw that fails
either is redrawn from the next sub-seed. The cases are named ``fuzz-<seed>-<i>`` and tagged ``fuzz``.

Tiers: ``ci`` draws 16 small cases (prompts up to 160 tokens), ``nightly`` 256 larger ones (up to
512); an integer N draws N cases of the ci tier's sizes.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

from pytest_attn.cases.case import BatchCase
from pytest_attn.core.errors import AttnInputError

FUZZ_TAG = "fuzz"
MAX_DRAWS = 64  # draws per case before giving up on a backend whose capabilities admit almost nothing
TILE_EDGES = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
HEAD_DIMS = (32, 64, 80, 96, 128)


@dataclass(frozen=True)
class FuzzTier:
    """How many cases, and how large: prompts up to ``max_len`` tokens, ``max_requests`` a batch."""

    name: str
    count: int
    max_len: int
    max_requests: int
    max_decode_steps: int


TIERS = {"ci": FuzzTier("ci", 16, 160, 4, 3), "nightly": FuzzTier("nightly", 256, 512, 6, 4)}


def tier(value) -> FuzzTier:
    """A tier by name (ci, nightly) or a count N >= 1 (the ci tier's sizes); AttnInputError otherwise."""
    text = str(value).strip()
    if text in TIERS:
        return TIERS[text]
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise AttnInputError(f"--attn-fuzz={value!r}: give ci ({TIERS['ci'].count} small cases), nightly "
                             f"({TIERS['nightly'].count} larger ones) or a number of cases >= 1")
    base = TIERS["ci"]
    return FuzzTier(str(count), count, base.max_len, base.max_requests, base.max_decode_steps)


def fuzz_name(seed: int, index: int) -> str:
    return f"fuzz-{seed}-{index}"


def fuzz_names(seed: int, count: int) -> list[str]:
    return [fuzz_name(seed, i) for i in range(count)]


def _rng(seed: int, backend: str, size: FuzzTier, index: int, draw: int) -> random.Random:
    sizes = f"{size.max_len}/{size.max_requests}/{size.max_decode_steps}"  # not the count: case i is case i
    return random.Random(zlib.crc32(f"{seed}/{backend}/{sizes}/{index}/{draw}".encode()))


def _length(rng: random.Random, size: FuzzTier, least: int = 1) -> int:
    if rng.random() < 0.4:
        edges = [n for n in TILE_EDGES if least <= n <= size.max_len]
        if edges:
            return rng.choice(edges)
    return rng.randint(least, size.max_len)


def _layer(rng: random.Random, caps, cache: bool) -> dict:
    kv_heads = rng.choice((1, 2, 4))
    ratio = rng.choice((1, 2, 4, 7) if caps.gqa else (1,))
    dims = [d for d in HEAD_DIMS if (caps.head_dims is None or d in caps.head_dims)
            and (caps.max_head_dim is None or d <= caps.max_head_dim)] or sorted(caps.head_dims or HEAD_DIMS)
    head_dim = rng.choice(dims)
    layer = dict(num_heads=kv_heads * ratio, num_kv_heads=kv_heads, head_dim=head_dim,
                 dtype=rng.choice(sorted(caps.dtypes)), mask=rng.choice(sorted(caps.masks)))
    if caps.sliding_window and rng.random() < 0.3:
        layer["window_left"] = rng.choice((0, 1, 15, 32, 63, 100))
    if caps.soft_cap and rng.random() < 0.25:
        layer["logits_soft_cap"] = rng.choice((10.0, 30.0, 50.0))
    if caps.sinks and rng.random() < 0.25:
        layer["sinks"] = True
    if caps.head_dim_vo and rng.random() < 0.15:
        layer["head_dim_vo"] = rng.choice([d for d in (32, 64, 128) if d != head_dim])
    if caps.lse_base and rng.random() < 0.25:
        layer["return_lse"] = True
    if cache and caps.kv_dtypes and rng.random() < 0.25:
        kv_dtype = rng.choice(sorted(caps.kv_dtypes))
        if kv_dtype != layer["dtype"]:
            layer["kv_dtype"] = kv_dtype
            if kv_dtype.startswith("float8"):
                layer.update(k_scale=rng.choice((0.05, 0.5, 1.0)), v_scale=rng.choice((0.02, 0.3, 1.0)))
    return layer


def _schedule(rng: random.Random, caps, size: FuzzTier, cache: bool) -> dict:
    n = rng.randint(1, size.max_requests)
    if not cache:
        least = 0 if caps.empty_sequences and rng.random() < 0.2 else 1
        lens = [_length(rng, size, least) for _ in range(n)]
        if not any(lens):
            lens[0] = _length(rng, size)
        fields = dict(seq_lens=tuple(lens), check_solo=rng.random() < 0.15)
        if caps.cross_attention and rng.random() < 0.25:
            fields["kv_seq_lens"] = tuple(_length(rng, size) for _ in lens)
        return fields
    fields = dict(seq_lens=tuple(_length(rng, size) for _ in range(n)), cache=True,
                  kv_layout=rng.choice(sorted(caps.kv_layouts)), page_size=rng.choice((1, 8, 16, 16, 64)),
                  decode_steps=rng.randint(0, size.max_decode_steps))
    if fields["decode_steps"] and rng.random() < 0.4:
        fields["joining"] = tuple(_length(rng, size) for _ in range(rng.randint(1, 2)))
    if caps.chunked_prefill and rng.random() < 0.3:
        fields["chunk_size"] = rng.choice((8, 16, 32, 64))
    if caps.multi_token_generation and fields["decode_steps"] and rng.random() < 0.25:
        fields["draft_tokens"] = rng.randint(1, 4)
    if caps.chunked_prefill and fields["decode_steps"] and rng.random() < 0.2:
        page = fields["page_size"]
        held = min(fields["seq_lens"][0], fields.get("chunk_size") or fields["seq_lens"][0])
        pages = (min(held, fields["seq_lens"][0] - 1)) // page
        if pages:
            fields["shared_prefix"] = page * rng.randint(1, pages)
    return fields


def draw_case(seed: int, backend: str, caps, size: FuzzTier, index: int, draw: int = 0) -> BatchCase:
    """One random case within ``caps`` (its draw ``draw``); AttnInputError when the draw is invalid."""
    rng = _rng(seed, backend, size, index, draw)
    cache = caps.paged_cache and (not caps.no_cache or rng.random() < 0.6)
    layer = _layer(rng, caps, cache)
    fields = _schedule(rng, caps, size, cache)
    if rng.random() < 0.2:
        fields["num_layers"] = 2
    if rng.random() < 0.1:
        fields["input_scale"] = rng.choice((3.0, 8.0))
    return BatchCase(fuzz_name(seed, index), **layer, **fields, tags=(FUZZ_TAG,),
                     description=f"random case {index} of seed {seed} for {backend}")


def fuzz_case(seed: int, backend: str, caps, size: FuzzTier, index: int,
              accept: Optional[Callable[[BatchCase], bool]] = None) -> Optional[BatchCase]:
    """Case ``index``: the first valid draw the backend accepts, or None after MAX_DRAWS draws."""
    if not (caps.paged_cache or caps.no_cache):
        return None
    for draw in range(MAX_DRAWS):
        try:
            case = draw_case(seed, backend, caps, size, index, draw)
        except AttnInputError:
            continue
        if accept is None or accept(case):
            return case
    return None


def fuzz_cases(seed: int, backend: str, caps, size: FuzzTier,
               accept: Optional[Callable[[BatchCase], bool]] = None) -> list[BatchCase]:
    """Cases 0 .. size.count - 1 for this backend (those it accepts in MAX_DRAWS draws)."""
    found = (fuzz_case(seed, backend, caps, size, i, accept) for i in range(size.count))
    return [c for c in found if c is not None]
