"""A named batch case: a layer (or several) and a schedule of steps, as vLLM's batch specs are.

Without a cache a case is one ragged step (cross-attention: each request with keys of its own).
With a paged cache it is a schedule, as TensorRT-LLM and vLLM run one:

- step 0 feeds every prompt as a context request: whole, or ``chunk_size`` tokens at a time over
  several steps (chunked prefill: later chunks are context requests whose first tokens are cached);
- a request whose prompt is in generates from the next step on, one token per step, or
  ``1 + draft_tokens`` (speculative decoding: the target model verifies the draft tokens);
- at step 1, ``joining`` prompts arrive (a step mixing new prompts with decoding requests), and with
  ``shared_prefix`` a request arrives whose first ``shared_prefix`` tokens are request 0's, reused
  from the cache by sharing its pages (prefix caching);
- the first generating request finishes after its first generation step (its pages go back
  mid-run, poisoned), and everyone finishes at the last step.

Each step runs ``num_layers`` layers over the same batch; ``layer_overrides`` make layers differ
(GPT-OSS alternates sliding-window and full layers; a reuse case changes one parameter between
layers of the same shape, the stale-plan class of bug). The catalog itself, and ``select``, are in
:mod:`pytest_attn.cases.catalog`; every case there is named for the class of bug it catches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Optional

from pytest_attn.core.errors import AttnInputError
from pytest_attn.core.layer import KV_LAYOUTS, LayerSpec, dtype_name
from pytest_attn.core.metadata import _as_lengths, pages_for

# The seed's model: the Nemotron/RADIO ViT encoder (hidden 1280 = 16 heads x 80).
VIT_HEADS, VIT_HEAD_DIM = 16, 80
VIT_TOKENS_224 = (224 // 14) ** 2  # one 224-pixel image at patch 14: 256 tokens

#: LayerSpec fields a layer override may change (shapes and the cache's dtype are the case's).
LAYER_OVERRIDABLE = ("dtype", "mask", "sm_scale", "window_left", "logits_soft_cap", "sinks", "k_scale", "v_scale",
                     "return_lse")


@dataclass(frozen=True)
class Step:
    seq_lens: tuple[int, ...]
    request_ids: tuple[int, ...]
    num_contexts: int
    finished: tuple[int, ...] = ()  # requests whose pages are freed after this step
    # (new request, source request, tokens): before this step, the new request starts with the
    # source's first tokens, sharing its pages
    shared: tuple[tuple[int, int, int], ...] = ()


def sink_logits(num_heads: int) -> tuple[float, ...]:
    """Sink logits of a case with sinks: spread over [-2, 4] across the heads, so that in some
    heads the sink takes a large share of the softmax and in others almost none."""
    if num_heads == 1:
        return (2.0,)
    return tuple(round(-2.0 + 6.0 * h / (num_heads - 1), 4) for h in range(num_heads))


#: The layer's parameters a case takes as keywords (``BatchCase("x", 8, 8, 64, (10,), window_left=8)``);
#: they live in the case's one :class:`LayerSpec` (``case.layer_spec``), never beside it.
LAYER_KEYWORDS = ("num_heads", "num_kv_heads", "head_dim", "dtype", "mask", "window_left", "logits_soft_cap",
                  "sinks", "sm_scale", "head_dim_vo", "kv_dtype", "k_scale", "v_scale", "return_lse", "latent_kv")


@dataclass(frozen=True, init=False)
class BatchCase:
    """A named case: one layer (``layer_spec``, changed per layer by ``layer_overrides``) and the
    batch schedule it runs. Construct it with the layer's parameters as arguments,
    ``BatchCase(name, num_heads, num_kv_heads, head_dim, seq_lens, dtype, mask, **keywords)``, or
    with ``layer_spec=LayerSpec(...)``; ``sinks=True`` gives the layer :func:`sink_logits`."""

    name: str
    layer_spec: LayerSpec
    seq_lens: tuple[int, ...]  # prompt lengths (the whole batch when there is no cache)
    cache: bool = False
    kv_layout: str = "NHD"
    page_size: int = 16
    decode_steps: int = 0
    joining: tuple[int, ...] = ()  # prompts that join at step 1 as context requests
    tags: tuple[str, ...] = ()
    description: str = ""
    num_layers: int = 1
    layer_overrides: tuple = ()  # per layer index: ((field, value), ...) changing that layer
    # -- shapes of the batch that engines produce and kernels get wrong ----------------------------
    kv_seq_lens: tuple[int, ...] = ()  # no cache: keys per request (cross-attention)
    chunk_size: int = 0  # > 0: prompts go in chunks of this many tokens (chunked prefill)
    shared_prefix: int = 0  # > 0: at step 1 a request joins reusing request 0's first tokens
    draft_tokens: int = 0  # generation steps bring 1 + draft_tokens tokens (speculative decoding)
    # -- inputs that stress the numerics ------------------------------------------------------------
    input_scale: float = 1.0  # q and k are multiplied by this: logits grow by its square
    logit_shift: float = 0.0  # < 0: q and k share a component that moves every logit down by about this
    strided: bool = False  # q, k and v are views of one fused QKV projection, not contiguous tensors
    check_solo: bool = False  # each request run alone must give what it gave in the batch

    def __init__(self, name: str, num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, seq_lens=(), dtype=None, mask: Optional[str] = None, *,
                 layer_spec: Optional[LayerSpec] = None, **keywords):
        layer_fields = {k: keywords.pop(k) for k in LAYER_KEYWORDS if k in keywords}
        for key, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                           ("dtype", dtype), ("mask", mask)):
            if value is not None:
                layer_fields[key] = value
        unknown = [k for k in keywords if k not in {f.name for f in dataclasses.fields(BatchCase)}]
        if unknown:
            raise AttnInputError(f"case {name}: unknown field(s) {', '.join(unknown)}")
        if isinstance(layer_fields.get("sinks"), bool):
            sinks = layer_fields.pop("sinks")
            heads = layer_fields.get("num_heads", layer_spec.num_heads if layer_spec else None)
            layer_fields["sinks"] = sink_logits(heads) if sinks and heads else ()
        try:
            if layer_spec is None:
                missing = [k for k in ("num_heads", "num_kv_heads", "head_dim") if k not in layer_fields]
                if missing:
                    raise AttnInputError(f"needs {', '.join(missing)} (or layer_spec=LayerSpec(...))")
                layer_spec = LayerSpec(**layer_fields)
            elif layer_fields:
                layer_spec = dataclasses.replace(layer_spec, **layer_fields)
        except (AttnInputError, TypeError) as exc:
            raise AttnInputError(f"case {name}: {exc}") from None
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "layer_spec", layer_spec)
        object.__setattr__(self, "seq_lens", seq_lens)
        for f in dataclasses.fields(self):
            if f.name not in ("name", "layer_spec", "seq_lens"):
                object.__setattr__(self, f.name, keywords.get(f.name, f.default))
        self.__post_init__()

    def __post_init__(self):
        for name in ("seq_lens", "joining", "kv_seq_lens"):
            object.__setattr__(self, name, _as_lengths(getattr(self, name), f"case {self.name}: {name}"))
        if not self.seq_lens:
            raise AttnInputError(f"case {self.name}: seq_lens is empty; a case needs at least one request")
        if self.kv_layout not in KV_LAYOUTS:
            raise AttnInputError(f"case {self.name}: kv_layout {self.kv_layout!r} is not one of {KV_LAYOUTS}")
        for name, least in (("page_size", 1), ("decode_steps", 0), ("num_layers", 1), ("chunk_size", 0),
                            ("shared_prefix", 0), ("draft_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise AttnInputError(f"case {self.name}: {name} must be an int >= {least}, got {value!r}")
        self._check_schedule()
        self._check_layers()
        if not (isinstance(self.input_scale, (int, float)) and self.input_scale > 0):
            raise AttnInputError(f"case {self.name}: input_scale must be positive, got {self.input_scale!r}")
        if not (isinstance(self.logit_shift, (int, float)) and self.logit_shift <= 0):
            raise AttnInputError(f"case {self.name}: logit_shift must be 0 or negative, got {self.logit_shift!r}")

    def _check_schedule(self) -> None:
        if not self.cache and (self.decode_steps or self.joining or self.chunk_size or self.shared_prefix
                               or self.draft_tokens):
            raise AttnInputError(f"case {self.name}: decode steps, joining prompts, chunks, shared prefixes and draft "
                                 "tokens need cache=True")
        if self.cache and 0 in self.seq_lens + self.joining:
            raise AttnInputError(f"case {self.name}: a prompt on a paged cache needs at least one token (a request "
                                 "with none would be scheduled as a generation request before it is in the cache)")
        if self.cache and self.num_steps < 2 and (self.joining or self.shared_prefix or self.draft_tokens):
            raise AttnInputError(f"case {self.name}: joining prompts, a shared prefix and draft tokens come at step 1, "
                                 "and this case has one step: give decode_steps >= 1 or a chunk_size")
        if self.kv_seq_lens and (self.cache or len(self.kv_seq_lens) != len(self.seq_lens)):
            raise AttnInputError(f"case {self.name}: kv_seq_lens (cross-attention) need cache=False and one entry "
                                 "per request")
        if self.shared_prefix and (self.shared_prefix % self.page_size or self.shared_prefix >= self.seq_lens[0]
                                   or self.shared_prefix > self._held_after_first_step(0)):
            raise AttnInputError(f"case {self.name}: shared_prefix must be a multiple of page_size, shorter than "
                                 "request 0's prompt and at most what request 0 holds after step 0")
        if self.strided and self.kv_seq_lens:
            raise AttnInputError(f"case {self.name}: strided (fused QKV) inputs need as many keys as queries")

    def _check_layers(self) -> None:
        if self.layer_spec.kv_dtype is not None and not self.cache:
            raise AttnInputError(f"case {self.name}: kv_dtype is the paged cache's dtype and needs cache=True")
        if len(self.layer_overrides) > self.num_layers:
            raise AttnInputError(f"case {self.name}: {len(self.layer_overrides)} layer_overrides for "
                                 f"{self.num_layers} layers")
        for overrides in self.layer_overrides:
            bad = [k for k, _ in overrides if k not in LAYER_OVERRIDABLE]
            if bad:
                raise AttnInputError(f"case {self.name}: layer_overrides may change {', '.join(LAYER_OVERRIDABLE)}, "
                                     f"not {', '.join(bad)}")
        for i in range(self.num_layers):
            try:
                self.layer(i)  # heads, dims, dtypes, masks, scales are checked there
            except AttnInputError as exc:
                raise AttnInputError(f"case {self.name}: {exc}") from None

    # -- layers -----------------------------------------------------------------------------------
    def layer(self, layer_idx: int = 0) -> LayerSpec:
        """The layer ``layer_idx``: the case's layer with that layer's overrides."""
        base = self.layer_spec
        fields = dict(dict(self.layer_overrides[layer_idx])) if layer_idx < len(self.layer_overrides) else {}
        if isinstance(fields.get("sinks"), bool):
            fields["sinks"] = sink_logits(base.num_heads) if fields["sinks"] else ()
        if base.kv_dtype is None and self.cache and fields.get("dtype", base.dtype) != base.dtype:
            fields["kv_dtype"] = base.dtype  # the cache keeps the case's dtype whatever a layer computes in
        return dataclasses.replace(base, layer_idx=layer_idx, **fields)

    def layers(self) -> list[LayerSpec]:
        return [self.layer(i) for i in range(self.num_layers)]

    def with_dtype(self, dtype) -> "BatchCase":
        return dataclasses.replace(self, layer_spec=dataclasses.replace(self.layer_spec, dtype=dtype_name(dtype)))

    @property
    def gen_tokens(self) -> int:
        """New tokens of a generation request per step: 1, or 1 + draft_tokens."""
        return 1 + self.draft_tokens

    @property
    def prefill_steps(self) -> int:
        if not self.chunk_size:
            return 1
        return max(pages_for(n, self.chunk_size) for n in self.seq_lens)

    @property
    def num_steps(self) -> int:
        return self.prefill_steps + self.decode_steps if self.cache else 1

    def _held_after_first_step(self, rid: int) -> int:
        n = self.seq_lens[rid]
        return min(n, self.chunk_size) if self.chunk_size else n

    def steps(self) -> Iterator[Step]:
        return iter(self._schedule)

    @cached_property
    def _schedule(self) -> tuple[Step, ...]:
        n = len(self.seq_lens)
        first = tuple(range(n))
        if not self.cache:
            return (Step(self.seq_lens, first, num_contexts=n, finished=first),)
        prompt = {rid: self.seq_lens[rid] for rid in first}  # prompt tokens not yet in the cache
        active = list(first)
        steps, finished_one = [], False
        for index in range(self.num_steps):
            shared = ()
            if index == 1:  # arrivals: joining prompts, and a request reusing request 0's prefix
                for j, length in enumerate(self.joining):
                    prompt[n + j] = length
                    active.append(n + j)
                if self.shared_prefix and 0 in active:
                    rid = n + len(self.joining)
                    prompt[rid] = self.seq_lens[0] - self.shared_prefix
                    active.append(rid)
                    shared = ((rid, 0, self.shared_prefix),)
            last = index == self.num_steps - 1
            ctx = [r for r in active if prompt[r] > 0]
            gen = [r for r in active if prompt[r] == 0]
            chunk = self.chunk_size or max(prompt.values())
            lens = tuple(min(chunk, prompt[r]) for r in ctx) + (self.gen_tokens,) * len(gen)
            for r in ctx:
                prompt[r] -= min(chunk, prompt[r])
            ids = tuple(ctx + gen)
            if last:
                done = ids
            elif gen and not finished_one and len(active) > 1:
                done, finished_one = (gen[0],), True
            else:
                done = ()
            steps.append(Step(lens, ids, num_contexts=len(ctx), finished=done, shared=shared))
            active = [r for r in ids if r not in done]
        return tuple(steps)

    @cached_property
    def _kv_lengths(self) -> dict[int, int]:
        """Tokens each request holds at the end (the longest key sequence it attends over)."""
        held: dict[int, int] = {}
        for step in self.steps():
            for new, source, tokens in step.shared:
                held[new] = tokens
            for rid, length in zip(step.request_ids, step.seq_lens):
                held[rid] = held.get(rid, 0) + length
        return held

    @property
    def max_tokens(self) -> int:
        """The longest key (or query) sequence any step has (sizes the cache and the CPU limit)."""
        if not self.cache:
            return max(self.seq_lens + self.kv_seq_lens)
        return max(self._kv_lengths.values())

    @property
    def total_tokens(self) -> int:
        return sum(sum(step.seq_lens) for step in self.steps()) * self.num_layers

    @property
    def work(self) -> float:
        """Attention score elements over all steps and layers (a cost estimate for scheduling)."""
        if not self.cache:
            keys = self.kv_seq_lens or self.seq_lens
            return float(sum(q * k for q, k in zip(self.seq_lens, keys)) * self.layer_spec.num_heads * self.num_layers)
        total, held = 0, {}
        for step in self.steps():
            for new, source, tokens in step.shared:
                held[new] = tokens
            for rid, length in zip(step.request_ids, step.seq_lens):
                held[rid] = held.get(rid, 0) + length
                total += length * held[rid]
        return float(total * self.layer_spec.num_heads * self.num_layers)

    def pages_needed(self) -> int:
        """Pages for every request's whole history, as if none were freed or shared, plus two spare."""
        return sum(pages_for(n, self.page_size) for n in self._kv_lengths.values()) + 2

    def describe(self) -> str:
        spec = self.layer_spec
        heads = f"{spec.num_heads}/{spec.num_kv_heads}x{spec.head_dim}"
        if spec.head_dim_vo:
            heads += f"/{spec.head_dim_vo}"
        cache = (f"paged {self.kv_layout} page {self.page_size}, {self.num_steps} steps" if self.cache else
                 ("no cache, kv_seq_lens=" + str(list(self.kv_seq_lens)) if self.kv_seq_lens else "no cache"))
        return f"{heads} {spec.dtype} {spec.mask} seq_lens={list(self.seq_lens)} {cache}"
