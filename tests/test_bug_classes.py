"""Mutation tests: the catalog catches the bug classes of the bug corpus.

Each test builds a deliberately buggy backend that reproduces the *mechanism* of a real bug from
``docs/bug-corpus.md`` (its bugs #N, dimensions DN and "also seen" threads), runs the
catalog case named for that bug class through :func:`~pytest_attn.check.harness.run_case` and
:func:`~pytest_attn.check.harness.assert_case_passes`, and requires it to FAIL, by the check the test
names, on every seed it is given, while a correct backend passes the same case with the same
seed: the case discriminates. Where it helps, a test also runs the mutant on a case
that cannot show its bug (plain decode for a speculative-decoding bug, one KV head for a GQA
mapping bug), so the named case is shown to be the one that matters.

Most mutants derive from :class:`Hooked`, the torch backend's algorithm (SDPA per request,
explicit masks, sinks as an extra key, an FP8 cache dequantized on gather) with each step a method;
``test_hooked_control_passes_every_case_used`` proves that without a mutation it passes every
case used here, so each mutant differs from a passing backend by its mechanism alone. A few
mutate :class:`TorchSDPABackend` itself (its plan), and the soft-cap and LSE mutants mutate the
``flex`` backend (skipped when flex cannot be imported or does not pass the case itself).

Rows the file does not cover, and why, are listed at its end.
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from pytest_attn.cases.catalog import CATALOG  # noqa: E402
from pytest_attn.core.errors import AttnCheckFailure, AttnError  # noqa: E402
from pytest_attn.core.calls import BackendError  # noqa: E402
from pytest_attn.check.harness import assert_case_passes, run_case  # noqa: E402
from pytest_attn.core.kv_cache import PagedKVCacheManager  # noqa: E402
from pytest_attn.core.layer import torch_dtype  # noqa: E402
from pytest_attn.core.metadata import pages_for  # noqa: E402
from pytest_attn_backends.torch_sdpa import TorchSDPABackend  # noqa: E402

SEEDS = (0, 1, 2)
TORCH = TorchSDPABackend("torch")  # the correct backend every torch-based mutant is checked against

#: What each check of the harness prints when it fires (matched against the failure's message).
CHECKS = {
    "elementwise": r"max \|out - ref\| = \S+ EXCEEDS the allowed",
    "nonfinite": r"output elements are NaN or Inf",
    "unwritten": r"still hold the poison value .*: the backend never wrote them",
    "bias": r"systematic bias .* EXCEEDS the allowed",
    "lse": r"LSE \(base e\): max \|lse - ref\| = \S+ EXCEEDS",
    "lse-nonfinite": r"\d+ LSE values NaN",
    "solo": r"run alone differs from its rows of the batch",
}


# -- helpers ---------------------------------------------------------------------------------------
_CONTROLS_PASSED: set = set()


def passes(backend, case_name: str, seed: int = 0) -> None:
    case = CATALOG[case_name]
    assert_case_passes(run_case(backend, case, seed=seed), backend, case)


def control_passes(control, case_name: str, seed: int) -> None:
    """``passes`` for a correct backend, once per (backend, case, seed) in a session: inputs are
    seeded, so a second run would only repeat the first."""
    key = (type(control), control.name, case_name, seed)
    if key not in _CONTROLS_PASSED:
        passes(control, case_name, seed)
        _CONTROLS_PASSED.add(key)


def caught(mutant, case_name: str, seed: int = 0, check="elementwise", control=TORCH) -> str:
    """The control passes the case; the mutant fails it, and ``check`` (a key of CHECKS, or a
    tuple of keys of which one must fire) is among what fired. Returns the failure message."""
    control_passes(control, case_name, seed)
    case = CATALOG[case_name]
    with pytest.raises(AttnCheckFailure) as info:
        assert_case_passes(run_case(mutant, case, seed=seed), mutant, case)
    message = str(info.value)
    assert f"backend {mutant.name!r} is wrong on case {case_name!r}" in message
    checks = (check,) if isinstance(check, str) else tuple(check)
    assert any(re.search(CHECKS[c], message) for c in checks), (
        f"expected the {' or '.join(checks)} check to fire; the failure was:\n{message}")
    return message


def _flex_class():
    """FlexAttentionBackend, or a skip when backends/flex.py cannot be imported or used here."""
    try:
        from pytest_attn_backends.flex import FlexAttentionBackend
    except Exception as exc:  # noqa: BLE001  (being written concurrently: anything may be wrong with it)
        pytest.skip(f"backends/flex.py does not import ({type(exc).__name__}: {exc})")
    availability = FlexAttentionBackend().available()
    if not availability:
        pytest.skip(f"flex is unavailable: {availability.reason}")
    return FlexAttentionBackend


def flex_caught(mutant, case_name: str, seed: int, check: str) -> str:
    """``caught`` against flex itself; skipped (not failed) when flex does not pass the case."""
    flex = _flex_class()()
    try:
        control_passes(flex, case_name, seed)
    except (AssertionError, AttnError) as exc:
        pytest.skip(f"flex does not pass {case_name} itself, so it cannot be a control: {exc}")
    return caught(mutant, case_name, seed, check, control=flex)


def _manual_attention(q, k, v, layer, visible, sinks, *, subtract_max: bool = True,
                      sentinel: float | None = None):
    """Softmax attention written out in float32: q [lq, H, D], k [lk, H, D], v [lk, H, Dv] (KV
    heads already expanded), visible None or bool [lq, lk] / [H, lq, lk], sinks None or [H, lq].

    subtract_max=False: exp of the raw logits (overflows past ~88). sentinel: the "minus infinity"
    of masked logits and the running max's initial value, a finite number (flashinfer's 5e4)."""
    qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))
    s = torch.matmul(qf, kf.transpose(1, 2)) * layer.scale  # [H, lq, lk]
    lk = s.shape[-1]
    if sentinel is not None:
        if visible is not None:
            s = s.masked_fill(~visible, sentinel)
        m = s.amax(-1, keepdim=True).clamp(min=sentinel)  # the running max starts at the sentinel
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        out = torch.where(denom > 0, torch.matmul(p, vf) / denom, torch.zeros(()))
        return out.transpose(0, 1).to(q.dtype)
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.float()[:, :, None]], dim=-1)
    m = s.amax(-1, keepdim=True) if subtract_max else torch.zeros(())
    p = torch.exp(s - m)
    out = torch.matmul(p[..., :lk], vf) / p.sum(-1, keepdim=True)
    return out.transpose(0, 1).to(q.dtype)


# -- the hookable torch backend --------------------------------------------------------------------
class Hooked(TorchSDPABackend):
    """TorchSDPABackend's algorithm, one method per step so a mutant overrides just its bug:
    read the inputs, write the new K/V into the cache, then per request find its query rows, its
    keys (a slice, or its pages gathered and dequantized), build the mask (bottom-right causal,
    window) and the sink column, attend (SDPA) and store the rows. Without a mutation it passes
    every case used here (test_hooked_control_passes_every_case_used)."""

    NAME = "hooked-control"

    def __init__(self, name=None):
        super().__init__(name or self.NAME, use_varlen=False)

    # forward, step by step
    def forward(self, q, k, v, metadata, plan, out=None):
        layer = plan.layer
        metadata.check_inputs(q, k, v, layer, require_contiguous=False)
        if out is None:
            out = q.new_empty((q.shape[0], layer.num_heads, layer.head_dim_v))
        q, k, v = self.read_inputs(q, k, v, metadata, layer)
        manager = metadata.kv_cache_manager
        if manager is not None:
            self.write_cache(manager, layer, metadata, k, v)
        for i, n in enumerate(metadata.seq_lens):
            if n == 0:
                continue
            qs, qe = self.q_rows(metadata, i)
            qi = q[qs:qe]
            if qi.shape[0] == 0:
                continue
            ki, vi = self.request_kv(i, k, v, metadata, layer)
            self.store(out, self.out_rows(metadata, i), self.attend(qi, ki, vi, layer, metadata, i), layer)
        return out

    def read_inputs(self, q, k, v, metadata, layer):
        return q, k, v

    def write_cache(self, manager, layer, metadata, k, v):
        manager.write(layer.layer_idx, metadata, k, v, k_scale=layer.k_scale, v_scale=layer.v_scale)

    def q_rows(self, metadata, i):
        return metadata.qo_indptr[i], metadata.qo_indptr[i + 1]

    def out_rows(self, metadata, i):
        return metadata.qo_indptr[i], metadata.qo_indptr[i + 1]

    def kv_rows(self, metadata, i):
        return metadata.kv_rows_indptr[i], metadata.kv_rows_indptr[i + 1]

    def request_kv(self, i, k, v, metadata, layer):
        manager = metadata.kv_cache_manager
        if manager is None:
            s, e = self.kv_rows(metadata, i)
            return k[s:e], v[s:e]
        ki, vi = self.gather(manager, layer, metadata, i)
        if manager.quantized:
            k_scale, v_scale = self.kv_scales(layer)
            ki = (ki.to(torch.float32) * k_scale).to(torch_dtype(layer.dtype))
            vi = (vi.to(torch.float32) * v_scale).to(torch_dtype(layer.dtype))
        return ki, vi

    def gather(self, manager, layer, metadata, i):
        return manager.gather(layer.layer_idx, self.block_table(metadata, i), metadata.kv_lens[i])

    def block_table(self, metadata, i):
        return metadata.block_tables[i]

    def kv_scales(self, layer):
        return layer.k_scale, layer.v_scale

    # one request
    def attend(self, q, k, v, layer, metadata, i):
        lq, lk = q.shape[0], k.shape[0]
        visible = self.visible(lq, lk, layer, q.device)
        sinks = self.sink_logits(lq, layer, metadata, i)
        k, v = self.expand_kv(k, v, layer)
        return self.softmax_attend(q, k, v, layer, visible, sinks)

    def query_positions(self, lq, lk, device):
        return torch.arange(lk - lq, lk, device=device)  # bottom-right: the queries are the last tokens

    def causal_visible(self, qpos, kpos, lq, lk):
        return kpos <= qpos

    def window_left(self, layer, lq, lk):
        return layer.window_left

    def visible(self, lq, lk, layer, device):
        """bool [lq, lk] (True: attend), or None when every key is visible."""
        window = self.window_left(layer, lq, lk)
        if not layer.causal and window < 0:
            return None
        qpos = self.query_positions(lq, lk, device)[:, None]
        kpos = torch.arange(lk, device=device)[None, :]
        vis = self.causal_visible(qpos, kpos, lq, lk) if layer.causal else torch.ones(lq, lk, dtype=torch.bool)
        if window >= 0:
            vis = vis & (kpos >= qpos - window)
        return vis

    def sink_logits(self, lq, layer, metadata, i):
        """float32 [H, lq]: the sink logit of each query row, or None."""
        if not layer.sinks:
            return None
        return torch.tensor(layer.sinks, dtype=torch.float32)[:, None].expand(layer.num_heads, lq)

    def expand_kv(self, k, v, layer):
        """[lk, Hkv, D] -> [lk, H, D]: query head h reads KV head h // group."""
        g = layer.group_size
        return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)

    def softmax_attend(self, q, k, v, layer, visible, sinks):
        """SDPA as the torch backend calls it: a bool mask, or with sinks one more key of zeros
        whose additive mask entry is the sink."""
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        lq, lk, heads = q.shape[0], k.shape[0], layer.num_heads
        mask = visible
        if sinks is not None:
            kh = torch.cat([kh, kh.new_zeros((1, heads, 1, kh.shape[3]))], dim=2)
            vh = torch.cat([vh, vh.new_zeros((1, heads, 1, vh.shape[3]))], dim=2)
            bias = torch.zeros((heads, lq, lk + 1), dtype=torch.float32)
            if visible is not None:
                bias[..., :lk].masked_fill_(~visible.expand(heads, lq, lk), -math.inf)
            bias[..., lk] = sinks
            mask = bias.to(q.dtype)[None]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=layer.scale)
        return o[0].transpose(0, 1)

    def store(self, out, rows, o, layer):
        s, e = rows
        out[s:e] = o


