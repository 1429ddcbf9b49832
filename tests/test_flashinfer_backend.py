"""The FlashInfer backend's decisions, checked on CPU, and proof that the output check catches the
class of bug TensorRT-LLM #13190 fixed (ragged K/V read in the wrong layout, offsets in the wrong
units), which a test asserting only ``wrapper._backend == "cudnn"`` (PR #12911's) let through."""
import functools

import pytest
import steps
from backend_packages import backend_names_in_a_fresh_process

from pytest_attn.cases.catalog import CATALOG
from pytest_attn.core.contract import LayerSpec
from pytest_attn.core.errors import AttnInputError, UnsupportedCase
from pytest_attn.check.harness import assert_case_passes, first_step, run_case, step_metadata
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn.env.packages import flashinfer_version
from pytest_attn_backends import flashinfer as fi
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

VIT = LayerSpec(16, 16, 80, "bfloat16", "full")  # the seed: RADIO ViT encoder, 1280 = 16 x 80
VIT_BATCH = AttentionMetadata.ragged([256, 1024, 576])
BY_NAME = {b.name: b for b in fi.BACKENDS}


paged_batch = functools.partial(steps.paged_step, kv_heads=4)  # requests with cached tokens decode


# -- module and environment -------------------------------------------------------------------------
def test_module_imports_neither_torch_nor_flashinfer():
    assert backend_names_in_a_fresh_process("pytest_attn_backends.flashinfer", ("torch", "flashinfer")) == [
        "flashinfer", "flashinfer-fa2", "flashinfer-fa3", "flashinfer-auto"]


@pytest.mark.attn_long
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # flashinfer's own imports of cutlass
def test_flashinfer_is_importable_here():
    import flashinfer  # noqa: F401  (the CPU machines install it too: the plan logic reads its version)

    assert flashinfer_version()


def test_unavailable_without_a_gpu_says_why():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for backend in fi.BACKENDS:
        availability = backend.available()
        assert not availability and "no CUDA device" in availability.reason and "NVIDIA" in availability.reason


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="flashinfer-fa2"):
        fi.FlashInferBackend("flashinfer-fa4")


# -- offset units -----------------------------------------------------------------------------------
@pytest.mark.parametrize("version, units", [
    ("0.2.5", "elements"), ("0.6.18", "elements"), ("0.7.0", "tokens"), ("0.7.2.post1", "tokens"), ("0.8.1", "tokens"),
])
def test_cudnn_offset_units_follow_the_version(version, units):
    assert fi.cudnn_index_units(version) == units


def test_unparseable_version_is_refused_with_an_example():
    with pytest.raises(AttnInputError, match="0.7.2.post1"):
        fi.cudnn_index_units("latest")


def test_offsets_in_elements_scale_by_heads_and_head_dim():
    assert fi.kernel_offsets((0, 3, 5), "tokens", 16, 80) == (0, 3, 5)
    assert fi.kernel_offsets((0, 3, 5), "elements", 16, 80) == (0, 3 * 1280, 5 * 1280)
    with pytest.raises(AttnInputError):
        fi.kernel_offsets((0, 1), "bytes", 1, 1)


# -- the seed: ViT encoder without a cache ----------------------------------------------------------
def test_vit_seed_goes_to_cudnn_ragged_nhd_in_tokens():
    plan = fi.decide(VIT_BATCH, VIT, "policy", version="0.7.2.post1")
    assert (plan.backend, plan.kernel, plan.kernel_backend, plan.layout, plan.index_units, plan.reads_cache) == (
        "flashinfer", fi.RAGGED, "cudnn", "NHD", "tokens", False)
    assert plan.layer == VIT and not plan.parts
    assert plan.requests == (0, 3) and plan.tokens == (0, 1856)


def test_vit_seed_on_flashinfer_before_0_7_takes_element_offsets():
    assert fi.decide(VIT_BATCH, VIT, "policy", version="0.6.18").index_units == "elements"


def test_plan_without_a_gpu_returns_the_decision_and_no_wrappers():
    backend = BY_NAME["flashinfer"]
    plan = backend.plan(VIT_BATCH, VIT, device="cuda")
    assert plan.handle is None
    assert plan == fi.decide(VIT_BATCH, VIT, "policy", version=flashinfer_version())
    assert plan == backend.plan(VIT_BATCH, VIT, device="cuda")


# -- known hazards, refused before anything launches ------------------------------------------------
def test_fa2_at_head_dim_80_is_refused_citing_4299():
    reasons = BY_NAME["flashinfer-fa2"].unsupported(VIT, VIT_BATCH, "cuda")
    assert len(reasons) == 1 and "#4299" in reasons[0] and "head_dim 80" in reasons[0]


