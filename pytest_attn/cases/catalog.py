"""The catalog of named cases that drives the suite (``pytest-attn cases`` lists it).

Each case exists to catch a class of real bug, and its name says which; its description names the
upstream thread where such a bug was found. In the comments, #N is a bug and DN a dimension of the
project's bug corpus, docs/bug-corpus.md, whose entries name the cases here that catch each; an
upstream thread is cited with its repository ("flashinfer #4299"). tests/test_bug_corpus.py checks
that every code cited here has an entry there. Tags select a dimension: ``--attn-cases=swa`` runs
the sliding-window cases. Cases over --attn-max-tokens (2048 by default on CPU) run on GPUs only.
"""
from __future__ import annotations

from typing import Optional

from pytest_attn.cases.case import VIT_HEAD_DIM, VIT_HEADS, VIT_TOKENS_224, BatchCase
from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.layer import LayerSpec


def _vit(name, seq_lens, mask="full", tags=(), **kw):
    return BatchCase(name, VIT_HEADS, VIT_HEADS, VIT_HEAD_DIM, tuple(seq_lens), "bfloat16", mask,
                     tags=("vit", "no-cache") + tuple(tags), **kw)


def _ragged(name, heads, kv_heads, head_dim, seq_lens, *, tags, mask="causal", **kw):
    return BatchCase(name, heads, kv_heads, head_dim, tuple(seq_lens), mask=mask, tags=tuple(tags) + ("no-cache",), **kw)


def _paged(name, heads, kv_heads, head_dim, seq_lens, *, tags, decode_steps=2, mask="causal", **kw):
    return BatchCase(name, heads, kv_heads, head_dim, tuple(seq_lens), mask=mask, cache=True, decode_steps=decode_steps,
                     tags=tuple(tags) + ("cache",), **kw)


def _gqa(ratio: int, kv_heads: int) -> BatchCase:
    # Decode kernels dispatch on the group size (flashinfer #2849, TRT-LLM PR #6573), and a kernel
    # path can depend on the absolute number of KV heads, not the ratio (pytorch #193893).
    return _paged(f"gqa-r{ratio}-kv{kv_heads}", ratio * kv_heads, kv_heads, 64, (33, 17), tags=("gqa", "decode"),
                  description=f"group size {ratio} over {kv_heads} KV head(s): prefill and decode kernels (D4)")


# -- absorbed multi-head latent attention (MLA): DeepSeek-V2/V3/R1, Kimi K2 ---------------------------
#: DeepSeek-V3's (and Kimi K2's) latent KV: c_kv of kv_lora_rank 512 and a rope part of 64, one
#: latent head; the softmax scale stays the un-absorbed 1/sqrt(qk_nope_head_dim + qk_rope_head_dim).
MLA_CKV, MLA_ROPE, MLA_QK_NOPE = 512, 64, 128
MLA_SCALE = (MLA_QK_NOPE + MLA_ROPE) ** -0.5  # 1/sqrt(192)
DEEPSEEK_V3_HEADS, KIMI_K2_HEADS = 128, 64
MLA_TP8_HEADS = DEEPSEEK_V3_HEADS // 8  # DeepSeek-V3 under tensor parallelism 8: 16 heads per GPU


def _mla(name, heads, seq_lens, *, tags, cache=True, **kw):
    layer = LayerSpec(heads, 1, MLA_CKV + MLA_ROPE, "bfloat16", "causal", sm_scale=MLA_SCALE, head_dim_vo=MLA_CKV,
                      latent_kv=True)
    if cache:
        kw.setdefault("decode_steps", 2)
    return BatchCase(name, seq_lens=tuple(seq_lens), layer_spec=layer, cache=cache,
                     tags=("mla",) + tuple(tags) + (("cache",) if cache else ("no-cache",)), **kw)


