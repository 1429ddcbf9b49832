"""What really ran on the device: each plan's forward traced with torch.profiler (CUDA kernels on a
GPU, operators on CPU) and checked against the kernel families the backend declares for that plan
(Backend.expected_kernels): a kernel outside them, or a declared family that launched nothing,
fails with the kernel names. A backend that declares nothing has its kernels recorded in the
test's properties (--junitxml, --attn-report), not judged. --attn-trace=off (or
PYTEST_ATTN_TRACE=off) leaves these tests out."""
import pytest

from pytest_attn.check.traces import assert_traces_match, trace_case, tracing_enabled

pytestmark = pytest.mark.attn_no_output_check


def test_kernels_match_the_plan(attn_backend, attn_case, attn_device, attn_seed, request):
    enabled, why = tracing_enabled(request.config)
    if not enabled:
        pytest.skip(why)
    steps = trace_case(attn_backend, attn_case, device=attn_device, seed=attn_seed)
    for step in steps:
        request.node.user_properties.append(("attn_kernels", {"step": step.index, "plan": step.plan_text,
                                                              "kernels": step.trace.summary()}))
    assert steps, f"{attn_backend.name} ran no step of {attn_case.name}"
    assert_traces_match(attn_backend, attn_case, steps)
