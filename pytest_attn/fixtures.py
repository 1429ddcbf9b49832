"""Fixtures and parametrization. Tests ask for ``attn_backend`` (one test per selected backend,
the backend's name in the test ID) and ``attn_case`` (one per catalog case), or build their own
batches with ``make_attn_batch``. Nothing here imports torch at import time."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import pytest

from .cases import BatchCase, select
from .contract import Backend, LayerSpec, Plan
from .errors import AttnInputError
from .metadata import AttentionMetadata, pages_for


def _session(config):
    from .plugin import attn_session_of

    return attn_session_of(config)


# -- parametrization ------------------------------------------------------------------------------
def parametrize(metafunc, session) -> None:
    if "attn_backend" in metafunc.fixturenames:
        backends = session.selected
        metafunc.parametrize("attn_backend", backends, ids=[b.name for b in backends], indirect=True)
    if "attn_case" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("attn_cases")
        cases = select(session.case_filter)
        if marker is not None:  # a test narrows the catalog: @pytest.mark.attn_cases("cache", ...)
            wanted = set(select(list(marker.args)))
            cases = [c for c in cases if c in wanted]
        if session.dtypes:
            params = [c.with_dtype(d) for c in cases for d in session.dtypes]
            ids = [f"{c.name}-{c.dtype}" for c in params]
        else:
            params, ids = cases, [c.name for c in cases]
        metafunc.parametrize("attn_case", params, ids=ids, indirect=True)


def deselect_oversized(config, items, session) -> None:
    """Drop cases over --attn-max-tokens (by default 2048 on CPU), reporting them as deselected."""
    limit = session.max_tokens if any(case_of(i) for i in items) else None
    if not limit:
        return
    keep, drop = [], []
    for item in items:
        case = case_of(item)
        (drop if case is not None and case.max_tokens > limit else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def case_of(item) -> Optional[BatchCase]:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("attn_case") if callspec is not None else None


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def attn_session(request):
    """The run's state: selected backends, device, dtypes, seed, strictness."""
    return _session(request.config)


@pytest.fixture
def attn_backend(request, attn_session) -> Backend:
    """One selected backend. Unavailable: skipped with the reason (failed under --attn-strict)."""
    return attn_session.require_available(request.param)


@pytest.fixture
def attn_case(request) -> BatchCase:
    """One case of the catalog (pytest_attn.cases.CATALOG)."""
    return request.param


@pytest.fixture
def attn_device(attn_session) -> str:
    return attn_session.device


@pytest.fixture
def attn_seed(attn_session) -> int:
    """The run's seed; inputs derive from it and the case name (harness.derive_seed)."""
    return attn_session.seed


@dataclass
class AttnBatch:
    """A batch built by ``make_attn_batch``: layer, metadata, inputs and the reference's K/V."""

    layer: LayerSpec
    metadata: AttentionMetadata
    q: "object"
    k: "object"
    v: "object"
    keys: list = field(default_factory=list)  # each request's whole K history (cached + new)
    values: list = field(default_factory=list)
    device: str = "cpu"

    def run(self, backend: Backend, plan: Optional[Plan] = None):
        """(plan, out, comparison) of one forward of this batch through ``backend``."""
        from .harness import compare_with_reference, run_forward

        plan, out = run_forward(backend, self.q, self.k, self.v, self.metadata, self.layer, self.device, plan)
        return plan, out, compare_with_reference(backend, out, self.q, self.keys, self.values, self.metadata, self.layer)

    def assert_matches_reference(self, backend: Backend, plan: Optional[Plan] = None) -> Plan:
        plan, _, comparison = self.run(backend, plan)
        assert comparison.passed, f"{backend.name} on {self.metadata.describe()} ({plan.describe()}):\n{comparison.message()}"
        return plan


