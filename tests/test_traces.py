"""Kernel traces: what a forward really launched against what its backend declares for the plan.
The matching is checked on handwritten traces named as FlashInfer, TensorRT-LLM and torch name
their kernels (read from their sources), and on real CPU traces of torch and flex; a planted backend
whose plan says one SDPA kernel while it runs another must fail, naming the kernel."""
import dataclasses

import pytest

from pytest_attn.cases.catalog import CATALOG
from pytest_attn.check.harness import step_metadata
from pytest_attn.check.traces import (KernelFamily, KernelTrace, as_families, assert_traces_match, check_trace,
                                      compare_replay, shorten, trace_case)
from pytest_attn.core.errors import AttnCheckFailure
from pytest_attn.env.registry import Registry

FI_PAGED = ("void flashinfer::BatchPrefillWithPagedKVCacheKernel<flashinfer::KernelTraits<(flashinfer::MaskMode)1, "
            "128u, 1u, 4u, 8u, 8u, 1u, 4u, (flashinfer::PosEncodingMode)0, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16, "
            "float, int, DefaultAttention<false, false, false, false> >, int>(int, int)")
FI_RAGGED = "void flashinfer::BatchPrefillWithRaggedKVCacheKernel<flashinfer::KernelTraits<...> >(...)"
FI_DECODE = "void flashinfer::BatchDecodeWithPagedKVCacheKernel<(flashinfer::PosEncodingMode)0, 2u, 4u, 8u, 16u, 1u, 8u>(...)"
FI_FA3 = "void flashinfer::PrefillWithKVCacheKernel<flashinfer::CollectiveMainloop<...>, ...>(...)"
FI_MERGE = "void flashinfer::PersistentVariableLengthMergeStatesKernel<8u, 16u, 8u, 4u, __nv_bfloat16, float, int>(...)"
CUDNN = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0"
FMHA_V2 = "fmha_v2_flash_attention_bf16_64_128_S_q_k_v_128_sm90_kernel_nl_tiled"
XQA = "kernel_mha"
TORCH_FLASH = "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t> >(...)"
TORCH_EFFICIENT = "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)"
GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
FILL = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::BFloat16>, std::array<char*, 1ul> >(...)"
COPY = "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda>(...)"


def backend(name):
    return Registry.discover().get(name)


def plans(name, case, steps=2):
    """The plans ``name`` makes (decided on CPU, as for an H100) for the first steps of ``case``."""
    b, layer = backend(name), CATALOG[case].layer(0)
    return [b.plan(md, layer, "cuda") for md, _ in zip(step_metadata(CATALOG[case]), range(steps))]


def test_kernel_names_are_shortened_for_reports():
    assert shorten(FI_PAGED) == "flashinfer::BatchPrefillWithPagedKVCacheKernel<…>"
    assert shorten(CUDNN) == CUDNN
    assert len(shorten("k" * 500)) == 110


def test_a_trace_counts_launches_and_streams():
    trace = KernelTrace.of("cuda", [FI_PAGED, FILL, FI_PAGED], [7, 7, 9])
    assert trace.counts() == {FI_PAGED: 2, FILL: 1}
    assert trace.launches[0].streams == (7, 9)
    assert [l.name for l in trace.attention()] == [FI_PAGED]


def test_flashinfer_prefill_then_decode_matches_its_kernels_and_a_cudnn_launch_does_not():
    prefill, decode = plans("flashinfer", "hd64-decode-page1")
    assert check_trace(KernelTrace.of("cuda", [COPY, FI_PAGED, FI_MERGE]), backend("flashinfer").expected_kernels(prefill)) == []
    assert check_trace(KernelTrace.of("cuda", [COPY, FI_DECODE]), backend("flashinfer").expected_kernels(decode)) == []
    wrong = check_trace(KernelTrace.of("cuda", [COPY, CUDNN]), backend("flashinfer").expected_kernels(decode))
    assert any("cudnn_generated_fort_native_sdpa" in p and "outside the declared" in p for p in wrong), wrong
    assert any("launched nothing" in p for p in wrong), wrong


def test_flashinfer_cudnn_plan_fails_when_fa2_runs_instead():
    """The ViT route: the plan says cuDNN; a fa2 ragged kernel in the trace is the bug it must catch."""
    (plan,) = plans("flashinfer", "vit-1img-224", steps=1)
    assert plan.kernel_backend == "cudnn"
    declared = backend("flashinfer").expected_kernels(plan)
    assert check_trace(KernelTrace.of("cuda", [CUDNN]), declared) == []
    problems = check_trace(KernelTrace.of("cuda", [FI_RAGGED]), declared)
    assert problems and "BatchPrefillWithRaggedKVCacheKernel" in problems[0]


