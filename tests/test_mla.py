"""Absorbed multi-head latent attention (MLA, issue 21 item 6): the ``latent_kv`` layer, its inputs
and reference, the catalog's MLA cases on torch, planted MLA bugs that must fail, the backends that
must skip MLA with a reason, and the flashinfer-mla backend's decisions (pure Python, on CPU)."""
import importlib.util
import math
import pathlib
import re

import pytest
import torch

from pytest_attn.cases.catalog import CATALOG, MLA_SCALE, select
from pytest_attn.check.batch import build_batch
from pytest_attn.check.harness import assert_case_passes, make_qkv, run_case, step_metadata
from pytest_attn.check.reference import reference_attention
from pytest_attn.core.contract import Backend, Capabilities, LayerSpec, Plan
from pytest_attn.core.errors import AttnCheckFailure, AttnInputError, UnsupportedCase
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn_backends import flashinfer_mla as fim
from pytest_attn_backends.flashinfer import FlashInferBackend
from pytest_attn_backends.torch_sdpa import TorchSDPABackend
from pytest_attn_backends.trtllm import TrtllmBackend

CKV, ROPE = 512, 64


def mla_layer(heads=16, mask="causal", **kw) -> LayerSpec:
    return LayerSpec(heads, 1, CKV + ROPE, "bfloat16", mask, sm_scale=MLA_SCALE, head_dim_vo=CKV, latent_kv=True, **kw)


MLA_CASES = select(["mla"])
CPU_MLA_CASES = [c for c in MLA_CASES if c.max_tokens <= 2048]


# -- the layer ---------------------------------------------------------------------------------------
def test_a_latent_layer_is_one_latent_head_whose_v_is_the_ckv_part_of_k():
    layer = mla_layer(128)
    assert (layer.head_dim_v, layer.head_dim_rope, layer.group_size) == (512, 64, 128)
    assert "latent_kv" in layer.features() and "head_dim_vo" in layer.features()
    assert "absorbed MLA 128 heads over one latent KV head x 576 (c_kv 512 + rope 64" in layer.describe()
    assert LayerSpec(8, 8, 192, head_dim_vo=128).head_dim_rope == 0  # a 192/128 layer is no MLA


@pytest.mark.parametrize("kwargs, says", [
    (dict(num_kv_heads=2), "one latent KV head"),
    (dict(head_dim_vo=None), "head_dim_vo"),
    (dict(head_dim_vo=576), "below head_dim"),
    (dict(kv_dtype="fp8", k_scale=0.1, v_scale=0.2), "one scale"),
    (dict(latent_kv=1), "True or False"),
])
def test_a_latent_layer_that_is_not_mla_is_refused_with_what_is_wrong(kwargs, says):
    fields = dict(num_heads=16, num_kv_heads=1, head_dim=576, head_dim_vo=512, latent_kv=True) | kwargs
    with pytest.raises(AttnInputError, match=says):
        LayerSpec(**fields)


@pytest.mark.parametrize("strided", [False, True])
def test_inputs_of_a_latent_layer_have_v_equal_to_the_ckv_part_of_k(strided):
    layer = mla_layer(4)
    q, k, v = make_qkv(9, layer, "cpu", seed=3, strided=strided)
    assert v.shape == (9, 1, CKV) and torch.equal(v, k[..., :CKV])
    _, k_plain, v_plain = make_qkv(9, LayerSpec(4, 1, 576, head_dim_vo=512), "cpu", seed=3)
    assert not torch.equal(v_plain, k_plain[..., :CKV])  # other layers keep V of its own


def test_a_hand_built_latent_batch_has_v_equal_to_the_ckv_part_of_k_in_the_cache_history_too():
    batch = build_batch([3, 1], cached_lens=[0, 20], num_heads=16, num_kv_heads=1, head_dim=576, head_dim_vo=512,
                        mask="causal", sm_scale=MLA_SCALE, latent_kv=True)
    for keys, values in zip(batch.keys, batch.values):
        assert torch.equal(values, keys[..., :CKV])
    batch.assert_matches_reference(TorchSDPABackend())


def test_the_reference_of_a_latent_layer_is_mqa_with_v_the_ckv_part_of_k_computed_by_hand():
    layer = mla_layer(8)
    q, k, _ = make_qkv(7, layer, "cpu", seed=11)
    keys = [torch.cat([make_qkv(5, layer, "cpu", seed=12)[1], k])]  # 5 cached keys, then the 7 new ones
    values = [kk[..., :CKV] for kk in keys]
    ref = reference_attention(q, keys, values, (7,), layer, precision="high")
    qd, kd = q.double(), keys[0].double()[:, 0]  # [7, H, 576], [12, 576]
    scores = torch.einsum("qhd,kd->hqk", qd, kd) * (192 ** -0.5)
    visible = torch.arange(12)[None, :] <= torch.arange(5, 12)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    by_hand = torch.einsum("hqk,kd->qhd", probs, kd[:, :CKV])
    assert torch.allclose(ref.double(), by_hand, atol=1e-5, rtol=0)


