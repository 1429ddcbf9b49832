"""Does the backend's plan describe what it runs? Checked without running anything."""

from pytest_attn.core import calls
from pytest_attn.core.layer import KV_LAYOUTS
from pytest_attn.check.harness import first_step

INDEX_UNITS = ("tokens", "elements", "pages")


def test_plan_matches_the_batch(attn_backend, attn_case, attn_device):
    metadata, layer = first_step(attn_case, attn_device)
    calls.require_supported(attn_backend, layer, metadata, attn_device)
    plan = calls.plan(attn_backend, metadata, layer, attn_device)
    assert plan.backend == attn_backend.name
    assert plan.layer == layer, "the plan must carry the layer it was made for"
    for part in plan.launches:
        assert part.layout in KV_LAYOUTS, part
        assert part.index_units in INDEX_UNITS, part
        assert part.kernel and part.kernel_backend, part
    assert plan.reads_cache == metadata.has_cache, (
        f"plan {plan.describe()} says reads_cache={plan.reads_cache} for a batch "
        f"{'with' if metadata.has_cache else 'without'} a kv_cache_manager")
    if metadata.has_cache:
        layouts = {p.layout for p in plan.launches if p.reads_cache}
        assert layouts == {metadata.kv_cache_manager.layout}, (
            f"the cache is {metadata.kv_cache_manager.layout} but the plan reads it as {layouts}")
    else:  # ragged K/V have the layout of the inputs: a plan that reads them as HND is TRT-LLM #13190
        layouts = {p.layout for p in plan.launches}
        assert layouts == {"NHD"}, (
            f"without a cache K/V are the inputs, [tokens, kv_heads, head_dim] (NHD), but the plan reads them "
            f"as {layouts}: the TensorRT-LLM #13190 bug")
    again = calls.plan(attn_backend, metadata, layer, attn_device)
    assert again == plan, "planning the same batch twice gave different plans"

