"""Determinism and batch invariance, measured: a correct per-request backend has both on every
family; a planted backend that reduces in a run-dependent order is caught as non-deterministic, and
one whose split-KV decode depends on the batch size as not batch-invariant, each failing only where
it declares the property."""
import dataclasses

import pytest
import torch
from planted_backends import Einsum, attend

from pytest_attn import Capabilities
from pytest_attn.check.properties import (FAMILIES, NEEDLE, assert_property, bitwise_diff, compose, families, measure,
                                          measure_batch_invariance, measure_determinism, problems, table)
from pytest_attn.core.contract import LayerSpec
from pytest_attn.core.errors import AttnCheckFailure
from pytest_attn.env.registry import Registry

FAMILY = families(long=96)  # small on CPU


class Declares(Einsum):
    """The einsum control, declaring both properties."""

    name = "einsum-declares"
    capabilities = Capabilities(**{**Einsum.capabilities.__dict__, "deterministic": True, "batch_invariant": True})


class RunDependentOrder(Declares):
    """Sums each request's keys in chunks taken in a new random order every call, rounding the running
    sum to the output dtype: the bits depend on the run (atomics' order)."""

    name = "run-order"
    calls = 0

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        layer, manager = plan.layer, metadata.kv_cache_manager
        if manager is not None:
            manager.write(layer.layer_idx, metadata, k, v)
        type(self).calls += 1
        gen = torch.Generator().manual_seed(type(self).calls)
        for i, (start, stop) in enumerate(zip(metadata.qo_indptr, metadata.qo_indptr[1:])):
            if start == stop:
                continue
            keys, values = metadata.request_kv(i, k, v, layer, dtype=q.dtype)
            out[start:stop] = split_attend(q[start:stop], keys, values, layer, chunks=4, generator=gen)
            if lse is not None:
                lse[start:stop] = attend(q[start:stop], keys, values, layer, layer.causal)[1]
        return out


class SplitByBatchSize(Declares):
    """A split-KV decode whose number of splits is the batch size (more requests, more splits), its
    partial outputs rounded to the output dtype before the merge, as a real one may keep them."""

    name = "split-by-batch"

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        layer, manager = plan.layer, metadata.kv_cache_manager
        if manager is not None:
            manager.write(layer.layer_idx, metadata, k, v)
        for i, (start, stop) in enumerate(zip(metadata.qo_indptr, metadata.qo_indptr[1:])):
            if start == stop:
                continue
            keys, values = metadata.request_kv(i, k, v, layer, dtype=q.dtype)
            out[start:stop] = split_attend(q[start:stop], keys, values, layer, chunks=metadata.num_requests)
            if lse is not None:
                lse[start:stop] = attend(q[start:stop], keys, values, layer, layer.causal)[1]
        return out


def split_attend(q, k, v, layer, chunks, generator=None):
    """Attention as a merge of ``chunks`` partial results over slices of the keys (LSE-weighted),
    each partial rounded to q's dtype; merged in a random order when ``generator`` is given."""
    lk = k.shape[0]
    bounds = torch.linspace(0, lk, min(chunks, lk) + 1).round().long().tolist()
    order = list(range(len(bounds) - 1))
    if generator is not None:
        order = torch.randperm(len(order), generator=generator).tolist()
    lq = q.shape[0]
    kk, vv = (t.float().repeat_interleave(layer.group_size, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), kk) * layer.scale
    visible = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    acc, total = None, None
    for c in order:
        s = scores[..., bounds[c]:bounds[c + 1]]
        m = s.amax(-1, keepdim=True).clamp_min(-1e30)
        w = torch.exp(s - m)
        part = torch.einsum("hqk,khd->qhd", w, vv[bounds[c]:bounds[c + 1]]).to(q.dtype).float()
        lse = (m + w.sum(-1, keepdim=True).log()).squeeze(-1).transpose(0, 1)  # [q, h]
        weight = torch.exp(lse)[..., None] / w.sum(-1).transpose(0, 1)[..., None].clamp_min(1e-30)
        contrib = part * weight
        acc = contrib if acc is None else (acc + contrib).to(q.dtype).float()
        total = torch.exp(lse) if total is None else total + torch.exp(lse)
    return (acc / total[..., None]).to(q.dtype)


def test_bitwise_diff_counts_bits_not_values():
    a = torch.tensor([1.0, 0.0, float("nan")])
    assert bitwise_diff(a, a.clone()) == (0, 0.0)  # NaN bits equal themselves
    assert bitwise_diff(a, torch.tensor([1.0, -0.0, float("nan")]))[0] == 1  # -0.0 is other bits
    assert bitwise_diff(a, torch.tensor([1.5, 0.0, float("nan")])) == (1, 0.5)


