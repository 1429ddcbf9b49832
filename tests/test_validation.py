"""Bad input to pytest-attn's public functions: each raises the documented error type, and the
message names the problem. The table here is the README's "bad input -> error" table."""
import dataclasses
import re

import pytest
import torch

from pytest_attn.cases.case import BatchCase
from pytest_attn.cases.catalog import select
from pytest_attn.core.contract import Capabilities, Plan
from pytest_attn.core.layer import LayerSpec, dtype_name
from pytest_attn.core.errors import AttnInputError, CacheFullError, UnknownBackendError, UnsupportedCase
from pytest_attn.check.harness import run_forward
from pytest_attn.core.kv_cache import PagedKVCacheManager
from pytest_attn.core.metadata import AttentionMetadata, check_qkv, lengths_from_offsets
from pytest_attn.check.reference import reference_attention
from pytest_attn.env.registry import Registry
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

LAYER = LayerSpec(4, 2, 16, "float32", "causal")


def qkv(rows=10, heads=4, kv_heads=2, dim=16, dtype=torch.float32, device="cpu"):
    return (torch.zeros(rows, heads, dim, dtype=dtype, device=device),
            torch.zeros(rows, kv_heads, dim, dtype=dtype, device=device),
            torch.zeros(rows, kv_heads, dim, dtype=dtype, device=device))


def manager(num_pages=4, page_size=4, **kwargs):
    return PagedKVCacheManager(num_kv_heads=2, head_dim=16, page_size=page_size, num_pages=num_pages,
                               dtype="float32", **kwargs)


def q_k_v_with(**changes):
    q, k, v = qkv()
    tensors = {"q": q, "k": k, "v": v}
    tensors.update({name: make(tensors[name]) for name, make in changes.items()})
    return tensors["q"], tensors["k"], tensors["v"]


