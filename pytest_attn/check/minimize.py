"""Shrink a failing case to a small one that fails the same way (``pytest-attn minimize``).

"The same way" is the failure's :class:`Failure` signature: a wrong answer (AttnCheckFailure) stays a
wrong answer first seen on the same kind of step (prefill, decode, a mixed step of both, or a batch
without a cache), and a backend error stays an error of the same exception type. A candidate the
backend refuses (UnsupportedCase) or the case model rejects does not fail.

The search is greedy and runs these passes in this order, again and again until a whole round
changes nothing; each pass keeps every change after which the case still fails the same way:

1. layers: drop one layer at a time (with its override);
2. requests: drop each joining prompt, the shared prefix, then each request;
3. decode steps: fewer (0, else halve while failing, then bisect);
4. schedule features: no chunking, fewer draft tokens, no solo check;
5. layer features: no layer overrides, window, soft-cap, sinks, LSE, separate V head dim, custom
   scale or cache dtype; contiguous inputs, unit input scale, no logit shift;
6. lengths: each prompt, joining prompt and cross-attention key length: 1 if that still fails, else
   halved while it fails, then bisected between the last passing and failing lengths (so the result
   fails and one token less passes);
7. heads: halve query and KV heads together (the GQA ratio kept), then lower the ratio;
8. pages: smaller page size (as lengths).

Passes 1-5 make the case cheap before the numeric ones run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

from pytest_attn.cases.case import BatchCase, sink_logits
from pytest_attn.core import calls
from pytest_attn.core.contract import Backend
from pytest_attn.core.errors import AttnCheckFailure, AttnInputError, UnsupportedCase


@dataclass(frozen=True)
class Failure:
    """What kind of failure a case shows: ``kind`` is "wrong" (the output or a contract check) or
    "error: ExceptionType" (the backend raised); ``step`` the kind of the first wrong step, when known."""

    kind: str
    step: Optional[str]
    summary: str = field(compare=False)

    def same_as(self, other: "Failure") -> bool:
        return self.kind == other.kind and (self.step == other.step or None in (self.step, other.step))


def step_kind(metadata) -> str:
    if not metadata.has_cache:
        return "no-cache"
    contexts, requests = metadata.num_contexts, metadata.num_requests
    return "prefill" if contexts == requests else "decode" if contexts == 0 else "mixed"


def failure_of(backend: Backend, case: BatchCase, device: str = "cpu", seed: int = 0) -> Optional[Failure]:
    """How the case fails on the backend, or None when it passes (or the backend cannot run it)."""
    from pytest_attn.check.harness import assert_case_passes, run_case

    results: list = []
    try:
        results = run_case(backend, case, device=device, seed=seed)
        assert_case_passes(results, backend, case)
    except (UnsupportedCase, AttnInputError):
        return None
    except AttnCheckFailure as exc:
        wrong = [r for r in results if not r.passed]
        return Failure("wrong", step_kind(wrong[0].metadata) if wrong else None, exc.summary)
    except calls.BackendError as exc:
        cause = exc.__cause__ or exc.__context__
        return Failure(f"error: {type(cause or exc).__name__}", None, str(exc).splitlines()[0])
    return None


def runs_every_step(backend: Backend, case: BatchCase, device: str = "cpu") -> bool:
    """Whether the backend says it runs every step and layer of the case (its unsupported() is
    empty everywhere): a fuzz draw it refuses is redrawn."""
    from pytest_attn.check.harness import step_metadata

    try:
        return not any(calls.unsupported(backend, case.layer(i), metadata, device)
                       for metadata in step_metadata(case) for i in range(case.num_layers))
    except calls.BackendError:
        return False


@dataclass
class Minimized:
    original: BatchCase
    case: BatchCase
    failure: Failure
    runs: int
    changes: list[str]


def _replace(case: BatchCase, **fields) -> BatchCase:
    """The case with these fields changed (layer fields go to its LayerSpec); AttnInputError if invalid."""
    layer = {k: fields.pop(k) for k in list(fields) if k in {f.name for f in dataclasses.fields(case.layer_spec)}}
    spec = dataclasses.replace(case.layer_spec, **layer) if layer else case.layer_spec
    return BatchCase(case.name, layer_spec=spec, seq_lens=fields.pop("seq_lens", case.seq_lens),
                     **{f.name: fields.get(f.name, getattr(case, f.name)) for f in dataclasses.fields(case)
                        if f.name not in ("name", "layer_spec", "seq_lens")})


class _Search:
    def __init__(self, fails: Callable[[BatchCase], bool], log: Callable[[str], None]):
        self.fails, self.log = fails, log
        self.changes: list[str] = []

    def attempt(self, case: BatchCase, what: str, **fields) -> Optional[BatchCase]:
        try:
            candidate = _replace(case, **fields)
        except (AttnInputError, TypeError, ValueError):
            return None
        if candidate == case or not self.fails(candidate):
            return None
        self.changes.append(what)
        self.log(what)
        return candidate

    def number(self, case: BatchCase, what: str, value: int, least: int, make: Callable[[int], dict]) -> BatchCase:
        """Shrink one number: ``least`` if that fails, else halve while failing, then bisect."""
        if value <= least:
            return case
        found = self.attempt(case, f"{what} {value} -> {least}", **make(least))
        if found is not None:
            return found
        lo, hi, current = least, value, case  # lo passes (or is invalid), hi fails
        half = value // 2
        while half > least:
            found = self.attempt(current, f"{what} {hi} -> {half}", **make(half))
            if found is None:
                lo = half
                break
            current, hi, half = found, half, half // 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            found = self.attempt(current, f"{what} {hi} -> {mid}", **make(mid))
            if found is None:
                lo = mid
            else:
                current, hi = found, mid
        return current


def _without(values: tuple, index: int) -> tuple:
    return values[:index] + values[index + 1:]


def _layers(s: _Search, case: BatchCase) -> BatchCase:
    i = 0
    while i < case.num_layers and case.num_layers > 1:
        overrides = _without(case.layer_overrides, i) if i < len(case.layer_overrides) else case.layer_overrides
        found = s.attempt(case, f"drop layer {i} of {case.num_layers}", num_layers=case.num_layers - 1,
                          layer_overrides=overrides[:case.num_layers - 1])
        case, i = (found, i) if found is not None else (case, i + 1)
    return case


def _requests(s: _Search, case: BatchCase) -> BatchCase:
    i = 0
    while i < len(case.joining):
        found = s.attempt(case, f"drop joining prompt {i} (of {len(case.joining)})", joining=_without(case.joining, i))
        case, i = (found, i) if found is not None else (case, i + 1)
    if case.shared_prefix:
        case = s.attempt(case, "drop the shared prefix", shared_prefix=0) or case
    i = 0
    while i < len(case.seq_lens) and len(case.seq_lens) > 1:
        kv = {"kv_seq_lens": _without(case.kv_seq_lens, i)} if case.kv_seq_lens else {}
        found = s.attempt(case, f"drop request {i} (of {len(case.seq_lens)})", seq_lens=_without(case.seq_lens, i),
                          **kv)
        case, i = (found, i) if found is not None else (case, i + 1)
    return case


def _steps(s: _Search, case: BatchCase) -> BatchCase:
    return s.number(case, "decode steps", case.decode_steps, 0, lambda n: {"decode_steps": n})


def _schedule_features(s: _Search, case: BatchCase) -> BatchCase:
    if case.chunk_size:
        case = s.attempt(case, "no chunked prefill", chunk_size=0) or case
    case = s.number(case, "draft tokens", case.draft_tokens, 0, lambda n: {"draft_tokens": n})
    if case.check_solo:
        case = s.attempt(case, "no solo check", check_solo=False) or case
    return case


#: (what, field, the plain value) for pass 5.
_PLAIN_LAYER = (("no sliding window", "window_left", -1), ("no soft-cap", "logits_soft_cap", 0.0),
                ("no sinks", "sinks", ()), ("no LSE", "return_lse", False),
                ("V head dim = head dim", "head_dim_vo", None),
                ("default softmax scale", "sm_scale", None))
_PLAIN_CASE = (("contiguous inputs", "strided", False), ("input scale 1", "input_scale", 1.0),
               ("no logit shift", "logit_shift", 0.0))


def _layer_features(s: _Search, case: BatchCase) -> BatchCase:
    if any(case.layer_overrides):
        case = s.attempt(case, "no layer overrides", layer_overrides=()) or case
    for what, name, plain in _PLAIN_LAYER:
        if getattr(case.layer_spec, name) != plain:
            case = s.attempt(case, what, **{name: plain}) or case
    if case.layer_spec.kv_dtype is not None:
        case = s.attempt(case, "cache in the layer's dtype", kv_dtype=None, k_scale=1.0, v_scale=1.0) or case
    for what, name, plain in _PLAIN_CASE:
        if getattr(case, name) != plain:
            case = s.attempt(case, what, **{name: plain}) or case
    return case


def _lengths(s: _Search, case: BatchCase) -> BatchCase:
    for name in ("seq_lens", "joining", "kv_seq_lens"):
        for i in range(len(getattr(case, name))):
            values = getattr(case, name)  # only entry i changes while it shrinks
            case = s.number(case, f"{name}[{i}]", values[i], min(values[i], 1),
                            lambda n, v=values, i=i, name=name: {name: v[:i] + (n,) + v[i + 1:]})
    return case


def _sinks_for(case: BatchCase, heads: int) -> tuple:
    sinks = case.layer_spec.sinks
    if not sinks:
        return ()
    return sink_logits(heads) if sinks == sink_logits(case.layer_spec.num_heads) else sinks[:heads]


def _heads(s: _Search, case: BatchCase) -> BatchCase:
    spec = case.layer_spec
    while spec.num_kv_heads > 1 and spec.num_kv_heads % 2 == 0 and spec.num_heads % 2 == 0:
        h, kv = spec.num_heads // 2, spec.num_kv_heads // 2
        found = s.attempt(case, f"heads {spec.num_heads}/{spec.num_kv_heads} -> {h}/{kv}", num_heads=h,
                          num_kv_heads=kv, sinks=_sinks_for(case, h))
        if found is None:
            break
        case, spec = found, found.layer_spec
    ratio = spec.group_size
    for smaller in [r for r in range(1, ratio) if ratio % r == 0]:  # the smallest ratio that still fails
        h = smaller * spec.num_kv_heads
        found = s.attempt(case, f"heads {spec.num_heads}/{spec.num_kv_heads} -> {h}/{spec.num_kv_heads}",
                          num_heads=h, sinks=_sinks_for(case, h))
        if found is not None:
            return found
    return case


def _pages(s: _Search, case: BatchCase) -> BatchCase:
    if not case.cache:
        return case
    return s.number(case, "page size", case.page_size, 1, lambda n: {"page_size": n})


#: The passes, in the order the module docstring gives.
PASSES = (_layers, _requests, _steps, _schedule_features, _layer_features, _lengths, _heads, _pages)


def minimize(backend: Backend, case: BatchCase, *, device: str = "cpu", seed: int = 0, name: Optional[str] = None,
             log: Callable[[str], None] = lambda line: None, max_rounds: int = 20) -> Optional[Minimized]:
    """The smallest case found that fails like ``case`` on ``backend`` (named ``name``, by default
    ``<case>-min``), or None when ``case`` does not fail to begin with."""
    original = failure_of(backend, case, device, seed)
    if original is None:
        return None
    renamed = dataclasses.replace(case, name=name or f"{case.name}-min")
    start = renamed if _same(failure_of(backend, renamed, device, seed), original) else case  # inputs follow the name
    runs = [0]  # candidates run (each once)
    seen: dict[BatchCase, bool] = {start: True}

    def fails(candidate: BatchCase) -> bool:
        if candidate not in seen:
            runs[0] += 1
            seen[candidate] = _same(failure_of(backend, candidate, device, seed), original)
        return seen[candidate]

    search = _Search(fails, log)
    current = start
    for _ in range(max_rounds):
        before = current
        for shrink in PASSES:
            current = shrink(search, current)
        if current == before:
            break
    final = failure_of(backend, current, device, seed)
    description = f"minimized from {case.name} for {backend.name}: {final.summary}"
    current = dataclasses.replace(current, description=description[:300])
    return Minimized(case, current, final, runs[0] + 3, search.changes)  # + the original, renamed, final


def _same(found: Optional[Failure], original: Failure) -> bool:
    return found is not None and found.same_as(original)

