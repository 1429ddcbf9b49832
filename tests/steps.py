"""Step metadata for the backends' CPU tests (plans only: the cache has no storage), and the check
every GPU backend's plan for a step must pass."""
import pytest

from pytest_attn.core.errors import UnsupportedCase
from pytest_attn.core.kv_cache import PagedKVCacheManager


def paged_step(seq_lens, cached_lens, *, layout="NHD", kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16"):
    """Metadata of a step on a storage-less paged cache: requests with cached tokens are generation
    requests (their history prepared first), the others context requests, which come first."""
    manager = PagedKVCacheManager(num_kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, num_pages=64,
                                  device="meta", layout=layout, dtype=dtype)
    gen = [i for i, c in enumerate(cached_lens) if c]
    if gen:
        manager.prepare([cached_lens[i] for i in gen], gen, num_contexts=len(gen))
    order = [i for i, c in enumerate(cached_lens) if not c] + gen
    return manager.prepare([seq_lens[i] for i in order], order, num_contexts=len(order) - len(gen))


def planned_or_refused(backend, metadata, layer, device="cuda"):
    """The plan, after checking that it is this backend's, for this layer and batch, and that its
    parts cover the requests in order and read them in the cache's layout; or None, after
    checking that the backend gave reasons (non-empty strings) and plan() then refuses."""
    reasons = backend.unsupported(layer, metadata, device)
    if reasons:
        assert all(isinstance(r, str) and r for r in reasons)
        with pytest.raises(UnsupportedCase):
            backend.plan(metadata, layer, device=device)
        return None
    plan = backend.plan(metadata, layer, device=device)
    assert plan.backend == backend.name and plan.layer == layer and plan.reads_cache == metadata.has_cache
    parts = plan.launches
    assert {p.layout for p in parts} == {metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"}
    covered = [p.request_range(metadata) for p in parts]
    assert covered[0][0] == 0 and covered[-1][1] == metadata.num_requests
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    return plan
