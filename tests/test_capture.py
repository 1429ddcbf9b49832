"""pytest_attn.capture: a running program's attention calls recorded as cases, and replayed.

The SDPA engine here runs on CPU for real; FlashInfer's wrappers cannot run on CPU, so their
plan()/run() are replaced by stand-ins that keep the real signatures (functools.wraps: the capture
reads arguments by the signature it finds) and the calls are made as an engine makes them."""
from __future__ import annotations

import dataclasses
import functools
import json
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

from pytest_attn import capture
from pytest_attn.cases.case import BatchCase
from pytest_attn.check.harness import assert_case_passes, run_case, step_metadata
from pytest_attn.core.errors import AttnCheckFailure
from pytest_attn_backends.flex import BACKENDS as FLEX_BACKENDS
from pytest_attn_backends.torch_sdpa import TorchSDPABackend
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # a global, as engines bind it

TORCH = TorchSDPABackend()


class TinySDPAEngine:
    """A few attention layers of a decoder: a batch of prompts prefilled, then decoded token by
    token over a growing K/V history, every layer through SDPA."""

    def __init__(self, layers=3, heads=4, kv_heads=2, head_dim=32, scale=None):
        self.layers, self.heads, self.kv_heads, self.head_dim, self.scale = layers, heads, kv_heads, head_dim, scale
        self.generator = torch.Generator().manual_seed(0)

    def _new(self, batch, heads, tokens):
        return torch.randn(batch, heads, tokens, self.head_dim, generator=self.generator)

    def generate(self, batch: int, prompt: int, new_tokens: int) -> None:
        history = [(self._new(batch, self.kv_heads, prompt), self._new(batch, self.kv_heads, prompt))
                   for _ in range(self.layers)]
        for k, v in history:  # prefill: causal over the prompt
            F.scaled_dot_product_attention(self._new(batch, self.heads, prompt), k, v, is_causal=True,
                                           enable_gqa=True, scale=self.scale)
        for _ in range(new_tokens):  # decode: one query over every key so far
            for i, (k, v) in enumerate(history):
                k = torch.cat([k, self._new(batch, self.kv_heads, 1)], dim=2)
                v = torch.cat([v, self._new(batch, self.kv_heads, 1)], dim=2)
                history[i] = (k, v)
                F.scaled_dot_product_attention(self._new(batch, self.heads, 1), k, v, enable_gqa=True,
                                               scale=self.scale)


def test_an_sdpa_engine_is_captured_as_its_prefill_and_decode_steps_and_they_replay(tmp_path):
    path = tmp_path / "engine.jsonl"
    with capture.record(path) as recording:
        TinySDPAEngine().generate(batch=2, prompt=9, new_tokens=3)
    assert recording.calls == 3 + 3 * 3 and recording.duplicates == 8 and not recording.skipped
    cases = capture.load(path)
    assert [c.name for c in cases] == [c.name for c in recording.cases]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["layer_spec"] == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "dtype": "float32"}
    assert lines[0]["seq_lens"] == [9, 9] and "kv_seq_lens" not in lines[0]
    assert [(line["seq_lens"], line["kv_seq_lens"], line["layer_spec"]["mask"]) for line in lines[1:]] == [
        ([1, 1], [10, 10], "full"), ([1, 1], [11, 11], "full"), ([1, 1], [12, 12], "full")]
    for case in cases:
        assert_case_passes(run_case(TORCH, case, seed=3), TORCH, case)


class IgnoresScale(TorchSDPABackend):
    """A planted bug: the layer's sm_scale is dropped (1/sqrt(head_dim) used instead)."""

    def forward(self, q, k, v, metadata, plan, out=None, **kwargs):
        plan = dataclasses.replace(plan, layer=dataclasses.replace(plan.layer, sm_scale=None))
        return super().forward(q, k, v, metadata, plan, out=out, **kwargs)


def test_a_replayed_capture_catches_a_backend_that_drops_the_engines_scale(tmp_path):
    with capture.record(tmp_path / "scaled.jsonl") as recording:
        TinySDPAEngine(layers=1, scale=0.4).generate(batch=1, prompt=12, new_tokens=1)
    assert {c.layer_spec.sm_scale for c in recording.cases} == {0.4}
    buggy = IgnoresScale(name="ignores-scale")
    for case in recording.cases:
        assert_case_passes(run_case(TORCH, case, seed=1), TORCH, case)
        with pytest.raises(AttnCheckFailure):
            assert_case_passes(run_case(buggy, case, seed=1), buggy, case)


# -- FlashInfer ---------------------------------------------------------------------------------------
flashinfer = pytest.importorskip("flashinfer")
from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper as Decode  # noqa: E402
from flashinfer.prefill import BatchPrefillWithPagedKVCacheWrapper as PagedPrefill  # noqa: E402
from flashinfer.prefill import BatchPrefillWithRaggedKVCacheWrapper as Ragged  # noqa: E402