def test_fa3_at_head_dim_80_is_refused_naming_its_head_dims():
    (reason,) = BY_NAME["flashinfer-fa3"].unsupported(VIT, VIT_BATCH, "cuda")
    assert "64/128/256" in reason and "80" in reason


def test_auto_at_head_dim_80_on_hopper_is_refused_because_it_resolves_to_fa2():
    (reason,) = fi.route(VIT_BATCH, VIT, "auto", sm=(9, 0))[1]
    assert "resolves to fa2" in reason and "#4299" in reason
    assert BY_NAME["flashinfer-auto"].unsupported(VIT, VIT_BATCH, "cuda") == [reason]


def test_cudnn_at_head_dim_80_is_supported():
    assert BY_NAME["flashinfer"].unsupported(VIT, VIT_BATCH, "cuda") == []


@pytest.mark.parametrize("name", ["flashinfer-fa2", "flashinfer-fa3", "flashinfer-auto"])
def test_plan_refuses_a_hazard_instead_of_planning_it(name):
    with pytest.raises(UnsupportedCase) as caught:
        BY_NAME[name].plan(VIT_BATCH, VIT, device="cuda")
    assert caught.value.backend == name and caught.value.reasons


def test_fa3_needs_hopper_and_auto_elsewhere_resolves_to_fa2():
    layer = LayerSpec(8, 8, 128)
    batch = AttentionMetadata.ragged([100, 7])
    (reason,) = fi.route(batch, layer, "fa3", sm=(8, 0))[1]
    assert "Hopper" in reason
    plan = fi.decide(batch, layer, "auto", sm=(8, 0))
    assert plan.kernel_backend == "auto" and plan.detail("predicted_backend") == "fa2"
    assert fi.decide(batch, layer, "auto", sm=(9, 0)).detail("predicted_backend") == "fa3"


def test_cpu_and_float32_are_refused_by_the_capabilities():
    backend = BY_NAME["flashinfer"]
    assert any("cuda" in r for r in backend.unsupported(VIT, VIT_BATCH, "cpu"))
    fp32 = LayerSpec(16, 16, 80, "float32", "full")
    assert any("float32" in r for r in backend.unsupported(fp32, VIT_BATCH, "cuda"))


# -- the JIT budget ---------------------------------------------------------------------------------
def test_fa3_families_outside_the_budget_are_refused_with_the_way_out():
    layer = LayerSpec(8, 8, 128, "float16")
    batch = AttentionMetadata.ragged([64])
    (reason,) = fi.route(batch, layer, "fa3", sm=(9, 0))[1]
    assert "JIT budget" in reason and f"{fi.JIT_ENV}=all" in reason
    assert fi.route(batch, layer, "fa3", sm=(9, 0), fa3_budget=None)[1] == []


def test_budget_from_the_environment():
    assert fi.fa3_budget_from_env({}) == fi.DEFAULT_FA3_FAMILIES
    assert fi.fa3_budget_from_env({fi.JIT_ENV: "all"}) is None
    with pytest.raises(AttnInputError, match="all"):
        fi.fa3_budget_from_env({fi.JIT_ENV: "some"})


def test_policy_prefers_fa2_to_building_an_fa3_family_outside_the_budget():
    case = CATALOG["hd256-decode"]
    md, layer = first_step(case)
    assert fi.decide(md, layer, "policy").kernel_backend == "fa2"
    assert fi.decide(md, layer, "policy", fa3_budget=None).kernel_backend == "fa3"


# -- with a paged cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_mixed_batch_is_paged_prefill_then_decode_on_the_cache_layout(layout):
    md = paged_batch([33, 5, 1, 1], [0, 0, 40, 7], layout=layout)
    layer = LayerSpec(16, 4, 128)
    plan = fi.decide(md, layer, "policy", fa3_budget=None)  # fa3 built: the Hopper policy
    prefill, decode = plan.parts
    assert plan.reads_cache and plan.layout == layout and plan.layer == layer
    assert fi.decide(md, layer, "policy").parts[0].kernel_backend == "fa2"  # the default budget builds no fa3
    assert plan.kernels == (fi.PAGED_PREFILL, fi.DECODE)
    assert (prefill.kernel_backend, prefill.layout, prefill.index_units, prefill.requests) == (
        "fa3", layout, "tokens", (0, 2))
    assert prefill.tokens == (0, 38) and decode.tokens == (38, 40)
    assert (decode.kernel_backend, decode.layout, decode.index_units, decode.requests) == (
        "fa2", layout, "pages", (2, 4))
    assert decode.detail("tensor_cores") is False  # group size 4 has a CUDA-core decode kernel


