"""Does the backend give the same bits twice (deterministic), and a request the same bits whatever
else is in its batch (batch-invariant)? Measured on five case families (pytest_attn.check.properties)
for every backend and recorded in the test's properties; required only where the backend declares
them (Capabilities.deterministic, Capabilities.batch_invariant), where a difference fails with where
it was found. `pytest-attn properties` prints the table."""
import pytest

from pytest_attn.check.properties import (FAMILIES, assert_property, families, measure_batch_invariance,
                                          measure_determinism)


def _family(name, device):
    return families(long=2048 if str(device).startswith("cuda") else 96)[name]


def _check(measurement, request):
    request.node.user_properties.append((f"attn_{measurement.prop}", measurement.as_dict()))
    if measurement.holds is None:
        from pytest_attn.core.errors import UnsupportedCase

        raise UnsupportedCase(measurement.backend, [measurement.reason or "cannot run this family"])
    assert_property(measurement)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic(attn_backend, family, attn_device, attn_seed, request):
    _check(measure_determinism(attn_backend, _family(family, attn_device), device=attn_device, seed=attn_seed), request)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariant(attn_backend, family, attn_device, attn_seed, request):
    _check(measure_batch_invariance(attn_backend, _family(family, attn_device), device=attn_device, seed=attn_seed),
           request)