@pytest.fixture
def flashinfer_on_cpu(monkeypatch):
    """plan() and run() that do nothing but keep FlashInfer's signatures; wrappers made without
    their CUDA workspace. Returns a factory of wrappers."""
    for cls in (PagedPrefill, Decode, Ragged):
        for name in ("plan", "run"):
            real = cls.__dict__[name]
            monkeypatch.setattr(cls, name, functools.wraps(real)(lambda self, *args, **kwargs: None))

    def make(cls, kv_layout="NHD"):
        wrapper = cls.__new__(cls)
        wrapper._kv_layout = kv_layout
        return wrapper

    return make


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def last_step(case: BatchCase):
    metadata = list(step_metadata(case))[-1]
    return metadata.seq_lens, metadata.kv_lens, metadata.num_contexts


def paged_cache(pages=8, kv_heads=2, page=16, head_dim=64, dtype=torch.bfloat16):
    return torch.zeros(pages, 2, page, kv_heads, head_dim, dtype=dtype)


def test_paged_prefill_then_decode_become_cases_ending_in_those_batches(tmp_path, flashinfer_on_cpu):
    """An engine's steps on FlashInfer's paged API: prompts of 20 and 7 tokens (pages of 16), then
    two decode steps; each run() of a layer after one plan() repeats the case."""
    q = torch.zeros(27, 8, 64, dtype=torch.bfloat16)
    with capture.record(tmp_path / "paged.jsonl") as recording:
        prefill, decode = flashinfer_on_cpu(PagedPrefill, "HND"), flashinfer_on_cpu(Decode, "HND")
        prefill.plan(i32(0, 20, 27), i32(0, 2, 3), i32(0, 1, 2), i32(4, 7), 8, 2, 64, 16, causal=True,
                     q_data_type=torch.bfloat16)
        for _ in range(4):
            prefill.run(q, paged_cache())
        for last in ((5, 8), (6, 9)):
            decode.plan(i32(0, 2, 3), i32(0, 1, 2), i32(*last), 8, 2, 64, 16, q_data_type=torch.bfloat16)
            for _ in range(4):
                decode.run(q[:2], paged_cache())
    assert recording.calls == 12 and recording.duplicates == 9 and not recording.skipped
    prompt, step1, step2 = recording.cases
    assert (prompt.cache, prompt.kv_layout, prompt.page_size, prompt.seq_lens) == (True, "HND", 16, (20, 7))
    assert last_step(prompt) == ((20, 7), (20, 7), 2)
    assert last_step(step1) == ((1, 1), (21, 8), 0) and last_step(step2) == ((1, 1), (22, 9), 0)
    assert step1.layer_spec == prompt.layer_spec and prompt.layer_spec.causal
    assert capture.load(tmp_path / "paged.jsonl") == recording.cases


def test_plan_arguments_reach_the_layer_deprecated_positional_ones_included(tmp_path, flashinfer_on_cpu):
    q = torch.zeros(2, 8, 64, dtype=torch.float16)
    with capture.record(tmp_path / "layer.jsonl") as recording:
        decode = flashinfer_on_cpu(Decode)
        # FlashInfer 0.7's deprecated positional form: pos_encoding_mode, window_left, logits_soft_cap
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode.plan(i32(0, 1, 2), i32(0, 1), i32(3, 16), 8, 2, 64, 16, "NONE", 7, 30.0, sm_scale=0.3)
        decode.run(q, paged_cache(dtype=torch.float16), return_lse=True)
        decode.run(q, paged_cache(dtype=torch.float8_e4m3fn), k_scale=0.5, v_scale=2.0)
    plain, fp8 = (c.layer_spec for c in recording.cases)
    assert (plain.window_left, plain.logits_soft_cap, plain.sm_scale, plain.dtype, plain.return_lse) == \
        (7, 30.0, 0.3, "float16", True)
    assert (fp8.kv_dtype, fp8.k_scale, fp8.v_scale, fp8.return_lse) == ("float8_e4m3fn", 0.5, 2.0, False)


