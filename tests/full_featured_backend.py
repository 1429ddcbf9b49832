"""A third-party backend declaring every capability, written only against ``pytest_attn``'s public
API (docs/api.md), as a backend author would write one: sliding windows, soft-cap, sinks, a V head
dim of its own, FP8 and 16-bit caches in another dtype, the LSE, cross-attention, chunked prefill,
multi-token generation, several layers and strided inputs.

tests/test_full_featured_backend.py installs this file as a package with a ``pytest_attn.backends``
entry point and runs the whole catalog against it, so a change to the API that breaks backend
authors fails the project's own CI first. Attention is computed per request in float32, from the
keys ``request_kv`` gives (the cache's history, or without a cache the request's rows of k and v).
"""
import math

import torch

from pytest_attn import (FUSED_FLOAT32_TOLERANCE, AttentionMetadata, AttnInputError, Availability, Backend,
                         Capabilities, LayerSpec, Plan, Tolerance)


class FullFeaturedBackend(Backend):
    name = "full-featured"
    description = "every capability declared: float32 attention per request over request_kv's keys"
    capabilities = Capabilities(
        sliding_window=True, soft_cap=True, sinks=True, head_dim_vo=True, cross_attention=True,
        chunked_prefill=True, multi_token_generation=True,
        kv_dtypes=frozenset({"float8_e4m3fn", "bfloat16", "float16"}),  # request_kv converts what the cache holds
        lse_base="e", never_reads_masked_slots=True,  # it gathers each request's own tokens only
        latent_kv=True)  # absorbed MLA: the suite gives V as K's first head_dim_vo channels
    requires_contiguous = False  # it slices q, k and v; views of a fused QKV projection are fine

    def available(self) -> Availability:
        return Availability(True)

    def tolerance(self, dtype: str) -> Tolerance:
        return FUSED_FLOAT32_TOLERANCE if dtype == "float32" else Tolerance()

    def plan(self, metadata: AttentionMetadata, layer: LayerSpec, device: str = "cpu") -> Plan:
        layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
        return Plan(self.name, "per_request_float32", "torch", layout, "tokens", metadata.has_cache,
                    device=str(device), layer=layer, details=(("num_requests", metadata.num_requests),
                                                              ("num_contexts", metadata.num_contexts),
                                                              ("num_tokens", metadata.num_tokens)))

    def forward(self, q, k, v, metadata: AttentionMetadata, plan: Plan, out=None, lse=None):
        layer, out = self.start_forward(q, k, v, metadata, plan, out)  # inputs checked as it declares
        manager = metadata.kv_cache_manager
        if manager is not None:
            manager.write(layer.layer_idx, metadata, k, v, k_scale=layer.k_scale, v_scale=layer.v_scale)
        q_off, key_count, new_rows = metadata.qo_indptr, metadata.cu_kv_lens, metadata.kv_rows_indptr
        for i, n in enumerate(metadata.seq_lens):
            if n == 0:
                continue
            keys, values = metadata.request_kv(i, k, v, layer, dtype=torch.float32)
            if keys.shape[0] != key_count[i + 1] - key_count[i]:
                raise AttnInputError(f"request {i}: request_kv gave {keys.shape[0]} keys, cu_kv_lens says "
                                     f"{key_count[i + 1] - key_count[i]}")
            if manager is not None and n and not torch.equal(  # its newest keys are this step's rows
                    keys[-n:], _as_cached(k[new_rows[i]:new_rows[i + 1]], manager.dtype, layer.k_scale)):
                raise AttnInputError(f"request {i}: the cache's newest keys are not this step's k rows")
            rows = slice(q_off[i], q_off[i + 1])
            o, row_lse = attend(q[rows].float(), keys, values, layer)
            out[rows] = o.to(out.dtype)
            if lse is not None:
                lse[rows] = row_lse
        return out


def _as_cached(t, cache_dtype: str, scale: float):
    """What the cache holds of t, as request_kv(dtype=float32) gives it back."""
    if cache_dtype == "float8_e4m3fn":
        return (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return t.to(getattr(torch, cache_dtype)).float()


def attend(q, k, v, layer: LayerSpec):
    """One request in float32: q [Lq, H, D] over k [Lk, Hkv, D], v [Lk, Hkv, Dv]; its queries are its
    last Lq tokens. -> (out [Lq, H, Dv], natural LSE [Lq, H])."""
    lq, lk = q.shape[0], k.shape[0]
    kh = k.repeat_interleave(layer.group_size, dim=1).transpose(0, 1)  # [H, Lk, D]
    vh = v.repeat_interleave(layer.group_size, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), kh.transpose(1, 2)) * layer.scale  # [H, Lq, Lk]
    if layer.logits_soft_cap > 0:
        scores = torch.tanh(scores / layer.logits_soft_cap) * layer.logits_soft_cap
    qpos = torch.arange(lk - lq, lk, device=q.device)[:, None]  # bottom-right alignment
    kpos = torch.arange(lk, device=q.device)[None, :]
    visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if layer.causal:
        visible &= kpos <= qpos
    if layer.window_left >= 0:
        visible &= kpos >= qpos - layer.window_left
    scores = scores.masked_fill(~visible, -math.inf)
    if layer.sinks:  # one more logit per head, with no value
        sinks = torch.tensor(layer.sinks, dtype=torch.float32, device=q.device).view(-1, 1, 1)
        scores = torch.cat([scores, sinks.expand(-1, lq, 1)], dim=-1)
    top = scores.amax(dim=-1, keepdim=True)  # subtract the row maximum: exact, unlike the LSE at large logits
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a query that sees nothing
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    probs = torch.where(total > 0, weights / total, torch.zeros_like(weights))[..., :lk]
    row_lse = (top + torch.log(total)).squeeze(-1)  # [H, Lq]; -inf where nothing is seen
    return torch.matmul(probs, vh).transpose(0, 1), row_lse.transpose(0, 1)


BACKENDS = [FullFeaturedBackend()]