# -- control ---------------------------------------------------------------------------------------
USED_CASES = sorted({
    "swa-causal-ragged", "swa-full-ragged", "swa-noncausal-chunked", "swa-long-decode",
    "sinks-prefill", "sinks-decode", "sinks-spec-decode", "swa-alternating-layers-sinks", "swa-spec-decode",
    "chunked-prefill", "prefix-reuse", "spec-decode-q4", "spec-decode-q8-gqa8", "cross-attn-causal",
    "prefix-reuse-q2-kv3", "llm-decode-gqa-nhd", "llm-decode-gqa-hnd", "llm-mixed-nhd",
    "fp8-kv-scales", "fp8-kv-mixed", "reuse-scale", "reuse-window", "reuse-mask", "reuse-dtype",
    "gqa-r4-kv2", "page64-partial-last", "page256-partial-last", "hd64-decode-page1",
    "zero-length-rows", "zero-length-mixed", "vit-ragged-vs-solo", "hetero-batch-vs-solo",
    "hd192-vo128-paged", "hd192-vo128-ragged-full", "extreme-logits-300", "extreme-logits-300-decode",
    "extreme-negative-logits-fp32", "fp32-ragged", "hd64-ragged", "hd72-ragged", "hd80-ragged", "hd96-ragged",
    "strided-fused-qkv", "strided-fused-qkv-paged", "hd128-ragged", "vit-causal",
    "chunked-kv-lt16", "tile-edge-127-128-129-192", "tile-edge-63-64-65", "cross-attn-hd32",
    *(f"gqa-r{r}-kv{kv}" for r in (1, 2, 4, 8, 16) for kv in (1, 2)),
})


@pytest.mark.parametrize("case_name", USED_CASES)
def test_hooked_control_passes_every_case_used(case_name):
    """Hooked without a mutation is correct on every case this file uses, so a mutant's failure
    comes from its mechanism, not from the way Hooked reimplements the torch backend."""
    passes(Hooked(), case_name)


# == 1. sliding windows ============================================================================
class WindowIgnored(Hooked):
    """The window never reaches the kernel (sglang #33915 for window_left on the ragged path;
    PR #31501: planned without window_left; PR #4823: never passed to the backend)."""

    NAME = "bug-window-ignored"

    def window_left(self, layer, lq, lk):
        return -1


class WindowCausalOnly(Hooked):
    """The window is applied on the causal path only; a non-causal window is dropped (#18)."""

    NAME = "bug-window-causal-only"

    def window_left(self, layer, lq, lk):
        return layer.window_left if layer.causal else -1


class WindowFirstTileWrong(Hooked):
    """flashinfer #4972: non-causal window with qo_len < kv_len, the first 128-row query tile is
    scheduled without the window (rows 0-127 wrong; causal and qo_len == kv_len fine)."""

    NAME = "bug-window-first-tile"

    def visible(self, lq, lk, layer, device):
        vis = super().visible(lq, lk, layer, device)
        if vis is not None and not layer.causal and layer.window_left >= 0 and lq < lk:
            vis = vis.clone()
            vis[:128] = True
        return vis


class WindowOnFirstTileOnly(Hooked):
    """The converse tiling bug: the window bound is applied while processing the first 128-row
    query tile and not on the later ones (rows >= 128 of a request attend past the window)."""

    NAME = "bug-window-first-tile-only"

    def visible(self, lq, lk, layer, device):
        vis = super().visible(lq, lk, layer, device)
        if vis is not None and layer.window_left >= 0 and lq > 128:
            unwindowed = super().visible(lq, lk, dataclasses.replace(layer, window_left=-1), device)
            vis = torch.cat([vis[:128], torch.ones_like(vis[128:]) if unwindowed is None else unwindowed[128:]])
        return vis


class WindowOffByOne(Hooked):
    """A window one token too wide (HF's inclusive sliding_window given to an exclusive kernel,
    sglang PR #26147) or too narrow (the opposite conversion)."""

    def __init__(self, delta):
        self.delta = delta
        super().__init__(f"bug-window-off-by-{delta:+d}")

    def window_left(self, layer, lq, lk):
        return layer.window_left + self.delta if layer.window_left >= 0 else -1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["swa-causal-ragged", "swa-full-ragged", "swa-noncausal-chunked",
                                       "swa-long-decode"])