# -- the catalog -------------------------------------------------------------------------------------
def test_the_catalog_has_deepseek_v3_and_smaller_mla_layers_over_the_shapes_engines_run():
    assert len(MLA_CASES) >= 10
    assert all(c.layer_spec.latent_kv and c.layer_spec.num_kv_heads == 1 for c in MLA_CASES)
    assert all((c.layer_spec.head_dim, c.layer_spec.head_dim_v) == (576, 512) for c in MLA_CASES)
    assert all(math.isclose(c.layer_spec.scale, 192 ** -0.5) for c in MLA_CASES)
    assert {128, 16} <= {c.layer_spec.num_heads for c in MLA_CASES}
    assert {1, 16, 64} <= {c.page_size for c in MLA_CASES if c.cache}
    assert any(not c.cache for c in MLA_CASES)
    for tag in ("decode", "chunked", "mixed", "spec-decode", "prefix", "fp8", "lse", "page-size"):
        assert any(tag in c.tags for c in MLA_CASES), tag


def test_mla_cases_name_their_upstream_thread_and_keep_cpu_runs_small():
    threads = [c for c in MLA_CASES if re.search(r"(#\d+)", c.description)]
    assert len(threads) >= 7
    for case in MLA_CASES:
        assert case.description
        if case.max_tokens > 2048:  # CPU runs leave it out (--attn-max-tokens); say so by its tag
            assert "large" in case.tags
        if case.layer_spec.num_heads == 128 and case.max_tokens <= 2048:
            assert case.max_tokens <= 128, f"{case.name}: 128 heads x 576 on CPU is slow; keep it short"


# -- torch runs MLA; a planted MLA bug fails ---------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CPU_MLA_CASES if not c.layer_spec.return_lse], ids=lambda c: c.name)
def test_torch_passes_every_mla_case_on_cpu(case):
    backend = TorchSDPABackend()
    assert_case_passes(run_case(backend, case, device="cpu", seed=5), backend, case)


class LatentOnly(Backend):
    """Absorbed MLA as a latent kernel computes it: K alone (the K pages), V derived from it."""

    capabilities = Capabilities(head_dim_vo=True, latent_kv=True, chunked_prefill=True, multi_token_generation=True,
                                kv_dtypes=frozenset({"float8_e4m3fn"}))
    requires_contiguous = False

    def __init__(self, name="latent-only", bug=None):
        self.name, self.bug = name, bug

    def plan(self, metadata, layer, device="cpu"):
        layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
        return Plan(self.name, "latent", "torch", layout, "tokens", metadata.has_cache, device=str(device), layer=layer)

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        layer, out = self.start_forward(q, k, v, metadata, plan, out)  # writes the cache first
        ckv = layer.head_dim_v
        scale = layer.head_dim ** -0.5 if self.bug == "scale-of-576" else layer.scale
        q_off = metadata.qo_indptr
        for i, n in enumerate(metadata.seq_lens):
            if not n:
                continue
            keys, _ = metadata.request_kv(i, k, v, layer, dtype=torch.float32)  # the K pages only
            keys = keys[:, 0]
            values = keys[:, -ckv:] if self.bug == "v-from-the-rope-end" else keys[:, :ckv]
            qi = q[q_off[i]:q_off[i + 1]].float()
            scores = torch.einsum("qhd,kd->hqk", qi, keys) * scale
            lk = keys.shape[0]
            visible = torch.arange(lk)[None, :] <= torch.arange(lk - n, lk)[:, None]
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out[q_off[i]:q_off[i + 1]] = torch.einsum("hqk,kd->qhd", probs, values).to(out.dtype)
        return out


@pytest.mark.parametrize("name", ["mla-tp8-decode-ragged-page16", "mla-kimi-k2-ragged-no-cache", "mla-tp8-fp8-kv"])
def test_a_backend_reading_only_the_k_pages_passes(name):
    case, backend = CATALOG[name], LatentOnly()
    assert_case_passes(run_case(backend, case, device="cpu", seed=5), backend, case)


@pytest.mark.parametrize("bug", ["scale-of-576", "v-from-the-rope-end"])
@pytest.mark.parametrize("name", ["mla-tp8-decode-page1-prime", "mla-kimi-k2-ragged-no-cache"])
def test_a_planted_mla_bug_fails(bug, name):
    case, backend = CATALOG[name], LatentOnly(bug=bug)
    with pytest.raises(AttnCheckFailure, match=rf"{name} \(.*absorbed MLA"):
        assert_case_passes(run_case(backend, case, device="cpu", seed=5), backend, case)


