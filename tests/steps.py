"""Step metadata for the backends' CPU tests (plans only: the cache has no storage)."""
from pytest_attn.kv_cache import PagedKVCacheManager


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
