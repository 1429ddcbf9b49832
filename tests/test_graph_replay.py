"""Graph replay with planted backends (on CPU, up to the capture, which needs a GPU): a graph
decoder that raises, or is not one, fails with a BackendError naming its backend and the method, as
guard does for the backend's own methods; None is 'not offered' (a skip)."""
import pytest

from pytest_attn.core.errors import UnsupportedCase
from pytest_attn.check.graph_replay import SCENARIOS, graph_decoder, run_graph_decode, stale_plan
from pytest_attn.core.calls import BackendError
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

SCENARIO = SCENARIOS["decode-gqa4-hd128"]


class Decoder:
    def __init__(self, plan_error=None):
        self.plan_error = plan_error

    def plan(self, metadata):
        if self.plan_error:
            raise self.plan_error
        return "planned"

    def run(self, q, out):
        out.zero_()


class OffersDecoder(TorchSDPABackend):
    def __init__(self, name, decoder):
        super().__init__(name=name)
        self.decoder = decoder

    def graph_decoder(self, manager, layer, max_batch, device):
        if isinstance(self.decoder, Exception):
            raise self.decoder
        return self.decoder


def _decoder(backend):
    return graph_decoder(backend, None, SCENARIO.layer(), 4, "cpu")


def test_no_graph_decoder_is_not_offered():
    with pytest.raises(UnsupportedCase, match="offers no CUDA-graph decode path"):
        _decoder(OffersDecoder("none", None))


@pytest.mark.parametrize("decoder, message", [
    (ValueError("no workspace"), r"backend 'raises' \(.*\) raised in graph_decoder\(\): ValueError: no workspace"),
    (object(), r"backend 'raises' \(.*\): graph_decoder\(\) returned <object object at .*>, which has no plan\(\) or "
               r"run\(\); return None, or an object with plan\(metadata\) and run\(q, out\)"),
])
def test_a_graph_decoder_that_raises_or_is_not_one_names_its_backend(decoder, message):
    with pytest.raises(BackendError, match=message):
        _decoder(OffersDecoder("raises", decoder))


def test_a_decoder_method_that_raises_names_the_backend_and_the_method():
    checked = _decoder(OffersDecoder("planfails", Decoder(KeyError("page_table"))))
    with pytest.raises(BackendError, match=r"backend 'planfails' \(.*\) raised in graph_decoder\(\)\.plan\(\): "
                                           r"KeyError: 'page_table'") as caught:
        checked.plan(None)
    assert isinstance(caught.value.__cause__, KeyError)  # chained: the traceback shows where in the decoder
    assert stale_plan(_decoder(OffersDecoder("fine", Decoder()))).plan(None) == "planned"


def test_the_scenario_fails_a_broken_decoder_naming_it_before_any_capture():
    backend = OffersDecoder("planfails", Decoder(KeyError("page_table")))
    with pytest.raises(BackendError, match=r"backend 'planfails' .* raised in graph_decoder\(\)\.plan\(\)"):
        run_graph_decode(backend, SCENARIO, device="cpu")


def test_one_capture_helper_serves_graph_replay_timing_and_fidelity():
    """Issue 18: the warm-up-then-capture sequence was written three times; each now calls
    check.cuda_graph.capture (read from the source: the capture itself needs a GPU)."""
    import inspect

    from pytest_attn.bench import fidelity, timing
    from pytest_attn.check import graph_replay

    for module in (graph_replay, timing, fidelity):
        source = inspect.getsource(module)
        assert "capture(" in source and "torch.cuda.CUDAGraph()" not in source, module.__name__