def test_window_ignored_is_caught__sglang_pr31501_and_4823(case_name, seed):
    """Bugs #15 (window_left dropped on the ragged path), #16 (paged prefill planned without the
    window), #17 (window never reaches the backend; garbage past the window in long decode)."""
    caught(WindowIgnored(), case_name, seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["swa-full-ragged", "swa-noncausal-chunked"])
def test_window_dropped_when_not_causal_is_caught__flashinfer_4972(case_name, seed):
    """Bug #18 (non-causal sliding window wrong; causal fine). The causal window case cannot see
    this bug, the non-causal ones must."""
    passes(WindowCausalOnly(), "swa-causal-ragged", seed)
    caught(WindowCausalOnly(), case_name, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_window_missing_on_first_query_tile_is_caught__flashinfer_4972(seed):
    """Bug #18: only the first query tile, only non-causal, only with qo_len < kv_len (the second
    chunk of swa-noncausal-chunked: 300 queries over 600 keys). swa-full-ragged (qo == kv) cannot
    show it."""
    passes(WindowFirstTileWrong(), "swa-full-ragged", seed)
    caught(WindowFirstTileWrong(), "swa-noncausal-chunked", seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["swa-causal-ragged", "swa-full-ragged", "swa-noncausal-chunked"])
def test_window_on_first_query_tile_only_is_caught__flashinfer_4972(case_name, seed):
    """Bug #18's class (a window handled per query tile; D6 "window crossing tiles"): requests of
    more than 128 queries catch it. swa-long-decode (a 40-token prompt, then one-token steps)
    cannot."""
    passes(WindowOnFirstTileOnly(), "swa-long-decode", seed)
    caught(WindowOnFirstTileOnly(), case_name, seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("delta", [+1, -1])
@pytest.mark.parametrize("case_name", ["swa-causal-ragged", "swa-full-ragged", "swa-long-decode"])
def test_window_off_by_one_is_caught__sglang_pr26147(case_name, delta, seed):
    """Also seen in the corpus: sglang PR #26147 (HF's window is inclusive, SGLang's exclusive: one
    token larger), vllm PR #9679 (window = sliding_window - 1). Bugs #16/#17's dimension D6."""
    caught(WindowOffByOne(delta), case_name, seed)


# == 2. soft-cap (flex) ============================================================================
def _flex_mutant(kind: str):
    """A FlexAttentionBackend whose score/mask handling has the soft-cap bug ``kind``:
    "dropped" (the cap never reaches the kernel), "before-scale" (cap * tanh(raw / cap), then the
    scale), "after-mask" (masked logits are -inf *before* the cap, which maps them to -cap)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from pytest_attn_backends import flex as flex_module

    base = _flex_class()

    class SoftCapMutant(base):
        name = f"bug-softcap-{kind}"

        def _attend(self, q, k, v, layer, plan, params, want_lse):
            lq, lk = q.shape[0], k.shape[0]
            qh, kh, vh = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
            cap, scale = layer.logits_soft_cap, layer.scale
            offset = lk - lq
            block_mask, flex_scale, score_mod = None, scale, None
            if kind == "dropped":
                pass
            elif kind == "before-scale":
                flex_scale = 1.0

                def score_mod(score, b, h, q_idx, kv_idx):
                    return cap * torch.tanh(score / cap) * scale
            elif kind == "after-mask":
                def score_mod(score, b, h, q_idx, kv_idx):
                    if layer.causal:
                        score = torch.where(kv_idx <= q_idx + offset, score, -math.inf)
                    return cap * torch.tanh(score / cap)
            else:
                raise ValueError(kind)
            if kind != "after-mask" and flex_module.needs_mask(layer):
                mask_mod = flex_module.make_mask_mod(layer.causal, layer.window_left >= 0, False,
                                                     torch.tensor(offset), params.get("window"), torch.tensor(lk))
                block_mask = create_block_mask(mask_mod, None, None, lq, lk, device=q.device)
            kwargs = {"score_mod": score_mod, "block_mask": block_mask, "scale": flex_scale,
                      "enable_gqa": layer.group_size > 1}
            o, row_lse = flex_module._run_flex(qh, kh, vh, kwargs, want_lse, compiled=False)
            return o[0].transpose(0, 1), (row_lse[0].transpose(0, 1) if want_lse else None)

    return SoftCapMutant()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["softcap-30-ragged", "softcap-50-decode"])
def test_soft_cap_dropped_is_caught__sglang_33915(case_name, seed):
    """Bugs #15 (the cap specialised at plan time, never passed: output matches the *uncapped*
    reference) and #14 (soft-cap wrong; GSM8K 0.26)."""
    flex_caught(_flex_mutant("dropped"), case_name, seed, "elementwise")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["softcap-30-ragged", "softcap-50-decode"])
def test_soft_cap_before_scaling_is_caught__flashinfer_1193(case_name, seed):
    """Bug #14 (logit-cap math regression): the cap applied to the unscaled logit."""
    flex_caught(_flex_mutant("before-scale"), case_name, seed, "elementwise")


# A masked logit capped to -cap matters only in a causal row whose visible logits lie near -cap:
# softcap-30-ragged has such rows for one seed of three and softcap-50-decode's decode steps mask
# nothing, so softcap-30-low-logits shifts every logit to about -60 (capped to about -29).
@pytest.mark.parametrize("seed", SEEDS)
def test_soft_cap_after_masking_is_caught__flashinfer_pr350(seed):
    """Also seen in the corpus: flashinfer PR #350 (decode applied the logits cap after masking), the
    #14 class: a masked logit of -inf capped to -cap gets a weight again."""
    flex_caught(_flex_mutant("after-mask"), "softcap-30-low-logits", seed, "elementwise")


# == 3. sinks ======================================================================================
class SinksIgnored(Hooked):
    """vllm PR #52148: the prefill path accepts sinks and does not apply them."""

    NAME = "bug-sinks-ignored"

    def sink_logits(self, lq, layer, metadata, i):
        return None


class SinksFirstRowGroupOnly(Hooked):
    """TRT-LLM PR #15739: rows flattened as [query token, head]; the sink normalisation covers
    only the first head group of rows, i.e. the first query token of a speculative generation
    request. The later draft tokens get no sink."""

    NAME = "bug-sinks-first-row-group"

    def sink_logits(self, lq, layer, metadata, i):
        sinks = super().sink_logits(lq, layer, metadata, i)
        if sinks is None or i < metadata.num_contexts or lq == 1:
            return sinks
        sinks = sinks.clone()
        sinks[:, 1:] = -math.inf
        return sinks


