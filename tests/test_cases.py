"""Catalog cases: their schedules step by step, their validation, and that every case can run."""
import dataclasses

import pytest

from pytest_attn.cases.case import LAYER_OVERRIDABLE, BatchCase, Step, sink_logits
from pytest_attn.cases.catalog import CATALOG
from pytest_attn.core.errors import AttnInputError
from pytest_attn.check.harness import step_metadata
from pytest_attn.core.layer import LayerSpec


def schedule(case):
    return [(s.seq_lens, s.request_ids, s.num_contexts, s.finished, s.shared) for s in case.steps()]


# -- schedules, exactly ----------------------------------------------------------------------------
def test_chunked_prefill_schedule():
    # prompts 300 and 40 in chunks of 128: request 1's prompt is in after step 0, so it decodes at
    # step 1 (the first generating request: it finishes there) while request 0 takes two more chunks
    assert schedule(CATALOG["chunked-prefill"]) == [
        ((128, 40), (0, 1), 2, (), ()),
        ((128, 1), (0, 1), 1, (1,), ()),
        ((44,), (0,), 1, (), ()),
        ((1,), (0,), 0, (), ()),
        ((1,), (0,), 0, (0,), ()),
    ]


def test_prefix_reuse_schedule():
    # at step 1 request 2 arrives with request 0's first 64 tokens (4 pages) and brings the other 36;
    # request 0, the owner, finishes after that step while request 2 still holds its pages
    assert schedule(CATALOG["prefix-reuse"]) == [
        ((100, 30), (0, 1), 2, (), ()),
        ((36, 1, 1), (2, 0, 1), 1, (0,), ((2, 0, 64),)),
        ((1, 1), (2, 1), 0, (2, 1), ()),
    ]


def test_prefix_reuse_q2_kv3_schedule():
    # page size 1, one shared token: the new request has 2 queries over 3 keys
    assert schedule(CATALOG["prefix-reuse-q2-kv3"]) == [
        ((3, 5), (0, 1), 2, (), ()),
        ((2, 1, 1), (2, 0, 1), 1, (2, 0, 1), ((2, 0, 1),)),
    ]
    md = list(step_metadata(CATALOG["prefix-reuse-q2-kv3"]))[1]
    assert md.seq_lens[0] == 2 and md.cached_lens[0] == 1 and md.kv_lens[0] == 3 and md.has_cached_context


def test_spec_decode_q4_schedule():
    assert schedule(CATALOG["spec-decode-q4"]) == [
        ((40, 17, 5), (0, 1, 2), 3, (), ()),
        ((4, 4, 4), (0, 1, 2), 0, (0,), ()),
        ((4, 4), (1, 2), 0, (), ()),
        ((4, 4), (1, 2), 0, (1, 2), ()),
    ]
    assert CATALOG["spec-decode-q4"].gen_tokens == 4
    assert [md.max_generation_q for md in step_metadata(CATALOG["spec-decode-q4"])] == [0, 4, 4, 4]


def test_llm_mixed_schedule():
    # step 0 the prompts; step 1 the joining prompts as context requests first, then decode; the
    # first generating request finishes after its first generation step; everyone at the last
    expected = [
        ((50, 20), (0, 1), 2, (), ()),
        ((33, 5, 1, 1), (2, 3, 0, 1), 2, (0,), ()),
        ((1, 1, 1), (2, 3, 1), 0, (), ()),
        ((1, 1, 1), (2, 3, 1), 0, (2, 3, 1), ()),
    ]
    assert schedule(CATALOG["llm-mixed-nhd"]) == expected
    assert schedule(CATALOG["llm-mixed-hnd"]) == expected


def test_swa_noncausal_chunked_schedule():
    assert schedule(CATALOG["swa-noncausal-chunked"]) == [
        ((300,), (0,), 1, (), ()),
        ((300,), (0,), 1, (), ()),
        ((100,), (0,), 1, (0,), ()),
    ]
    mds = list(step_metadata(CATALOG["swa-noncausal-chunked"]))
    assert [md.kv_lens for md in mds] == [(300,), (600,), (700,)]
    assert [md.has_cached_context for md in mds] == [False, True, True]


def test_a_single_prompt_finishes_after_its_first_generation_step_once_a_joining_prompt_is_active():
    # request 0 is not alone at step 1: the joining prompt is active too
    assert schedule(CATALOG["fp8-kv-mixed"]) == [
        ((33,), (0,), 1, (), ()),
        ((20, 1), (1, 0), 1, (0,), ()),
        ((1,), (1,), 0, (1,), ()),
    ]


