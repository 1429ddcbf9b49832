"""The roofline a row reports: FLOPs and bytes from the batch's actual lengths. The dense FLOP
count is checked against torch.utils.flop_counter on the project's reference for one case of every
catalog tag (meta tensors: nothing is computed); the masked count against a brute-force count of
visible pairs (tests/test_benchmarks.py); the bytes against what each feature changes."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pytest_attn.bench.roofline import achieved, attention_bytes, attention_flops, dense_flops, keys_read
from pytest_attn.cases.catalog import CATALOG
from pytest_attn.check.batch import build_batch
from pytest_attn.check.harness import first_step
from pytest_attn.check.reference import reference_attention


def _smallest_case_per_tag():
    chosen = {}
    for case in CATALOG.values():
        for tag in case.tags:
            if tag not in chosen or sum(case.seq_lens) < sum(chosen[tag].seq_lens):
                chosen[tag] = case
    return sorted(chosen.items())


@pytest.mark.parametrize("tag, case", _smallest_case_per_tag(), ids=[t for t, _ in _smallest_case_per_tag()])
def test_flop_formula_matches_flopcountermode_on_the_reference(tag, case):
    metadata, layer = first_step(case)
    q = torch.empty(metadata.num_tokens, layer.num_heads, layer.head_dim, device="meta")
    keys = [torch.empty(kv, layer.num_kv_heads, layer.head_dim, device="meta") for kv in metadata.kv_lens]
    values = [torch.empty(kv, layer.num_kv_heads, layer.head_dim_v, device="meta") for kv in metadata.kv_lens]
    with FlopCounterMode(display=False) as counter:
        reference_attention(q, keys, values, metadata.seq_lens, layer)
    assert counter.get_total_flops() == dense_flops(metadata, layer) > 0
    masked = attention_flops(metadata, layer)
    assert masked <= dense_flops(metadata, layer)
    if not layer.causal and layer.window_left < 0:
        assert masked == dense_flops(metadata, layer)


def test_every_catalog_tag_is_covered():
    assert {t for c in CATALOG.values() for t in c.tags} == {t for t, _ in _smallest_case_per_tag()}


def _bytes(seq_lens, **kw):
    batch = build_batch(seq_lens, device="meta" if False else "cpu", **kw)
    return attention_bytes(batch.metadata, batch.layer)


def test_bytes_count_what_each_feature_changes():
    full = _bytes([256], num_heads=8, num_kv_heads=8, head_dim=64, mask="full")
    # Q + O (bf16) + K + V (bf16), each read or written once
    assert full == 256 * 8 * 64 * 2 * 2 + 256 * 8 * 64 * 2 * 2
    gqa = _bytes([256], num_heads=8, num_kv_heads=2, head_dim=64, mask="full")
    assert full - gqa == 256 * 6 * 64 * 2 * 2  # K/V of 6 fewer KV heads
    # a prefill's queries see every key between them, window or not; a decode's window skips the rest
    assert _bytes([256], num_heads=8, num_kv_heads=8, head_dim=64, mask="causal", window_left=31) == full
    decode = dict(num_heads=8, num_kv_heads=8, head_dim=64, mask="causal", cached_lens=[1000], page_size=16)
    whole, windowed = _bytes([1], **decode), _bytes([1], window_left=31, **decode)
    kv_page = 16 * 8 * 128 * 2
    assert whole - windowed == (63 - 3) * kv_page  # 1001 keys: 63 pages; the last 32 keys: 3 pages (969..1000)
    assert keys_read(1, 1000, True, 31) == 32 and keys_read(4, 10, True, -1) == 10 and keys_read(0, 5, False, -1) == 0


def test_paged_reads_count_whole_pages_and_fp8_one_byte():
    def paged(page_size, kv_dtype="bfloat16"):
        batch = build_batch([1], num_heads=4, num_kv_heads=4, head_dim=64, mask="causal", cached_lens=[17],
                            page_size=page_size, kv_dtype=kv_dtype)
        return attention_bytes(batch.metadata, batch.layer)

    # 18 keys: 18 pages of 1, 2 pages of 16 (32 slots), 1 page of 32
    kv_row = 4 * 128 * 2
    assert paged(1) - paged(16) == (18 - 32) * kv_row
    assert paged(32) - paged(16) == 0
    assert paged(16, "float8_e4m3fn") < paged(16)


def test_achieved_rates_and_shares_of_the_peaks():
    r = achieved(2e12, 1e9, 0.5, matmul_peak_tflops=8.0, copy_peak_gbps=4.0)
    assert r["tflops"] == 4.0 and r["gbps"] == 2.0 and r["pct_of_matmul_peak"] == 50.0 and r["pct_of_copy_peak"] == 50.0
