"""The TensorRT-LLM backend's decisions, on CPU: which kernel (FMHAv2 or XQA) each request goes to,
with which input layout, mask mode and scales, and the reasons given before anything launches for
what the kernels lack, including the hazards measured on GPUs and the JIT budget."""
import subprocess
import sys

import pytest
import steps
from steps import paged_step as paged  # requests with cached tokens decode

from pytest_attn.cases.catalog import CATALOG
from pytest_attn.core.contract import LayerSpec
from pytest_attn.core.errors import UnsupportedCase
from pytest_attn.check.harness import first_step, step_metadata
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn_backends import trtllm as t

ALL = t.Budget(None, None)
BY_NAME = {b.name: b for b in t.BACKENDS}


def test_module_imports_neither_torch_nor_flashinfer():
    code = ("import sys, pytest_attn_backends.trtllm; "
            "print([m for m in ('torch', 'flashinfer') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_unavailable_without_a_gpu_says_why():
    availability = BY_NAME["trtllm"].available()
    assert not availability and "CUDA" in availability.reason


def test_vit_seed_goes_to_fmha_v2_separate_q_k_v_without_a_mask():
    md, layer = first_step(CATALOG["vit-ragged-mix"])
    plan = t.decide(md, layer)
    assert (plan.kernel, plan.kernel_backend, plan.layout, plan.reads_cache) == (t.FMHA, "fmha_v2", "NHD", False)
    assert (plan.detail("input_layout"), plan.detail("mask_mode")) == ("SEPARATE_Q_K_V", "padding")
    assert plan.detail("bmm1_scale") == pytest.approx(80 ** -0.5) and plan.detail("bmm2_scale") == 1.0
    assert plan.detail("module") == "trtllm_fmha_v2_separate_q_k_v_bf16_bf16"


@pytest.mark.parametrize("layer, layout, mask", [
    (LayerSpec(8, 8, 64, logits_soft_cap=30.0), "CONTIGUOUS_Q_KV", "causal"),  # SEPARATE raises with a soft-cap
    (LayerSpec(8, 8, 64, return_lse=True), "CONTIGUOUS_Q_KV", "causal"),  # the only layout with statistics
    (LayerSpec(8, 8, 64, window_left=0), "SEPARATE_Q_K_V", "sliding_window"),  # "causal" would ignore window 0
])
def test_features_pick_the_layout_and_mask_mode_that_have_them(layer, layout, mask):
    md = AttentionMetadata.ragged([100, 7])
    plan = t.decide(md, layer, budget=ALL)
    assert (plan.detail("input_layout"), plan.detail("mask_mode")) == (layout, mask)


def test_mixed_batch_is_fmha_v2_paged_then_xqa_where_xqa_is_built():
    md = paged([33, 5, 1, 1], [0, 0, 40, 7])
    layer = LayerSpec(32, 8, 128)
    plan = t.decide(md, layer, budget=ALL)
    prefill, decode = plan.parts
    assert (prefill.kernel, prefill.detail("input_layout"), prefill.requests) == (t.FMHA, "Q_PAGED_KV_NHD",
                                                                                          (0, 2))
    assert (decode.kernel, decode.detail("page_size"), decode.detail("group_size")) == (t.XQA, 16, 4)
    assert decode.tokens == (38, 40)


def test_xqa_out_of_budget_routes_generation_through_fmha_v2_and_says_so():
    md = paged([33, 1], [0, 40])
    budget = t.Budget(None, frozenset())
    plan = t.decide(md, LayerSpec(32, 8, 128), budget=budget)
    assert plan.kernel == t.FMHA and "JIT budget: XQA" in plan.detail("routing")


@pytest.mark.parametrize("page_size, reason", [(1, "XQA takes pages of 16/32/64/128 tokens, not 1"),
                                                (256, "XQA takes pages of 16/32/64/128 tokens, not 256")])
def test_page_sizes_xqa_lacks_go_through_fmha_v2(page_size, reason):
    md = paged([1], [40], page_size=page_size)
    plan = t.decide(md, LayerSpec(32, 8, 128), budget=ALL)
    assert plan.kernel == t.FMHA and reason in plan.detail("routing") and "masked-MHA" in plan.detail("routing")


def test_speculative_rows_go_through_fmha_v2():
    md = paged([4, 4], [40, 7])
    plan = t.decide(md, LayerSpec(32, 8, 128), budget=ALL)
    assert plan.kernel == t.FMHA and "speculative" in plan.detail("routing")


def test_trtllm_fmha_sends_everything_through_fmha_v2():
    md = paged([33, 1], [0, 40])
    plan = t.decide(md, LayerSpec(32, 8, 128), "fmha", budget=ALL)
    assert plan.kernel == t.FMHA and not plan.parts


@pytest.mark.parametrize("layer, metadata, reason", [
    (LayerSpec(8, 8, 72), AttentionMetadata.ragged([10]), "FMHAv2 has no kernel for head_dim 72"),
    (LayerSpec(8, 8, 64, mask="full", window_left=8), AttentionMetadata.ragged([10]),
     "sliding window is causal only"),
    (LayerSpec(8, 8, 64), AttentionMetadata.cross([4], [40]), "cross-attention"),
    (LayerSpec(8, 8, 64, return_lse=True, sinks=(1.0,) * 8), AttentionMetadata.ragged([10]),
     "leave the sink out"),
])
def test_what_the_kernels_lack_is_refused_before_any_launch(layer, metadata, reason):
    with pytest.raises(UnsupportedCase, match=reason):
        t.decide(metadata, layer, budget=ALL)


def test_lse_with_a_cache_is_refused_because_fmha_v2_would_exit_the_process():
    (reason,) = t.route(paged([33], [0]), LayerSpec(8, 8, 128, return_lse=True), "op", budget=ALL)[1]
    assert "exit(1)" in reason


def test_page_sizes_that_are_not_powers_of_two_are_refused():
    reasons = t.route(paged([33], [0], page_size=24), LayerSpec(8, 8, 128), "op", budget=ALL)[1]
    assert any("powers of two" in r for r in reasons)


def test_fmha_v2_needs_sm90_or_sm120():
    (reason,) = t.route(AttentionMetadata.ragged([10]), LayerSpec(8, 8, 64), "op", sm=(8, 0), budget=ALL)[1]
    assert "sm90 and sm120 only" in reason


def test_the_default_budget_builds_the_vit_path_only():
    assert t.budget_from_env({}) == t.Budget(t.DEFAULT_FMHA_MODULES, t.DEFAULT_XQA)
    assert t.budget_from_env({t.JIT_ENV: "all"}) == ALL
    with pytest.raises(Exception, match="all"):
        t.budget_from_env({t.JIT_ENV: "some"})
    listed = t.budget_from_env({t.JIT_ENV: "q_paged_kv_nhd,xqa"})
    assert listed.allows_fmha("Q_PAGED_KV_NHD", "bfloat16") and listed.allows_fmha("SEPARATE_Q_K_V", "bfloat16")
    assert not listed.allows_fmha("Q_PAGED_KV_HND", "bfloat16") and listed.xqa is None
    (reason,) = t.route(paged([33], [0]), LayerSpec(8, 8, 128), "op")[1]
    assert "JIT budget" in reason and f"{t.JIT_ENV}=all" in reason
    assert t.route(AttentionMetadata.ragged([10]), LayerSpec(16, 16, 80), "op")[1] == []


def test_fp8_cache_quantizes_the_queries_into_an_e4m3_module():
    md = paged([33], [0], dtype="float8_e4m3fn")
    layer = LayerSpec(8, 8, 128, kv_dtype="float8_e4m3fn", k_scale=0.05, v_scale=0.02)
    plan = t.decide(md, layer, budget=ALL)
    assert plan.detail("module") == "trtllm_fmha_v2_q_paged_kv_nhd_e4m3_bf16"
    assert plan.detail("bmm2_scale") == 0.02


@pytest.mark.parametrize("name", sorted(t.VARIANTS))
@pytest.mark.parametrize("case", list(CATALOG.values()), ids=list(CATALOG))
def test_every_step_of_the_catalog_is_planned_or_refused_with_reasons(name, case):
    for md in step_metadata(case):
        for layer in case.layers():
            plan = steps.planned_or_refused(BY_NAME[name], md, layer)
            for p in (plan.launches) if plan else ():
                if p.kernel == t.XQA:
                    assert all(n == 1 for n in md.seq_lens[slice(*p.request_range(md))])


def test_readback_compares_what_the_kernels_were_called_with_against_the_plan():
    backend = t.TrtllmBackend("trtllm")
    md, layer = AttentionMetadata.ragged([10]), LayerSpec(8, 8, 64, window_left=4)
    plan = t.decide(md, layer, budget=ALL)
    assert backend.readback(plan) is None  # no launch yet: nothing to read back
    details = dict(plan.details)
    backend.launches = [{"kernel": t.FMHA, "input_layout": "SEPARATE_Q_K_V", "mask_mode": "causal", "window_left": -1,
                         "logits_soft_cap_scale": None, "save_softmax_stats": False, "sinks": False,
                         "bmm1_scale": details["bmm1_scale"], "bmm2_scale": 1.0}]
    mismatches = backend.readback(plan)
    assert any("window_left=4" in m and "window_left=-1" in m for m in mismatches)
    assert any("mask_mode='sliding_window'" in m for m in mismatches)
