"""PyTorch FlexAttention (``torch.nn.attention.flex_attention``): attention whose scaled logits a
``score_mod`` rewrites and whose visibility a ``mask_mod`` (made into a ``BlockMask``) decides.

Everything this project's layers ask for that those two functions can express, this backend does,
one request at a time over that request's keys (sliced from k/v without a cache; gathered from the
paged cache, NHD or HND, and dequantized to the input dtype for an FP8 cache):

- ``mask_mod``: causal visibility aligned bottom-right (a request's queries are its last tokens:
  chunked prefill, reused prefixes, speculative decoding, cross-attention with more keys than
  queries) and a sliding window that bounds the left (query at position i sees keys j >= i - W).
  A layer that hides nothing from anyone (full attention, no window) gets no block mask at all.
- ``score_mod``: the logit soft-cap, cap * tanh(s / cap) of the scaled logit (flex applies
  ``scale`` before score_mod), and attention sinks. A sink is one more key per request, of zeros,
  appended after the request's keys with a value row of zeros: score_mod returns the head's sink
  logit for it and mask_mod always lets it through, so it joins every softmax denominator and adds
  nothing to the output; flex's log-sum-exp (natural log) then includes it, as this project's LSE
  does.
- the scale goes to flex's ``scale``, GQA to ``enable_gqa``; V (and the output) may have a head
  dim of their own, and so absorbed MLA (``latent_kv``) runs as MQA with V = K[..., :head_dim_vo].

What score_mod and mask_mod read (offsets, window, cap, sinks) is captured as 0-d tensors, never
Python numbers, so that a compiled flex reuses its graph across requests and layers rather than
recompiling for each value.

On CPU flex runs eagerly: its unfused implementation, which materialises one request's scores
(``set_stance("force_eager")`` keeps TorchDynamo from tracing it again for every shape; its
"called without torch.compile" warning is silenced). On CUDA it runs one process-wide
``torch.compile(flex_attention, dynamic=True, fullgraph=True)`` with the Triton flex_attention
kernel (see :func:`triton_kernel_options`); on CUDA it also needs head dims of at least 16.
"""
from __future__ import annotations

import sys
import warnings

from pytest_attn.env import torch_build
from pytest_attn.core.contract import (FUSED_FLOAT32_TOLERANCE, Availability, Backend, Capabilities, LayerSpec, Plan,
                                  Tolerance)
from pytest_attn.core.metadata import AttentionMetadata

#: The torch release that first shipped torch.nn.attention.flex_attention.
MIN_TORCH = "2.5"
#: flex's Triton kernel multiplies with tl.dot, which takes no head dim under 16.
MIN_CUDA_HEAD_DIM = 16
# Measured on an H200 (torch 2.11): at head_dim 576/512 (absorbed MLA) the Triton template needs
# 425984 bytes of shared memory against a limit of 232448, and no config fits.
MAX_CUDA_HEAD_DIM = 256
#: Graphs TorchDynamo may compile for flex_attention's one code object (see _call_context).
RECOMPILE_LIMIT = 1024
_COMPILED_FLEX = None  # torch.compile(flex_attention, ...), made on first CUDA use


def mask_description(layer: LayerSpec) -> str:
    """What mask_mod lets through, in words (the plan's "mask_mod" detail)."""
    parts = []
    if layer.causal:
        parts.append("causal bottom-right")
    if layer.window_left >= 0:
        parts.append(f"window {layer.window_left}")
    if not parts:
        return "none (full attention)"
    if layer.sinks:
        parts.append("sink key always visible")
    return " + ".join(parts)


def score_description(layer: LayerSpec) -> str:
    """What score_mod does to a scaled logit, in words (the plan's "score_mod" detail)."""
    parts = []
    if layer.logits_soft_cap > 0:
        parts.append(f"soft-cap {layer.logits_soft_cap:g}")
    if layer.sinks:
        parts.append("sinks")
    return " + ".join(parts) if parts else "none"


def needs_mask(layer: LayerSpec) -> bool:
    """Whether any key is hidden from any query (else flex runs with no block mask). A sink key is
    visible to every query, so sinks alone need none."""
    return layer.causal or layer.window_left >= 0