def test_a_mixed_batch_keeps_its_new_prompts_and_splits_by_query_length(tmp_path, flashinfer_on_cpu):
    """New prompts (as many keys as queries) join at step 1; requests over a cached history bring
    their queries as generation tokens (draft tokens beyond one), one case per query length."""
    q = torch.zeros(16, 4, 64, dtype=torch.bfloat16)
    with capture.record(tmp_path / "mixed.jsonl") as recording:
        prefill = flashinfer_on_cpu(PagedPrefill)
        # requests: 5 new tokens (prompt), 1 over 25 keys, 3 over 3 (prompt), 4 over 30, 0 tokens
        prefill.plan(i32(0, 5, 6, 9, 13, 13), i32(0, 1, 3, 4, 6, 7), i32(*range(7)), i32(5, 9, 3, 14, 2),
                     4, 4, 64, 16, causal=True)
        prefill.run_return_lse(q, paged_cache(kv_heads=4))
    mixed, extend = recording.cases
    assert last_step(mixed) == ((5, 3, 1), (5, 3, 25), 2) and mixed.layer_spec.return_lse
    assert last_step(extend) == ((4,), (30,), 0) and extend.draft_tokens == 3
    assert "split from one batch" in extend.description
    flex = FLEX_BACKENDS[0]  # the torch backend returns no LSE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's advice to compile it
        for case in recording.cases:
            assert_case_passes(run_case(flex, case, seed=2), flex, case)


def test_a_ragged_batch_with_its_own_keys_is_a_no_cache_cross_case(tmp_path, flashinfer_on_cpu):
    q, kv = torch.zeros(7, 8, 64, dtype=torch.bfloat16), torch.zeros(9, 2, 64, dtype=torch.bfloat16)
    with capture.record(tmp_path / "ragged.jsonl") as recording:
        ragged = flashinfer_on_cpu(Ragged)
        ragged.plan(i32(0, 3, 7), i32(0, 5, 9), 8, 2, 64, causal=True, window_left=2)
        ragged.run(q, kv, kv)
        ragged.plan(i32(0, 3, 7), i32(0, 5, 9), 8, 2, 64, custom_mask=torch.ones(31, dtype=torch.bool))
        ragged.run(q, kv, kv)
        ragged.plan(i32(0, 3, 7), i32(0, 5, 9), 8, 2, 64, pos_encoding_mode="ROPE_LLAMA")
        ragged.run(q, kv, kv)
    (case,) = recording.cases
    assert (case.cache, case.seq_lens, case.kv_seq_lens, case.layer_spec.window_left) == (False, (3, 4), (5, 4), 2)
    assert recording.skipped == {"a custom mask (plan's custom_mask)": 1,
                                 "position encoding inside the kernel (ROPE_LLAMA)": 1}
    assert_case_passes(run_case(TORCH, case, seed=2), TORCH, case)


# -- torch functions: masks and flex ---------------------------------------------------------------------
@pytest.mark.parametrize("visible, expected", [
    (torch.ones(3, 5, dtype=torch.bool), ("full", -1)),
    (torch.ones(5, 5, dtype=torch.bool).tril(), ("causal", -1)),
    (torch.ones(2, 5, dtype=torch.bool).tril(3), ("causal", -1)),  # bottom-right: the last 2 of 5
    (torch.ones(5, 5, dtype=torch.bool).tril() & ~torch.ones(5, 5, dtype=torch.bool).tril(-3), ("causal", 2)),
    (~torch.ones(5, 5, dtype=torch.bool).tril(-2), ("full", 1)),
])
def test_a_visibility_matrix_is_the_mask_and_window_that_give_it(visible, expected):
    assert capture.mask_kind(visible, *visible.shape) == expected