def test_no_cache_cases_are_one_step_with_their_own_or_cross_keys():
    assert schedule(CATALOG["vit-ragged-mix"]) == [((256, 1024, 576, 64, 1), (0, 1, 2, 3, 4), 5, (0, 1, 2, 3, 4), ())]
    (md,) = step_metadata(CATALOG["cross-attn-hd32"])
    assert md.seq_lens == (64, 1, 10) and md.kv_lens == (128, 300, 7) and md.is_cross
    assert md.num_kv_tokens == 435


def _old_steps(case):
    """The schedule before chunks, shared prefixes and draft tokens (commit 531b754), verbatim."""
    n = len(case.seq_lens)
    first = tuple(range(n))
    yield Step(case.seq_lens, first, num_contexts=n, finished=() if case.decode_steps else first)
    joined = tuple(range(n, n + len(case.joining)))
    active = list(first)
    for i in range(case.decode_steps):
        new = joined if i == 0 else ()
        ids = new + tuple(active)
        lens = (case.joining if i == 0 else ()) + (1,) * len(active)
        last = i == case.decode_steps - 1
        done = tuple(ids) if last else ((active[0],) if i == 0 and len(active) > 1 else ())
        yield Step(lens, ids, num_contexts=len(new), finished=done)
        active = [r for r in ids if r not in done]


OLD_STYLE = [c for c in CATALOG.values()
             if not (c.chunk_size or c.shared_prefix or c.draft_tokens) and not (c.joining and len(c.seq_lens) == 1)]


@pytest.mark.parametrize("case", OLD_STYLE, ids=lambda c: c.name)
def test_cases_the_old_schedule_could_express_keep_their_schedule(case):
    # (a single prompt with joining prompts now finishes early: see the fp8-kv-mixed test above)
    assert list(case.steps()) == list(_old_steps(case))


def test_work_counts_every_score_element_of_every_step():
    case = CATALOG["spec-decode-q4"]
    per_head = (40 * 40 + 17 * 17 + 5 * 5) + (4 * 44 + 4 * 21 + 4 * 9) + (4 * 25 + 4 * 13) + (4 * 29 + 4 * 17)
    assert case.work == per_head * 16
    cross = CATALOG["cross-attn-hd32"]
    assert cross.work == (64 * 128 + 1 * 300 + 10 * 7) * 16


