"""How fast is the backend? The ViT table (one ViT sequence, 128 to 8192 tokens) and
ragged ViT batches, recorded by pytest-benchmark (see pytest_attn.bench.measure): device time under CUDA-
graph replay by default, eager wall time per call with --attn-bench-metric=eager (both: device,eager).

Run serially: pytest-benchmark turns itself off under xdist (-n), and then each benchmark runs its
call once, untimed. On CPU the sizes stop at CPU_BENCH_MAX_TOKENS unless --attn-max-tokens is given.
"""
import pytest

from pytest_attn.check.batch import build_batch
from pytest_attn.bench.measure import VIT_MIXES, VIT_TABLE_SEQ_LENS, VIT_TABLE_SERIES, bench_max_tokens
from pytest_attn.cases.case import VIT_HEAD_DIM, VIT_HEADS

pytestmark = pytest.mark.attn_bench


def pytest_generate_tests(metafunc):
    """Sizes depend on the device (small on CPU), so they are chosen at collection."""
    from pytest_attn.plugin.options import bench_metrics
    from pytest_attn.plugin.session import attn_session_of

    limit = bench_max_tokens(attn_session_of(metafunc.config))
    if "vit_seq_len" in metafunc.fixturenames:
        lens = [n for n in VIT_TABLE_SEQ_LENS if limit is None or n <= limit]
        metafunc.parametrize("vit_seq_len", lens, ids=[f"seq{n}" for n in lens])
    if "vit_mix" in metafunc.fixturenames:
        mixes = [name for name, lens in VIT_MIXES.items() if limit is None or max(lens) <= limit]
        metafunc.parametrize("vit_mix", mixes)
    if "bench_metric" in metafunc.fixturenames:
        metrics = bench_metrics(metafunc.config)
        metafunc.parametrize("bench_metric", metrics, ids=None if len(metrics) > 1 else [""])


def test_vit_table(attn_benchmark, attn_backend, vit_seq_len, bench_metric, attn_device, attn_seed):
    """Batch 1, hidden 1280 (16 heads x 80), bf16, full mask: the ViT table, one row per size."""
    batch = build_batch([vit_seq_len], num_heads=VIT_HEADS, head_dim=VIT_HEAD_DIM, dtype="bfloat16", mask="full",
                        device=attn_device, seed=attn_seed)
    attn_benchmark(attn_backend, batch, series=VIT_TABLE_SERIES, label=f"seq {vit_seq_len}", metric=bench_metric)


def test_vit_ragged_mix(attn_benchmark, attn_backend, vit_mix, bench_metric, attn_device, attn_seed):
    """Several images of different sizes in one ragged batch, as the ViT encoder sees them."""
    batch = build_batch(VIT_MIXES[vit_mix], num_heads=VIT_HEADS, head_dim=VIT_HEAD_DIM, dtype="bfloat16",
                        mask="full", device=attn_device, seed=attn_seed)
    attn_benchmark(attn_backend, batch, series=vit_mix, label=vit_mix, metric=bench_metric)