@pytest.mark.parametrize("visible", [torch.tensor([[1, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool),
                                     torch.ones(2, 5, dtype=torch.bool).tril(),  # causal aligned top-left
                                     torch.eye(4, dtype=torch.bool) | torch.eye(4, dtype=torch.bool).roll(2, 1)])
def test_a_mask_no_layer_gives_is_refused_not_guessed(visible):
    with pytest.raises(capture.Uncapturable, match="not causal, full or a sliding window"):
        capture.mask_kind(visible, *visible.shape)


def test_sdpa_masks_and_flex_score_and_mask_mods_become_layers_or_reasons(tmp_path):
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    with capture.record(tmp_path / "fns.jsonl") as recording, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's advice to compile it
        window = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-4)
        F.scaled_dot_product_attention(q, k, k, attn_mask=window, enable_gqa=True)
        F.scaled_dot_product_attention(q, k, k, attn_mask=torch.randn(6, 6), enable_gqa=True)
        F.scaled_dot_product_attention(q[:, :, :2], k, k, is_causal=True, enable_gqa=True)
        flex_attention(q, k, k, score_mod=lambda s, b, h, i, j: 20 * torch.tanh(s / 20), enable_gqa=True)
        flex_attention(q, k, k, score_mod=lambda s, b, h, i, j: s + (i - j), enable_gqa=True)
        flex_attention(q, k, k, enable_gqa=True,
                       block_mask=create_block_mask(lambda b, h, i, j: i >= j, None, None, 6, 6, device="cpu"))
    sdpa_window, flex_cap, flex_causal = (c.layer_spec for c in recording.cases)
    assert (sdpa_window.mask, sdpa_window.window_left) == ("causal", 3)
    assert (flex_cap.mask, flex_cap.logits_soft_cap) == ("full", pytest.approx(20.0))
    assert (flex_causal.mask, flex_causal.window_left) == ("causal", -1)
    assert sorted(recording.skipped) == [
        "a score_mod that is not a soft-cap (it depends on positions or changes scores otherwise)",
        "an additive attention bias (a float mask with values other than 0 and -inf)",
        "is_causal with 2 queries over 6 keys: SDPA aligns it top-left, a case bottom-right"]
    flex = FLEX_BACKENDS[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in recording.cases:
            assert_case_passes(run_case(flex, case, seed=4), flex, case)


# -- the recording itself ----------------------------------------------------------------------------
def _patched_state():
    import torch.nn.attention.flex_attention as flex_module
    from torch.overrides import _get_current_function_mode_stack

    return ([cls.__dict__[name] for cls in (PagedPrefill, Decode, Ragged)
             for name in ("plan", "run", "run_return_lse")],
            flex_module.flex_attention, len(_get_current_function_mode_stack()))


def test_every_patch_is_undone_on_exit_and_on_an_exception(tmp_path):
    before = _patched_state()
    with capture.record(tmp_path / "a.jsonl"):
        assert _patched_state()[0] != before[0] and _patched_state()[1] is not before[1]
        assert flex_attention is not before[1]  # this module's own global too
    assert _patched_state() == before and flex_attention is before[1]
    with pytest.raises(ZeroDivisionError), capture.record(tmp_path / "b.jsonl") as recording:
        F.scaled_dot_product_attention(*[torch.randn(1, 2, 3, 8)] * 3)
        1 / 0
    assert _patched_state() == before and len(recording.cases) == 1  # written before the error
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 1
    F.scaled_dot_product_attention(*[torch.randn(1, 2, 3, 8)] * 3)  # after the block: not recorded
    assert recording.calls == 1


def test_nested_and_concurrent_recordings_are_refused_with_the_file_in_use(tmp_path):
    with capture.record(tmp_path / "outer.jsonl") as outer:
        with pytest.raises(capture.CaptureError, match=r"already recording to .*outer.jsonl: one recording at a time"):
            with capture.record(tmp_path / "inner.jsonl"):
                pass
        errors = []

        def other_thread():
            try:
                with capture.record(tmp_path / "thread.jsonl"):
                    pass
            except capture.CaptureError as exc:
                errors.append(exc)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(errors) == 1
        F.scaled_dot_product_attention(*[torch.randn(1, 2, 3, 8)] * 3)
    assert len(outer.cases) == 1 and not (tmp_path / "inner.jsonl").exists()
    with capture.record(tmp_path / "after.jsonl"):  # the refusals left nothing behind
        pass


def test_max_cases_caps_the_distinct_cases_written(tmp_path):
    with capture.record(tmp_path / "cap.jsonl", max_cases=2) as recording:
        for tokens in (3, 4, 3, 5, 6):
            F.scaled_dot_product_attention(*[torch.randn(1, 2, tokens, 8)] * 3)
    assert [c.seq_lens for c in recording.cases] == [(3,), (4,)]
    assert (recording.duplicates, recording.dropped) == (1, 2)
    assert "2 cases in" in recording.summary() and "2 beyond max_cases=2" in recording.summary()


@pytest.mark.parametrize("bad", [0, -1, True, "3"])
def test_a_bad_max_cases_is_refused_before_anything_is_patched(tmp_path, bad):
    with pytest.raises(capture.AttnInputError, match="max_cases must be an int >= 1"):
        with capture.record(tmp_path / "x.jsonl", max_cases=bad):
            pass
    with capture.record(tmp_path / "y.jsonl"):  # and nothing stays active
        pass


def test_an_unwritable_path_is_one_clear_error(tmp_path):
    with pytest.raises(capture.CaptureError, match="cannot write the recording .*missing/x.jsonl"):
        with capture.record(tmp_path / "missing" / "x.jsonl"):
            pass


def test_case_json_holds_only_non_default_fields_and_reads_back():
    case = BatchCase("c", 8, 2, 64, (5, 3), cache=True, decode_steps=2, page_size=4, window_left=7,
                     layer_overrides=((), (("window_left", -1),)), num_layers=2)
    data = capture._case_to_json(case)
    assert data == {"format": 1, "name": "c", "seq_lens": [5, 3], "cache": True, "decode_steps": 2, "page_size": 4,
                    "num_layers": 2, "layer_overrides": [{}, {"window_left": -1}],
                    "layer_spec": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 64, "window_left": 7}}
    assert capture._case_from_json(json.loads(json.dumps(data))) == case