# -- validation --------------------------------------------------------------------------------------
def make(seq_lens=(32, 16), **kw):
    return BatchCase("bad", 4, 2, 16, seq_lens, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(seq_lens=()), "case bad: seq_lens is empty; a case needs at least one request"),
    (dict(seq_lens=(3, -1)), r"case bad: seq_lens\[1\] = -1 is negative"),
    (dict(seq_lens=(3, 2.5)), r"case bad: seq_lens\[1\] = 2.5 is not an int"),
    (dict(cache=True, joining=(-2,)), r"case bad: joining\[0\] = -2 is negative"),
    (dict(kv_layout="NDH"), "case bad: kv_layout 'NDH' is not one of"),
    (dict(cache=True, page_size=0), "case bad: page_size must be an int >= 1, got 0"),
    (dict(cache=True, decode_steps=-1), "case bad: decode_steps must be an int >= 0, got -1"),
    (dict(cache=True, decode_steps=True), "case bad: decode_steps must be an int >= 0, got True"),
    (dict(num_layers=0), "case bad: num_layers must be an int >= 1, got 0"),
    (dict(cache=True, chunk_size=-8), "case bad: chunk_size must be an int >= 0, got -8"),
    (dict(cache=True, shared_prefix=-16), "case bad: shared_prefix must be an int >= 0, got -16"),
    (dict(cache=True, draft_tokens=1.0), "case bad: draft_tokens must be an int >= 0, got 1.0"),
    (dict(decode_steps=2), "case bad: decode steps, joining prompts, chunks, shared prefixes and draft tokens "
                           "need cache=True"),
    (dict(joining=(4,)), "need cache=True"),
    (dict(chunk_size=8), "need cache=True"),
    (dict(shared_prefix=16), "need cache=True"),
    (dict(draft_tokens=3), "need cache=True"),
    (dict(cache=True, kv_seq_lens=(8, 8)), r"case bad: kv_seq_lens \(cross-attention\) need cache=False and one "
                                           "entry per request"),
    (dict(kv_seq_lens=(8,)), r"kv_seq_lens \(cross-attention\) need cache=False and one entry per request"),
    (dict(cache=True, decode_steps=1, shared_prefix=8), "case bad: shared_prefix must be a multiple of page_size, shorter than "
                                        "request 0's prompt and at most what request 0 holds after step 0"),
    (dict(cache=True, decode_steps=1, shared_prefix=32), "shared_prefix must be a multiple of page_size"),  # all of request 0
    (dict(seq_lens=(64,), cache=True, chunk_size=16, shared_prefix=32), "at most what request 0 holds after step 0"),
    (dict(kv_dtype="fp8"), "case bad: kv_dtype is the paged cache's dtype and needs cache=True"),
    (dict(strided=True, kv_seq_lens=(8, 8)), r"case bad: strided \(fused QKV\) inputs need as many keys as queries"),
    (dict(layer_overrides=((), ())), "case bad: 2 layer_overrides for 1 layers"),
    (dict(num_layers=2, layer_overrides=((("head_dim", 8),),)),
     "case bad: layer_overrides may change .*, not head_dim"),
    (dict(input_scale=0), "case bad: input_scale must be positive, got 0"),
    (dict(input_scale=-2.0), "case bad: input_scale must be positive, got -2.0"),
    (dict(logit_shift=5.0), "case bad: logit_shift must be 0 or negative, got 5.0"),
    (dict(dtype="int8"), "unsupported dtype 'int8'"),
    (dict(mask="sliding"), r"mask 'sliding' is not one of \('causal', 'full'\)"),
    (dict(window_left=-3), "window_left must be -1 \\(no window\\) or >= 0, got -3"),
    (dict(cache=True, kv_dtype="int4"), "unsupported KV-cache dtype 'int4'"),
    (dict(cache=True, kv_dtype="fp8", k_scale=0.0), "LayerSpec.k_scale must be a positive number, got 0.0"),
    (dict(head_dim_vo=0), "LayerSpec.head_dim_vo must be None or a positive int, got 0"),
    (dict(logits_soft_cap=-1.0), "logits_soft_cap must be 0 \\(none\\) or a positive number, got -1.0"),
    # the override is checked too: layer 1 gets an impossible window
    (dict(num_layers=2, layer_overrides=((), (("window_left", -2),))), "window_left must be -1"),
])
def test_invalid_cases_are_rejected_with_their_reason(kw, message):
    seq_lens = kw.pop("seq_lens", (32, 16))
    with pytest.raises(AttnInputError, match=message):
        make(seq_lens, **kw)


def test_heads_must_divide_into_groups():
    with pytest.raises(AttnInputError, match="num_heads=6 is not divisible by num_kv_heads=4"):
        BatchCase("bad", 6, 4, 16, (8,))


def test_valid_edge_values_are_accepted():
    make(cache=True, decode_steps=1, shared_prefix=16)  # one page, shorter than request 0's 32
    make(seq_lens=(64,), cache=True, chunk_size=32, shared_prefix=32)
    make(cache=True, decode_steps=0, chunk_size=8)
    make(kv_seq_lens=(40, 3), mask="full")
    make(num_layers=3, layer_overrides=((("sm_scale", 0.5),),))  # fewer overrides than layers


@pytest.mark.parametrize("kw", [dict(seq_lens=(0, 5)), dict(seq_lens=(5, 3), joining=(0,))],
                         ids=["prompt", "joining"])
def test_a_zero_length_prompt_with_a_cache_is_rejected(kw):
    # its schedule would make it a generation request before it had anything in the cache
    with pytest.raises(AttnInputError, match="case zero: a prompt on a paged cache needs at least one token"):
        BatchCase("zero", 4, 2, 16, cache=True, decode_steps=2, **kw)


@pytest.mark.parametrize("kw", [dict(joining=(7,)), dict(shared_prefix=16), dict(draft_tokens=3)],
                         ids=["joining", "shared_prefix", "draft_tokens"])
def test_arrivals_at_step_1_need_a_step_1(kw):
    # with one step (decode_steps=0, no chunks) they would silently never happen
    with pytest.raises(AttnInputError, match="case one-step: joining prompts, a shared prefix and draft tokens"):
        BatchCase("one-step", 4, 2, 16, (32, 8), cache=True, decode_steps=0, **kw)


# -- the catalog ------------------------------------------------------------------------------------
ALL = list(CATALOG.values())


