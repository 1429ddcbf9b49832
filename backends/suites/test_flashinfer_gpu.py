"""FlashInfer on a GPU: the seed's path (the ViT encoder through cuDNN ragged prefill) checked by
its plan, by the real wrapper, and by its output, and the TensorRT-LLM #13190 class of bug shown
to fail. Skipped with a reason without a CUDA device (failed under --attn-strict).

Kernels used here need no JIT build beyond the default run's: cuDNN needs none, and the paged
test uses the fa3 bfloat16/128 family and the bfloat16/128 decode kernels the suite builds anyway.
"""
import pytest

from pytest_attn.core.calls import readback

pytestmark = pytest.mark.attn_gpu

SEED_LENS = [256, 1024, 576]  # three images of the RADIO ViT encoder: 16 heads x head_dim 80, bf16
SEED = dict(num_heads=16, head_dim=80, dtype="bfloat16", mask="full")


def _flashinfer(attn_session, name="flashinfer"):
    if not any(b.name.startswith("flashinfer") for b in attn_session.selected):
        pytest.skip("no flashinfer backend among this run's backends (--attn-backend)")
    return attn_session.require_available(attn_session.registry.get(name))


@pytest.fixture
def flashinfer_backend(attn_session):
    return _flashinfer(attn_session)


def _variant(backend, override_name, **overrides):
    """A FlashInfer policy backend with one method or attribute replaced: a deliberate bug."""
    cls = type(f"Buggy{type(backend).__name__}", (type(backend),), overrides)
    bad = cls("flashinfer")
    bad.name = override_name
    return bad


def test_vit_seed_plan_wrapper_and_output(flashinfer_backend, make_attn_batch):
    from pytest_attn_backends import flashinfer as fi

    batch = make_attn_batch(SEED_LENS, **SEED)
    plan = flashinfer_backend.plan(batch.metadata, batch.layer, device=batch.device)
    # what the plan says
    assert (plan.kernel, plan.kernel_backend, plan.layout, plan.reads_cache) == (fi.RAGGED, "cudnn", "NHD", False)
    assert plan.index_units == fi.cudnn_index_units(flashinfer_backend.version()) == "tokens"
    # and what it computes
    batch.assert_matches_reference(flashinfer_backend, plan)
    # what the live wrapper resolved to and how it reads K/V, read back through the contract
    assert plan.detail("resolved_backend") == "cudnn"
    assert readback(flashinfer_backend, plan) == []


def test_ragged_kv_reinterpreted_as_hnd_fails_the_output_check(flashinfer_backend, make_attn_batch):
    """TRT-LLM PR #13190's bug itself (bug corpus #1, docs/bug-corpus.md): NHD memory read as HND.
    cuDNN cannot tell, so only the output check catches it: AssertionError from the comparison with
    the reference."""

    def ragged_run_reading_hnd(self, wrapper, q, k, v, out, layer):
        def as_hnd(t):  # the same memory indexed as [heads, tokens, dim], made contiguous again
            return t.reshape(t.shape[1], t.shape[0], t.shape[2]).transpose(0, 1).contiguous()

        wrapper.run(q, as_hnd(k), as_hnd(v), out=out)

    bad = _variant(flashinfer_backend, "flashinfer-bug-hnd-view", _ragged_run=ragged_run_reading_hnd)
    batch = make_attn_batch(SEED_LENS, **SEED)
    with pytest.raises(AssertionError, match="flashinfer-bug-hnd-view"):
        batch.assert_matches_reference(bad)


def test_hnd_layout_given_to_the_cudnn_ragged_wrapper_is_caught(flashinfer_backend, make_attn_batch):
    """kv_layout="HND" given to the ragged wrapper. FlashInfer 0.7.2.post1 itself refuses it at
    run(): NotImplementedError "cuDNN ragged prefill backend requires kv_layout='NHD'", before any
    launch. A version without that guard reads the wrong memory and the output check raises
    AssertionError. Either way the bug cannot pass."""
    from pytest_attn.core.calls import BackendError

    bad = _variant(flashinfer_backend, "flashinfer-bug-hnd-layout", ragged_kv_layout="HND")
    batch = make_attn_batch(SEED_LENS, **SEED)
    with pytest.raises((BackendError, AssertionError)) as caught:
        batch.assert_matches_reference(bad)
    if isinstance(caught.value, BackendError):  # FlashInfer's own refusal, reported as the backend's failure
        assert isinstance(caught.value.__cause__, NotImplementedError) and "NHD" in str(caught.value)


