"""Does the backend compute attention? Every catalog case, every step and layer, against the reference."""
from pytest_attn.check.harness import assert_case_passes, run_case


def test_output_matches_reference(attn_backend, attn_case, attn_device, attn_seed):
    results = run_case(attn_backend, attn_case, device=attn_device, seed=attn_seed)
    assert_case_passes(results, attn_backend, attn_case)
    assert len(results) == attn_case.num_steps * attn_case.num_layers, "the harness skipped steps of the case"