def test_decode_only_batch_is_one_decode_launch():
    plan = fi.decide(paged_batch([1, 1], [40, 7]), LayerSpec(16, 4, 128), "policy")
    assert not plan.parts and plan.kernel == fi.DECODE and plan.requests == (0, 2)


def test_group_size_without_a_cuda_core_kernel_decodes_on_tensor_cores():
    layer = LayerSpec(20, 4, 128)  # group 5
    plan = fi.decide(paged_batch([1, 1], [40, 7]), layer, "policy", fa3_budget=None)
    assert plan.kernel == fi.DECODE and plan.detail("tensor_cores") is True and plan.kernel_backend == "fa3"
    (reason,) = fi.decode_hazards("fa2", False, layer, (9, 0))
    assert "groups" in reason


def test_generation_requests_of_several_tokens_go_through_paged_prefill():
    plan = fi.decide(paged_batch([33, 3, 1], [0, 40, 7]), LayerSpec(16, 4, 128), "policy")
    assert not plan.parts and plan.kernel == fi.PAGED_PREFILL and plan.requests == (0, 3)
    assert "one query token" in plan.detail("routing")


def test_head_dim_80_with_a_cache_goes_to_cudnn_paged_prefill_for_every_request():
    case = CATALOG["hd80-decode"]
    steps = list(step_metadata(case))
    for md in steps:
        plan = fi.decide(md, case.layer(), "policy")
        assert (plan.kernel, plan.kernel_backend, plan.reads_cache, plan.parts) == (fi.PAGED_PREFILL, "cudnn", True, ())
        assert "#4299" in plan.detail("routing")
    assert steps[1].num_generations  # the decode steps went there too


def test_cudnn_paged_prefill_on_flashinfer_before_0_7_is_refused_with_the_fix():
    md, layer = first_step(CATALOG["hd80-decode"])
    (reason,) = fi.route(md, layer, "policy", version="0.6.18")[1]
    assert "flashinfer-python>=0.7" in reason


@pytest.mark.parametrize("variant", ["fa2", "fa3"])
def test_forced_backends_decode_on_their_own_tensor_core_kernels(variant):
    plan = fi.decide(paged_batch([33, 1], [0, 40]), LayerSpec(16, 4, 128), variant)
    assert [p.kernel_backend for p in plan.parts] == [variant, variant]
    assert plan.parts[1].detail("tensor_cores") is True


@pytest.mark.parametrize("name", sorted(fi.VARIANTS))
@pytest.mark.parametrize("case", list(CATALOG.values()), ids=list(CATALOG))
def test_every_step_of_the_catalog_is_planned_or_refused_with_reasons(name, case):
    for md in step_metadata(case):
        layer = case.layer()
        plan = steps.planned_or_refused(BY_NAME[name], md, layer)
        if plan is None:
            continue
        assert plan.handle is None
        for p in plan.launches:
            assert not fi.kernel_hazards(p.kernel_backend, layer, fi.ASSUMED_SM) or p.kernel == fi.DECODE
            if p.kernel == fi.DECODE:
                assert all(n == 1 for n in md.seq_lens[slice(*p.request_range(md))])


def test_forward_refuses_cpu_tensors():
    import torch

    backend = BY_NAME["flashinfer"]
    md = AttentionMetadata.ragged([4])
    layer = LayerSpec(2, 2, 64)
    q = k = v = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(AttnInputError, match="CUDA"):
        backend.forward(q, k, v, md, backend.plan(md, layer, device="cuda"))


# -- the output check catches the TRT-LLM #13190 class of bug (bug corpus #1) -------------------------
class _ClaimsCudnnRagged(TorchSDPABackend):
    """Computes with torch but plans like the FlashInfer policy: every field a plan-only test
    (PR #12911's ``wrapper._backend == "cudnn"``) looks at says cuDNN ragged, NHD, tokens."""

    def __init__(self, name):
        super().__init__(name, use_varlen=False)

    def plan(self, metadata, layer, device="cpu"):
        return fi.decide(metadata, layer, "policy", name=self.name, device=device)

    def _torch_forward(self, q, k, v, metadata, plan, out):
        return TorchSDPABackend.forward(self, q, k, v, metadata, TorchSDPABackend.plan(self, metadata, plan.layer), out)