class SinksFirstKVGroupOnly(Hooked):
    """The same class of bug over heads: only the query heads of the first KV head's group get
    their sink."""

    NAME = "bug-sinks-first-kv-group"

    def sink_logits(self, lq, layer, metadata, i):
        sinks = super().sink_logits(lq, layer, metadata, i)
        if sinks is None:
            return None
        sinks = sinks.clone()
        sinks[layer.group_size:] = -math.inf
        return sinks


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["sinks-prefill", "sinks-decode", "swa-alternating-layers-sinks"])
def test_sinks_ignored_is_caught__vllm_pr52148(case_name, seed):
    """Bug #23 (FA2 prefill with sinks silently without them: GSM8K 0.000)."""
    caught(SinksIgnored(), case_name, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_sinks_for_first_row_group_only_is_caught__trtllm_pr15739(seed):
    """Bug #24 (speculative XQA: sinks normalised for the first head group of [token, head] rows
    only). Plain decode (one token) cannot show it; sinks-spec-decode must."""
    passes(SinksFirstRowGroupOnly(), "sinks-decode", seed)
    caught(SinksFirstRowGroupOnly(), "sinks-spec-decode", seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["sinks-prefill", "sinks-spec-decode"])
def test_sinks_for_first_kv_head_group_only_is_caught__trtllm_pr15739(case_name, seed):
    """Bug #24's class over heads: only the first KV head's query heads get sinks (D8 x D4)."""
    caught(SinksFirstKVGroupOnly(), case_name, seed)


# == 4. causal alignment ===========================================================================
class TopLeftCausal(TorchSDPABackend):
    """The torch backend planned as if SDPA's is_causal (top-left) were right for every batch:
    queries of a request with cached keys (chunked prefill, a reused prefix, speculative drafts,
    causal cross-attention) are aligned with its *first* keys. A single query still sees every key
    (as the real backend does), so plain decode stays right."""

    def __init__(self):
        super().__init__("bug-causal-top-left", use_varlen=False)

    def plan(self, metadata, layer, device="cpu"):
        plan = super().plan(metadata, layer, device)
        if plan.detail("mask") == "explicit" and layer.causal and layer.window_left < 0 and not layer.sinks:
            details = tuple((k, "is_causal" if k == "mask" else v) for k, v in plan.details)
            plan = dataclasses.replace(plan, details=details)
        return plan


class CausalOffByOne(Hooked):
    """flashinfer PR #348: `>` for `>=` in the bottom-right causal mask when qo_len < kv_len (a
    query does not see its own key)."""

    NAME = "bug-causal-off-by-one"

    def causal_visible(self, qpos, kpos, lq, lk):
        return kpos < qpos if 1 < lq < lk else kpos <= qpos


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["chunked-prefill", "prefix-reuse", "spec-decode-q4", "cross-attn-causal"])
def test_causal_aligned_top_left_is_caught__D10_D12(case_name, seed):
    """D10 (chunked prefill / reused prefix: bugs #8, #18, #19, #30) and D12 (multi-token
    generation: #24, #38, #39); D11 for causal cross-attention. llm-decode-gqa-nhd (prefill with
    qo == kv, then one-token decode) cannot show it."""
    passes(TopLeftCausal(), "llm-decode-gqa-nhd", seed)
    caught(TopLeftCausal(), case_name, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_causal_off_by_one_is_caught__flashinfer_pr348(seed):
    """Bug #19 (qo_len 2, kv_len 3: `>` vs `>=`, in the kernel and its CPU reference alike)."""
    caught(CausalOffByOne(), "prefix-reuse-q2-kv3", seed)


# == 5. FP8 KV scales ==============================================================================
class FP8Scales(Hooked):
    """The cache is written with the layer's scales, but the kernel reads with other ones: both
    left at 1.0 (vllm PR #34863: `_k/_v_scale_float` never set; sglang PR #20705: Triton falls back
    to 1.0), one of them at 1.0, or k and v swapped."""

    def __init__(self, kind):
        self.kind = kind
        super().__init__(f"bug-fp8-scales-{kind}")

    def kv_scales(self, layer):
        return {"dropped": (1.0, 1.0), "k-dropped": (1.0, layer.v_scale), "v-dropped": (layer.k_scale, 1.0),
                "swapped": (layer.v_scale, layer.k_scale)}[self.kind]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["dropped", "k-dropped", "v-dropped", "swapped"])
@pytest.mark.parametrize("case_name", ["fp8-kv-scales", "fp8-kv-mixed"])
def test_fp8_kv_scale_dropped_or_swapped_is_caught__sglang_pr20705_vllm_pr34863(case_name, kind, seed):
    """Bugs #21 (scale loading broken, float scale None or 1.0) and #22 (float scales left at 1.0:
    garbage output)."""
    caught(FP8Scales(kind), case_name, seed)


# == 6. stale plans ================================================================================
class StalePlanMixin:
    """A compiled graph cached by shape only (the batch's lengths and the layer's head counts and
    dims): plan() reports the layer it was asked for, but its handle is whatever graph was compiled
    first for that shape, and forward replays that graph with its baked-in scale, window, mask,
    soft-cap and dtype (for another dtype, the same bytes read as the compiled one)."""

    def plan(self, metadata, layer, device="cpu"):
        fresh = super().plan(metadata, layer, device)
        key = (metadata.seq_lens, metadata.cached_lens, layer.num_heads, layer.num_kv_heads, layer.head_dim,
               layer.head_dim_v)
        graphs = self.__dict__.setdefault("_graphs", {})
        return fresh.with_handle(graphs.setdefault(key, fresh))

    def forward(self, q, k, v, metadata, plan, out=None, **kwargs):
        compiled = plan.handle
        replay = dataclasses.replace(compiled, layer=dataclasses.replace(compiled.layer,
                                                                         layer_idx=plan.layer.layer_idx))
        dtype = torch_dtype(compiled.layer.dtype)
        if q.dtype != dtype:  # cuDNN decode hard-coded BF16 (bug #9): fp16 bytes read as bf16
            super().forward(q.view(dtype), k.view(dtype), v.view(dtype), metadata, replay, out.view(dtype), **kwargs)
            return out
        return super().forward(q, k, v, metadata, replay, out, **kwargs)


class StalePlan(StalePlanMixin, TorchSDPABackend):
    def __init__(self):
        super().__init__("bug-stale-plan", use_varlen=False)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["reuse-scale", "reuse-window", "reuse-mask", "reuse-dtype"])
def test_stale_plan_keyed_on_shape_is_caught__flashinfer_pr4146_sglang_pr31501(case_name, seed):
    """Bugs #9 (cuDNN graph-cache key without scale/dtype/strides), #16 (window specialised at
    plan time), #15 (the same for the cap: see the flex test below); D15. The plan this mutant
    reports is right (a plan-only check passes); only the output shows the stale graph."""
    caught(StalePlan(), case_name, seed)
    case = CATALOG[case_name]
    results = run_case(StalePlan(), case, seed=seed)
    assert all(r.plan.layer == case.layer(r.layer_idx) for r in results), "every reported plan names its layer"
    assert any(r.plan.handle.layer != r.plan.layer for r in results), "and some replay another layer's graph"


@pytest.mark.parametrize("seed", SEEDS)
def test_stale_plan_with_soft_cap_is_caught__sglang_33915(seed):
    """Bug #15 (the cap specialised at plan(): a graph compiled with the cap replayed without it)."""

    class FlexStalePlan(StalePlanMixin, _flex_class()):
        name = "bug-stale-plan-flex"

    flex_caught(FlexStalePlan(), "reuse-softcap", seed, "elementwise")


# == 7. the paged cache: pages, page tables, freed and shared pages ===============================
class PagesAssumedContiguous(Hooked):
    """Reads a request's pages as first_page, first_page + 1, ... instead of through its block
    table (pytorch #182593: flex output depends on physical KV placement; vLLM randomises block
    order to catch this). Out-of-range ids wrap, as a pointer into the pool would."""

    NAME = "bug-pages-contiguous"

    def block_table(self, metadata, i):
        table, pool = metadata.block_tables[i], metadata.kv_cache_manager.num_pages
        return tuple((table[0] + j) % pool for j in range(len(table)))


class GenerationReadsContextPageTable(Hooked):
    """A mixed batch split into a prefill part and a decode part, the decode part given the whole
    batch's paged_kv_indptr from its start: generation request j reads the pages of request j,
    a context request (another request's cache pages)."""

    NAME = "bug-gen-reads-ctx-pages"

    def block_table(self, metadata, i):
        if i < metadata.num_contexts:
            return metadata.block_tables[i]
        flat, indptr = metadata.paged_kv_indices, metadata.paged_kv_indptr
        start = indptr[i - metadata.num_contexts]
        need = pages_for(metadata.kv_lens[i], metadata.page_size)
        return tuple(flat[(start + m) % len(flat)] for m in range(need))


class StalePageTableRows(Hooked):
    """A persistent page-table buffer updated append-only per batch slot (a CUDA-graph replay
    whose page table is never rewritten, TRT-LLM PR #18769): once a request finishes and the
    others move up a slot, a slot's first pages are those of the request that held it before,
    freed (and poisoned) by then."""

    NAME = "bug-stale-page-table"

    def block_table(self, metadata, i):
        rows = self.__dict__.setdefault("_rows", {})
        current, previous = metadata.block_tables[i], rows.get(i, ())
        row = tuple(previous[:len(current)]) + tuple(current[len(previous):])
        rows[i] = row
        return row


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["gqa-r4-kv2", "llm-decode-gqa-nhd", "page64-partial-last"])
def test_pages_assumed_contiguous_is_caught__pytorch_182593(case_name, seed):
    """Also seen in the corpus: pytorch #182593 (output depends on physical KV placement); D16/D17.
    The cache hands pages out in a seeded scrambled order, so a request's pages are not adjacent."""
    caught(PagesAssumedContiguous(), case_name, seed, ("nonfinite", "elementwise"))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["llm-mixed-nhd", "chunked-prefill"])
