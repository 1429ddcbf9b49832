"""Property tests: random ragged batches, and random batches on a paged cache, through the torch
backend on CPU must match the reference. Derandomized and database-free, so CI sees the same
examples every run; sizes are kept small (< 3000 tokens) so this stays a few seconds."""
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pytest_attn.plugin.fixtures import build_batch  # noqa: E402
from pytest_attn.env.registry import Registry  # noqa: E402

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])
MAX_TOKENS = 3000


@pytest.fixture(scope="module")
def torch_backend():
    return Registry.discover().get("torch")


# a lone long sequence, many short ones, single tokens, and (where allowed) empty requests
seq_len = st.one_of(st.integers(0, 4), st.integers(1, 300), st.integers(1000, 2000))
heads = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)])  # (num_heads, num_kv_heads): MHA, GQA, MQA
head_dim = st.sampled_from([8, 16, 64, 80])
dtype = st.sampled_from(["float32", "bfloat16", "float16"])
mask = st.sampled_from(["causal", "full"])


@st.composite
def ragged_lengths(draw):
    lens = draw(st.lists(seq_len, min_size=1, max_size=24))
    while sum(lens) > MAX_TOKENS:
        lens.pop(lens.index(max(lens)))
    if not lens or sum(lens) == 0:
        lens.append(draw(st.integers(1, 64)))  # at least one query token in the batch
    return lens


@pytest.mark.attn_long
@FUZZ
@given(lens=ragged_lengths(), heads=heads, head_dim=head_dim, dtype=dtype, mask=mask, seed=st.integers(0, 2**16))
def test_ragged_batches_match_the_reference(torch_backend, lens, heads, head_dim, dtype, mask, seed):
    num_heads, num_kv_heads = heads
    batch = build_batch(lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                        mask=mask, device="cpu", seed=seed)
    batch.assert_matches_reference(torch_backend)


@st.composite
def paged_step(draw):
    """New tokens and what each request already holds: 0 cached makes a context request (which
    may be empty), >0 a generation request (at least one new token)."""
    n = draw(st.integers(1, 8))
    cached = draw(st.lists(st.one_of(st.just(0), st.integers(1, 700)), min_size=n, max_size=n))
    new = [draw(st.integers(0, 200)) if c == 0 else draw(st.sampled_from([1, 1, 2, 7])) for c in cached]
    if sum(new) == 0:
        new[0] = 1
    while sum(cached) + sum(new) > MAX_TOKENS:
        i = cached.index(max(cached))
        cached[i] //= 2
        if cached[i] == 0 and new[i] == 0:
            new[i] = 1
    return new, cached


@FUZZ
@given(step=paged_step(), heads=heads, head_dim=st.sampled_from([16, 64, 128]), mask=mask,
       kv_layout=st.sampled_from(["NHD", "HND"]), page_size=st.sampled_from([1, 4, 16, 64]), seed=st.integers(0, 2**16))
def test_paged_cache_batches_match_the_reference(torch_backend, step, heads, head_dim, mask, kv_layout, page_size, seed):
    new, cached = step
    num_heads, num_kv_heads = heads
    batch = build_batch(new, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype="bfloat16",
                        mask=mask, cached_lens=cached, kv_layout=kv_layout, page_size=page_size, device="cpu", seed=seed)
    assert batch.metadata.has_cache and batch.metadata.kv_cache_manager.layout == kv_layout
    batch.assert_matches_reference(torch_backend)
