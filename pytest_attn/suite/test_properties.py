"""Does the backend give the same bits twice (deterministic), and a request the same bits whatever
else is in its batch (batch-invariant)? For each catalog case: its steps run twice, output and LSE
compared bitwise; and a needle request with the case's layer placed in the batches of the case's
family (pytest_attn.check.properties: beside short and long requests, among decodes), each planned
anew, its rows compared bitwise with its rows alone. Both are measured for every backend and
recorded in the test's properties (--junitxml, --attn-report); they are required only where the
backend declares them (Capabilities.deterministic, Capabilities.batch_invariant), and a difference
then fails with where it was found. `pytest-attn properties` prints the table per case family."""
import pytest

from pytest_attn.check.properties import assert_property, measure_case_batch_invariance, measure_case_determinism

pytestmark = pytest.mark.attn_no_output_check


def test_same_bits_twice_and_in_any_batch(attn_backend, attn_case, attn_device, attn_seed, request):
    deterministic = measure_case_determinism(attn_backend, attn_case, device=attn_device, seed=attn_seed)
    invariant = measure_case_batch_invariance(attn_backend, attn_case, device=attn_device, seed=attn_seed)
    for measurement in (deterministic, invariant):
        request.node.user_properties.append(("attn_determinism", measurement.as_dict()))
    assert_property(deterministic)
    assert_property(invariant)