def test_another_requests_pages_are_caught__flashinfer_pr942(case_name, seed):
    """Bug #12 (PR #942: an unrelated sequence's page corrupts the outputs), #20 (chunked prefill
    mixing requests), D17. Pure-decode steps are unaffected: only the mixed steps catch it."""
    caught(GenerationReadsContextPageTable(), case_name, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_freed_page_read_through_stale_page_table_is_caught__trtllm_pr18769(seed):
    """Bug #28 (decode re-plan skipped under graph replay: each replay reused the warmup page
    table), D14/D17: llm-decode-gqa-nhd frees request 0 after step 1, and its pages come back NaN."""
    caught(StalePageTableRows(), "llm-decode-gqa-nhd", seed, "nonfinite")


@pytest.mark.parametrize("seed", SEEDS)
def test_shared_prefix_poisoned_by_owners_free_is_caught__D17(seed, monkeypatch):
    """D17 with prefix caching (TRT-LLM KV-cache reuse, vLLM prefix caching), bugs #12 and #20's
    class: the owner of a shared prefix finishes and its free releases (poisons) the pages the
    reusing request still reads. The bug is in the cache's free, so the manager is mutated here
    (through its public methods only); the torch backend itself is correct."""
    control_passes(TORCH, "prefix-reuse", seed)
    original_free = PagedKVCacheManager.free

    def free_ignoring_shares(self, request_id):
        pages = list(self.block_table(request_id))
        original_free(self, request_id)
        k_poison, v_poison = self.poison
        for layer in range(self.num_layers):
            self.k_cache(layer)[pages] = k_poison
            self.v_cache(layer)[pages] = v_poison

    monkeypatch.setattr(PagedKVCacheManager, "free", free_ignoring_shares)
    torch_with_buggy_cache = TorchSDPABackend("torch-buggy-prefix-free")
    case = CATALOG["prefix-reuse"]
    with pytest.raises(AttnCheckFailure, match=CHECKS["nonfinite"]):
        assert_case_passes(run_case(torch_with_buggy_cache, case, seed=seed), torch_with_buggy_cache, case)


# == 8. masked slots loaded and multiplied by a zero weight =======================================
class LoadsWholePages(Hooked):
    """Gathers whole pages (a TMA load of full tiles, flash-attention #1745; MLA flashinfer #941)
    and masks the slots past the request's length in the softmax, then P @ V over every slot:
    0 * NaN = NaN. Declares never_reads_masked_slots, as the torch backend does."""

    NAME = "bug-loads-masked-slots"

    def gather(self, manager, layer, metadata, i):
        whole = pages_for(metadata.kv_lens[i], manager.page_size) * manager.page_size
        return manager.gather(layer.layer_idx, metadata.block_tables[i], whole)

    def attend(self, q, k, v, layer, metadata, i):
        lq, lk, loaded = q.shape[0], metadata.kv_lens[i] if metadata.has_cache else k.shape[0], k.shape[0]
        visible = self.visible(lq, lk, layer, q.device)
        if visible is None:
            visible = torch.ones(lq, lk, dtype=torch.bool)
        visible = F.pad(visible, (0, loaded - lk), value=False)
        k, v = self.expand_kv(k, v, layer)
        return _manual_attention(q, k, v, layer, visible, self.sink_logits(lq, layer, metadata, i))


class LoadsWholePagesHonestly(LoadsWholePages):
    """The same kernel, declaring that it loads masked slots: the cache is then poisoned with
    finite values (K = 0, V = -49152), which a zero weight cancels. Legitimate, so it passes."""

    NAME = "loads-masked-slots-declared"
    capabilities = dataclasses.replace(TorchSDPABackend.capabilities, never_reads_masked_slots=False)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["page64-partial-last", "page256-partial-last", "gqa-r4-kv2"])
def test_masked_slots_times_zero_weight_is_caught__flashinfer_941_fa_1745(case_name, seed):
    """Bugs #12 (MLA NaN from the unfilled slots of a partial last page) and #33 (FA3/FA4 load the
    full cache: 0 * NaN in P @ V). A page-1 cache has no padding slots, so it cannot show it; the
    same kernel declaring that it loads masked slots passes (finite poison)."""
    passes(LoadsWholePages(), "hd64-decode-page1", seed)
    passes(LoadsWholePagesHonestly(), case_name, seed)
    caught(LoadsWholePages(), case_name, seed, "nonfinite")


# == 9. zero-length rows ===========================================================================
class ZeroLengthOffsets(Hooked):
    """Offsets built as if every request had at least one token (the pointer advances by one for
    an empty request, flash-attention #1537's max_seqlen == 1 reshape with zero-length sequences):
    every request after an empty one starts one row late."""

    NAME = "bug-zero-length-offsets"

    @staticmethod
    def _offsets(lens):
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + max(n, 1))
        return offs

    def q_rows(self, metadata, i):
        offs = self._offsets(metadata.seq_lens)
        return offs[i], offs[i + 1]

    out_rows = q_rows

    def kv_rows(self, metadata, i):
        offs = self._offsets(metadata.kv_lens)
        return offs[i], offs[i + 1]

    def store(self, out, rows, o, layer):
        s, e = rows
        e = min(e, out.shape[0])
        out[s:e] = o[: max(0, e - s)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["zero-length-rows", "zero-length-mixed"])
def test_zero_length_offsets_are_caught__flash_attention_1537(case_name, seed):
    """Bugs #34 (seqlens [0,1,0,1], GQA 9/3: wrong reshape) and #20 (zero-length rows never
    written); D3. Some rows are never written (poison) and others get a neighbour's answer."""
    message = caught(ZeroLengthOffsets(), case_name, seed, "unwritten")
    assert "EXCEEDS" in message


# == 10. batch-dependent results ===================================================================
class OneTokenBatchStride(Hooked):
    """flashinfer #3800: the Q descriptor has a one-token batch stride when no batch offsets are
    given, so request i reads its queries from row i; request 0 is right, the others silently
    wrong."""

    NAME = "bug-one-token-batch-stride"

    def q_rows(self, metadata, i):
        n = metadata.seq_lens[i]
        start = min(i, metadata.num_tokens - n)
        return start, start + n


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["vit-ragged-vs-solo", "hetero-batch-vs-solo"])
def test_batch_stride_of_one_token_is_caught__flashinfer_3800(case_name, seed):
    """Bug #10 (batch 0 correct, batch >= 1 silently wrong); D13. Both checks fire: the reference,
    and each request run alone (check_solo) differing from its rows of the batch."""
    control_passes(TORCH, case_name, seed)
    bad = OneTokenBatchStride()
    results = run_case(bad, CATALOG[case_name], seed=seed)
    assert not all(r.comparison.passed for r in results), "the reference check did not fire"
    assert any(not s.passed for r in results for s in r.solo), "the solo check did not fire"
    with pytest.raises(AttnCheckFailure, match=CHECKS["solo"]):
        assert_case_passes(results, bad, CATALOG[case_name])


# == 11. head_dim_vo ===============================================================================
class OutputOffsetWithQKHeadDim(Hooked):
    """flashinfer PR #4663: with hd_qk != hd_vo the O offset is computed with hd_qk: token t's
    output lands at element t * H * hd_qk of the [tokens, H, hd_vo] buffer (writes past the end
    are dropped)."""

    NAME = "bug-o-offset-hd-qk"

    def store(self, out, rows, o, layer):
        flat = out.view(-1)
        heads, d_qk = layer.num_heads, layer.head_dim
        s, _ = rows
        for t in range(o.shape[0]):
            start = (s + t) * heads * d_qk
            values = o[t].reshape(-1)
            n = max(0, min(values.numel(), flat.numel() - start))
            flat[start:start + n] = values[:n]