def test_flashinfer_fa3_and_forced_fa2_decode_families():
    b = backend("flashinfer-fa2")
    _, decode = plans("flashinfer-fa2", "hd64-decode-page1")
    assert decode.detail("tensor_cores")  # forced fa2 decode runs the prefill kernels
    assert check_trace(KernelTrace.of("cuda", [FI_PAGED]), b.expected_kernels(decode)) == []
    assert check_trace(KernelTrace.of("cuda", [FI_DECODE]), b.expected_kernels(decode))
    fa3_part = dataclasses.replace(decode, kernel_backend="fa3")
    assert check_trace(KernelTrace.of("cuda", [FI_FA3]), b.expected_kernels(fa3_part)) == []
    assert check_trace(KernelTrace.of("cuda", [FI_PAGED]), b.expected_kernels(fa3_part))


def test_trtllm_fmha_and_xqa_families():
    from pytest_attn_backends.trtllm import FMHA, XQA as XQA_KERNEL
    from pytest_attn.core.contract import Plan

    b = backend("trtllm")
    fmha = Plan("trtllm", FMHA, "fmha_v2", "NHD", "tokens", False, device="cuda")
    xqa = Plan("trtllm", XQA_KERNEL, "xqa", "NHD", "pages", True, device="cuda")
    mixed = Plan("trtllm", f"{FMHA}+{XQA_KERNEL}", "fmha_v2+xqa", "NHD", "pages", True, device="cuda",
                 parts=(dataclasses.replace(fmha, reads_cache=True), xqa))
    assert check_trace(KernelTrace.of("cuda", ["Memset (Device)", FMHA_V2]), b.expected_kernels(fmha)) == []
    assert check_trace(KernelTrace.of("cuda", [XQA]), b.expected_kernels(xqa)) == []
    assert check_trace(KernelTrace.of("cuda", [FMHA_V2, XQA]), b.expected_kernels(mixed)) == []
    only_fmha = check_trace(KernelTrace.of("cuda", [FMHA_V2, FMHA_V2]), b.expected_kernels(mixed))
    assert only_fmha == [f"the declared family 'XQA (TensorRT-LLM generation)' launched nothing (patterns kernel_mha); "
                         f"it ran: {FMHA_V2} x2"]


def test_torch_sdpa_families_on_cuda_tell_flash_efficient_and_math_apart():
    b = backend("torch")
    md, _ = next(zip(step_metadata(CATALOG["hd64-ragged"]), range(1)))
    layer = CATALOG["hd64-ragged"].layer(0)
    plan = b.plan(md, layer, "cuda")
    for kernel_backend, right, wrong in (("flash", TORCH_FLASH, TORCH_EFFICIENT), ("efficient", TORCH_EFFICIENT, GEMM),
                                         ("math", GEMM, TORCH_FLASH), ("cudnn", CUDNN, TORCH_FLASH)):
        part = dataclasses.replace(plan, kernel="scaled_dot_product_attention", kernel_backend=kernel_backend)
        assert check_trace(KernelTrace.of("cuda", [COPY, right, FILL]), b.expected_kernels(part)) == [], kernel_backend
        assert check_trace(KernelTrace.of("cuda", [COPY, wrong]), b.expected_kernels(part)), kernel_backend


def test_no_declaration_reports_only_and_strings_are_optional_families():
    trace = KernelTrace.of("cuda", ["some_kernel"])
    assert check_trace(trace, None) == []
    assert check_trace(trace, [r"^some_"]) == []
    assert check_trace(KernelTrace.of("cuda", []), [r"^some_"]) == []  # a string family need not launch
    assert check_trace(KernelTrace.of("cuda", ["other"]), [r"^some_"])
    with pytest.raises(TypeError):
        as_families([42])


def test_on_cpu_only_attention_operators_are_judged():
    declared = [KernelFamily("SDPA flash (cpu)", (r"^aten::_scaled_dot_product_flash_attention_for_cpu$",))]
    ok = KernelTrace.of("cpu", ["aten::copy_", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm"])
    assert check_trace(ok, declared) == []
    fell_back = KernelTrace.of("cpu", ["aten::copy_", "aten::_scaled_dot_product_attention_math"])
    problems = check_trace(fell_back, declared)
    assert "aten::_scaled_dot_product_attention_math x1, outside the declared" in problems[0]


def test_a_replay_must_launch_what_the_eager_call_launched():
    eager = KernelTrace.of("cuda", ["Memcpy HtoD (Pageable -> Device)", FI_DECODE, FI_MERGE])
    assert compare_replay(eager, KernelTrace.of("cuda", [FI_DECODE, FI_MERGE])) == []
    assert compare_replay(eager, KernelTrace.of("cuda", [FI_DECODE])) == [
        "flashinfer::PersistentVariableLengthMergeStatesKernel<…>: 1 launch(es) eager, 0 in the replay"]
    assert "recorded no kernel of the graph replay" in compare_replay(eager, KernelTrace.of("cuda", []))[0]


# -- real traces on CPU --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, op", [("torch", "aten::_scaled_dot_product_flash_attention_for_cpu"),
                                      ("flex", "FlexAttentionAutogradOp")])