class ReadsRaggedKVAsHND(_ClaimsCudnnRagged):
    """The TRT-LLM #13190 bug: ragged K/V are NHD ([tokens, heads, dim]) but the kernel reads them as HND."""

    def forward(self, q, k, v, metadata, plan, out=None):
        def as_hnd(t):  # the same memory, indexed as [heads, tokens, dim]
            return t.reshape(t.shape[1], t.shape[0], t.shape[2]).transpose(0, 1)

        return self._torch_forward(q, as_hnd(k), as_hnd(v), metadata, plan, out)


class ReadsRaggedKVAsNHD(_ClaimsCudnnRagged):
    """The same path done right: the control."""

    def forward(self, q, k, v, metadata, plan, out=None):
        return self._torch_forward(q, k, v, metadata, plan, out)


class ElementOffsetKernel(_ClaimsCudnnRagged):
    """A kernel over flat q/k/v buffers that takes each request's start as an element offset (as
    FlashInfer's cuDNN path did up to 0.6.18), given offsets in ``units`` via kernel_offsets."""

    def __init__(self, name, units):
        super().__init__(name)
        self.units = units

    def forward(self, q, k, v, metadata, plan, out=None):
        import torch.nn.functional as F

        layer = plan.layer
        heads, kv_heads, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        qo = fi.kernel_offsets(metadata.qo_indptr, self.units, heads, d)
        kv = fi.kernel_offsets(metadata.kv_rows_indptr, self.units, kv_heads, d)
        flat_q, flat_k, flat_v, flat_out = q.reshape(-1), k.reshape(-1), v.reshape(-1), out.view(-1)
        for i, n in enumerate(metadata.seq_lens):
            qi = flat_q[qo[i]:qo[i] + n * heads * d].view(n, heads, d).transpose(0, 1)
            ki = flat_k[kv[i]:kv[i] + n * kv_heads * d].view(n, kv_heads, d).transpose(0, 1)
            vi = flat_v[kv[i]:kv[i] + n * kv_heads * d].view(n, kv_heads, d).transpose(0, 1)
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=layer.causal, scale=layer.scale,
                                                enable_gqa=layer.group_size > 1)
            flat_out[qo[i]:qo[i] + n * heads * d] = oi.transpose(0, 1).reshape(-1)
        return out


SEED_CASE = CATALOG["vit-ragged-mix"]  # 16 heads x 80, bf16, images of 256/1024/576/64/1 tokens


def test_a_plan_only_check_passes_the_layout_bug():
    bad = ReadsRaggedKVAsHND("bug-hnd")
    md, layer = first_step(SEED_CASE)
    plan = bad.plan(md, layer, device="cuda")
    assert (plan.kernel, plan.kernel_backend, plan.layout) == (fi.RAGGED, "cudnn", "NHD")  # PR #12911's check


def test_the_output_check_catches_ragged_kv_read_as_hnd():
    bad = ReadsRaggedKVAsHND("bug-hnd")
    with pytest.raises(AssertionError, match="bug-hnd"):
        assert_case_passes(run_case(bad, SEED_CASE), bad, SEED_CASE)


def test_the_same_path_reading_nhd_passes():
    good = ReadsRaggedKVAsNHD("nhd")
    assert_case_passes(run_case(good, SEED_CASE), good, SEED_CASE)


def test_the_output_check_catches_token_offsets_given_to_an_element_offset_kernel():
    bad = ElementOffsetKernel("bug-units", fi.cudnn_index_units("0.7.2.post1"))  # tokens, not converted
    with pytest.raises(AssertionError, match="bug-units"):
        assert_case_passes(run_case(bad, SEED_CASE), bad, SEED_CASE)


def test_element_offsets_given_to_an_element_offset_kernel_pass():
    good = ElementOffsetKernel("units", fi.cudnn_index_units("0.6.18"))
    assert_case_passes(run_case(good, SEED_CASE), good, SEED_CASE)


def test_the_decision_runs_once_per_forward(monkeypatch):
    """unsupported() then plan() of one batch and layer route once (issue 18: route ran twice)."""
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.check.harness import first_step

    calls = []
    real = fi.route
    monkeypatch.setattr(fi, "route", lambda *a, **k: calls.append(1) or real(*a, **k))
    backend = fi.FlashInferBackend("flashinfer")
    metadata, layer = first_step(CATALOG["llm-mixed-nhd"])
    assert backend.unsupported(layer, metadata, "cuda") == []
    plan = backend.plan(metadata, layer, "cuda")  # on this CPU machine: the decision alone
    assert len(calls) == 1 and plan.made_for is not None
    other, _ = first_step(CATALOG["llm-mixed-nhd"])  # another batch object: decided anew
    backend.plan(other, layer, "cuda")
    assert len(calls) == 2
