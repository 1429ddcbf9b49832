"""The paged KV cache's invariants: pages, block tables, layouts, freeing, running out."""
import pytest
import torch

from pytest_attn.errors import AttnInputError, CacheFullError
from pytest_attn.kv_cache import K_POISON, V_POISON, PagedKVCacheManager


def make(layout="NHD", num_pages=16, page_size=4, **kw):
    return PagedKVCacheManager(num_layers=2, num_kv_heads=2, head_dim=8, page_size=page_size, num_pages=num_pages,
                               dtype="float32", layout=layout, **kw)


def tokens(n, start=0.0):
    """K values that say which token they are: every element of token i is start + i."""
    return (torch.arange(n, dtype=torch.float32) + start)[:, None, None].expand(n, 2, 8).contiguous()


def test_pages_are_allocated_per_request_and_never_shared():
    cache = make()
    md = cache.prepare([5, 4, 9], [10, 11, 12])
    assert [len(t) for t in md.block_tables] == [2, 1, 3]
    pages = [p for t in md.block_tables for p in t]
    assert len(pages) == len(set(pages)) == 6
    assert cache.num_free_pages == 10
    assert md.paged_kv_indptr == (0, 2, 3, 6)
    assert md.paged_kv_last_page_len == (1, 4, 1)
    assert md.paged_kv_indices == tuple(pages)


def test_pages_are_scrambled_so_contiguity_cannot_be_assumed():
    md = make(num_pages=64).prepare([64], [0])
    assert list(md.block_tables[0]) != sorted(md.block_tables[0])


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_write_then_gather_returns_the_tokens_across_prefill_and_decode(layout):
    cache = make(layout)
    md = cache.prepare([6, 3], [0, 1])
    cache.write(1, md, tokens(9), tokens(9, 100))
    for step in range(3):  # decode: one token each, crossing a page boundary for request 0
        md = cache.prepare([1, 1], [0, 1], num_contexts=0)
        cache.write(1, md, tokens(2, 1000 + 10 * step), tokens(2, 2000 + 10 * step))
    k, v = cache.gather(1, cache.block_table(0), cache.seq_len(0))
    assert k[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 1000, 1010, 1020]
    assert v[:, 1, 7].tolist() == [100, 101, 102, 103, 104, 105, 2000, 2010, 2020]
    k1, _ = cache.gather(1, cache.block_table(1), cache.seq_len(1))
    assert k1[:, 0, 0].tolist() == [6, 7, 8, 1001, 1011, 1021]
    assert cache.v_cache(0).eq(V_POISON).all() and cache.k_cache(0).eq(K_POISON).all(), "layer 0 was never written"


def test_raw_layouts_are_what_kernels_expect():
    for layout, shape in (("NHD", (16, 4, 2, 8)), ("HND", (16, 2, 4, 8))):
        cache = make(layout)
        assert tuple(cache.k_cache().shape) == shape
        md = cache.prepare([2], [0])
        cache.write(0, md, tokens(2, 7), tokens(2))
        page = md.block_tables[0][0]
        raw = cache.k_cache()[page]
        second_token = raw[1] if layout == "NHD" else raw[:, 1]
        assert second_token.eq(8).all()  # [heads, dim] of token 1


def test_running_out_of_pages_is_an_error_and_changes_nothing():
    cache = make(num_pages=4)
    cache.prepare([8], [0])
    before = (cache.num_free_pages, cache.block_table(0), cache.seq_len(0))
    with pytest.raises(CacheFullError, match="needs 4 more pages of 4 tokens, 2 of 4 are free"):
        cache.prepare([9, 1], [1, 0], num_contexts=1)
    assert (cache.num_free_pages, cache.block_table(0), cache.seq_len(0)) == before
    assert 1 not in cache.active_requests


def test_freed_pages_are_reused_and_poisoned():
    cache = make(num_pages=2)
    md = cache.prepare([8], [0])
    cache.write(0, md, tokens(8), tokens(8))
    cache.free(0)
    assert cache.num_free_pages == 2 and cache.active_requests == ()
    assert cache.v_cache().eq(V_POISON).all(), "a freed page must be poisoned again"
    md = cache.prepare([5], [1])
    assert sorted(md.block_tables[0]) == [0, 1]
    with pytest.raises(AttnInputError, match="request 0 is not in the cache"):
        cache.free(0)


def test_generation_request_needs_its_context_first():
    with pytest.raises(AttnInputError, match="generation request 3 is not in the cache"):
        make().prepare([1], [3], num_contexts=0)


def test_decode_fills_the_last_page_before_taking_a_new_one():
    cache = make(page_size=4)
    cache.prepare([3], [0])
    md = cache.prepare([1], [0], num_contexts=0)
    assert len(md.block_tables[0]) == 1 and md.paged_kv_last_page_len == (4,)
    md = cache.prepare([1], [0], num_contexts=0)
    assert len(md.block_tables[0]) == 2 and md.paged_kv_last_page_len == (1,)
    assert md.cached_lens == (4,) and md.kv_lens == (5,)


def test_reading_an_unwritten_slot_fails_but_masked_padding_does_not():
    """A backend that attends one slot past a request's length (still inside its last page) must
    fail; the same page's padding, masked, must not matter."""
    from pytest_attn.contract import LayerSpec, Tolerance
    from pytest_attn.harness import make_qkv
    from pytest_attn.reference import compare, reference_attention

    cache = PagedKVCacheManager(num_kv_heads=2, head_dim=8, page_size=4, num_pages=4, dtype="float32")
    layer = LayerSpec(2, 2, 8, "float32", "full")
    md = cache.prepare([6], [0])
    q, k, v = make_qkv(6, layer, "cpu", 0)
    cache.write(0, md, k, v)
    high = reference_attention(q, [k], [v], [6], layer)
    right_k, right_v = cache.gather(0, md.block_tables[0], 6)
    over_k, over_v = cache.gather(0, md.block_tables[0], 7)  # one unwritten slot too many
    right = reference_attention(q, [right_k], [right_v], [6], layer)
    over = reference_attention(q, [over_k], [over_v], [6], layer)
    assert compare(right.float(), high, right, Tolerance()).passed
    result = compare(over.float(), high, right, Tolerance())
    assert not result.passed and result.max_abs_err > 100