_MLA_CASES = [
    _mla("mla-dsv3-decode-page64", DEEPSEEK_V3_HEADS, (37, 100), page_size=64, decode_steps=3,
         tags=("decode", "page-size"),
         description="DeepSeek-V3's 128 heads decoding on 64-token pages: absorbed-MLA decode silently wrong at "
                     "page_size > 1 (ROCm/aiter #2996); FlashInfer's MLA kernel was tested at page size 1 only "
                     "(flashinfer PR #810)"),
    _mla("mla-tp8-decode-page1-prime", MLA_TP8_HEADS, (127, 31, 5), page_size=1, decode_steps=3,
         tags=("decode", "page-size"),
         description="one-token pages and prime lengths: the last page's length set to the whole sequence's in "
                     "vLLM's AITER MLA decode (vllm PR #31282)"),
    _mla("mla-tp8-decode-ragged-page16", MLA_TP8_HEADS, (1, 17, 200, 64, 3), decode_steps=4,
         tags=("decode",),
         description="decode over very different KV lengths, each request on several scattered pages: FlashInfer's "
                     "fa2 MLA returned zeros for non-contiguous kv_indices (flashinfer #3219)"),
    _mla("mla-tp8-chunked-prefill", MLA_TP8_HEADS, (300, 40), chunk_size=128, tags=("chunked", "mixed"),
         description="a prompt in chunks over its own cached latent KV (qo_len < kv_len) beside a decoding request: "
                     "MLA chunked prefill wrong in SGLang (sglang #22291, flashinfer #3047)"),
    _mla("mla-tp8-mixed-page64", MLA_TP8_HEADS, (50, 20), joining=(33, 5), decode_steps=3, page_size=64,
         tags=("mixed", "page-size"),
         description="new prompts and decoding requests in one step: MLA's decode/prefill split of a batch "
                     "mishandled, inaccurate results and illegal accesses in vLLM V1 (vllm PR #14253)"),
    _mla("mla-tp8-spec-decode", MLA_TP8_HEADS, (40, 17), draft_tokens=3, decode_steps=3,
         tags=("spec-decode",),
         description="MTP/EAGLE verification: four query tokens per request over pages > 1 (target_verify, "
                     "sglang PR #9990); wrong output of an MLA backend under speculative decoding (vllm PR #25984)"),
    _mla("mla-tp8-prefix-reuse", MLA_TP8_HEADS, (100, 30), shared_prefix=64,
         tags=("prefix", "chunked"),
         description="a request reusing another's cached latent pages: MLA with prefix caching failed on a cache "
                     "hit (vllm PR #13747, its review thread)"),
    _mla("mla-kimi-k2-ragged-no-cache", KIMI_K2_HEADS, (64, 17, 1), cache=False, tags=(),
         description="Kimi K2's 64 heads over a ragged batch without a cache: the latent K given directly"),
    _mla("mla-tp8-fp8-kv", MLA_TP8_HEADS, (60, 17), kv_dtype="float8_e4m3fn", k_scale=0.05, v_scale=0.05,
         decode_steps=3, tags=("fp8", "decode"),
         description="an FP8 latent cache with its scale: FlashInfer takes it as ckv_scale and kpe_scale, two "
                     "arguments where a scale can be dropped or read as 1.0 (sglang PR #20705 for the class)"),
    _mla("mla-tp8-lse-decode", MLA_TP8_HEADS, (40, 17), return_lse=True, decode_steps=2, tags=("lse", "decode"),
         description="the log-sum-exp with which decode context parallelism merges partial MLA outputs"),
    _mla("mla-dsv3-chunked-2500", DEEPSEEK_V3_HEADS, (2500,), chunk_size=1024, page_size=64, decode_steps=2,
         tags=("chunked", "large"),
         description="DeepSeek-V3 prefilling a 2.5k-token document in 1024-token chunks: logprob MSE 3.3 on a "
                     "2471-token document through MLA chunked prefill (sglang #22291)"),
]