def make_mask_mod(causal: bool, windowed: bool, sink: bool, offset, window_left, sink_idx):
    """mask_mod of one request: query q_idx sits at key position q_idx + offset (bottom-right);
    offset, window_left and sink_idx are 0-d integer tensors."""

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        keep = kv_idx <= pos if causal else kv_idx >= 0
        if windowed:
            keep = keep & (kv_idx >= pos - window_left)
        if sink:
            keep = keep | (kv_idx == sink_idx)
        return keep

    return mask_mod


def make_score_mod(capped: bool, sink: bool, cap, sinks, sink_idx):
    """score_mod of one layer and request: cap and sinks (float32, one per query head) are tensors;
    the key at sink_idx is the appended sink key, whose logit becomes the head's sink."""
    import torch

    def score_mod(score, b, h, q_idx, kv_idx):
        if capped:
            score = cap * torch.tanh(score / cap)
        if sink:
            score = torch.where(kv_idx == sink_idx, sinks[h].to(score.dtype), score)
        return score

    return score_mod


def _flex_file_present() -> bool:
    """Whether the installed torch has torch/nn/attention/flex_attention.py, read off disk."""
    return any((location / "nn" / "attention" / "flex_attention.py").is_file()
               for location in torch_build.package_dirs())


def _compiled_flex():
    """One compiled flex_attention for the process: dynamic shapes, since request lengths vary, and
    fullgraph, so a compile that fails raises instead of quietly running the unfused kernel."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True, fullgraph=True)
    return _COMPILED_FLEX


def triton_kernel_options(flex_module) -> dict:
    """kernel_options for CUDA: the Triton flex_attention kernel, never flex_decoding. Compiled with
    dynamic shapes, flex_decoding (which flex picks for short queries) failed to lower on torch
    2.11 for GQA batches on an H100 ("NoValidChoicesError: No choices to select"). Newer torch
    names the kernel with BACKEND; older releases take FORCE_USE_FLEX_ATTENTION."""
    options_type = getattr(flex_module, "FlexKernelOptions", None)
    if "BACKEND" in getattr(options_type, "__annotations__", {}):
        return {"BACKEND": "TRITON"}
    return {"FORCE_USE_FLEX_ATTENTION": True}


def _call_context(compiled: bool):
    """What a flex call runs under.

    Eager (CPU): uncompiled flex_attention still hands its operator to torch.compile (backend
    "eager"), and TorchDynamo traces it again for every new shape, head count and score_mod, about
    0.3 s each: most of a catalog run's CPU time. ``set_stance("force_eager")`` skips that tracing;
    the operator runs the same unfused implementation either way. Its "called without
    torch.compile" warning is silenced: on CPU that is the point.

    Compiled (CUDA): each head count, head dim, dtype and score_mod/mask_mod shape is a graph of
    its own, and past TorchDynamo's recompile limit (8 by default) a call would fail (fullgraph),
    or without fullgraph quietly fall back to the unfused kernel; the limit is raised for the call.
    """
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    if compiled:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        stack.enter_context(config.patch(**{name: max(getattr(config, name), RECOMPILE_LIMIT)}))
        return stack
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)  # torch 2.6 and later
    if set_stance is not None:
        stack.enter_context(set_stance("force_eager"))
    return stack


class FlexAttentionBackend(Backend):
    name = "flex"
    description = "PyTorch FlexAttention (score_mod / mask_mod), per request; eager on CPU, compiled on CUDA"
    capabilities = Capabilities(sliding_window=True, soft_cap=True, sinks=True, head_dim_vo=True,
                                cross_attention=True, chunked_prefill=True, multi_token_generation=True,
                                kv_dtypes=frozenset({"float8_e4m3fn", "bfloat16", "float16"}), lse_base="e",
                                never_reads_masked_slots=True, latent_kv=True)
    requires_contiguous = False  # flex takes strided q/k/v (views of a fused QKV projection)

    def available(self) -> Availability:
        # torch is imported only where it already is: a process that only reports (an xdist
        # controller) need not pay for it, so then the module is looked for on disk.
        if not torch_build.is_installed():
            return Availability(False, f"torch is not installed: pip install 'torch>={MIN_TORCH}' (flex_attention)")
        if "torch" not in sys.modules:
            if _flex_file_present():
                return Availability(True)
            return Availability(False, f"torch {torch_build.version()} has no torch.nn.attention.flex_attention: "
                                       f"install torch {MIN_TORCH} or later")
        try:
            import torch
            import torch.nn.attention.flex_attention  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            return Availability(False, f"torch.nn.attention.flex_attention cannot be imported ({type(exc).__name__}: "
                                       f"{exc}): install torch {MIN_TORCH} or later")
        try:
            dynamo_ok = torch._dynamo.is_dynamo_supported()
        except Exception:  # noqa: BLE001  (a private API; when it cannot answer, flex will tell)
            dynamo_ok = True
        if not dynamo_ok:
            return Availability(False, f"flex_attention needs TorchDynamo, which torch {torch.__version__} does not "
                                       f"support on Python {sys.version.split()[0]}")
        return Availability(True)

    def tolerance(self, dtype: str) -> Tolerance:
        return FUSED_FLOAT32_TOLERANCE if dtype == "float32" else Tolerance()

    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        if str(device).startswith("cuda") and min(layer.head_dim, layer.head_dim_v) < MIN_CUDA_HEAD_DIM:
            reasons.append(f"flex_attention's Triton kernel needs head dims of at least {MIN_CUDA_HEAD_DIM} (tl.dot), "
                           f"not {layer.head_dim}/{layer.head_dim_v}")
        if str(device).startswith("cuda") and max(layer.head_dim, layer.head_dim_v) > MAX_CUDA_HEAD_DIM:
            reasons.append(f"flex_attention's Triton kernel runs out of shared memory above head dim {MAX_CUDA_HEAD_DIM} "
                           f"(head dims {layer.head_dim}/{layer.head_dim_v}; measured on an H200)")
        return reasons

    def plan(self, metadata: AttentionMetadata, layer: LayerSpec, device: str = "cpu") -> Plan:
        device_type = str(device).split(":")[0]
        layout = metadata.kv_cache_manager.layout if metadata.has_cache else "NHD"
        details = [
            ("launches", sum(1 for n in metadata.seq_lens if n)),
            ("mask_mod", mask_description(layer)),
            ("score_mod", score_description(layer)),
        ]
        if layer.sinks:
            details.append(("sinks", "one zero key (and value) appended per request; score_mod gives it the sink "
                                     "logit"))
        if layer.group_size > 1:
            details.append(("gqa", f"enable_gqa, {layer.group_size} query heads per KV head"))
        if metadata.has_cache and metadata.kv_cache_manager.quantized:
            details.append(("kv_cache", f"{metadata.kv_cache_manager.dtype}, dequantized to {layer.dtype} on gather"))
        if device_type == "cuda":
            kernel_backend = "compiled"
            details.append(("compile", "torch.compile(flex_attention, dynamic=True, fullgraph=True), Triton "
                                       "flex_attention kernel (flex_decoding off)"))
        else:
            kernel_backend = "eager"
            details.append(("compile", "none: the unfused eager implementation"))
        return Plan(self.name, "flex_attention", kernel_backend, layout, "tokens", metadata.has_cache,
                    device=str(device), layer=layer, details=tuple(details))

    def forward(self, q, k, v, metadata: AttentionMetadata, plan: Plan, out=None, lse=None):
        layer, out = self.start_forward(q, k, v, metadata, plan, out)
        params = self._layer_tensors(layer, q.device)
        q_off = metadata.qo_indptr
        for i, n in enumerate(metadata.seq_lens):
            if n == 0:
                continue
            ki, vi = metadata.request_kv(i, k, v, layer, dtype=q.dtype)
            rows = slice(q_off[i], q_off[i + 1])
            o, row_lse = self._attend(q[rows], ki, vi, layer, plan, params, want_lse=lse is not None)
            out[rows] = o
            if lse is not None:
                lse[rows] = row_lse
        return out

    @staticmethod
    def _layer_tensors(layer: LayerSpec, device) -> dict:
        """The layer's parameters as the tensors score_mod reads (made once per forward)."""
        import torch

        params = {}
        if layer.logits_soft_cap > 0:
            params["cap"] = torch.tensor(layer.logits_soft_cap, dtype=torch.float32, device=device)
        if layer.sinks:
            params["sinks"] = torch.tensor(layer.sinks, dtype=torch.float32, device=device)
        if layer.window_left >= 0:
            params["window"] = torch.tensor(layer.window_left, dtype=torch.int32, device=device)
        return params

    def _attend(self, q, k, v, layer: LayerSpec, plan: Plan, params: dict, want_lse: bool):
        """One request: q [Lq, H, D] over k [Lk, Hkv, D], v [Lk, Hkv, Dv] (its last Lq tokens are
        the queries) -> ([Lq, H, Dv], [Lq, H] float32 natural-log LSE or None)."""
        import torch
        from torch.nn.attention.flex_attention import create_block_mask

        lq, lk = q.shape[0], k.shape[0]
        device = q.device
        # [1, heads, len, dim], each a tensor of its own with the standard strides: a compiled flex
        # guards on a view's base and on strides, and contiguous() hands back a view with odd
        # strides when a dim is 1 (a decode's one query): each would be one more graph to compile.
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0).clone(memory_format=torch.contiguous_format) for t in (q, k, v))
        sink = bool(layer.sinks)
        if sink:  # one more key and value of zeros, at index lk: score_mod makes its logit the sink
            kh = torch.cat([kh, kh.new_zeros(kh.shape[:2] + (1, kh.shape[3]))], dim=2)
            vh = torch.cat([vh, vh.new_zeros(vh.shape[:2] + (1, vh.shape[3]))], dim=2)
        sink_idx = torch.tensor(lk, dtype=torch.int32, device=device)
        score_mod = None
        if layer.logits_soft_cap > 0 or sink:
            score_mod = make_score_mod(layer.logits_soft_cap > 0, sink, params.get("cap"), params.get("sinks"),
                                       sink_idx)
        block_mask = None
        if needs_mask(layer):
            offset = torch.tensor(lk - lq, dtype=torch.int32, device=device)
            mask_mod = make_mask_mod(layer.causal, layer.window_left >= 0, sink, offset, params.get("window"),
                                     sink_idx)
            block_mask = create_block_mask(mask_mod, None, None, lq, kh.shape[2], device=device)
        kwargs = {"score_mod": score_mod, "block_mask": block_mask, "scale": layer.scale,
                  "enable_gqa": layer.group_size > 1}
        o, row_lse = _run_flex(qh, kh, vh, kwargs, want_lse, compiled=plan.kernel_backend == "compiled")
        o = o[0].transpose(0, 1)  # [Lq, H, Dv]
        return o, (row_lse[0].transpose(0, 1) if want_lse else None)

    # -- what runs, as the profiler names it ----------------------------------------------------------
    def expected_kernels(self, plan: Plan) -> list:
        """Eager (CPU): flex's unfused implementation under its operator (``FlexAttentionAutogradOp``
        or ``flex_attention``), never an SDPA kernel. Compiled (CUDA): the Triton flex_attention
        template kernel (``triton_tem_fused_*``); Inductor's pointwise and reduction kernels and the
        block mask's ATen kernels are data movement."""
        from pytest_attn.check.traces import KernelFamily

        if plan.kernel_backend == "compiled":
            return [KernelFamily("flex_attention Triton template", (r"^triton_tem_",))]
        return [KernelFamily("flex_attention eager", (r"FlexAttention", r"flex_attention"))]


def _run_flex(qh, kh, vh, kwargs: dict, want_lse: bool, compiled: bool):
    """flex_attention, compiled or eager, -> (out, natural-log LSE or None): through
    ``return_aux=AuxRequest(lse=True)`` where this torch has it, else ``return_lse=True``."""
    from torch.nn.attention import flex_attention as flex_module

    fn = _compiled_flex() if compiled else flex_module.flex_attention
    if compiled:
        kwargs = {**kwargs, "kernel_options": triton_kernel_options(flex_module)}
    aux_request = getattr(flex_module, "AuxRequest", None)
    if want_lse:
        if aux_request is not None:
            kwargs = {**kwargs, "return_aux": aux_request(lse=True)}
        else:
            kwargs = {**kwargs, "return_lse": True}
    with _call_context(compiled):
        result = fn(qh, kh, vh, **kwargs)
    if not want_lse:
        return result, None
    o, extra = result
    return o, (extra.lse if aux_request is not None else extra)


BACKENDS = [FlexAttentionBackend()]
