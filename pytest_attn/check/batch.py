"""Batches built by hand (the ``make_attn_batch`` fixture, the benchmarks, the CLI): a layer, its
metadata, inputs, and each request's K/V history for the reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from pytest_attn.core.contract import Backend, LayerSpec, Plan
from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.metadata import AttentionMetadata, pages_for


@dataclass
class AttnBatch:
    """A batch built by ``make_attn_batch``: layer, metadata, inputs and the reference's K/V."""

    layer: LayerSpec
    metadata: AttentionMetadata
    q: "object"
    k: "object"
    v: "object"
    keys: list = field(default_factory=list)  # each request's whole K history (cached + new), as attention uses it
    values: list = field(default_factory=list)
    device: str = "cpu"

    def run(self, backend: Backend, plan: Optional[Plan] = None):
        """(plan, out, comparison) of one forward of this batch through ``backend``."""
        __tracebackhide__ = True
        from pytest_attn.check.harness import compare_with_reference, run_forward

        result = run_forward(backend, self.q, self.k, self.v, self.metadata, self.layer, self.device, plan)
        comparison = compare_with_reference(backend, result, self.q, self.keys, self.values, self.metadata, self.layer)
        return result.plan, result.out, comparison

    def assert_matches_reference(self, backend: Backend, plan: Optional[Plan] = None) -> Plan:
        """Run ``backend`` on this batch and raise (AttnCheckFailure, an AssertionError) unless its
        output matches the reference; returns the plan it ran."""
        __tracebackhide__ = True
        from pytest_attn.core.errors import AttnCheckFailure

        plan, _, comparison = self.run(backend, plan)
        if not comparison.passed:
            summary = f"{backend.name} ({self.layer.describe()}): {comparison.summary()}"
            raise AttnCheckFailure(f"{summary}\n{backend.name} on {self.metadata.describe()} ({plan.describe()}):\n"
                                   f"{comparison.message()}", summary=summary)
        return plan


def build_batch(seq_lens: Sequence[int], *, num_heads: int = 16, num_kv_heads: Optional[int] = None,
                head_dim: int = 80, dtype="bfloat16", mask: str = "full", cached_lens: Sequence[int] = (),
                kv_layout: Optional[str] = None, page_size: int = 16, kv_lens: Sequence[int] = (), device="cpu",
                seed: int = 0, **layer_options) -> AttnBatch:
    """A batch of new tokens. ``cached_lens`` (or ``kv_layout``) puts it on a paged KV cache whose
    requests already hold that many tokens: lengths 0 are context requests, others generation.
    ``kv_lens`` (no cache) gives each request keys of its own: cross-attention. Other keywords
    (window_left, logits_soft_cap, sinks, sm_scale, head_dim_vo, kv_dtype, k_scale, v_scale,
    return_lse, latent_kv) go to the LayerSpec; a latent_kv (absorbed MLA) layer's V is K's first
    head_dim_vo channels (see make_qkv)."""
    from pytest_attn.check.harness import derive_seed, make_qkv
    from pytest_attn.check.history import KVHistory, split_tokens
    from pytest_attn.core.kv_cache import PagedKVCacheManager

    layer = LayerSpec(num_heads, num_kv_heads or num_heads, head_dim, dtype, mask, **layer_options)
    if not cached_lens and kv_layout is None:
        if layer.cache_dtype != layer.dtype:
            raise AttnInputError("kv_dtype is the paged cache's dtype: give cached_lens or kv_layout for a cache")
        metadata = AttentionMetadata.cross(seq_lens, kv_lens) if kv_lens else AttentionMetadata.ragged(seq_lens)
        q, k, v = make_qkv(metadata.num_tokens, layer, device, derive_seed(seed, "batch", tuple(seq_lens)),
                           num_kv_tokens=metadata.num_kv_tokens)
        lens = metadata.kv_lens
        return AttnBatch(layer, metadata, q, k, v, split_tokens(k, lens), split_tokens(v, lens), str(device))
    if kv_lens:
        raise AttnInputError("kv_lens (cross-attention) is for batches without a cache")
    cached = tuple(cached_lens) or (0,) * len(seq_lens)
    if len(cached) != len(seq_lens):
        raise AttnInputError(f"{len(cached)} cached_lens for {len(seq_lens)} seq_lens: give one per request")
    pages = sum(pages_for(c + n, page_size) for c, n in zip(cached, seq_lens)) + 1
    manager = PagedKVCacheManager(num_kv_heads=layer.num_kv_heads, head_dim=head_dim, head_dim_v=layer.head_dim_v,
                                  page_size=page_size, num_pages=pages, dtype=layer.cache_dtype, device=device,
                                  layout=kv_layout or "NHD")
    ids = tuple(range(len(seq_lens)))
    order = sorted(ids, key=lambda i: cached[i] > 0)  # context requests first
    history = KVHistory()
    scales = dict(k_scale=layer.k_scale, v_scale=layer.v_scale)
    if any(cached):  # fill the history of generation requests through the cache itself
        prior = [i for i in order if cached[i]]
        md0 = manager.prepare([cached[i] for i in prior], prior, num_contexts=len(prior))
        _, k0, v0 = make_qkv(md0.num_tokens, layer, device, derive_seed(seed, "history"))
        manager.write(0, md0, k0, v0, **scales)
        history.add_rows(prior, md0.seq_lens, k0, v0, layer)
    contexts = sum(1 for i in order if not cached[i])
    metadata = manager.prepare([seq_lens[i] for i in order], order, num_contexts=contexts)
    q, k, v = make_qkv(metadata.num_tokens, layer, device, derive_seed(seed, "batch", tuple(seq_lens)))
    history.add_rows(order, metadata.seq_lens, k, v, layer)
    keys, values = history.keys_values(order)
    return AttnBatch(layer, metadata, q, k, v, keys, values, str(device))