class LastVOTileDropped(Hooked):
    """flashinfer #1663 (cutlass ragged wrong for (192, 128)): the V/O loop computes the first
    head_dim_vo - 64 dims and leaves the last 64-wide tile zero."""

    NAME = "bug-vo-truncated"

    def softmax_attend(self, q, k, v, layer, visible, sinks):
        o = super().softmax_attend(q, k, v, layer, visible, sinks)
        if layer.head_dim_v != layer.head_dim:
            o = o.clone()
            o[..., layer.head_dim_v - 64:] = 0
        return o


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["hd192-vo128-paged", "hd192-vo128-ragged-full"])
def test_output_offset_with_qk_head_dim_is_caught__flashinfer_pr4663(case_name, seed):
    """Bug #13 (paged (192, 128): wrong O offset); D1/D24."""
    caught(OutputOffsetWithQKHeadDim(), case_name, seed, "unwritten")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["hd192-vo128-ragged-full", "hd192-vo128-paged"])
def test_vo_truncated_is_caught__flashinfer_1663(case_name, seed):
    """Bug #7 (ragged cutlass wrong for hd_qk 192 / hd_vo 128, especially non-causal)."""
    caught(LastVOTileDropped(), case_name, seed)


# == 12. GQA mapping ===============================================================================
class GQAModulo(Hooked):
    """Query head h reads KV head h % num_kv_heads instead of h // group_size."""

    NAME = "bug-gqa-modulo"

    def expand_kv(self, k, v, layer):
        g = layer.group_size
        return k.repeat(1, g, 1), v.repeat(1, g, 1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio", [2, 4, 8, 16])
def test_gqa_kv_head_modulo_is_caught__D4(ratio, seed):
    """D4 (GQA geometry; bugs #26, #35, #38, #39 are its class). With one KV head, h % 1 ==
    h // group, so the kv1 cases cannot see it: the absolute number of KV heads matters."""
    passes(GQAModulo(), f"gqa-r{ratio}-kv1", seed)
    caught(GQAModulo(), f"gqa-r{ratio}-kv2", seed)


# == 13. extreme logits ============================================================================
class NoMaxSubtraction(Hooked):
    """Softmax as exp(s) / sum exp(s), without subtracting the row maximum: exp overflows past ~88."""

    NAME = "bug-softmax-no-max"

    def softmax_attend(self, q, k, v, layer, visible, sinks):
        return _manual_attention(q, k, v, layer, visible, sinks, subtract_max=False)


class FiniteMinusInfSentinel(Hooked):
    """flashinfer #4267: "minus infinity" is the finite -5e4, for masked logits and as the running
    max's initial value: with every logit below -5e4 the max stays at -5e4, exp(s - m) underflows
    to 0 and the output is zeros (or the masked keys win)."""

    NAME = "bug-minus-inf-5e4"

    def softmax_attend(self, q, k, v, layer, visible, sinks):
        return _manual_attention(q, k, v, layer, visible, sinks, sentinel=-5e4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["extreme-logits-300", "extreme-logits-300-decode"])
def test_softmax_without_max_subtraction_is_caught__D19(case_name, seed):
    """D19 (extreme logit magnitudes; bugs #5, #36 are its class). hd64-ragged (logits of a few
    units) cannot show it."""
    passes(NoMaxSubtraction(), "hd64-ragged", seed)
    caught(NoMaxSubtraction(), case_name, seed, "nonfinite")


@pytest.mark.parametrize("seed", SEEDS)
def test_finite_minus_inf_sentinel_is_caught__flashinfer_4267(seed):
    """Bug #5 (outputs zeros when every logit < -5e4). fp32-ragged (ordinary logits) cannot show it."""
    passes(FiniteMinusInfSentinel(), "fp32-ragged", seed)
    caught(FiniteMinusInfSentinel(), "extreme-negative-logits-fp32", seed)


# == 14. a systematic bias =========================================================================
class ScaledOutput(Hooked):
    """Computes in float32 and multiplies by 1.002 before the final rounding to the output dtype."""

    NAME = "bug-output-times-1.002"

    def softmax_attend(self, q, k, v, layer, visible, sinks):
        o = super().softmax_attend(q.float(), k.float(), v.float(), layer, visible, sinks)
        return (o * 1.002).to(q.dtype)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["llm-decode-gqa-nhd", "hd128-ragged"])
def test_output_scaled_by_1_002_is_caught_by_the_bias_slope(case_name, seed):
    """The contract's Tolerance docstring (an output scaled by 1.002 passes the elementwise rule
    on most steps; the signed slope catches it). Every step must fail the slope; the elementwise
    rule passes on most of them."""
    control_passes(TORCH, case_name, seed)
    bad = ScaledOutput()
    results = run_case(bad, CATALOG[case_name], seed=seed)
    assert all(not r.comparison.bias_passed for r in results), [r.comparison.bias for r in results]
    elementwise_ok = sum(r.comparison.elementwise_passed for r in results)
    assert elementwise_ok * 2 > len(results), (
        f"the elementwise rule alone caught {len(results) - elementwise_ok} of {len(results)} steps")
    with pytest.raises(AttnCheckFailure, match=CHECKS["bias"]):
        assert_case_passes(results, bad, CATALOG[case_name])


# == 15. the LSE (flex) ============================================================================
def _lse_mutant(kind: str):
    base = _flex_class()

    class LSEMutant(base):
        name = f"bug-lse-{kind}"

        def forward(self, q, k, v, metadata, plan, out=None, lse=None):
            if lse is None:
                return super().forward(q, k, v, metadata, plan, out)
            if kind == "base-2":  # cuDNN's stats in the other base than the contract declares (#13)
                super().forward(q, k, v, metadata, plan, out, lse=lse)
                lse.div_(math.log(2.0))
                return out
            # first-head-only (#39): for s_q == 1 rows, only the first q head of each KV group gets
            # its LSE; the others keep what the buffer held
            scratch = torch.empty_like(lse)
            super().forward(q, k, v, metadata, plan, out, lse=scratch)
            group = plan.layer.group_size
            for i, n in enumerate(metadata.seq_lens):
                rows = slice(metadata.qo_indptr[i], metadata.qo_indptr[i + 1])
                if n == 1 and group > 1:
                    lse[rows, ::group] = scratch[rows, ::group]
                else:
                    lse[rows] = scratch[rows]
            return out

    return LSEMutant()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["lse-ragged", "lse-decode-gqa"])
def test_lse_in_base_2_declared_base_e_is_caught__flashinfer_pr4663(case_name, seed):
    """Bug #13 (the LSE written in one base where the contract wants the other); D21."""
    flex_caught(_lse_mutant("base-2"), case_name, seed, "lse")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["lse-decode-gqa", "lse-ragged"])
def test_lse_for_first_head_of_group_only_is_caught__cudnn_frontend_1083(case_name, seed):
    """Bug #39 (s_q == 1 with GQA: LSE written for the first q head of each KV group only; O is
    right). The harness hands the LSE buffer over NaN-filled, so the stale rows show."""
    message = flex_caught(_lse_mutant("first-head"), case_name, seed, "lse-nonfinite")
    assert re.search(r"max \|out - ref\| = \S+ within", message), "O is right: only the LSE check may fire"
    assert not re.search(CHECKS["bias"], message)


# == 16. strided inputs ============================================================================
class ReadsAsContiguous(Hooked):
    """Takes q, k and v by data pointer and shape, as if contiguous (a raw-pointer kernel, or a
    .view() that happens to fit): for views of one fused QKV projection it reads the wrong rows.
    Declares requires_contiguous = False, so the harness passes the views (bug #9: a
    token-strided K replayed through a graph built for contiguous K; pytorch #191937)."""

    NAME = "bug-reads-strided-as-contiguous"

    def read_inputs(self, q, k, v, metadata, layer):
        return tuple(torch.as_strided(t, t.shape, _contiguous_strides(t.shape), t.storage_offset())
                     for t in (q, k, v))