# -- backends that do not run MLA say why ----------------------------------------------------------------
def _first(case_name):
    case = CATALOG[case_name]
    return case.layer(0), next(step_metadata(case))


def test_a_backend_without_latent_kv_skips_mla_with_the_reason():
    class Plain(LatentOnly):
        capabilities = Capabilities(head_dim_vo=True, chunked_prefill=True, multi_token_generation=True)

    layer, metadata = _first("mla-tp8-decode-page1-prime")
    assert any("absorbed MLA (latent_kv" in r for r in Plain().unsupported(layer, metadata, "cpu"))
    with pytest.raises(UnsupportedCase, match="absorbed MLA"):
        run_case(Plain(), CATALOG["mla-tp8-decode-page1-prime"], device="cpu", seed=5)


def test_flashinfer_and_trtllm_skip_mla_saying_where_it_runs():
    layer, metadata = _first("mla-dsv3-decode-page64")
    fi_reasons = FlashInferBackend("flashinfer").unsupported(layer, metadata, "cuda")
    assert any("absorbed MLA" in r for r in fi_reasons) and any("576" in r for r in fi_reasons)
    trt_reasons = TrtllmBackend("trtllm").unsupported(layer, metadata, "cuda")
    assert any("SM100/SM103/SM107" in r and "flashinfer-mla" in r for r in trt_reasons)
    assert not any("SM100" in r for r in TrtllmBackend("trtllm").unsupported(LayerSpec(8, 8, 128), metadata, "cuda"))


# -- flashinfer-mla: its decisions, on CPU ----------------------------------------------------------------
BY_NAME = {b.name: b for b in fim.BACKENDS}


def test_the_module_imports_neither_torch_nor_flashinfer():
    from backend_packages import backend_names_in_a_fresh_process

    assert backend_names_in_a_fresh_process("pytest_attn_backends.flashinfer_mla", ("torch", "flashinfer")) == [
        "flashinfer-mla", "flashinfer-mla-fa3"]


def test_it_is_unavailable_without_a_gpu_and_says_why():
    availability = BY_NAME["flashinfer-mla"].available()
    assert not availability and ("CUDA" in availability.reason or "flashinfer" in availability.reason)


