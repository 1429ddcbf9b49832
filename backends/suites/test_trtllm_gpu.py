"""TensorRT-LLM's kernels on a GPU: the seed's ViT path through FMHAv2, a mixed step through FMHAv2
and XQA, each checked by its plan, by what the kernels were called with and by its output; and a
backend that plans a feature the kernel then does not get fails. Skipped without a CUDA device."""
import pytest

pytestmark = pytest.mark.attn_gpu

SEED_LENS = [256, 1024, 576]
SEED = dict(num_heads=16, head_dim=80, dtype="bfloat16", mask="full")


@pytest.fixture
def trtllm(attn_session):
    return attn_session.require_available(attn_session.registry.get("trtllm"))


def test_vit_seed_through_fmha_v2(trtllm, make_attn_batch):
    from pytest_attn_backends import trtllm as t

    batch = make_attn_batch(SEED_LENS, **SEED)
    plan = trtllm.plan(batch.metadata, batch.layer, device=batch.device)
    assert (plan.kernel, plan.layout, plan.reads_cache) == (t.FMHA, "NHD", False)
    assert (plan.detail("input_layout"), plan.detail("mask_mode")) == ("SEPARATE_Q_K_V", "padding")
    batch.assert_matches_reference(trtllm, plan)
    assert trtllm.readback(plan) == []
    assert trtllm.launches[0]["input_layout"] == "SEPARATE_Q_K_V"


def test_mixed_step_goes_through_fmha_v2_then_xqa(trtllm, make_attn_batch):
    from pytest_attn_backends import trtllm as t

    batch = make_attn_batch([33, 5, 1, 1], cached_lens=[0, 0, 40, 7], num_heads=32, num_kv_heads=8, head_dim=128,
                            mask="causal", kv_layout="NHD")
    plan = trtllm.plan(batch.metadata, batch.layer, device=batch.device)
    if plan.detail("routing"):
        pytest.skip(plan.detail("routing"))
    assert [p.kernel for p in plan.parts] == [t.FMHA, t.XQA]
    assert plan.parts[0].detail("input_layout") == "Q_PAGED_KV_NHD"
    batch.assert_matches_reference(trtllm, plan)
    assert trtllm.readback(plan) == []


def test_a_window_planned_but_not_given_to_the_kernel_fails(trtllm, make_attn_batch):
    """The plan says sliding window; a forward that calls FMHAv2 without it must fail, by the read-back
    of the call against the plan or by the output."""
    from pytest_attn.core.errors import AttnCheckFailure
    from pytest_attn_backends import trtllm as t

    class DropsTheWindow(t.TrtllmBackend):
        def _fmha(self, part, md, index, q, k, v, out, lse):
            import dataclasses

            layer = dataclasses.replace(part.layer, window_left=-1)
            details = dict(part.details)
            details["mask_mode"] = "causal"
            super()._fmha(dataclasses.replace(part, layer=layer, details=tuple(details.items())), md, index, q, k, v,
                          out, lse)

    bad = DropsTheWindow("trtllm")
    bad.name = "trtllm-bug-window"
    batch = make_attn_batch([300, 129], num_heads=8, num_kv_heads=2, head_dim=128, mask="causal", window_left=64)
    batch.assert_matches_reference(trtllm)
    with pytest.raises(AttnCheckFailure):
        batch.assert_matches_reference(bad)