def test_cpu_traces_of_the_builtin_backends_match_their_declaration(name, op):
    steps = trace_case(backend(name), CATALOG["hd64-decode-page1"], device="cpu")
    assert steps and all(not s.problems for s in steps), [s.problems for s in steps]
    assert steps[0].trace.counts()[op] == 2  # one per request
    assert_traces_match(backend(name), CATALOG["hd64-decode-page1"], steps)


def test_a_backend_whose_plan_says_flash_while_it_runs_math_fails_naming_the_kernel():
    from pytest_attn_backends.torch_sdpa import TorchSDPABackend

    class SaysFlashRunsMath(TorchSDPABackend):
        def forward(self, q, k, v, metadata, plan, out=None, lse=None):
            return super().forward(q, k, v, metadata, dataclasses.replace(plan, kernel_backend="math"), out, lse)

    liar = SaysFlashRunsMath("says-flash")
    case = CATALOG["hd64-ragged"]
    steps = trace_case(liar, case, device="cpu")
    with pytest.raises(AttnCheckFailure) as failure:
        assert_traces_match(liar, case, steps)
    assert "aten::_scaled_dot_product_attention_math" in str(failure.value)
    assert "SDPA flash (cpu)" in str(failure.value)


class _Config:
    def __init__(self, trace=None):
        self.trace = trace

    def getoption(self, name, default=None):
        assert name == "attn_trace"
        return self.trace if self.trace is not None else default


def test_traces_are_on_unless_the_option_or_the_environment_turns_them_off(monkeypatch):
    from pytest_attn.check.traces import TRACE_ENV, tracing_enabled

    monkeypatch.delenv(TRACE_ENV, raising=False)
    assert tracing_enabled(_Config()) == (True, "")
    assert tracing_enabled(_Config("off")) == (False, "kernel traces are off (--attn-trace=off)")
    monkeypatch.setenv(TRACE_ENV, "off")
    assert tracing_enabled(_Config()) == (False, "kernel traces are off ($PYTEST_ATTN_TRACE=off)")
    assert tracing_enabled(_Config("on"))[0]  # the option wins over the environment


def test_a_kernel_the_profiler_could_not_name_is_not_judged_but_a_named_stranger_still_fails():
    """An H200 run (torch 2.11) recorded SDPA math's GEMMs at head dim 576 without names: they are
    neither outside the families nor proof that a family ran; a named kernel outside still fails."""
    families = [KernelFamily("SDPA math (cuda)", (r"(?i)gemm",))]
    assert check_trace(KernelTrace.of("cuda", ["", ""]), families) == []
    (problem,) = check_trace(KernelTrace.of("cuda", ["", "flash_fwd_kernel"]), families)
    assert "flash_fwd_kernel x1, outside the declared kernel families" in problem
    (problem,) = check_trace(KernelTrace.of("cuda", []), families)
    assert "launched nothing" in problem


def test_a_kernel_in_an_anonymous_namespace_keeps_its_name_in_reports():
    """An H200 run printed such kernels as blank: the parameter-list cut took "(anonymous namespace)"."""
    from pytest_attn.check.traces import shorten

    assert shorten("void (anonymous namespace)::masked_fill_kernel<float>(float*, int)") == \
        "(anonymous namespace)::masked_fill_kernel<…>"
    assert shorten("void at::native::(anonymous namespace)::softmax<4>(c10::BFloat16*)") == \
        "at::native::(anonymous namespace)::softmax<…>"


def test_sdpa_math_on_cuda_declares_the_softmax_between_its_gemms():
    """An H200 trace of SDPA's math path: GEMMs and (anonymous namespace)::softmax_warp_forward."""
    from pytest_attn_backends.torch_sdpa import TorchSDPABackend
    from pytest_attn.core.contract import Plan

    layer = CATALOG["swa-causal-ragged"].layer()
    plan = Plan("torch", "scaled_dot_product_attention", "math", "NHD", "tokens", False, device="cuda:0", layer=layer)
    gemm, softmax = "sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize32x32x8", "void (anonymous namespace)::softmax_warp_forward<float>(float*)"
    declared = TorchSDPABackend().expected_kernels(plan)
    assert check_trace(KernelTrace.of("cuda", [gemm, softmax, gemm]), declared) == []
    assert check_trace(KernelTrace.of("cuda", [gemm, "pytorch_flash::flash_fwd_kernel<x>(p)"]), declared) != []