def build_batch(seq_lens: Sequence[int], *, num_heads: int = 16, num_kv_heads: Optional[int] = None,
                head_dim: int = 80, dtype="bfloat16", mask: str = "full", cached_lens: Sequence[int] = (),
                kv_layout: Optional[str] = None, page_size: int = 16, device="cpu", seed: int = 0) -> AttnBatch:
    """A batch of new tokens. ``cached_lens`` (or ``kv_layout``) puts it on a paged KV cache whose
    requests already hold that many tokens: lengths 0 are context requests, others generation."""
    from .harness import derive_seed, make_qkv, split_tokens
    from .kv_cache import PagedKVCacheManager

    layer = LayerSpec(num_heads, num_kv_heads or num_heads, head_dim, dtype, mask)
    if not cached_lens and kv_layout is None:
        metadata = AttentionMetadata.ragged(seq_lens)
        q, k, v = make_qkv(metadata.num_tokens, layer, device, derive_seed(seed, "batch", tuple(seq_lens)))
        return AttnBatch(layer, metadata, q, k, v, split_tokens(k, seq_lens), split_tokens(v, seq_lens), str(device))
    cached = tuple(cached_lens) or (0,) * len(seq_lens)
    if len(cached) != len(seq_lens):
        raise AttnInputError(f"{len(cached)} cached_lens for {len(seq_lens)} seq_lens: give one per request")
    pages = sum(pages_for(c + n, page_size) for c, n in zip(cached, seq_lens)) + 1
    manager = PagedKVCacheManager(num_kv_heads=layer.num_kv_heads, head_dim=head_dim, page_size=page_size,
                                  num_pages=pages, dtype=dtype, device=device, layout=kv_layout or "NHD")
    ids = tuple(range(len(seq_lens)))
    order = sorted(ids, key=lambda i: cached[i] > 0)  # context requests first
    keys, values = {}, {}
    if any(cached):  # fill the history of generation requests through the cache itself
        prior = [i for i in order if cached[i]]
        md0 = manager.prepare([cached[i] for i in prior], prior, num_contexts=len(prior))
        _, k0, v0 = make_qkv(md0.num_tokens, layer, device, derive_seed(seed, "history"))
        manager.write(0, md0, k0, v0)
        for i, kk, vv in zip(prior, split_tokens(k0, md0.seq_lens), split_tokens(v0, md0.seq_lens)):
            keys[i], values[i] = [kk], [vv]
    contexts = sum(1 for i in order if not cached[i])
    metadata = manager.prepare([seq_lens[i] for i in order], order, num_contexts=contexts)
    q, k, v = make_qkv(metadata.num_tokens, layer, device, derive_seed(seed, "batch", tuple(seq_lens)))
    import torch

    for i, kk, vv in zip(order, split_tokens(k, metadata.seq_lens), split_tokens(v, metadata.seq_lens)):
        keys.setdefault(i, []).append(kk)
        values.setdefault(i, []).append(vv)
    return AttnBatch(layer, metadata, q, k, v, [torch.cat(keys[i]) for i in order],
                     [torch.cat(values[i]) for i in order], str(device))


@pytest.fixture
def make_attn_batch(attn_device, attn_seed):
    """Factory: ``make_attn_batch([256, 1024], head_dim=80)`` for a ragged batch without a cache,
    ``make_attn_batch([1, 1], cached_lens=[40, 7], kv_layout="HND")`` for decode on a paged cache."""

    def make(seq_lens, **kwargs) -> AttnBatch:
        kwargs.setdefault("device", attn_device)
        kwargs.setdefault("seed", attn_seed)
        return build_batch(seq_lens, **kwargs)

    return make


@pytest.fixture
def attn_metadata_no_cache() -> AttentionMetadata:
    """The seed's shape of batch: a ragged mix of images, no kv_cache_manager."""
    return AttentionMetadata.ragged([256, 1024, 576])


@pytest.fixture
def attn_metadata_paged(attn_device) -> AttentionMetadata:
    """A mixed step on a real paged cache: two new prompts and two requests decoding."""
    from .kv_cache import PagedKVCacheManager

    manager = PagedKVCacheManager(num_kv_heads=8, head_dim=128, page_size=16, num_pages=32, dtype="bfloat16",
                                  device=attn_device)
    manager.prepare([40, 17], [0, 1], num_contexts=2)
    return manager.prepare([33, 5, 1, 1], [2, 3, 0, 1], num_contexts=2)