def test_offsets_in_the_wrong_units_are_caught(flashinfer_backend, make_attn_batch):
    """A backend that believes in the other FlashInfer generation: element offsets for a build that
    takes tokens (0.7+) raise ValueError from FlashInfer's run() ("q.shape[0] ... does not match
    qo_indptr[-1]"), before any launch; token offsets for a build that takes elements (<= 0.6.18)
    read the wrong rows, and the output check raises AssertionError."""
    from pytest_attn_backends import flashinfer as fi

    real = flashinfer_backend.version()
    wrong = "0.6.18" if fi.cudnn_index_units(real) == "tokens" else fi.PINNED_VERSION
    from pytest_attn.core.calls import BackendError

    bad = _variant(flashinfer_backend, "flashinfer-bug-units", version=lambda self: wrong)
    batch = make_attn_batch(SEED_LENS, **SEED)
    if fi.cudnn_index_units(real) == "tokens":  # FlashInfer's ValueError, reported as the backend's failure
        with pytest.raises(BackendError) as caught:
            batch.assert_matches_reference(bad)
        assert isinstance(caught.value.__cause__, ValueError)
    else:
        with pytest.raises(AssertionError):
            batch.assert_matches_reference(bad)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_mixed_batch_on_the_paged_cache(attn_session, make_attn_batch, layout):
    """Two new prompts and two requests decoding, in one step, on the project's paged cache."""
    backend = _flashinfer(attn_session)
    batch = make_attn_batch([33, 5, 1, 1], cached_lens=[0, 0, 40, 7], num_heads=16, num_kv_heads=4, head_dim=128,
                            mask="causal", kv_layout=layout)
    plan = backend.plan(batch.metadata, batch.layer, device=batch.device)
    assert all(p.layout == layout and p.reads_cache for p in plan.parts)
    for part in plan.parts:
        assert part.detail("resolved_backend") == part.kernel_backend
    batch.assert_matches_reference(backend, plan)
    assert readback(backend, plan) == []  # each live wrapper's layout, backend and features as planned


def test_auto_resolves_as_predicted(attn_session, make_attn_batch):
    backend = _flashinfer(attn_session, "flashinfer-auto")
    batch = make_attn_batch([129, 64, 7], num_heads=8, num_kv_heads=2, head_dim=128, mask="causal")
    reasons = backend.unsupported(batch.layer, batch.metadata, batch.device)
    if reasons:
        pytest.skip("; ".join(reasons))
    plan = backend.plan(batch.metadata, batch.layer, device=batch.device)
    assert plan.detail("resolved_backend") == plan.detail("predicted_backend")
    batch.assert_matches_reference(backend, plan)


@pytest.mark.parametrize("feature", ["window_left", "logits_soft_cap"])
def test_a_feature_passed_at_run_time_but_not_at_plan_time_fails(attn_session, make_attn_batch, feature):
    """sglang #33915 and PR #31501: the soft-cap or window is specialised at plan(); a backend that
    plans without it fails, whether FlashInfer's own run() check, the read-back of the live wrapper
    against the plan, or the output check catches it first."""
    from pytest_attn.core.errors import AttnCheckFailure

    backend = _flashinfer(attn_session)

    def plan_wrapper_without_the_feature(self, wrapper, part, md, device):
        import dataclasses as dc

        layer = dc.replace(part.layer, **({feature: -1} if feature == "window_left" else {feature: 0.0}))
        type(backend)._plan_wrapper(self, wrapper, dc.replace(part, layer=layer), md, device)

    bad = _variant(backend, f"flashinfer-bug-{feature}-at-run", _plan_wrapper=plan_wrapper_without_the_feature)
    options = {"window_left": 31} if feature == "window_left" else {"logits_soft_cap": 20.0}
    batch = make_attn_batch([1, 1], cached_lens=[90, 40], num_heads=16, num_kv_heads=2, head_dim=64, mask="causal",
                            **options)
    batch.assert_matches_reference(backend)  # the correct backend passes
    with pytest.raises((AttnCheckFailure, AssertionError)):
        batch.assert_matches_reference(bad)