def test_the_needle_holds_the_same_numbers_in_every_batch():
    layer = LayerSpec(4, 2, 32, "bfloat16", "causal")
    fam = FAMILY["mixed"]
    alone = compose(fam.batches[0], layer, cache=True, device="cpu")
    crowded = compose(fam.batches[2], layer, cache=True, device="cpu", scramble=3)
    assert torch.equal(alone.q[alone.rows[NEEDLE]], crowded.q[crowded.rows[NEEDLE]])
    assert crowded.metadata.num_contexts == 2 and crowded.metadata.num_requests == 5
    needle_at = list(crowded.rows).index(NEEDLE)
    assert crowded.metadata.kv_lens[needle_at] == 301
    assert alone.metadata.block_tables[0] != crowded.metadata.block_tables[needle_at]  # pages placed elsewhere


@pytest.mark.parametrize("family", FAMILIES)
def test_a_per_request_backend_is_deterministic_and_batch_invariant(family):
    row = measure(Declares(), FAMILY[family], device="cpu", with_kernels=False)
    assert row.deterministic.holds is True and row.batch_invariant.holds is True, row.as_dict()
    assert problems([row]) == []


def test_a_run_dependent_reduction_order_is_caught_and_fails_only_where_declared():
    m = measure_determinism(RunDependentOrder(), FAMILY["decode"], device="cpu")
    assert m.holds is False and m.failed, m.as_dict()
    assert "output element(s) differ from run 1" in m.differences[0]
    with pytest.raises(AttnCheckFailure, match="declares deterministic=True but decode"):
        assert_property(m)

    class Undeclared(RunDependentOrder):
        capabilities = Einsum.capabilities

    measured = measure_determinism(Undeclared(), FAMILY["decode"], device="cpu")
    assert measured.holds is False and not measured.failed  # measured and reported, not required
    assert_property(measured)


def test_a_split_that_depends_on_the_batch_size_is_not_batch_invariant():
    m = measure_batch_invariance(SplitByBatchSize(), FAMILY["decode"], device="cpu")
    assert m.holds is False and m.failed, m.as_dict()
    assert "needle at position" in m.differences[0]
    assert measure_determinism(SplitByBatchSize(), FAMILY["decode"], device="cpu").holds is True
    with pytest.raises(AttnCheckFailure, match="batch_invariant"):
        assert_property(m)


def test_a_family_the_backend_cannot_run_is_not_applicable_with_the_reason():
    class NoSpec(Declares):
        capabilities = dataclasses.replace(Declares.capabilities, multi_token_generation=False)

    row = measure(NoSpec(), FAMILY["spec-decode"], device="cpu", with_kernels=False)
    assert row.deterministic.holds is None and "speculative decoding" in row.deterministic.reason
    assert row.batch_invariant.holds is None and not row.batch_invariant.failed
    assert "n/a (" in table([row])[2]


@pytest.mark.parametrize("name", ["torch", "flex"])
def test_the_builtin_cpu_backends_are_measured_with_their_kernels(name):
    row = measure(Registry.discover().get(name), FAMILY["decode"], device="cpu")
    assert row.deterministic.holds is True and row.batch_invariant.holds is True, row.as_dict()
    assert ("flash_attention_for_cpu" if name == "torch" else "FlexAttention") in row.kernels


def test_each_catalog_case_maps_to_the_family_of_its_steps():
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.check.properties import family_of_case

    assert family_of_case(CATALOG["vit-1img-224"]) == "prefill"
    assert family_of_case(CATALOG["llm-decode-gqa-nhd"]) == "decode"
    assert family_of_case(CATALOG["llm-mixed-nhd"]) == "mixed"
    assert family_of_case(CATALOG["spec-decode-q4"]) == "spec-decode"
    assert {family_of_case(c) for c in CATALOG.values()} == set(FAMILIES)


def test_per_case_measurements_catch_the_planted_backends():
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.check.properties import measure_case_batch_invariance, measure_case_determinism

    case = CATALOG["llm-decode-gqa-hnd"]
    assert measure_case_determinism(Declares(), case, device="cpu").holds is True
    assert measure_case_batch_invariance(Declares(), case, device="cpu").holds is True
    det = measure_case_determinism(RunDependentOrder(), case, device="cpu")
    assert det.failed and "differ between two runs" in det.differences[0]
    inv = measure_case_batch_invariance(SplitByBatchSize(), case, device="cpu")
    assert inv.failed and inv.family == "llm-decode-gqa-hnd (decode batches)"
