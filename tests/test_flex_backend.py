"""The FlexAttention backend on CPU: what it declares and plans, that it passes every catalog case a
CPU run selects (all of them, within 2048 tokens), that its log-sum-exp is the reference's (sink
included), and that the output check catches the bugs its score_mod and mask_mod could hide: a
soft-cap dropped, a sink dropped, a causal mask aligned top-left."""
import functools
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import steps

from pytest_attn.cases.catalog import CATALOG
from pytest_attn.core.contract import LayerSpec
from pytest_attn.check.harness import assert_case_passes, first_step, make_qkv, run_case
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn.plugin.session import CPU_MAX_TOKENS
from pytest_attn_backends import flex

BACKEND = flex.FlexAttentionBackend()
VIT = LayerSpec(16, 16, 80, "bfloat16", "full")  # the seed: RADIO ViT encoder, 1280 = 16 x 80
VIT_BATCH = AttentionMetadata.ragged([256, 1024, 576])
# GPT-OSS's sliding layers: 64 query heads over 8 KV heads, a window of 128 tokens, sinks; with a cap
GPT_OSS = LayerSpec(64, 8, 64, "bfloat16", "causal", window_left=127, logits_soft_cap=30.0,
                    sinks=tuple(0.1 * h for h in range(64)))
CPU_CASES = [c for c in CATALOG.values() if c.max_tokens <= CPU_MAX_TOKENS]


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


paged_step = functools.partial(steps.paged_step, head_dim=64)  # requests with cached tokens decode


