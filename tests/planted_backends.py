"""A correct backend written out in einsums, and its planted bugs: each one mistake a newcomer's
kernel makes (a contract broken in what forward() returns, a mask ignored, an exception deep in its
own code), for the tests of what the suite reports. `Einsum` is the control: it passes what its
capabilities let it run, so each mutant fails by its bug alone. Importable by tests, and through
``write_planted_package`` by pytester runs and their subprocesses as an installed package would be."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pytest_attn import Availability, Backend, Capabilities, Plan

HERE = Path(__file__).resolve().parent


class Einsum(Backend):
    """Attention per request in float32 einsums, with the log-sum-exp when asked for."""

    name = "einsum"
    capabilities = Capabilities(devices=frozenset({"cpu", "cuda"}), chunked_prefill=True,
                                multi_token_generation=True, lse_base="e")
    causal = True  # honours the layer's causal mask

    def available(self) -> Availability:
        return Availability(True)

    def plan(self, metadata, layer, device="cpu") -> Plan:
        layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
        return Plan(self.name, kernel="einsum", kernel_backend="torch", layout=layout, index_units="tokens",
                    reads_cache=metadata.has_cache, device=device, layer=layer)

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        layer, manager = plan.layer, metadata.kv_cache_manager
        if manager is not None:
            manager.write(layer.layer_idx, metadata, k, v, k_scale=layer.k_scale, v_scale=layer.v_scale)
        for i, (start, stop) in enumerate(zip(metadata.qo_indptr, metadata.qo_indptr[1:])):
            if start == stop:
                continue
            keys, values = metadata.request_kv(i, k, v, layer, dtype=q.dtype)
            rows, row_lse = attend(q[start:stop], keys, values, layer, self.causal and layer.causal)
            out[start:stop] = rows
            if lse is not None:
                lse[start:stop] = row_lse
        return out


def attend(q, k, v, layer, causal: bool):
    """q [Lq, H, D] over k, v [Lk, Hkv, D], the queries being the request's last Lq tokens:
    the output [Lq, H, Dv] in q's dtype and the natural log-sum-exp [Lq, H] in float32."""
    k, v = (t.float().repeat_interleave(layer.group_size, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * layer.scale
    if causal:  # bottom-right: query i sees keys up to position Lk - Lq + i
        lq, lk = q.shape[0], k.shape[0]
        visible = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lk - lq, lk, device=q.device)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out, scores.logsumexp(-1).transpose(0, 1)


class IgnoresCausalMask(Einsum):
    """Every query sees every key of its request, causal layer or not."""

    name = "nocausal"
    causal = False


def reshape_heads(q):
    """The backend's own helper, where its exception starts (a report must show this frame)."""
    return q.view(-1, 7, 13)


class RaisesInForward(Einsum):
    name = "raises"

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        reshape_heads(q)
        return super().forward(q, k, v, metadata, plan, out, lse)


class ReturnsViewOfOut(Einsum):
    """Writes `out`, then returns it flattened to [tokens, heads * head_dim]."""

    name = "viewout"

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        return super().forward(q, k, v, metadata, plan, out, lse).view(out.shape[0], -1)


class ReturnsOwnTensor(Einsum):
    """Computes into a tensor of its own, in the shape, dtype and device ``make`` gives it."""

    name = "owntensor"

    def __init__(self, make, name: str = "owntensor"):
        self.make, self.name = make, name

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        mine = torch.empty_like(out)
        super().forward(q, k, v, metadata, plan, mine, lse)
        return self.make(mine)


class ReturnsOutAndLse(Einsum):
    """Returns (out, lse) as FlashInfer's return_lse=True does."""

    name = "pair"

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        return super().forward(q, k, v, metadata, plan, out, lse), lse


class WritesOwnLse(Einsum):
    """Writes the log-sum-exp into a tensor of its own, never into the `lse` it is given."""

    name = "ownlse"

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        return super().forward(q, k, v, metadata, plan, out, None if lse is None else torch.empty_like(lse))


BACKENDS = [Einsum(), IgnoresCausalMask(), RaisesInForward(), ReturnsViewOfOut()]


def write_planted_package(pytester):
    """Install BACKENDS through an entry point (package ``planted_attn``) for pytester runs; returns
    the PYTHONPATH a subprocess needs to see them too."""
    from backend_packages import write_backend_package

    site = write_backend_package(pytester, "planted_attn", "from planted_backends import BACKENDS\n",
                                 {"planted": "planted_attn:BACKENDS"})
    return f"{site}{os.pathsep}{HERE}"