@pytest.mark.parametrize("case", MLA_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("variant", ["fa2", "fa3"])
def test_every_mla_case_is_planned_on_an_h100_as_flashinfer_would_take_it(case, variant):
    for metadata in step_metadata(case):
        plan = fim.decide(metadata, case.layer(0), variant, sm=(9, 0))
        assert (plan.kernel, plan.kernel_backend, plan.index_units) == (fim.WRAPPER, variant, "pages")
        assert (plan.detail("head_dim_ckv"), plan.detail("head_dim_kpe")) == (512, 64)
        assert math.isclose(plan.detail("sm_scale"), 192 ** -0.5) and plan.detail("causal") is True
        assert plan.detail("page_size") == (case.page_size if case.cache else 1)
        assert plan.reads_cache == case.cache
        assert plan.detail("kv_data_type") == case.layer_spec.cache_dtype
        assert plan.detail("lse_mode") == ("base2" if case.layer_spec.return_lse else "none")
        plan.check_batch(metadata)  # made for this batch


@pytest.mark.parametrize("variant, sm, says", [
    ("fa3", (8, 0), "fa3 MLA needs a Hopper"),
    ("fa3", (10, 0), "fa3 MLA needs a Hopper"),
    ("fa2", (7, 5), "fa2 MLA needs sm80"),
])
def test_an_architecture_flashinfer_refuses_is_refused_first(variant, sm, says):
    layer, metadata = _first("mla-tp8-decode-page1-prime")
    assert any(says in r for r in fim.kernel_reasons(variant, layer, metadata, sm))
    with pytest.raises(UnsupportedCase, match=says):
        fim.decide(metadata, layer, variant, sm=sm)
    assert fim.kernel_reasons("fa2", layer, metadata, (8, 0)) == []


def test_widths_flashinfer_has_no_kernel_for_are_refused():
    metadata = AttentionMetadata.ragged([4, 1])
    odd = LayerSpec(16, 1, 448 + 64, head_dim_vo=448, latent_kv=True)
    assert any("multiple of 128" in r for r in fim.kernel_reasons("fa2", odd, metadata))
    wide = LayerSpec(16, 1, 384 + 64, head_dim_vo=384, latent_kv=True)
    assert fim.kernel_reasons("fa2", wide, metadata) == []
    assert any("fa3 MLA takes head_dim_ckv 128/256/512, not 384" in r for r in fim.kernel_reasons("fa3", wide, metadata))


def test_an_fp8_latent_cache_is_refused_where_flashinfer_has_no_fp8_mla():
    layer, metadata = _first("mla-tp8-fp8-kv")
    assert fim.kernel_reasons("fa2", layer, metadata, (9, 0)) == []
    assert any("FP8 MLA cache needs a Hopper" in r for r in fim.kernel_reasons("fa2", layer, metadata, (8, 0)))
    fp16 = layer.__class__(**{**layer.__dict__, "dtype": "float16"})
    assert any("bfloat16 queries only" in r for r in fim.kernel_reasons("fa2", fp16, metadata, (9, 0)))
    plan = fim.decide(metadata, layer, "fa2")
    assert "0.05" in plan.detail("kv_scales")


def test_a_causal_query_tile_ending_inside_a_tokens_heads_is_refused():
    prefill, decode = AttentionMetadata.ragged([40]), AttentionMetadata.ragged([1, 1])
    assert fim.query_tile_rows([40], 24) == 128 and fim.query_tile_rows([1, 1], 16) == 64
    assert any("_validate_fa_causal_tile_bound" in r for r in fim.kernel_reasons("fa2", mla_layer(24), prefill))
    assert fim.kernel_reasons("fa2", mla_layer(24), decode) == []  # one query token per request: no boundary
    assert fim.kernel_reasons("fa2", mla_layer(24, mask="full"), prefill) == []
    assert fim.kernel_reasons("fa2", mla_layer(128), prefill) == []


def test_a_layer_that_is_not_mla_is_refused_with_that_reason_first():
    metadata = AttentionMetadata.ragged([10])
    reasons = BY_NAME["flashinfer-mla"].unsupported(LayerSpec(8, 8, 128), metadata, "cpu")
    assert reasons[0].startswith("FlashInfer's MLA wrapper runs absorbed MLA layers only")
    assert any("runs on cuda" in r for r in reasons)
    assert BY_NAME["flashinfer-mla"].unsupported(mla_layer(), metadata, "cuda") == []
    assert any("runs on cuda" in r for r in BY_NAME["flashinfer-mla"].unsupported(mla_layer(), metadata, "cpu"))


def test_the_wrapper_call_form_follows_the_installed_flashinfer():
    class Canonical:
        MLAPlanMetadata = object

    assert fim.call_form(Canonical) == "canonical" and fim.call_form(object()) == "flat"


class _Wrapper:
    def __init__(self, **overrides):
        base = dict(_planned_backend_name="fa2", _sm_scale=192 ** -0.5, _causal=True, _page_size=16,
                    _head_dim_ckv=512, _q_data_type=torch.bfloat16, _kv_data_type=torch.bfloat16)
        self.__dict__.update(base | overrides)


def test_readback_compares_the_planned_wrapper_with_the_plan():
    layer, metadata = _first("mla-tp8-decode-ragged-page16")
    plan = fim.decide(metadata, layer, "fa2")
    backend = BY_NAME["flashinfer-mla"]
    assert backend.readback(plan) is None  # decided without a GPU: nothing to read back
    assert backend.readback(plan.with_handle(_Wrapper())) == []
    wrong = backend.readback(plan.with_handle(_Wrapper(_sm_scale=576 ** -0.5, _planned_backend_name="fa3")))
    assert len(wrong) == 2 and any("sm_scale" in m for m in wrong) and any("planned_backend_name" in m for m in wrong)


def test_forward_refuses_cpu_tensors_with_a_sentence():
    layer, metadata = _first("mla-kimi-k2-ragged-no-cache")
    q, k, v = make_qkv(metadata.num_tokens, layer, "cpu", seed=1)
    plan = fim.decide(metadata, layer, "fa2")
    with pytest.raises(AttnInputError, match="on CUDA tensors"):
        BY_NAME["flashinfer-mla"].forward(q, k, v, metadata, plan)


def _flashinfer_source(relative: str) -> str:
    spec = importlib.util.find_spec("flashinfer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flashinfer is not installed here")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        pytest.skip(f"this flashinfer has no {relative}")
    return path.read_text()


def test_the_rules_mirrored_here_are_the_installed_flashinfers():
    """The refusals above are read from FlashInfer's planner; a FlashInfer that changes them fails here."""
    fa = _flashinfer_source("mla/_batch_mla/_backends/_fa_common.py")
    assert "head_dim_ckv not in (128, 256, 512)" in fa and "head_dim_ckv % 128 or head_dim_kpe % 64" in fa
    assert "_FA_MAX_WORK_ITEMS = 16384" in fa and "def _validate_fa_causal_tile_bound" in fa
    assert "if major != 9" in fa and "q_data_type != torch.bfloat16" in fa  # FP8: Hopper, bf16 queries
    trtllm_gen = _flashinfer_source("mla/_batch_mla/_backends/trtllm_gen_backend.py")
    assert "((10, 0), (10, 3), (10, 7))" in trtllm_gen and "trtllm-gen MLA requires SM100/SM103/SM107" in trtllm_gen