def _contiguous_strides(shape):
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return tuple(reversed(strides))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["strided-fused-qkv", "strided-fused-qkv-paged"])
def test_strided_inputs_read_as_contiguous_are_caught__flashinfer_pr4146_pytorch_191937(case_name, seed):
    """Bugs #9 (same shapes, token-strided K: max err 1.88) and #37 (layout-dependent SDPA); D16.
    Contiguous inputs (hd128-ragged) cannot show it."""
    passes(ReadsAsContiguous(), "hd128-ragged", seed)
    caught(ReadsAsContiguous(), case_name, seed)


# == 17. TensorRT-LLM #13190: ragged K/V and the HND layout =======================================
class PlansRaggedHND(TorchSDPABackend):
    """TRT-LLM PR #12911: the no-KV wrapper built with the metadata's default kv_layout "HND".
    forward must never run in the plan check."""

    def __init__(self):
        super().__init__("bug-plan-ragged-hnd", use_varlen=False)
        self.forward_calls = 0

    def plan(self, metadata, layer, device="cpu"):
        plan = super().plan(metadata, layer, device)
        return plan if metadata.has_cache else dataclasses.replace(plan, layout="HND")

    def forward(self, q, k, v, metadata, plan, out=None):
        self.forward_calls += 1
        return super().forward(q, k, v, metadata, plan, out)


class ReadsRaggedKVAsHND(Hooked):
    """Bug #1's forward (TRT-LLM PR #13190): ragged K/V are [tokens, kv_heads, dim] (NHD), read
    as [kv_heads, tokens, dim] (HND) over the same memory."""

    NAME = "bug-reads-ragged-kv-as-hnd"

    def read_inputs(self, q, k, v, metadata, layer):
        if metadata.has_cache:
            return q, k, v
        as_hnd = [t.contiguous().reshape(t.shape[1], t.shape[0], t.shape[2]).transpose(0, 1) for t in (k, v)]
        return (q, *as_hnd)


@pytest.mark.parametrize("case_name", ["vit-ragged-mix", "vit-causal", "hd80-ragged"])
def test_no_cache_plan_claiming_hnd_fails_the_plan_check__trtllm_pr13190(case_name):
    """Bug #1 (the seed bug), the plan side: pytest_attn.suite.test_plans' check fails for a
    no-cache plan that says HND, without running anything; the torch backend's plan passes it."""
    from pytest_attn.suite import test_plans as plan_suite

    case = CATALOG[case_name]
    plan_suite.test_plan_matches_the_batch(attn_backend=TORCH, attn_case=case, attn_device="cpu")
    bad = PlansRaggedHND()
    with pytest.raises(AssertionError, match="13190"):
        plan_suite.test_plan_matches_the_batch(attn_backend=bad, attn_case=case, attn_device="cpu")
    assert bad.forward_calls == 0


@pytest.mark.parametrize("case_name", ["vit-causal", "vit-ragged-vs-solo"])
def test_ragged_kv_read_as_hnd_is_caught__trtllm_pr13190(case_name):
    """Bug #1, the output side: the same bytes read in the wrong layout fail the output check on
    the ViT cases (hd 80, bf16, ragged, no cache; vit-ragged-vs-solo also fails its solo check).
    Layout, not data: one seed suffices. (The seed's own vit-ragged-mix, 0.4 s a run, is left to
    tests/test_flashinfer_backend.py, which runs this mechanism on it.)"""
    caught(ReadsRaggedKVAsHND(), case_name)


# == 18. inputs modified in place ==================================================================
class SubtractsKeyMeanInPlace(Hooked):
    """Smooths K by subtracting its mean over the tokens, in place (as SageAttention-style kernels
    do to K for quantization). Softmax is invariant to it, so the output is right; the caller's k
    is not."""

    NAME = "bug-k-mean-in-place"

    def read_inputs(self, q, k, v, metadata, layer):
        k.sub_(k.mean(dim=0, keepdim=True))
        return q, k, v


@pytest.mark.parametrize("case_name", ["hd64-ragged", "fp32-ragged", "gqa-r4-kv2"])
def test_in_place_key_mean_subtraction_is_caught(case_name):
    """No corpus bug (a third-party kernel's behaviour): the harness's inputs-unchanged check
    raises BackendError naming k. Without a cache the output alone passes (the same kernel on a
    copy of k), so only the inputs check can catch it there."""
    control_passes(TORCH, case_name, 0)
    bad = SubtractsKeyMeanInPlace()
    with pytest.raises(BackendError, match=r"modified its input k in place"):
        run_case(bad, CATALOG[case_name])
    if not CATALOG[case_name].cache:  # (with a cache, each step's mean differs: not invariant)
        passes(SubtractsKeyMeanFromACopy(), case_name)


class SubtractsKeyMeanFromACopy(SubtractsKeyMeanInPlace):
    """The same smoothing on a copy of k: the output is right, so only the inputs check (not the
    output check) could ever catch the in-place version."""

    NAME = "k-mean-on-a-copy"

    def read_inputs(self, q, k, v, metadata, layer):
        return super().read_inputs(q, k.clone(), v, metadata, layer)


