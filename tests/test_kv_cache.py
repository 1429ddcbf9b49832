"""The paged KV cache's invariants: pages, block tables, layouts, freeing, running out."""
import pytest
import torch

from pytest_attn.core.errors import AttnInputError, CacheFullError
from pytest_attn.core.kv_cache import K_POISON, V_POISON, PagedKVCacheManager


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
    from pytest_attn.core.contract import LayerSpec, Tolerance
    from pytest_attn.check.harness import make_qkv
    from pytest_attn.check.reference import compare, reference_attention

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


# -- shared prefixes: pages counted by reference -----------------------------------------------------
def test_share_prefix_gives_the_new_request_the_owners_first_whole_pages():
    cache = make(num_pages=8)
    md = cache.prepare([10], [0])  # 3 pages of 4
    cache.write(0, md, tokens(10), tokens(10, 100))
    free_before = cache.num_free_pages
    cache.share_prefix(0, 7, 8)
    assert cache.num_free_pages == free_before, "sharing takes no page"
    assert cache.block_table(7) == cache.block_table(0)[:2] and cache.seq_len(7) == 8
    md = cache.prepare([3], [7], num_contexts=1)  # its own tokens go on a page of its own
    assert md.cached_lens == (8,) and md.kv_lens == (11,) and md.num_contexts == 1
    assert md.block_tables[0][:2] == cache.block_table(0)[:2]
    assert md.block_tables[0][2] not in cache.block_table(0)
    cache.write(0, md, tokens(3, 50), tokens(3, 150))
    k, v = cache.gather(0, cache.block_table(7), 11)
    assert k[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52]
    assert v[:, 1, 7].tolist() == [100, 101, 102, 103, 104, 105, 106, 107, 150, 151, 152]
    k0, _ = cache.gather(0, cache.block_table(0), 10)
    assert k0[:, 0, 0].tolist() == list(range(10)), "the owner's tokens are untouched"


def test_shared_pages_survive_the_owners_free_and_are_poisoned_when_the_last_user_frees():
    cache = make(num_pages=8)
    md = cache.prepare([12], [0])  # 3 full pages
    cache.write(0, md, tokens(12), tokens(12, 100))
    cache.write(1, md, tokens(12), tokens(12, 100))
    owner_pages = cache.block_table(0)
    cache.share_prefix(0, 1, 8)
    cache.share_prefix(1, 2, 4)  # a prefix of a prefix: page 0 now has three users
    cache.free(0)
    assert cache.num_free_pages == 6, "only the owner's unshared third page goes back"
    assert cache.v_cache()[owner_pages[2]].eq(V_POISON).all()
    k, v = cache.gather(0, cache.block_table(1), 8)
    assert k[:, 0, 0].tolist() == list(range(8)) and v[:, 0, 0].tolist() == list(range(100, 108))
    cache.free(1)
    assert cache.num_free_pages == 7
    assert cache.v_cache()[owner_pages[1]].eq(V_POISON).all()
    assert cache.v_cache()[owner_pages[0]].ne(V_POISON).all(), "request 2 still holds page 0"
    cache.free(2)
    assert cache.num_free_pages == 8 and cache.active_requests == ()
    for layer in (0, 1):
        assert cache.k_cache(layer).eq(K_POISON).all() and cache.v_cache(layer).eq(V_POISON).all()
    # every page is free exactly once: all 8 can be taken again
    md = cache.prepare([32], [3])
    assert sorted(md.block_tables[0]) == list(range(8))


@pytest.mark.parametrize("num_tokens", [3, 6, 0, -4, 16, True, 4.0])
def test_share_prefix_takes_whole_pages_the_source_holds(num_tokens):
    cache = make()
    cache.prepare([12], [0])
    with pytest.raises(AttnInputError, match="must be a positive multiple of the page size 4 and at most the 12 "
                                             "tokens request 0 holds"):
        cache.share_prefix(0, 1, num_tokens)
    assert cache.active_requests == (0,) and cache.num_free_pages == 13


def test_share_prefix_needs_a_known_source_and_a_new_request():
    cache = make()
    cache.prepare([8, 4], [0, 1])
    with pytest.raises(AttnInputError, match=r"request 5 is not in the cache \(active: \[0, 1\]\)"):
        cache.share_prefix(5, 2, 4)
    with pytest.raises(AttnInputError, match="share_prefix: request 1 is already in the cache"):
        cache.share_prefix(0, 1, 4)
    cache.share_prefix(0, 2, 8)  # the whole of request 0 is fine
    assert cache.seq_len(2) == 8


# -- an FP8 (e4m3) cache -------------------------------------------------------------------------------
def fp8_cache(**kw):
    return PagedKVCacheManager(num_kv_heads=2, head_dim=8, page_size=4, num_pages=4, dtype="fp8", **kw)