# -- module and environment -------------------------------------------------------------------------
def test_module_imports_no_torch_and_availability_reads_the_disk():
    code = ("import sys, pytest_attn_backends.flex as m; "
            "a = m.BACKENDS[0].available(); "
            "assert 'torch' not in sys.modules, sorted(sys.modules); "
            "print([b.name for b in m.BACKENDS], a.ok)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"['flex'] {flex.torch_build.is_installed()}"


def test_available_where_torch_has_flex_attention(torch):
    assert BACKEND.available()


def test_unavailable_without_torch_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(flex.torch_build, "is_installed", lambda: False)
    availability = BACKEND.available()
    assert not availability and "torch is not installed" in availability.reason and "pip install" in availability.reason


def test_unavailable_when_flex_attention_cannot_be_imported(torch, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # import raises ImportError
    availability = BACKEND.available()
    assert not availability
    assert "cannot be imported" in availability.reason and flex.MIN_TORCH in availability.reason


def test_unavailable_when_the_installed_torch_has_no_flex_attention_file(monkeypatch):
    monkeypatch.setattr(flex, "sys", SimpleNamespace(modules={}, version=sys.version))  # torch never imported
    monkeypatch.setattr(flex, "_flex_file_present", lambda: False)
    availability = BACKEND.available()
    assert not availability and "no torch.nn.attention.flex_attention" in availability.reason


# -- what it declares -------------------------------------------------------------------------------
def test_capabilities_declare_what_score_mod_and_mask_mod_express():
    caps = BACKEND.capabilities
    assert caps.sliding_window and caps.soft_cap and caps.sinks and caps.head_dim_vo
    assert caps.cross_attention and caps.chunked_prefill and caps.multi_token_generation
    assert caps.kv_dtypes == frozenset({"float8_e4m3fn", "bfloat16", "float16"}) and caps.lse_base == "e"
    assert caps.never_reads_masked_slots and caps.devices == frozenset({"cpu", "cuda"})
    assert set(caps.dtypes) == {"float32", "float16", "bfloat16"} and set(caps.kv_layouts) == {"NHD", "HND"}
    assert not BACKEND.requires_contiguous


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_gpt_oss_layer_is_supported(device):
    assert BACKEND.unsupported(GPT_OSS, paged_step([1, 300, 4], [40, 0, 20]), device) == []


def test_head_dims_over_256_are_refused_on_cuda_only():
    """Absorbed MLA's 576/512 needs more shared memory than the Triton template has (an H200)."""
    layer = LayerSpec(16, 1, 576, head_dim_vo=512, latent_kv=True)
    batch = AttentionMetadata.ragged([5])
    (reason,) = BACKEND.unsupported(layer, batch, "cuda")
    assert "shared memory above head dim 256" in reason and "576/512" in reason
    assert BACKEND.unsupported(layer, batch, "cpu") == []


def test_head_dims_under_16_are_refused_on_cuda_only():
    layer = LayerSpec(4, 4, 8, "bfloat16")
    batch = AttentionMetadata.ragged([5])
    (reason,) = BACKEND.unsupported(layer, batch, "cuda")
    assert "at least 16" in reason and "8/8" in reason
    assert BACKEND.unsupported(layer, batch, "cpu") == []
    assert "at least 16" in BACKEND.unsupported(LayerSpec(4, 4, 64, head_dim_vo=8), batch, "cuda")[0]


def test_other_devices_are_refused_by_the_contract():
    (reason,) = BACKEND.unsupported(VIT, VIT_BATCH, "mps")
    assert "not mps" in reason


# -- plans ------------------------------------------------------------------------------------------
def test_vit_seed_plan_is_eager_nhd_tokens_without_a_cache_or_mods():
    plan = BACKEND.plan(VIT_BATCH, VIT)
    assert (plan.backend, plan.kernel, plan.kernel_backend, plan.layout, plan.index_units, plan.reads_cache,
            plan.device) == ("flex", "flex_attention", "eager", "NHD", "tokens", False, "cpu")
    assert plan.layer == VIT and not plan.parts
    assert plan.detail("launches") == 3
    assert plan.detail("mask_mod") == "none (full attention)" and plan.detail("score_mod") == "none"
    assert plan.detail("sinks") is None and plan.detail("gqa") is None and plan.detail("kv_cache") is None


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gpt_oss_plan_reads_the_cache_in_its_layout_and_names_every_mod(layout):
    batch = paged_step([1, 300, 4, 0], [40, 0, 20, 0], layout=layout)
    plan = BACKEND.plan(batch, GPT_OSS)
    assert (plan.kernel_backend, plan.layout, plan.index_units, plan.reads_cache) == ("eager", layout, "tokens", True)
    assert plan.detail("mask_mod") == "causal bottom-right + window 127 + sink key always visible"
    assert plan.detail("score_mod") == "soft-cap 30 + sinks"
    assert "zero key" in plan.detail("sinks")
    assert plan.detail("gqa") == "enable_gqa, 8 query heads per KV head"
    assert plan.detail("launches") == 3  # the request with no new tokens launches nothing


def test_plan_on_cuda_is_compiled_triton():
    plan = BACKEND.plan(VIT_BATCH, VIT, device="cuda:1")
    assert (plan.kernel_backend, plan.device) == ("compiled", "cuda:1")
    assert "dynamic=True" in plan.detail("compile") and "flex_decoding off" in plan.detail("compile")


def test_non_causal_window_has_a_mask_and_sinks_alone_do_not():
    windowed = LayerSpec(8, 8, 64, mask="full", window_left=48)
    assert BACKEND.plan(VIT_BATCH, windowed).detail("mask_mod") == "window 48"
    sinks_only = LayerSpec(8, 8, 64, mask="full", sinks=(1.0,) * 8)
    plan = BACKEND.plan(VIT_BATCH, sinks_only)
    assert plan.detail("mask_mod") == "none (full attention)" and plan.detail("score_mod") == "sinks"
    assert not flex.needs_mask(sinks_only) and flex.needs_mask(windowed)


def test_fp8_cache_plan_says_it_dequantizes_on_gather():
    layer = LayerSpec(16, 8, 64, kv_dtype="fp8", k_scale=0.05, v_scale=0.02)
    plan = BACKEND.plan(paged_step([3], [0], dtype="float8_e4m3fn"), layer)
    assert plan.detail("kv_cache") == "float8_e4m3fn, dequantized to bfloat16 on gather"


def test_planning_twice_gives_equal_plans():
    batch = paged_step([1, 300, 4], [40, 0, 20], layout="HND")
    assert BACKEND.plan(batch, GPT_OSS) == BACKEND.plan(batch, GPT_OSS)
    assert BACKEND.plan(VIT_BATCH, VIT, "cuda") == BACKEND.plan(VIT_BATCH, VIT, "cuda")


@pytest.mark.parametrize("case", list(CATALOG.values()), ids=list(CATALOG))
def test_every_catalog_case_is_planned_in_its_layout(case):
    metadata, layer = first_step(case)
    for device in ("cpu", "cuda") if layer.head_dim <= flex.MAX_CUDA_HEAD_DIM else ("cpu",):
        assert BACKEND.unsupported(layer, metadata, device) == []
        plan = BACKEND.plan(metadata, layer, device)
        assert plan.layout == (case.kv_layout if case.cache else "NHD") and plan.reads_cache == case.cache
        assert plan.detail("launches") == sum(1 for n in metadata.seq_lens if n)


# -- mask_mod and score_mod, evaluated on their own -------------------------------------------------
def _visible(torch, lq, lk, **kw):
    """mask_mod over a [lq, lk (+1 with a sink)] grid, as a list of lists of 0/1."""
    sink = kw.get("sink", False)
    window = kw.get("window", -1)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    mask_mod = flex.make_mask_mod(kw.get("causal", True), window >= 0, sink, as_t(lk - lq), as_t(max(window, 0)),
                                  as_t(lk))
    q_idx = torch.arange(lq)[:, None]
    kv_idx = torch.arange(lk + sink)[None, :]
    return mask_mod(0, 0, q_idx, kv_idx).int().tolist()


def test_causal_mask_is_aligned_bottom_right(torch):
    # 2 queries over 3 keys (bug corpus #19's off-by-one): the queries are keys 1 and 2
    assert _visible(torch, 2, 3) == [[1, 1, 0], [1, 1, 1]]


def test_window_bounds_the_left_and_the_sink_is_always_visible(torch):
    assert _visible(torch, 2, 5, window=1, sink=True) == [[0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1]]
    assert _visible(torch, 2, 5, causal=False, window=1) == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_score_mod_caps_then_gives_the_sink_key_its_logit(torch):
    as_t = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)  # noqa: E731
    score_mod = flex.make_score_mod(True, True, as_t(30.0), as_t([0.5, -2.0]), as_t(4, torch.int32))
    scores = as_t([[100.0, -100.0, 0.0, 1.0, 7.0]])
    out = score_mod(scores, 0, as_t(1, torch.int64), 0, torch.arange(5)[None, :])
    expected = (30 * torch.tanh(scores / 30))[0, :4].tolist() + [-2.0]
    assert out[0].tolist() == pytest.approx(expected)


# -- how flex is called ------------------------------------------------------------------------------
def test_kernel_options_pick_the_triton_kernel(torch):
    from torch.nn.attention import flex_attention as flex_module

    options = flex.triton_kernel_options(flex_module)
    assert options in ({"BACKEND": "TRITON"}, {"FORCE_USE_FLEX_ATTENTION": True})
    assert flex.triton_kernel_options(object()) == {"FORCE_USE_FLEX_ATTENTION": True}


def test_compiled_calls_raise_the_recompile_limit_for_the_call_only(torch):
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    with flex._call_context(compiled=True):
        assert getattr(config, name) >= flex.RECOMPILE_LIMIT
    assert getattr(config, name) == before


def test_cpu_runs_compile_nothing_and_warn_nothing(torch, monkeypatch):
    """Uncompiled flex otherwise traces its operator with TorchDynamo for every shape (0.3 s each)."""
    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip(f"torch {torch.__version__} has no torch.compiler.set_stance")
    from torch._dynamo.utils import counters
    from torch.nn.attention import flex_attention as flex_module

    if hasattr(flex_module, "_WARNINGS_SHOWN"):  # flex warns once per process: let it warn again
        monkeypatch.setattr(flex_module, "_WARNINGS_SHOWN", set())
    case = CATALOG["sinks-spec-decode"]
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_case_passes(run_case(BACKEND, case, seed=3), BACKEND, case)
    assert counters["stats"]["unique_graphs"] == graphs


# -- the log-sum-exp against the reference -----------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lse_is_the_references_with_the_sink_in_it(torch, dtype):
    from pytest_attn.check.reference import reference_attention

    layer = LayerSpec(8, 2, 32, dtype, "causal", window_left=9, logits_soft_cap=5.0,
                      sinks=(-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0), return_lse=True)
    batch = AttentionMetadata.cross([3, 0, 17, 1], [20, 4, 17, 9])  # fewer queries than keys: bottom-right
    q, k, v = make_qkv(batch.num_tokens, layer, "cpu", 11, num_kv_tokens=batch.num_kv_tokens, input_scale=2.0)
    plan = BACKEND.plan(batch, layer)
    out = torch.full((batch.num_tokens, 8, 32), float("nan"), dtype=q.dtype)
    lse = torch.full((batch.num_tokens, 8), float("nan"))
    assert BACKEND.forward(q, k, v, batch, plan, out=out, lse=lse) is out
    offs = batch.kv_rows_indptr
    keys = [k[offs[i]:offs[i + 1]] for i in range(4)]
    values = [v[offs[i]:offs[i + 1]] for i in range(4)]
    ref_out, ref_lse = reference_attention(q, keys, values, batch.seq_lens, layer, return_lse=True)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert torch.allclose(lse.double(), ref_lse.double(), atol=tol, rtol=0)
    assert torch.allclose(out.double(), ref_out.double(), atol=tol, rtol=0)
    no_sink = reference_attention(q, keys, values, batch.seq_lens, LayerSpec(8, 2, 32, dtype, "causal", window_left=9,
                                  logits_soft_cap=5.0), return_lse=True)[1]
    assert (lse.double() - no_sink.double()).abs().max() > 0.1  # the sink is in it, and it matters


# -- every catalog case a CPU run selects -----------------------------------------------------------
@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_catalog_case_passes(case):
    pytest.importorskip("torch")
    assert_case_passes(run_case(BACKEND, case, seed=1), BACKEND, case)


# -- the output check catches what a wrong score_mod or mask_mod does --------------------------------
class DropsSoftCap(flex.FlexAttentionBackend):
    """Plans the soft-cap but forgets it in score_mod (bug corpus #14, #15: a cap specialised away)."""

    name = "flex-bug-no-softcap"

    def _layer_tensors(self, layer, device):
        params = super()._layer_tensors(layer, device)
        params["cap"] = params["cap"] * 1e6  # cap * tanh(s / cap) ~= s
        return params


def test_a_dropped_soft_cap_fails_the_soft_cap_cases():
    bad = DropsSoftCap()
    assert bad.plan(*first_step(CATALOG["softcap-30-ragged"])).detail("score_mod") == "soft-cap 30"
    for name in ("softcap-30-ragged", "softcap-50-decode"):
        with pytest.raises(AssertionError, match="flex-bug-no-softcap"):
            assert_case_passes(run_case(bad, CATALOG[name], seed=1), bad, CATALOG[name])


def test_the_same_backend_with_its_cap_passes_the_soft_cap_case():
    case = CATALOG["softcap-30-ragged"]
    assert_case_passes(run_case(BACKEND, case, seed=1), BACKEND, case)


def test_a_dropped_sink_fails_the_sink_cases(monkeypatch):
    real = flex.make_score_mod
    monkeypatch.setattr(flex, "make_score_mod", lambda capped, sink, *args: real(capped, False, *args))
    for name in ("sinks-prefill", "sinks-decode"):
        with pytest.raises(AssertionError, match="sinks"):
            assert_case_passes(run_case(BACKEND, CATALOG[name], seed=1), BACKEND, CATALOG[name])


def test_a_causal_mask_aligned_top_left_fails_chunked_prefill_and_prefix_reuse(monkeypatch):
    real = flex.make_mask_mod
    monkeypatch.setattr(flex, "make_mask_mod",
                        lambda causal, windowed, sink, offset, *args: real(causal, windowed, sink, offset * 0, *args))
    for name in ("prefix-reuse-q2-kv3", "chunked-prefill", "spec-decode-q4"):
        with pytest.raises(AssertionError, match=name):
            assert_case_passes(run_case(BACKEND, CATALOG[name], seed=1), BACKEND, CATALOG[name])