# == 19. new K/V written at the wrong slot (speculative decoding) =================================
class WritesDraftsAtLastSlot(Hooked):
    """The decode path's slot formula (the new token goes to position kv_len - 1) applied to
    every new token of a generation request: with several draft tokens they all land on the last
    slot, and the slots before it keep what they held (poison)."""

    NAME = "bug-spec-kv-slot"

    def write_cache(self, manager, layer, metadata, k, v):
        assert not manager.quantized
        pages, offsets = [], []
        ps = manager.page_size
        for i, (table, cached, n) in enumerate(zip(metadata.block_tables, metadata.cached_lens, metadata.seq_lens)):
            for j in range(n):
                pos = cached + j if i < metadata.num_contexts else cached + n - 1
                pages.append(table[pos // ps])
                offsets.append(pos % ps)
        pages, offsets = torch.tensor(pages, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)
        for cache, new in ((manager.k_cache(layer.layer_idx), k), (manager.v_cache(layer.layer_idx), v)):
            view = cache if manager.layout == "NHD" else cache.transpose(1, 2)
            view[pages, offsets] = new.to(cache.dtype)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["spec-decode-q4", "spec-decode-q8-gqa8", "swa-spec-decode"])
def test_draft_tokens_written_at_the_wrong_slot_are_caught__D12(case_name, seed):
    """D12 (multi-token generation; bugs #24, #38, #39 and sglang #22679 are its class). Plain
    one-token decode (llm-decode-gqa-nhd) cannot show it."""
    passes(WritesDraftsAtLastSlot(), "llm-decode-gqa-nhd", seed)
    caught(WritesDraftsAtLastSlot(), case_name, seed, "nonfinite")


# == 20. the partial last page =====================================================================
class LastPageLenOffByOne(Hooked):
    """Pages through FlashInfer's (indptr, indices, last_page_len), with last_page_len computed as
    kv_len % page_size + 1 instead of (kv_len - 1) % page_size + 1: right for page size 1, one
    slot too many on a partial last page (an unwritten, NaN slot), one slot for a full one."""

    NAME = "bug-last-page-len"

    def gather(self, manager, layer, metadata, i):
        ps = manager.page_size
        pages = metadata.paged_kv_indices[metadata.paged_kv_indptr[i]:metadata.paged_kv_indptr[i + 1]]
        last = metadata.kv_lens[i] % ps + 1
        return manager.gather(layer.layer_idx, pages, (len(pages) - 1) * ps + last)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case_name", ["page64-partial-last", "page256-partial-last"])
def test_last_page_len_off_by_one_is_caught__flashinfer_4347(case_name, seed):
    """Bugs #4 (large pages: the last page attended wrongly; the 6200-token case is GPU-only) and
    #12 (partial last page); D5. Page size 1 (hd64-decode-page1) cannot show it."""
    passes(LastPageLenOffByOne(), "hd64-decode-page1", seed)
    caught(LastPageLenOffByOne(), case_name, seed, "nonfinite")


# == further rows the CPU suite can express ========================================================
class HeadDimTailDropped(Hooked):
    """flashinfer #4299: FA2 never validates head_dim; with hd not a multiple of 16 the q.k loop
    runs over whole 16-wide chunks only (72 -> 64 dims)."""

    NAME = "bug-hd-tail-dropped"

    def softmax_attend(self, q, k, v, layer, visible, sinks):
        d = layer.head_dim // 16 * 16
        if d != layer.head_dim:
            q, k = q[..., :d], k[..., :d]
        return super().softmax_attend(q, k, v, layer, visible, sinks)


@pytest.mark.parametrize("seed", SEEDS)
def test_head_dim_not_multiple_of_16_is_caught__flashinfer_4299(seed):
    """Bug #2 (hd 72, 136: wrong results); D1. hd 64, 80 and 96 cannot show it."""
    for ok in ("hd64-ragged", "hd80-ragged", "hd96-ragged"):
        passes(HeadDimTailDropped(), ok, seed)
    caught(HeadDimTailDropped(), "hd72-ragged", seed)


class ShortKVReadsPoolAsContiguous(Hooked):
    """flashinfer PR #3106: below 16 keys the launcher picks a fallback kernel that cannot read
    paged KV; it reads the pool as one contiguous token array at the request's kv offset."""

    NAME = "bug-short-kv-fallback"

    def gather(self, manager, layer, metadata, i):
        if metadata.max_seq_len_kv >= 16:
            return super().gather(manager, layer, metadata, i)
        start, n = metadata.cu_kv_lens[i], metadata.kv_lens[i]
        out = []
        for cache in (manager.k_cache(layer.layer_idx), manager.v_cache(layer.layer_idx)):
            view = cache if manager.layout == "NHD" else cache.transpose(1, 2)
            out.append(view.reshape(-1, *view.shape[2:])[start:start + n])
        return out[0], out[1]


@pytest.mark.parametrize("seed", SEEDS)
def test_short_kv_fallback_reading_the_pool_is_caught__flashinfer_pr3106(seed):
    """Bug #8 (Q_PAGED_KV wrong when s_kv < 16); D2/D10."""
    passes(ShortKVReadsPoolAsContiguous(), "gqa-r4-kv2", seed)
    caught(ShortKVReadsPoolAsContiguous(), "chunked-kv-lt16", seed, "nonfinite")


class ReadsHNDCacheAsNHD(Hooked):
    """TRT-LLM #6507: split/concat kernels assume one paged layout while the cache has the other:
    an HND cache ([pages, heads, page, dim]) read as NHD over the same memory."""

    NAME = "bug-hnd-cache-read-as-nhd"

    def gather(self, manager, layer, metadata, i):
        if manager.layout == "NHD":
            return super().gather(manager, layer, metadata, i)
        table, n = metadata.block_tables[i], metadata.kv_lens[i]
        idx = torch.tensor(list(table[:pages_for(n, manager.page_size)]), dtype=torch.long)
        out = []
        for cache in (manager.k_cache(layer.layer_idx), manager.v_cache(layer.layer_idx)):
            as_nhd = cache.reshape(cache.shape[0], cache.shape[2], cache.shape[1], cache.shape[3])
            out.append(as_nhd[idx].reshape(-1, cache.shape[1], cache.shape[3])[:n])
        return out[0], out[1]


@pytest.mark.parametrize("seed", SEEDS)
def test_hnd_cache_read_as_nhd_is_caught__trtllm_6507(seed):
    """Bug #29 (a paged layout mismatch); D16. The NHD twin of the case cannot show it."""
    passes(ReadsHNDCacheAsNHD(), "llm-decode-gqa-nhd", seed)
    caught(ReadsHNDCacheAsNHD(), "llm-decode-gqa-hnd", seed)


class PaddedKeyTileScoredZero(Hooked):
    """pytorch #196678: when kv_len % 128 == 64, the padded half of the last 128-wide key tile is
    scored 0 instead of -inf (its K and V rows are zeros)."""

    NAME = "bug-padded-tile-zero"

    def softmax_attend(self, q, k, v, layer, visible, sinks):
        lq, lk = q.shape[0], k.shape[0]
        if lk % 128 != 64:
            return super().softmax_attend(q, k, v, layer, visible, sinks)
        k, v = (F.pad(t, (0, 0, 0, 0, 0, 64)) for t in (k, v))
        if visible is not None:
            visible = F.pad(visible, (0, 64), value=True)
        return super().softmax_attend(q, k, v, layer, visible, sinks)


@pytest.mark.parametrize("seed", SEEDS)
def test_padded_key_tile_scored_zero_is_caught__pytorch_196678(seed):
    """Bug #36 (L % 128 == 64 scored the padded half of the last key tile: L in {64, 192, ...});
    D2. Both tile-edge cases have such a length (64; 192); fp32-ragged (100, 33, 1) has none."""
    passes(PaddedKeyTileScoredZero(), "fp32-ragged", seed)
    caught(PaddedKeyTileScoredZero(), "tile-edge-127-128-129-192", seed)
    caught(PaddedKeyTileScoredZero(), "tile-edge-63-64-65", seed)


class CrossQStartFromKVOffsets(Hooked):
    """TRT-LLM #10102: in cross-attention the q sequence start is offset by the kv lengths; here
    request i's queries are read from its kv offset (0 for request 0, past its queries for the
    others)."""

    NAME = "bug-cross-q-start"

    def q_rows(self, metadata, i):
        if not metadata.is_cross:
            return super().q_rows(metadata, i)
        n = metadata.seq_lens[i]
        start = min(metadata.kv_rows_indptr[i], metadata.num_tokens - n)
        return start, start + n


@pytest.mark.parametrize("seed", SEEDS)
def test_cross_attention_q_start_is_caught__trtllm_10102(seed):
    """Bug #27 (cross-attention q 64 over kv 128, hd 32: wrong q start); D11."""
    caught(CrossQStartFromKVOffsets(), "cross-attn-hd32", seed)


# == not covered ===================================================================================
# Bugs of docs/bug-corpus.md with no mutant here, and why:
# - #3 (trtllm-gen decode wrong at hd 256), #25 (XQA pageIdx per X-iteration at hd 256 on sm89),
#   #26 (XQA stmatrix, GQA > 8), #35 (cuDNN wrong for < 8 absolute KV heads): kernel-internal
#   faults whose mechanism the threads do not state beyond "wrong at this shape"; a mutant would
#   only be "wrong when head_dim == 256", which proves nothing about the catalog. The cases that
#   would run them (hd256-decode, gqa-r16-kv*, gqa-r7-kv4) are in the catalog; they need the real
#   kernels (GPU).
# - #4's "only the first 4096 tokens and the last page attended": needs page256-long-6200 (6200
#   tokens), over the CPU limit (66 s on CPU through the torch backend); the partial-last-page half
#   of the class is test_last_page_len_off_by_one_is_caught__flashinfer_4347.
# - #6 (page index * stride wraps at 32 bits, page ids ~1M) and #32 (batch stride reaching 2^30):
#   need caches of gigabytes; the catalog has no case near those indices (D18), nor could CPU run one.
# - #11 (CUDA-graph padded CTAs over a reused workspace), #31 (plan() races on pinned staging
#   buffers): CUDA graphs, streams and workspaces have no CPU counterpart in the harness.
# - #20's uninitialised rows *merged* across chunks: the harness has no split-KV merge to mutate;
#   its zero-length and never-written halves are covered (zero-length offsets, poisoned out).
# - #30 (a non-contiguous LSE passed to merge_attn_states), #38 (flex BlockMask H=None / sliced
#   mask_mod), #40 (padded THD ignoring bound ragged offsets): the catalog has no cascade merge, no
#   BlockMask slicing and no padded-THD input, so no case could catch them.
# - #37's stride-0 (expanded) K/V: no catalog case passes broadcast K/V; only fused-QKV views
#   (strided-fused-qkv*) are covered.
# - #9's stride half within one backend instance (a graph compiled for contiguous K replayed for a
#   strided K of the same shape): no catalog case runs one shape with two stride patterns; the
#   stale-plan mutant is caught on the scale/window/mask/dtype/soft-cap halves only, and the
#   strided mutant on strided-fused-qkv* (a layout bug, not a cache-key bug).
# The soft-cap applied after masking (flashinfer PR #350, #14's class) shows only where visible
# logits lie near -cap: softcap-30-low-logits has them on every seed (softcap-30-ragged on one of three).
