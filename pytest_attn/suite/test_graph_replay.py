"""Correct under CUDA-graph replay? A decode step captured once and replayed for several steps while
lengths grow, pages are allocated and a request finishes (a smaller, padded live batch), every replay
compared with the reference; and a decoder that keeps its capture-time plan must fail (TensorRT-LLM
PR #18769). For backends that offer a graph decoder (Backend.graph_decoder); GPU only. Each test is
one backend's: a backend whose graph decoder raises or breaks its contract fails its own tests, named
(pytest_attn.check.graph_replay checks every call into it), and no other backend's."""
import pytest

from pytest_attn.check.graph_replay import SCENARIOS, run_graph_decode, stale_plan

pytestmark = [pytest.mark.attn_gpu, pytest.mark.attn_graph_replay]


def _run(backend, scenario, device, seed, hook=None):
    return run_graph_decode(backend, SCENARIOS[scenario], device=device, seed=seed, decoder_hook=hook)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_replay_matches_the_reference(attn_backend, scenario, attn_device, attn_seed):
    replays = _run(attn_backend, scenario, attn_device, attn_seed)
    bad = [f"step {r.step} ({r.live} live): {r.comparison.summary()}" for r in replays if not r.passed]
    assert not bad, f"{attn_backend.name} under CUDA-graph replay ({scenario}):\n" + "\n".join(bad)
    assert len(replays) == SCENARIOS[scenario].steps + 1


def test_a_decoder_that_keeps_its_capture_time_plan_fails(attn_backend, attn_device, attn_seed):
    scenario = "decode-gqa4-hd128"
    replays = _run(attn_backend, scenario, attn_device, attn_seed, hook=stale_plan)
    assert replays[1].passed, "the first replay runs the plan it was captured with, and must pass"
    assert not all(r.passed for r in replays[2:]), (
        f"{attn_backend.name}: replays with a stale plan passed, so this test could not see the bug")
