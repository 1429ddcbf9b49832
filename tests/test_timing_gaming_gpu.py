"""Timing that cannot be gamed, on a GPU (the CPU cases are in tests/test_gate.py): a backend that
runs its work on a side stream nobody waits for, or leaves it running past the timed region, is
caught by the compute check after timing (or cannot be captured, and then its event times are
checked against an honest run). Skipped without CUDA; run on a GPU machine:

    python -m pytest tests/test_timing_gaming_gpu.py -q -p no:randomly
"""
import pytest
import torch

from gaming_backends import CachesOutput, CopiesCachedOutput, FinishesLater, SideStream
from pytest_attn.bench.ab import vit_batch
from pytest_attn.bench.measure import BenchSettings, TimedCallsDidNotCompute, measure_backend
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("graph", ["auto", "off"])
@pytest.mark.parametrize("backend_class", [CachesOutput, CopiesCachedOutput, FinishesLater, SideStream],
                         ids=["cached", "copies-cached", "finishes-later", "side-stream"])
def test_a_gaming_backend_is_caught_on_cuda(backend_class, graph):
    batch = vit_batch(2048, "cuda")
    with pytest.raises(TimedCallsDidNotCompute):
        measure_backend(backend_class(), batch, BenchSettings(3, 10, graph, False))


@pytest.mark.parametrize("graph", ["auto", "off"])
def test_an_honest_backend_passes_on_cuda(graph):
    _, timing, _ = measure_backend(TorchSDPABackend(name="torch"), vit_batch(2048, "cuda"),
                                   BenchSettings(3, 10, graph, False))
    assert timing.device_median_s > 0
    assert len(timing.host_reference_s) == len(timing.eager_s) == 10  # one reference sample with each eager one


def test_a_host_bound_row_carries_its_host_reference_to_the_gate():
    from pytest_attn.bench.gate import REGIMES, row_samples
    from pytest_attn.bench.measure import timing_samples

    _, timing, _ = measure_backend(TorchSDPABackend(name="torch"), vit_batch(256, "cuda"), BenchSettings(3, 10))
    eager = {r.regime: r for r in row_samples("t", timing_samples(timing), REGIMES)}["eager"]
    assert len(eager.reference) == 10 and all(x > 0 for x in eager.relative_samples())