def test_fp8_write_stores_k_over_k_scale_rounded_as_torch_rounds_it():
    cache = fp8_cache()
    assert cache.dtype == "float8_e4m3fn" and cache.quantized and cache.k_cache().dtype == torch.float8_e4m3fn
    md = cache.prepare([6], [0])
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(6, 2, 8, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    v = (torch.randn(6, 2, 8, generator=gen) * 10).to(torch.bfloat16)
    cache.write(0, md, k, v, k_scale=0.05, v_scale=0.2)
    got_k, got_v = cache.gather(0, md.block_tables[0], 6)
    assert got_k.dtype == got_v.dtype == torch.float8_e4m3fn
    assert torch.equal(got_k.float(), (k.float() / 0.05).to(torch.float8_e4m3fn).float())
    assert torch.equal(got_v.float(), (v.float() / 0.2).to(torch.float8_e4m3fn).float())
    assert not torch.equal(got_k.float(), (k.float() / 0.05)), "the values were rounded"


def test_fp8_write_saturates_at_448():
    cache = fp8_cache()
    md = cache.prepare([3], [0])
    k = torch.tensor([1000.0, -1e9, 300.0])[:, None, None].expand(3, 2, 8).contiguous()
    cache.write(0, md, k, k, k_scale=1.0, v_scale=0.5)
    got_k, got_v = cache.gather(0, md.block_tables[0], 3)
    assert got_k[:, 0, 0].float().tolist() == [448.0, -448.0, 288.0]  # 300 rounds to 288 (spacing 32)
    assert got_v[:, 1, 7].float().tolist() == [448.0, -448.0, 448.0]  # 300 / 0.5 = 600 saturates
    assert torch.isfinite(got_k.float()).all() and torch.isfinite(got_v.float()).all()


def test_fp8_cache_poison_is_what_e4m3_can_hold():
    cache = fp8_cache()
    assert cache.poison == (K_POISON, -448.0)
    assert cache.k_cache().float().eq(0).all() and cache.v_cache().float().eq(-448).all()


@pytest.mark.parametrize("bad", [0, -1.0, True, float("nan"), "1.0", None])
def test_write_rejects_bad_scales(bad):
    cache = fp8_cache()
    md = cache.prepare([2], [0])
    t = torch.ones(2, 2, 8)
    for name in ("k_scale", "v_scale"):
        with pytest.raises(AttnInputError, match=f"cache write: {name} must be a positive number"):
            cache.write(0, md, t, t, **{name: bad})
    assert cache.v_cache().float().eq(-448).all(), "nothing was written"


def test_write_rejects_an_infinite_scale():
    cache = fp8_cache()
    md = cache.prepare([2], [0])
    t = torch.ones(2, 2, 8)
    with pytest.raises(AttnInputError, match="k_scale must be a positive number"):
        cache.write(0, md, t, t, k_scale=float("inf"))


# -- NaN poison ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8"])
def test_nan_poison_fills_unwritten_and_freed_slots_with_nan(dtype):
    cache = PagedKVCacheManager(num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, num_pages=4, dtype=dtype,
                                nan_poison=True)
    k_poison, v_poison = cache.poison
    assert k_poison != k_poison and v_poison != v_poison  # both NaN
    assert all(c.float().isnan().all() for c in (cache.k_cache(0), cache.v_cache(0), cache.k_cache(1)))
    md = cache.prepare([6], [0])
    cache.write(0, md, tokens(6), tokens(6, 1))
    k, v = cache.gather(0, md.block_tables[0], 8)  # 6 written, 2 unwritten slots of the last page
    assert not k[:6].float().isnan().any() and not v[:6].float().isnan().any()
    assert k[6:].float().isnan().all() and v[6:].float().isnan().all()
    cache.free(0)
    assert cache.k_cache(0).float().isnan().all() and cache.v_cache(0).float().isnan().all()


# -- a V head dim of its own -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_head_dim_v_sizes_the_v_storage_and_gather(layout):
    cache = PagedKVCacheManager(num_kv_heads=2, head_dim=12, head_dim_v=5, page_size=4, num_pages=6,
                                dtype="float32", layout=layout)
    assert cache.head_dim_v == 5 and "12/5" in repr(cache)
    expected = {"NHD": ((6, 4, 2, 12), (6, 4, 2, 5)), "HND": ((6, 2, 4, 12), (6, 2, 4, 5))}[layout]
    assert (tuple(cache.k_cache().shape), tuple(cache.v_cache().shape)) == expected
    md = cache.prepare([5, 2], [0, 1])
    k = torch.arange(7.0)[:, None, None].expand(7, 2, 12).contiguous()
    v = torch.arange(7.0)[:, None, None].expand(7, 2, 5).contiguous() + 10
    cache.write(0, md, k, v)
    got_k, got_v = cache.gather(0, cache.block_table(0), 5)
    assert got_k.shape == (5, 2, 12) and got_v.shape == (5, 2, 5)
    assert got_v[:, 1, 4].tolist() == [10, 11, 12, 13, 14]
    _, got_v1 = cache.gather(0, cache.block_table(1), 2)
    assert got_v1[:, 0, 0].tolist() == [15, 16]
    with pytest.raises(AttnInputError, match=r"cache write: v is \(7, 2, 12\), expected \(7, 2, 5\)"):
        cache.write(0, md, k, k)


def test_head_dim_v_must_be_positive():
    with pytest.raises(AttnInputError, match="head_dim_v must be a positive int, got 0"):
        PagedKVCacheManager(num_kv_heads=2, head_dim=8, head_dim_v=0, num_pages=2)
