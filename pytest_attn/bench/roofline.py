"""What one attention call must compute and move, from the batch's actual lengths: the roofline.

FLOPs: QK^T (head_dim) and PV (head_dim_v), 2 FLOPs per multiply-add, per query head, over the
(query, key) pairs the mask leaves visible (causal, sliding window, cross-attention's own key
lengths; GQA shares K/V between heads but each query head still multiplies). ``dense_flops`` is the
same without the mask: what a reference computing full score matrices does (the test checks it
against torch.utils.flop_counter on pytest_attn.check.reference).

Bytes, the minimum a kernel moves: Q read and the output written once (the layer's dtype); K and V
read once per KV head (GQA reads each once for its group), only the keys some query sees (a sliding
window skips the rest), in the dtype they are stored in (FP8: one byte); from a paged cache, whole
pages (a request's touched pages times the page size), plus the new tokens' K/V written into the
cache. No pytest, no torch at import.
"""
from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def attended_pairs(q_len: int, kv_len: int, causal: bool, window_left: int = -1) -> int:
    """Unmasked (query, key) pairs of one request whose q_len queries are its last tokens."""
    if window_left < 0:
        if not causal:
            return q_len * kv_len
        # query i sits at position kv_len - q_len + i and sees keys 0..that position
        return q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2
    total = 0
    for i in range(q_len):
        pos = kv_len - q_len + i
        last = pos if causal else kv_len - 1
        total += max(0, last - max(0, pos - window_left) + 1)
    return total


def _flops_per_pair(layer) -> int:
    return 2 * layer.num_heads * (layer.head_dim + layer.head_dim_v)


def attention_flops(metadata, layer) -> int:
    """Forward FLOPs over the visible pairs only."""
    pairs = sum(attended_pairs(q, kv, layer.causal, layer.window_left)
                for q, kv in zip(metadata.seq_lens, metadata.kv_lens))
    return pairs * _flops_per_pair(layer)


def dense_flops(metadata, layer) -> int:
    """Forward FLOPs of full score matrices (every query against every key of its request)."""
    return sum(q * kv for q, kv in zip(metadata.seq_lens, metadata.kv_lens)) * _flops_per_pair(layer)


def keys_read(q_len: int, kv_len: int, causal: bool, window_left: int) -> int:
    """Keys of one request that at least one of its queries sees."""
    if q_len == 0 or kv_len == 0:
        return 0
    first_pos, last_pos = kv_len - q_len, kv_len - 1
    high = last_pos if causal else kv_len - 1
    low = max(0, first_pos - window_left) if window_left >= 0 else 0
    return max(0, min(kv_len - 1, high) - low + 1)


def attention_bytes(metadata, layer) -> int:
    """The minimum bytes one forward moves (see the module docstring)."""
    act = DTYPE_BYTES.get(str(layer.dtype), 2)
    kv_width = layer.num_kv_heads * (layer.head_dim + layer.head_dim_v)
    total = metadata.num_tokens * layer.num_heads * (layer.head_dim * act + layer.head_dim_v * act)  # Q in, O out
    manager = metadata.kv_cache_manager
    if manager is None:
        reads = sum(keys_read(q, kv, layer.causal, layer.window_left)
                    for q, kv in zip(metadata.seq_lens, metadata.kv_lens))
        return total + reads * kv_width * act
    stored = DTYPE_BYTES.get(str(manager.dtype), 2)
    page = metadata.page_size
    for i, (q, kv) in enumerate(zip(metadata.seq_lens, metadata.kv_lens)):
        seen = keys_read(q, kv, layer.causal, layer.window_left)
        first_key = kv - seen if layer.causal or layer.window_left >= 0 else 0
        pages = (min(kv, first_key + seen) - 1) // page - first_key // page + 1 if seen else 0
        total += pages * page * kv_width * stored
    return total + metadata.num_tokens * kv_width * stored  # the new tokens written into the cache


def achieved(flops: int, nbytes: int, seconds: float, matmul_peak_tflops: float, copy_peak_gbps: float) -> dict:
    """TFLOP/s and GB/s at ``seconds`` per call, and their share of the measured peaks."""
    tflops = flops / seconds / 1e12 if seconds > 0 else 0.0
    gbps = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    return {"flops": flops, "bytes": nbytes, "tflops": tflops, "gbps": gbps,
            "arithmetic_intensity": flops / nbytes if nbytes else None,
            "matmul_peak_tflops": matmul_peak_tflops, "copy_peak_gbps": copy_peak_gbps,
            "pct_of_matmul_peak": 100.0 * tflops / matmul_peak_tflops if matmul_peak_tflops else None,
            "pct_of_copy_peak": 100.0 * gbps / copy_peak_gbps if copy_peak_gbps else None}
