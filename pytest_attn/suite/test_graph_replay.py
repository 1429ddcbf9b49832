"""Correct under CUDA-graph replay? A decode step captured once and replayed for several steps while
lengths grow, pages are allocated and a request finishes (a smaller, padded live batch), every replay
compared with the reference; and a decoder that keeps its capture-time plan must fail (TensorRT-LLM
PR #18769). The hostile scenarios also pad past the live batch from the start with NaN queries and
run another batch through the backend between each plan and its replay (a workspace reused from an
earlier plan, flashinfer #5176); a decoder holding a wrapper not built for graphs is refused before
capture (flashinfer #3904). A replay must launch the kernels the eager call launched, and those the
backend declares for the decoder's plan. For backends that offer a graph decoder (Backend.graph_decoder); GPU only. Each test is
one backend's: a backend whose graph decoder raises or breaks its contract fails its own tests, named
(pytest_attn.check.graph_replay checks every call into it), and no other backend's."""
import pytest

from pytest_attn.check.graph_replay import SCENARIOS, run_graph_decode, stale_plan, trace_graph_decode
from pytest_attn.check.traces import check_trace, compare_replay, expected_kernels, tracing_enabled
from pytest_attn.core.contract import Plan

pytestmark = [pytest.mark.attn_gpu, pytest.mark.attn_graph_replay]


def _run(backend, scenario, device, seed, hook=None):
    return run_graph_decode(backend, SCENARIOS[scenario], device=device, seed=seed, decoder_hook=hook)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_replay_matches_the_reference(attn_backend, scenario, attn_device, attn_seed):
    replays = _run(attn_backend, scenario, attn_device, attn_seed)
    bad = [f"{r.kind} at step {r.step} ({r.live} live): {r.comparison.summary()}" for r in replays if not r.passed]
    assert not bad, f"{attn_backend.name} under CUDA-graph replay ({scenario}):\n" + "\n".join(bad)
    assert len([r for r in replays if r.kind == "replay"]) == SCENARIOS[scenario].steps + 1


def test_a_decoder_that_keeps_its_capture_time_plan_fails(attn_backend, attn_device, attn_seed):
    scenario = "decode-gqa4-hd128"
    replays = _run(attn_backend, scenario, attn_device, attn_seed, hook=stale_plan)
    assert replays[1].passed, "the first replay runs the plan it was captured with, and must pass"
    assert not all(r.passed for r in replays[2:]), (
        f"{attn_backend.name}: replays with a stale plan passed, so this test could not see the bug")


def test_a_replay_launches_what_the_eager_call_launched(attn_backend, attn_device, attn_seed, request):
    enabled, why = tracing_enabled(request.config)
    if not enabled:
        pytest.skip(why)
    eager, replay, plan = trace_graph_decode(attn_backend, SCENARIOS["decode-gqa4-hd128"], device=attn_device,
                                             seed=attn_seed)
    request.node.user_properties.append(("attn_kernels", {"eager": eager.summary(), "replay": replay.summary()}))
    problems = compare_replay(eager, replay)
    if isinstance(plan, Plan):
        problems += [f"replay: {p}" for p in check_trace(replay, expected_kernels(attn_backend, plan))]
    assert not problems, f"{attn_backend.name} under CUDA-graph replay:\n" + "\n".join(problems)
