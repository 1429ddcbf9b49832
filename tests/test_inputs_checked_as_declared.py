"""Input validation takes contiguity from the backend (issue 22, trap 3): Backend.start_forward and
Backend.check_inputs pass its requires_contiguous, so no call site chooses it. Plan.start_forward and
AttentionMetadata.check_inputs default to accepting strided inputs; a contiguous-only backend that
calls them without the keyword accepts strided q, k, v its kernels would read wrong."""
import pytest
import torch

from full_featured_backend import FullFeaturedBackend
from pytest_attn import (CATALOG, AttentionMetadata, AttnInputError, LayerSpec, UnsupportedCase, assert_case_passes,
                         run_case)
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

LAYER = LayerSpec(4, 2, 8, "float32")


def strided_inputs():
    """q, k, v as views of one fused [tokens, (4 + 2 + 2) x 8] projection, as engines make them."""
    md = AttentionMetadata.ragged([5, 3])
    fused = torch.randn(md.num_tokens, 8, 8)
    q, k, v = fused[:, :4], fused[:, 4:6], fused[:, 6:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    return md, q, k, v


class ContiguousTorch(TorchSDPABackend):
    """torch's algorithm, declared contiguous-only (as a kernel deriving strides from shapes is)."""

    requires_contiguous = True

    def __init__(self):
        super().__init__("contiguous-torch", use_varlen=False)


class ChoosesAtItsCallSite(ContiguousTorch):
    """The form that leaves the choice to the call site, here forgotten: Plan.start_forward without
    require_contiguous."""

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        layer, out = plan.start_forward(q, k, v, metadata, out)
        return super().forward(q.contiguous(), k.contiguous(), v.contiguous(), metadata, plan, out)


def test_a_contiguous_only_backend_refuses_strided_inputs_without_choosing_at_its_call_site():
    md, q, k, v = strided_inputs()
    backend = ContiguousTorch()
    plan = backend.plan(md, LAYER)
    for call in (lambda: backend.check_inputs(q, k, v, md, LAYER),
                 lambda: backend.start_forward(q, k, v, md, plan),
                 lambda: backend.forward(q, k, v, md, plan)):  # the built-in forward starts with start_forward
        with pytest.raises(AttnInputError, match=r"q is not contiguous .*pass q\.contiguous\(\)"):
            call()
    contiguous = [t.contiguous() for t in (q, k, v)]
    backend.check_inputs(*contiguous, md, LAYER)
    assert backend.forward(*contiguous, md, plan).shape == (8, 4, 8)


def test_the_call_site_form_lets_strided_inputs_through_where_the_backend_form_does_not():
    md, q, k, v = strided_inputs()
    backend = ChoosesAtItsCallSite()
    backend.forward(q, k, v, md, backend.plan(md, LAYER))  # accepted: what Backend.start_forward prevents
    with pytest.raises(AttnInputError, match="not contiguous"):
        backend.start_forward(q, k, v, md, backend.plan(md, LAYER))


def test_a_backend_declaring_strided_inputs_gets_them_through_the_same_calls():
    md, q, k, v = strided_inputs()
    backend = FullFeaturedBackend()
    assert not backend.requires_contiguous
    backend.check_inputs(q, k, v, md, LAYER)
    plan = backend.plan(md, LAYER)
    layer, out = backend.start_forward(q, k, v, md, plan)
    assert layer == LAYER and out.shape == (8, 4, 8)


@pytest.mark.parametrize("case_name", ["strided-fused-qkv", "strided-fused-qkv-paged"])
def test_the_suites_strided_cases_pass_a_strided_backend_and_skip_a_contiguous_one(case_name):
    case = CATALOG[case_name]
    assert_case_passes(run_case(FullFeaturedBackend(), case), FullFeaturedBackend(), case)
    with pytest.raises(UnsupportedCase, match="needs contiguous inputs"):
        run_case(ContiguousTorch(), case)