def strided(t):
    """The same values, laid out [tokens, dim, heads] in memory: not contiguous."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


class ContiguousOnly(TorchSDPABackend):
    requires_contiguous = True


class Head64Only(TorchSDPABackend):
    capabilities = Capabilities(head_dims=frozenset({64}))


def registered_then(action):
    m = manager(num_pages=8)
    m.prepare([5], [0])
    return action(m)


def freed_twice():
    m = manager()
    m.prepare([3], [7])
    m.free(7)
    m.free(7)


# (what is wrong, the call, the error, a regular expression the message must match)
BAD_INPUTS = [
    # lengths and offsets
    ("negative length", lambda: AttentionMetadata.ragged([5, -1]), AttnInputError,
     r"seq_lens\[1\] = -1 is negative"),
    ("length not an int", lambda: AttentionMetadata.ragged([5, 2.5]), AttnInputError, r"seq_lens\[1\] = 2.5 is not an int"),
    ("no requests", lambda: AttentionMetadata.ragged([]), AttnInputError, r"at least one request"),
    ("offsets not monotonic", lambda: AttentionMetadata.from_offsets([0, 5, 3]), AttnInputError,
     r"cu_seqlens is not monotonic: cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 5"),
    ("offsets not starting at 0", lambda: lengths_from_offsets([2, 5]), AttnInputError, r"must start at 0, got 2"),
    ("offsets with one entry", lambda: lengths_from_offsets([0]), AttnInputError, r"at least two entries"),
    ("offsets not matching tensor rows",
     lambda: AttentionMetadata.from_offsets([0, 4, 9]).check_inputs(*qkv(rows=10), LAYER), AttnInputError,
     r"9 new tokens .* but q, k, v have 10, 10, 10 rows: offsets and tensors disagree"),
    ("request ids repeated", lambda: AttentionMetadata.ragged([1, 2], request_ids=[4, 4]), AttnInputError,
     r"request_ids repeat an id: \[4, 4\]"),
    ("one request id too few", lambda: AttentionMetadata.ragged([1, 2], request_ids=[4]), AttnInputError,
     r"1 request_ids for 2 requests"),
    ("num_contexts out of range", lambda: AttentionMetadata(seq_lens=(3,), num_contexts=2), AttnInputError,
     r"num_contexts=2 must be an int between 0 and the 1 requests"),
    # q, k, v
    ("q/k/v dtypes differ", lambda: check_qkv(*q_k_v_with(k=lambda t: t.half()), LAYER, num_tokens=10), AttnInputError,
     r"different dtypes \(torch.float32, torch.float16, torch.float32\)"),
    ("q/k/v devices differ", lambda: check_qkv(*q_k_v_with(v=lambda t: t.to("meta")), LAYER, num_tokens=10),
     AttnInputError, r"different devices \(cpu, cpu, meta\)"),
    ("tensors not the layer's dtype", lambda: check_qkv(*qkv(dtype=torch.float16), LAYER, num_tokens=10),
     AttnInputError, r"tensors are torch.float16 but the layer is float32"),
    ("not a tensor", lambda: check_qkv([[0.0]], *qkv()[1:], LAYER, num_tokens=10), AttnInputError,
     r"q must be a torch.Tensor, got list"),
    ("tensor not 3-d", lambda: check_qkv(*q_k_v_with(q=lambda t: t.flatten(1)), LAYER, num_tokens=10), AttnInputError,
     r"q must be \[num_tokens, heads, head_dim\], got shape \(10, 64\)"),
    ("q heads not the layer's", lambda: check_qkv(*qkv(heads=8), LAYER, num_tokens=10), AttnInputError,
     r"q is \(10, 8, 16\), expected \[\*, 4, 16\]"),
    ("k heads not the layer's kv heads", lambda: check_qkv(*qkv(kv_heads=4), LAYER, num_tokens=10), AttnInputError,
     r"k is \(10, 4, 16\), expected \[\*, 2, 16\]"),
    ("non-contiguous input, backend needs contiguous",
     lambda: AttentionMetadata.ragged([10]).check_inputs(*q_k_v_with(k=strided), LAYER, require_contiguous=True),
     AttnInputError, r"k is not contiguous \(strides \(32, 1, 2\)\); this backend needs contiguous inputs: "
                     r"pass k.contiguous\(\)"),
    # the layer
    ("num_heads not divisible by num_kv_heads", lambda: LayerSpec(6, 4, 64), AttnInputError,
     r"num_heads=6 is not divisible by num_kv_heads=4"),
    ("head_dim not positive", lambda: LayerSpec(4, 4, 0), AttnInputError, r"LayerSpec.head_dim must be a positive int, got 0"),
    ("unknown dtype", lambda: LayerSpec(4, 4, 64, dtype="int8"), AttnInputError, r"unsupported dtype 'int8': use one of"),
    ("unknown dtype name", lambda: dtype_name("fp8"), AttnInputError, r"unsupported dtype 'fp8'"),
    ("bad mask", lambda: LayerSpec(4, 4, 64, mask="sliding"), AttnInputError, r"mask 'sliding' is not one of \('causal', 'full'\)"),
    ("window below -1", lambda: LayerSpec(4, 4, 64, window_left=-5), AttnInputError, r"window_left must be -1 .* got -5"),
    ("non-positive sm_scale", lambda: LayerSpec(4, 4, 64, sm_scale=0.0), AttnInputError, r"sm_scale must be positive, got 0.0"),
    # the paged KV cache
    ("cache size not positive", lambda: manager(num_pages=0), AttnInputError,
     r"num_pages must be a positive int, got 0"),
    ("unknown cache layout", lambda: manager(layout="NDH"), AttnInputError, r"layout 'NDH' is not one of \('NHD', 'HND'\)"),
    ("generation request without cache", lambda: AttentionMetadata(seq_lens=(3, 1), num_contexts=1), AttnInputError,
     r"1 generation request\(s\) but no kv_cache_manager"),
    ("generation request the cache has not seen", lambda: manager().prepare([1], [9], num_contexts=0), AttnInputError,
     r"generation request 9 is not in the cache: run its context step first"),
    ("cached_lens without cache", lambda: AttentionMetadata(seq_lens=(3,), num_contexts=1, cached_lens=(2,)),
     AttnInputError, r"cached_lens and block_tables need a kv_cache_manager"),
    ("unknown request id freed", lambda: manager().free(42), AttnInputError, r"request 42 is not in the cache \(active: \[\]\)"),
    ("request freed twice", freed_twice, AttnInputError, r"request 7 is not in the cache"),
    ("layer out of range", lambda: manager().k_cache(3), AttnInputError, r"layer 3 is out of range: the cache has 1 layers"),
    ("write with another manager's metadata",
     lambda: registered_then(lambda m: manager().write(0, m.prepare([2], [1]), *qkv(rows=2)[1:])), AttnInputError,
     r"prepared by another cache manager"),
    ("write of the wrong shape",
     lambda: registered_then(lambda m: m.write(0, m.prepare([2], [1]), *qkv(rows=3)[1:])), AttnInputError,
     r"cache write: k is \(3, 2, 16\), expected \(2, 2, 16\)"),
    ("block table too short to gather", lambda: registered_then(lambda m: m.gather(0, m.block_table(0), 9)),
     AttnInputError, r"9 tokens need 3 pages, the block table has 2"),
    # the reference
    ("reference: v with the wrong head dim",
     lambda: reference_attention(torch.zeros(4, 4, 16), [torch.zeros(4, 2, 16)], [torch.zeros(4, 2, 8)], [4], LAYER),
     AttnInputError, r"must be \[kv_len, 2, 16\] and \[kv_len, 2, 16\]"),
    ("sinks: one per query head", lambda: LayerSpec(4, 2, 16, sinks=(1.0,)), AttnInputError,
     r"sinks must be empty or 4 finite numbers"),
    ("soft-cap negative", lambda: LayerSpec(4, 2, 16, logits_soft_cap=-1.0), AttnInputError,
     r"logits_soft_cap must be 0 \(none\) or a positive number"),
    ("kv dtype unknown", lambda: LayerSpec(4, 2, 16, kv_dtype="int4"), AttnInputError,
     r"unsupported KV-cache dtype 'int4'"),
    ("cross-attention kv lens with a query but no key", lambda: AttentionMetadata.cross([3], [0]), AttnInputError,
     r"has 3 queries but no keys"),
    ("reference: q rows not the sum of lengths",
     lambda: reference_attention(torch.zeros(4, 4, 16), [torch.zeros(5, 2, 16)], [torch.zeros(5, 2, 16)], [3], LAYER),
     AttnInputError, r"q has 4 rows but q_lens add up to 3"),
    ("reference: one K/V per request",
     lambda: reference_attention(torch.zeros(4, 4, 16), [torch.zeros(5, 2, 16)], [], [4], LAYER),
     AttnInputError, r"1 key and 0 value tensors for 1 requests"),
    ("reference: unknown precision",
     lambda: reference_attention(torch.zeros(1, 4, 16), [torch.zeros(1, 2, 16)], [torch.zeros(1, 2, 16)], [1], LAYER,
                                 precision="medium"),
     AttnInputError, r"precision must be 'high' or 'low', got 'medium'"),
    # cases, backends
    ("case with decode steps but no cache", lambda: BatchCase("x", 4, 4, 64, (8,), decode_steps=2), AttnInputError,
     r"case x: decode steps, joining prompts, chunks, shared prefixes and draft tokens need cache=True"),
    ("unknown case name", lambda: select(["hd64-ragged", "hd65"]), AttnInputError, r"unknown case name or tag hd65"),
    ("unknown backend", lambda: Registry.discover().get("nope"), UnknownBackendError,
     r"unknown attention backend 'nope'; registered: .*torch"),
    ("case the backend does not support",
     lambda: run_forward(Head64Only("narrow"), *qkv(), AttentionMetadata.ragged([10]), LAYER, "cpu"), UnsupportedCase,
     r"backend 'narrow' does not support this case: head_dim 16 not supported \(supports \[64\]\)"),
]


@pytest.mark.parametrize("call, error, message", [pytest.param(c, e, m, id=what) for what, c, e, m in BAD_INPUTS])
def test_bad_input_raises_an_error_naming_the_problem(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert re.search(message, str(info.value)), f"message {str(info.value)!r} does not match {message!r}"


def test_attn_input_errors_are_value_errors_and_cache_full_a_runtime_error():
    assert issubclass(AttnInputError, ValueError) and issubclass(CacheFullError, RuntimeError)


def test_more_tokens_than_the_cache_holds_raises_and_changes_nothing():
    m = manager(num_pages=4, page_size=4)  # 16 tokens
    m.prepare([6], [0])  # 2 pages
    before = (m.num_free_pages, m.active_requests, m.seq_len(0), m.block_table(0))
    k_before = m.k_cache().clone()
    with pytest.raises(CacheFullError, match=r"this step needs 3 more pages of 4 tokens, 2 of 4 are free.*free\(\)"):
        m.prepare([9, 1], [1, 0], num_contexts=1)  # new request 1 needs 3 pages, request 0 none
    assert (m.num_free_pages, m.active_requests, m.seq_len(0), m.block_table(0)) == before
    same = (m.k_cache() == k_before) | (m.k_cache().isnan() & k_before.isnan())
    assert bool(same.all()), "a failed prepare wrote into the cache"


FAILED_PREPARES = [
    ("prepare with a repeated id",
     lambda m: m.prepare([3, 3], [0, 0]), "request_ids repeat"),
    ("prepare with num_contexts out of range",
     lambda m: m.prepare([3], [1], num_contexts=5), "num_contexts"),
]


@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=w) for w, c, m in FAILED_PREPARES])
def test_failed_prepare_changes_nothing(call, message):
    m = manager(num_pages=8)
    with pytest.raises(AttnInputError, match=message):
        call(m)
    assert (m.num_free_pages, m.active_requests) == (8, ())


def test_run_forward_refuses_strided_inputs_for_a_backend_that_needs_contiguous():
    with pytest.raises(AttnInputError, match="not contiguous"):
        run_forward(ContiguousOnly("contig"), *q_k_v_with(q=strided), AttentionMetadata.ragged([10]), LAYER, "cpu")


@pytest.mark.parametrize("fields", [
    dict(seq_lens=(-3,)), dict(seq_lens=()), dict(num_heads=5, num_kv_heads=2), dict(cache=True, kv_layout="XYZ"),
], ids=["negative-length", "no-sequences", "heads-not-divisible", "unknown-layout"])
def test_batch_case_validates_its_fields(fields):
    base = dict(name="x", num_heads=4, num_kv_heads=4, head_dim=16, seq_lens=(8,))
    with pytest.raises(AttnInputError):
        BatchCase(**{**base, **fields})


def test_metadata_subset_and_int_tensor_refuse_bad_arguments():
    md = AttentionMetadata.ragged([3, 4, 5])
    with pytest.raises(AttnInputError, match=r"subset\(2, 5\): need 0 <= start < stop <= 3"):
        md.subset(2, 5)
    with pytest.raises(AttnInputError, match=r"int_tensor\('nope'\): one of"):
        md.int_tensor("nope")


def test_block_tables_must_cover_the_tokens_and_name_real_pages():
    m = manager(num_pages=8, page_size=4)
    good = m.prepare([6], [0])
    with pytest.raises(AttnInputError, match="its block table has 1 pages of 4: 2 needed"):
        AttentionMetadata(seq_lens=(6,), num_contexts=1, kv_cache_manager=m, block_tables=((good.block_tables[0][0],),))
    with pytest.raises(AttnInputError, match=r"names pages \[99\] outside the cache's 8"):
        AttentionMetadata(seq_lens=(6,), num_contexts=1, kv_cache_manager=m, block_tables=((good.block_tables[0][0], 99),))


@pytest.mark.parametrize("call, message", [
    (lambda m: m.k_cache(True), "layer True is out of range"),
    (lambda m: m.gather(0, (0,), -1), "length must be an int >= 0"),
    (lambda m: m.gather(0, (42,), 2), r"page ids \[42\] are outside"),
    (lambda m: m.slot_mapping(AttentionMetadata.ragged([2])), "prepared by another cache manager"),
], ids=["bool-layer", "negative-length", "unknown-page", "foreign-metadata"])
def test_cache_accessors_refuse_bad_arguments(call, message):
    with pytest.raises(AttnInputError, match=message):
        call(manager(num_pages=8))


def test_cache_refuses_an_unknown_device():
    with pytest.raises(AttnInputError, match="is not a torch device"):
        PagedKVCacheManager(num_kv_heads=2, head_dim=16, num_pages=2, device="tpu9")


# -- what every forward starts with (Plan.start_forward) and a request's K/V (request_kv) ----------
def _small_plan(made_for=None):
    layer = LayerSpec(4, 2, 16, "float32", "causal")
    return Plan("b", "k", "kb", "NHD", "tokens", False, layer=layer, made_for=made_for), layer


def test_start_forward_checks_the_batch_a_plan_recorded_and_allocates_out():
    md = AttentionMetadata.ragged([3, 2])
    from pytest_attn import BatchShape

    plan, layer = _small_plan(BatchShape(2, 2, 5))
    assert _small_plan()[0].for_batch(md).made_for == BatchShape.of(md) == BatchShape(2, 2, 5)
    q, k, v = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    got_layer, out = plan.start_forward(q, k, v, md)
    assert got_layer == layer and out.shape == (5, 4, 16)
    given = torch.empty(5, 4, 16)
    assert plan.start_forward(q, k, v, md, given)[1] is given
    other = AttentionMetadata.ragged([4, 1, 0])
    q3 = torch.randn(5, 4, 16)
    with pytest.raises(AttnInputError, match="the plan was made for another batch.*plan this batch first"):
        plan.start_forward(q3, k, v, other)
    unrecorded, _ = _small_plan()
    assert unrecorded.start_forward(q3, k, v, other)[1].shape == (5, 4, 16)  # nothing recorded, nothing to check


def test_start_forward_names_a_plan_without_layer_and_a_cuda_only_kernel_on_cpu():
    md = AttentionMetadata.ragged([2])
    plan, _ = _small_plan()
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    with pytest.raises(AttnInputError, match="FlashInfer runs on CUDA tensors; q is on cpu: move q, k, v to a GPU"):
        plan.start_forward(q, k, v, md, cuda_only="FlashInfer runs")
    with pytest.raises(AttnInputError, match="the plan carries no layer"):
        dataclasses.replace(plan, layer=None).start_forward(q, k, v, md)
    with pytest.raises(AttnInputError, match="not contiguous"):
        plan.start_forward(q, k.transpose(0, 1).contiguous().transpose(0, 1), v, md, require_contiguous=True)


def test_request_kv_is_the_rows_without_a_cache_and_the_dequantized_history_with_one():
    layer = LayerSpec(2, 2, 8, "bfloat16", "causal", kv_dtype="float8_e4m3fn", k_scale=0.5, v_scale=2.0)
    k, v = torch.randn(5, 2, 8).bfloat16(), torch.randn(5, 2, 8).bfloat16()
    ragged = AttentionMetadata.ragged([3, 2])
    got_k, got_v = ragged.request_kv(1, k, v, layer)
    assert torch.equal(got_k, k[3:]) and torch.equal(got_v, v[3:])
    cache = PagedKVCacheManager(num_kv_heads=2, head_dim=8, page_size=4, num_pages=8, dtype="float8_e4m3fn")
    md = cache.prepare([3, 2], [0, 1], num_contexts=2)
    cache.write(0, md, k, v, k_scale=0.5, v_scale=2.0)
    got_k, got_v = md.request_kv(1, k, v, layer, dtype=torch.bfloat16)
    stored_k, stored_v = cache.gather(0, md.block_tables[1], 2)
    assert got_k.dtype == torch.bfloat16 and got_k.shape == (2, 2, 8)
    assert torch.equal(got_k, (stored_k.float() * 0.5).bfloat16()) and torch.equal(got_v, (stored_v.float() * 2.0).bfloat16())