def test_every_case_builds_its_layers():
    for case in ALL:
        layers = case.layers()
        assert len(layers) == case.num_layers >= 1, case.name
        for i, layer in enumerate(layers):
            assert isinstance(layer, LayerSpec) and layer.layer_idx == i, case.name
            spec = case.layer_spec
            assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (spec.num_heads, spec.num_kv_heads,
                                                                               spec.head_dim), case.name
            assert layer.head_dim_v == spec.head_dim_v, case.name
            assert layer.sinks in ((), sink_logits(spec.num_heads)), case.name
            if case.cache:
                assert layer.cache_dtype == spec.cache_dtype, case.name


def test_a_case_holds_its_layer_once():
    """A layer's parameters live in the case's LayerSpec only: the case has no field copying one."""
    from pytest_attn.cases.case import LAYER_KEYWORDS

    case_fields = {f.name for f in dataclasses.fields(BatchCase)}
    assert not case_fields & set(LAYER_KEYWORDS)
    assert set(LAYER_KEYWORDS) <= {f.name for f in dataclasses.fields(LayerSpec)} | {"sinks"}
    case = BatchCase("swa", 8, 2, 64, (40, 9), window_left=15, sinks=True)
    assert case.layer_spec == LayerSpec(8, 2, 64, window_left=15, sinks=sink_logits(8))
    assert case.layer(0) is not case.layer_spec and case.layer(0) == case.layer_spec
    assert case.with_dtype("float16").layer_spec.dtype == "float16"
    with pytest.raises(AttnInputError, match="case bad: unknown field.s. window"):
        BatchCase("bad", 8, 2, 64, (4,), window=3)
    with pytest.raises(AttnInputError, match="case bad: needs head_dim"):
        BatchCase("bad", num_heads=8, num_kv_heads=2, seq_lens=(4,))


def test_layer_overrides_change_only_their_layer():
    gpt_oss = CATALOG["swa-alternating-layers-sinks"].layers()
    assert [layer.window_left for layer in gpt_oss] == [127, -1]
    assert gpt_oss[0].sinks == gpt_oss[1].sinks == sink_logits(16)
    assert [layer.sm_scale for layer in CATALOG["reuse-scale"].layers()] == [None, 0.3]
    assert [layer.dtype for layer in CATALOG["reuse-dtype"].layers()] == ["bfloat16", "float16"]
    # with a cache, a layer computing in another dtype still reads the case's cache dtype
    case = BatchCase("mixed-dtype", 4, 2, 16, (8,), cache=True, num_layers=2,
                     layer_overrides=((), (("dtype", "float16"),)))
    assert [(layer.dtype, layer.cache_dtype) for layer in case.layers()] == [("bfloat16", "bfloat16"),
                                                                             ("float16", "bfloat16")]
    assert set(LAYER_OVERRIDABLE) <= {f.name for f in dataclasses.fields(LayerSpec)}


def test_the_catalog_covers_the_new_features():
    features = {f for case in ALL for layer in case.layers() for f in layer.features()}
    assert features >= {"sliding_window", "soft_cap", "sinks", "head_dim_vo", "lse"}
    assert any(case.layer_spec.kv_dtype == "float8_e4m3fn" for case in ALL)
    for field in ("chunk_size", "shared_prefix", "draft_tokens", "joining", "kv_seq_lens", "strided", "check_solo"):
        assert any(getattr(case, field) for case in ALL), field


def test_tags_are_never_case_names_and_every_case_has_tags():
    names = set(CATALOG)
    tags = {tag for case in ALL for tag in case.tags}
    assert not names & tags, names & tags
    assert all(case.tags for case in ALL)
    assert all(case.name == name for name, case in CATALOG.items())


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_max_tokens_and_pages_needed_cover_the_whole_schedule(case):
    """step_metadata allocates, shares and frees pages as run_case does, on a cache of
    pages_needed() pages: no CacheFullError; max_tokens bounds (and is) the longest sequence."""
    steps = list(case.steps())
    assert len(steps) == case.num_steps
    longest = 0
    for step, md in zip(steps, step_metadata(case)):
        assert md.seq_lens == step.seq_lens and md.request_ids == step.request_ids
        assert md.num_contexts == step.num_contexts
        longest = max(longest, *md.kv_lens, *md.seq_lens)
        if case.cache:
            assert md.num_generations == 0 or md.max_generation_q == case.gen_tokens
    assert longest == case.max_tokens
    finished = [rid for step in steps for rid in step.finished]
    assert sorted(finished) == sorted({rid for step in steps for rid in step.request_ids}), "each finishes once"
    assert case.total_tokens == sum(sum(s.seq_lens) for s in steps) * case.num_layers
