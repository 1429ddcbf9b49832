"""What a backend author calls means one thing: offsets into forward's k/v rows apart from cumulative
key lengths, one default for input validation, and compare_with_reference's old form still working
(with a warning) for one release."""
import inspect

import pytest
import torch

from pytest_attn import CATALOG, AttentionMetadata, Backend, Capabilities, LayerSpec, Plan, assert_case_passes, run_case
from pytest_attn.check.batch import build_batch
from pytest_attn.core.errors import AttnDeprecationWarning
from pytest_attn.check.harness import compare_with_reference, run_forward
from pytest_attn.env.registry import Registry


def test_with_a_cache_kv_rows_follow_the_new_tokens_and_cu_kv_lens_count_cached_plus_new():
    md = build_batch([5, 1], cached_lens=[0, 7], num_heads=2, head_dim=8).metadata
    assert md.seq_lens == (5, 1) and md.kv_lens == (5, 8)
    assert md.kv_rows_indptr == md.qo_indptr == (0, 5, 6)
    assert md.cu_kv_lens == (0, 5, 13)


def test_without_a_cache_both_are_the_offsets_of_each_requests_keys():
    md = AttentionMetadata.cross([2, 3], [7, 4])
    assert md.kv_rows_indptr == md.cu_kv_lens == (0, 7, 11)
    assert md.int_tensor("kv_rows_indptr").tolist() == [0, 7, 11]
    assert md.int_tensor("cu_kv_lens").tolist() == [0, 7, 11]


def test_kv_indptr_is_a_deprecated_alias_of_cu_kv_lens_naming_both_replacements():
    md = build_batch([5, 1], cached_lens=[0, 7], num_heads=2, head_dim=8).metadata
    with pytest.warns(DeprecationWarning, match=r"kv_indptr is deprecated.*cu_kv_lens.*kv_rows_indptr.*request_kv"):
        assert md.kv_indptr == md.cu_kv_lens
    with pytest.warns(AttnDeprecationWarning):
        assert md.int_tensor("kv_indptr").tolist() == list(md.cu_kv_lens)


def test_request_kv_gives_a_requests_keys_with_and_without_a_cache():
    md = AttentionMetadata.cross([2, 3], [7, 4])
    layer = LayerSpec(2, 2, 8, "float32", "full")
    k, v = torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    ki, vi = md.request_kv(1, k, v, layer)
    assert torch.equal(ki, k[7:]) and torch.equal(vi, v[7:])
    batch = build_batch([5, 1], cached_lens=[0, 7], num_heads=2, head_dim=8, dtype="float32")
    batch.metadata.kv_cache_manager.write(0, batch.metadata, batch.k, batch.v)
    for i in range(2):  # the whole history, as the reference reads it
        ki, vi = batch.metadata.request_kv(i, batch.k, batch.v, batch.layer)
        assert torch.equal(ki, batch.keys[i]) and torch.equal(vi, batch.values[i])


# -- one default for input validation -----------------------------------------------------------------
def test_check_inputs_and_start_forward_have_one_default_that_lets_strided_inputs_through():
    defaults = {inspect.signature(f).parameters["require_contiguous"].default
                for f in (AttentionMetadata.check_inputs, Plan.start_forward)}
    assert defaults == {False}
    md, layer = AttentionMetadata.ragged([4]), LayerSpec(2, 2, 8, "float32")
    fused = torch.randn(4, 6, 8)
    q, k, v = fused[:, :2], fused[:, 2:4], fused[:, 4:]
    md.check_inputs(q, k, v, layer)  # no keyword: strided views pass
    with pytest.raises(Exception, match="not contiguous"):
        md.check_inputs(q, k, v, layer, require_contiguous=True)


class ChecksWithoutKeyword(Backend):
    """A backend that takes strided inputs and calls check_inputs as the docs show, no keyword."""

    name = "checks-without-keyword"
    capabilities = Capabilities(devices=frozenset({"cpu"}))
    requires_contiguous = False

    def plan(self, metadata, layer, device="cpu"):
        return Plan(self.name, "sdpa", "math", "NHD", "tokens", metadata.has_cache, layer=layer)

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        layer = plan.layer
        metadata.check_inputs(q, k, v, layer)
        out = out if out is not None else q.new_empty(q.shape[0], layer.num_heads, layer.head_dim_v)
        if metadata.has_cache:
            metadata.kv_cache_manager.write(layer.layer_idx, metadata, k, v)
        for i in range(metadata.num_requests):
            rows = slice(metadata.qo_indptr[i], metadata.qo_indptr[i + 1])
            ki, vi = metadata.request_kv(i, k, v, layer, dtype=q.dtype)
            qh, kh, vh = (t.transpose(0, 1) for t in (q[rows], ki, vi))
            lq, lk = qh.shape[1], kh.shape[1]  # causal: bottom-right, the queries are the last tokens
            mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if layer.causal else None
            out[rows] = torch.nn.functional.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, scale=layer.scale, enable_gqa=True).transpose(0, 1)
        return out


@pytest.mark.parametrize("case_name", ["strided-fused-qkv", "strided-fused-qkv-paged"])
def test_a_backend_declaring_strided_inputs_passes_the_suites_strided_cases_calling_check_inputs_plainly(case_name):
    backend, case = ChecksWithoutKeyword(), CATALOG[case_name]
    assert_case_passes(run_case(backend, case), backend, case)


# -- compare_with_reference: the Forward, or (deprecated) the output tensor ----------------------------
def test_compare_with_reference_takes_the_forward_and_for_one_release_an_output_tensor_with_a_warning():
    backend = Registry.discover().get("torch")
    batch = build_batch([9, 4], num_heads=2, head_dim=16, mask="causal")
    args = (batch.q, batch.keys, batch.values, batch.metadata, batch.layer)
    forward = run_forward(backend, batch.q, batch.k, batch.v, batch.metadata, batch.layer, "cpu")
    new = compare_with_reference(backend, forward, *args)
    with pytest.warns(DeprecationWarning, match="compare_with_reference.*output tensor.*Forward"):
        old = compare_with_reference(backend, forward.out, *args)
    assert new.passed and old.passed and old.max_abs_err == new.max_abs_err
    with pytest.warns(DeprecationWarning):  # and a wrong output still fails in the old form
        assert not compare_with_reference(backend, forward.out * 1.1, *args).passed