_CASES = [
    # -- the seed: the ViT encoder, no cache, full (bidirectional) attention, head_dim 80 ----------------
    _vit("vit-1img-224", [VIT_TOKENS_224], description="one 224-pixel image: 256 tokens"),
    _vit("vit-1024", [1024]),
    _vit("vit-2048", [2048]),
    _vit("vit-4096", [4096], tags=("large",)),
    _vit("vit-8192", [8192], tags=("large",)),
    _vit("vit-ragged-mix", [256, 1024, 576, 64, 1], description="several images of different sizes, and a 1-token edge"),
    _vit("vit-ragged-many", [256] * 12 + [16, 49, 100], description="many small images"),
    _vit("vit-causal", [300, 128], mask="causal"),
    _vit("vit-ragged-vs-solo", [256, 64, 576, 1], tags=("hetero",), check_solo=True,
         description="each image alone must give what it gave in the batch: batch >= 1 silently wrong (flashinfer #3800)"),
    # -- LLM prefill with grouped-query attention, no cache ---------------------------------------------
    BatchCase("llm-prefill-gqa", 32, 8, 128, (512, 300, 17), mask="causal", tags=("llm", "gqa", "no-cache")),
    BatchCase("llm-prefill-mha-full", 8, 8, 128, (200, 64), mask="full", tags=("llm", "no-cache")),
    # -- head dims: FA2 never validated head_dim (#2), hd 256 decode (#3), 192/128 pairs (#7, #13) --------
    _ragged("hd64-ragged", 8, 8, 64, (129, 64, 7), tags=("head-dim",)),
    _ragged("hd72-ragged", 8, 8, 72, (129, 64, 7), tags=("head-dim",),
            description="not a multiple of 16: wrong results in FA2 (flashinfer #4299)"),
    _ragged("hd80-ragged", 16, 16, 80, (129, 64, 7), tags=("head-dim",)),
    _ragged("hd96-ragged", 8, 8, 96, (129, 64, 7), tags=("head-dim",),
            description="a multiple of 16, not of 64: an illegal memory access in FA2 (flashinfer #4299)"),
    _ragged("hd128-ragged", 8, 2, 128, (129, 64, 7), tags=("head-dim", "gqa")),
    _ragged("hd192-ragged", 4, 4, 192, (129, 64, 7), tags=("head-dim",), mask="full"),
    _ragged("hd256-ragged", 4, 4, 256, (129, 64, 7), tags=("head-dim",), mask="full"),
    _ragged("hd192-vo128-ragged-full", 8, 8, 192, (129, 64, 7), mask="full", head_dim_vo=128, tags=("head-dim",),
            description="q/k head dim 192, v/out 128, non-causal: cutlass ragged wrong (flashinfer #1663)"),
    _paged("hd192-vo128-paged", 8, 8, 192, (40, 17), head_dim_vo=128, tags=("head-dim", "decode"),
           description="192/128 through a paged cache: wrong O offset (flashinfer PR #4663)"),
    _paged("hd72-decode", 8, 8, 72, (40, 17), tags=("head-dim", "decode")),
    _paged("hd96-decode", 8, 8, 96, (40, 17), tags=("head-dim", "decode")),
    BatchCase("fp16-ragged", 8, 8, 128, (100, 33), dtype="float16", mask="causal", tags=("dtype", "no-cache")),
    # -- lengths one below, at and above tile edges (D2: #4, #8, #36, #37) -------------------------------
    _ragged("tile-edge-63-64-65", 8, 2, 128, (63, 64, 65), tags=("tile-edge", "gqa")),
    _ragged("tile-edge-127-128-129-192", 8, 8, 64, (127, 128, 129, 192), mask="full", tags=("tile-edge",),
            description="L % 128 == 64 scored the padded half of the last key tile (pytorch #196678)"),
    _ragged("tile-edge-1023-1025", 4, 4, 64, (1023, 1025), tags=("tile-edge",)),
    _ragged("tile-edge-4097-8193", 8, 8, 128, (4097, 8193), tags=("tile-edge", "large")),
    # -- the paged cache: prefill, decode steps, a mixed step, requests finishing -----------------------
    _paged("llm-decode-gqa-nhd", 32, 8, 128, (37, 100, 16), decode_steps=4, tags=("llm", "gqa", "decode")),
    _paged("llm-decode-gqa-hnd", 32, 8, 128, (37, 100, 16), decode_steps=4, kv_layout="HND",
           tags=("llm", "gqa", "decode")),
    _paged("llm-mixed-nhd", 16, 4, 128, (50, 20), decode_steps=3, joining=(33, 5), tags=("llm", "gqa", "mixed")),
    _paged("llm-mixed-hnd", 16, 4, 128, (50, 20), decode_steps=3, joining=(33, 5), kv_layout="HND",
           tags=("llm", "gqa", "mixed")),
    _paged("hd64-decode-page1", 8, 8, 64, (5, 3), page_size=1, tags=("page-size", "decode"),
           description="page size 1: MLA page-attention tested only there (flashinfer PR #810)"),
    _paged("hd80-decode", 16, 16, 80, (70, 9), tags=("head-dim", "decode")),
    _paged("hd256-decode", 4, 2, 256, (40,), tags=("head-dim", "decode"),
           description="decode at head_dim 256: trtllm-gen wrong (flashinfer #1993)"),
    _paged("cache-full-mask", 8, 8, 128, (64, 31), mask="full", tags=()),
    # -- page sizes above 16, partial last pages (D5: #4, #12) -----------------------------------------
    _paged("page64-partial-last", 8, 2, 64, (100, 200, 7), page_size=64, decode_steps=3, tags=("page-size", "decode")),
    _paged("page256-partial-last", 8, 2, 64, (300, 40), page_size=256, tags=("page-size", "decode")),
    _paged("page256-long-6200", 16, 2, 128, (6200,), page_size=256, tags=("page-size", "large"),
           description="context beyond 4096 tokens on 256-token pages: only the first 4096 attended (flashinfer #4347)"),
    # -- GQA geometry: ratios 1..16 over 1 and 2 KV heads, and 7 over 4 (D4: #26, #35, #39) ---------------
    *[_gqa(ratio, kv) for kv in (1, 2) for ratio in (1, 2, 4, 8, 16)],
    _paged("gqa-r7-kv4", 28, 4, 64, (33, 17), tags=("gqa", "decode"),
           description="group size 7 over 4 KV heads: cuDNN wrong for fewer than 8 KV heads at 7:1 (pytorch #193893)"),
    # -- zero-length rows (D3: #5, #20, #34) -------------------------------------------------------------
    _ragged("zero-length-rows", 9, 3, 64, (0, 1, 0, 1), tags=("zero-length", "gqa"),
            description="max_seqlen 1 with empty sequences (flash-attention #1537)"),
    _ragged("zero-length-mixed", 8, 2, 128, (0, 64, 0, 33, 0), tags=("zero-length", "gqa")),
    # -- extreme logits (D19: #5, #36) -------------------------------------------------------------------
    _ragged("extreme-logits-300", 8, 8, 64, (200, 65), input_scale=12.0, tags=("extreme-logits",),
            description="logits of several hundred: exp overflows without max subtraction"),
    _paged("extreme-logits-300-decode", 8, 2, 64, (70, 30), input_scale=12.0, tags=("extreme-logits", "decode")),
    _ragged("extreme-negative-logits-fp32", 4, 4, 64, (150, 33), dtype="float32", logit_shift=-6e4,
            tags=("extreme-logits", "fp32"),
            description="every logit below -5e4: a finite -inf sentinel of 5e4 zeroes the output (flashinfer #4267); float32, "
                        "where the low-precision reference can still resolve logits that large"),
    # -- float32 (D22) ---------------------------------------------------------------------------------
    _ragged("fp32-ragged", 8, 2, 64, (100, 33, 1), dtype="float32", tags=("fp32", "gqa")),
    _paged("fp32-decode", 8, 2, 64, (40, 17), dtype="float32", decode_steps=3, tags=("fp32", "decode")),
    # -- heterogeneous batches against the same requests alone (D13: #10, #20, #25, #40) -----------------
    _ragged("hetero-batch-vs-solo", 8, 2, 128, (1, 17, 300, 64, 2), check_solo=True, tags=("hetero", "gqa")),
    # -- sliding windows (D6: #15, #16, #17, #18, #28) and long generation (D26) -------------------------
    _ragged("swa-causal-ragged", 8, 2, 128, (300, 129, 7), window_left=64, tags=("swa", "gqa")),
    _ragged("swa-full-ragged", 8, 8, 64, (200, 65), mask="full", window_left=48, tags=("swa",),
            description="a non-causal window bounds only the left"),
    _paged("swa-noncausal-chunked", 8, 2, 128, (700,), mask="full", window_left=133, chunk_size=300, decode_steps=0,
           tags=("swa", "chunked"), description="non-causal window with qo_len < kv_len: first query tile wrong (flashinfer #4972)"),
    _paged("swa-long-decode", 8, 2, 64, (40, 9), window_left=32, decode_steps=48, tags=("swa", "long-decode", "decode"),
           description="many decode steps past the window (sglang PR #4823: garbage past ~2k tokens)"),
    _paged("swa-alternating-layers-sinks", 16, 2, 64, (300, 50), num_layers=2, sinks=True,
           layer_overrides=((("window_left", 127),), ()), decode_steps=3, tags=("swa", "sinks", "multi-layer"),
           description="GPT-OSS: sliding and full layers alternate, both with sinks (TensorRT-LLM PR #18769)"),
    _paged("swa-spec-decode", 8, 2, 64, (60, 45), window_left=40, draft_tokens=3, decode_steps=3,
           tags=("swa", "spec-decode"), description="speculative decoding with a window (sglang #22679)"),
    # -- logit soft-cap (D7: #14, #15) ------------------------------------------------------------------
    _ragged("softcap-30-ragged", 8, 4, 128, (200, 33), logits_soft_cap=30.0, input_scale=4.0, tags=("soft-cap", "gqa"),
            description="Grok's cap; logits of ~16 so the cap bends them"),
    _paged("softcap-50-decode", 8, 2, 64, (64, 20), logits_soft_cap=50.0, input_scale=5.0, decode_steps=3,
           tags=("soft-cap", "decode"), description="Gemma 2's cap through prefill and decode"),
    _ragged("softcap-30-low-logits", 8, 8, 64, (150, 40), logits_soft_cap=30.0, logit_shift=-60.0,
            tags=("soft-cap",), description="visible logits near -cap: a cap applied after masking turns the masked "
                                            "-inf into -30, which then weighs as much as they do (flashinfer PR #350)"),
    # -- attention sinks (D8: #23, #24) -----------------------------------------------------------------
    _ragged("sinks-prefill", 16, 2, 64, (128, 45), sinks=True, tags=("sinks", "gqa")),
    _paged("sinks-decode", 16, 2, 64, (50, 20), sinks=True, decode_steps=3, tags=("sinks", "decode")),
    _paged("sinks-spec-decode", 16, 2, 64, (50, 20), sinks=True, draft_tokens=3, decode_steps=2,
           tags=("sinks", "spec-decode"), description="sinks normalised for the first head group only (TensorRT-LLM PR #15739)"),
    # -- a custom softmax scale --------------------------------------------------------------------------
    _ragged("custom-scale", 8, 8, 64, (100, 31), sm_scale=0.3, tags=("scale",)),
    # -- cross-attention: q != kv without a cache (D11: #27) ------------------------------------------
    _ragged("cross-attn-hd32", 16, 16, 32, (64, 1, 10), mask="full", kv_seq_lens=(128, 300, 7), tags=("cross",),
            description="cross-attention q 64 over kv 128 at head_dim 32: wrong q start (TensorRT-LLM #10102)"),
    _ragged("cross-attn-gqa", 8, 2, 128, (33, 7), mask="full", kv_seq_lens=(200, 64), tags=("cross", "gqa")),
    _ragged("cross-attn-causal", 8, 8, 64, (20, 5), kv_seq_lens=(50, 5), tags=("cross",),
            description="causal with fewer queries than keys: aligned bottom-right"),
    # -- chunked prefill and cached prefixes (D10: #8, #18, #19, #30) -----------------------------------
    _paged("chunked-prefill", 8, 2, 128, (300, 40), chunk_size=128, tags=("chunked", "mixed"),
           description="a prompt in three chunks; the other request decodes beside its second chunk, then finishes"),
    _paged("chunked-kv-lt16", 14, 2, 64, (9, 12), chunk_size=8, decode_steps=1, tags=("chunked",),
           description="chunks over fewer than 16 cached keys: fmha_v2 fallback reads paged KV wrong (flashinfer PR #3106)"),
    _paged("prefix-reuse", 8, 2, 64, (100, 30), shared_prefix=64, tags=("prefix", "chunked"),
           description="a request reusing another's first 4 pages; the owner finishes first"),
    _paged("prefix-reuse-q2-kv3", 8, 8, 64, (3, 5), page_size=1, shared_prefix=1, decode_steps=1,
           tags=("prefix", "chunked"), description="qo_len 2 over kv_len 3: the causal off-by-one (flashinfer PR #348)"),
    # -- speculative decoding: several new tokens per generation request (D12: #24, #38, #39) ------------
    _paged("spec-decode-q4", 16, 4, 64, (40, 17, 5), draft_tokens=3, decode_steps=3, tags=("spec-decode", "gqa")),
    _paged("spec-decode-q8-gqa8", 32, 4, 64, (50, 9), draft_tokens=7, tags=("spec-decode", "gqa")),
    # -- FP8 KV cache with non-unit scales (D9: #21, #22) ------------------------------------------------
    _paged("fp8-kv-scales", 16, 4, 128, (60, 17), kv_dtype="float8_e4m3fn", k_scale=0.05, v_scale=0.02,
           decode_steps=3, tags=("fp8", "decode"), description="a scale dropped or read as 1.0 (sglang PR #20705, vllm PR #34863)"),
    _paged("fp8-kv-mixed", 8, 2, 64, (33,), joining=(20,), kv_dtype="float8_e4m3fn", k_scale=0.1, v_scale=0.3,
           tags=("fp8", "mixed")),
    # -- a 16-bit cache in the other 16-bit dtype (the KV-cache dtype configured apart from the model's) ---
    _paged("kv-bf16-under-fp16", 16, 4, 64, (60, 17), dtype="float16", kv_dtype="bfloat16", decode_steps=3,
           tags=("kv-dtype", "decode"), description="an fp16 layer over a bf16 cache: attention uses the K/V the cache "
           "holds, rounded to bf16, not the fp16 inputs"),
    _paged("kv-fp16-under-bf16", 16, 4, 64, (60, 17), dtype="bfloat16", kv_dtype="float16", decode_steps=3,
           tags=("kv-dtype", "decode"), description="a bf16 layer over an fp16 cache"),
    # -- the log-sum-exp (D21: #13, #30, #39) ------------------------------------------------------------
    _ragged("lse-ragged", 8, 2, 128, (100, 33, 1), return_lse=True, tags=("lse", "gqa")),
    _paged("lse-decode-gqa", 16, 2, 64, (40, 17), return_lse=True, tags=("lse", "gqa", "decode"),
           description="one query token with GQA: LSE written for the first head of each group only (cudnn-frontend #1083)"),
    # -- several layers on one cache, and one parameter changing between layers (D15: #9, #15, #16) -----
    _paged("multi-layer-decode", 8, 2, 64, (40, 17), num_layers=3, tags=("multi-layer", "decode")),
    _ragged("reuse-scale", 8, 8, 64, (100, 20), num_layers=2, layer_overrides=((), (("sm_scale", 0.3),)),
            tags=("reuse",), description="a compiled graph reused after the scale changed (flashinfer PR #4146)"),
    _paged("reuse-window", 8, 2, 64, (80, 20), num_layers=2, layer_overrides=((("window_left", 31),), ()),
           tags=("reuse", "swa"), description="window specialised at plan time, not passed at run (sglang PR #31501)"),
    _ragged("reuse-softcap", 8, 8, 64, (100, 20), num_layers=2, input_scale=3.0,
            layer_overrides=((("logits_soft_cap", 20.0),), ()), tags=("reuse", "soft-cap"),
            description="soft-cap specialised at plan time (sglang #33915)"),
    _ragged("reuse-dtype", 8, 8, 64, (100, 20), num_layers=2, layer_overrides=((), (("dtype", "float16"),)),
            tags=("reuse", "dtype"), description="a graph cache key without the dtype (flashinfer PR #4014)"),
    _ragged("reuse-mask", 8, 8, 64, (100, 20), num_layers=2, layer_overrides=((), (("mask", "full"),)),
            tags=("reuse",)),
    # -- strided inputs: q, k, v as views of one fused QKV projection (D16: #9, #37) ----------------------
    _ragged("strided-fused-qkv", 8, 2, 128, (100, 33), strided=True, tags=("strided", "gqa")),
    _paged("strided-fused-qkv-paged", 8, 2, 64, (40, 17), strided=True, tags=("strided", "decode")),
    # -- absorbed MLA (above) --------------------------------------------------------------------------
    *_MLA_CASES,
]

CATALOG: dict[str, BatchCase] = {c.name: c for c in _CASES}
if len(CATALOG) != len(_CASES):  # a name used twice would silently drop a case
    raise RuntimeError("two catalog cases share a name")


def select(names_or_tags: Optional[list[str]] = None, catalog: Optional[dict] = None) -> list[BatchCase]:
    """Cases whose name or one of whose tags is listed; all when the list is empty."""
    catalog = CATALOG if catalog is None else catalog
    if not names_or_tags:
        return list(catalog.values())
    chosen = [c for c in catalog.values() if c.name in names_or_tags or set(c.tags) & set(names_or_tags)]
    known = set(catalog) | {t for c in catalog.values() for t in c.tags}
    unknown = [n for n in names_or_tags if n not in known]
    if unknown:
        raise AttnInputError(f"unknown case name or tag {', '.join(unknown)}; known: {', '.join(sorted(known))} "
                             "(see `pytest-attn cases`)")
    return chosen
