"""Does a backend give the same bits twice, and the same bits whatever else is in the batch?

**Determinism**: a batch run twice, output and LSE compared bitwise. A kernel that reduces in a
run-dependent order (atomics, a split chosen by timing) differs in the last bits.

**Batch invariance**: one request, the *needle*, with the same queries and keys every time, placed
at different positions in batches of different sizes and compositions (alone, beside short
requests, beside long ones, mixed with decodes), each batch planned anew; its rows compared bitwise
with its rows when alone. A split-KV decode whose split depends on the batch size, or a tile size
chosen by the batch's longest request, changes them.

Both are measured for every backend and reported (``pytest-attn properties``); they are required
only of a backend that declares them (``Capabilities.deterministic``, ``Capabilities.batch_invariant``).
Five case families cover what engines run: a prefill without a cache, a prefill on a paged cache,
decode, mixed prefill + decode, and speculative decoding (several new tokens per generation request).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from pytest_attn.check.harness import derive_seed, make_qkv
from pytest_attn.core.contract import Backend, LayerSpec
from pytest_attn.core.errors import UnsupportedCase
from pytest_attn.core.metadata import AttentionMetadata, pages_for

if TYPE_CHECKING:
    import torch

NEEDLE = "needle"


@dataclass(frozen=True)
class Request:
    """A request of a composed batch: ``key`` names it (its inputs derive from it, so the needle
    has the same numbers in every batch), ``cached`` tokens already in the cache, ``new`` this step."""

    key: str
    cached: int
    new: int


@dataclass(frozen=True)
class Family:
    """A case family: a layer, whether it runs on a paged cache, and batches that each hold the
    needle (the first is the needle alone: the baseline)."""

    name: str
    description: str
    cache: bool
    batches: tuple[tuple[Request, ...], ...]
    page_size: int = 16

    def largest(self) -> tuple[Request, ...]:
        return max(self.batches, key=lambda b: sum(r.new for r in b))


def _ctx(key, n):
    return Request(key, 0, n)


def _gen(key, cached, new=1):
    return Request(key, cached, new)


def families(long: int = 512) -> dict:
    """The five families; ``long`` is the length of the long requests beside the needle (larger on a
    GPU, where splits and tiles are chosen by length)."""
    needle_prefill = _ctx(NEEDLE, 37)
    needle_decode = _gen(NEEDLE, 300)
    needle_spec = _gen(NEEDLE, 120, 3)
    prefill_batches = (
        (needle_prefill,),
        (needle_prefill, _ctx("a", 5)),
        (_ctx("a", 3), needle_prefill),
        (_ctx("long0", long), _ctx("b", 9), needle_prefill, _ctx("c", 64)),
        (needle_prefill, *(_ctx(f"s{i}", 16) for i in range(7))),
    )
    decode_batches = (
        (needle_decode,),
        (_gen("a", 40), _gen("b", 7), needle_decode),
        (needle_decode, *(_gen(f"d{i}", 33 + i) for i in range(7))),
        (_gen("long0", 4 * long), needle_decode, _gen("c", 5)),
        (*(_gen(f"d{i}", 17 * i + 3) for i in range(15)), needle_decode),
    )
    mixed_batches = (
        (needle_decode,),
        (_ctx("p0", 64), needle_decode),
        (_ctx("p0", long), _ctx("p1", 17), _gen("a", 40), needle_decode, _gen("b", 2 * long)),
        (_ctx("p0", 5), needle_decode, *(_gen(f"d{i}", 20 + i) for i in range(6))),
    )
    spec_batches = (
        (needle_spec,),
        (needle_spec, _gen("a", 30, 3), _gen("b", 90, 3)),
        (_ctx("p0", 48), _gen("a", 2 * long, 3), needle_spec),
        (*(_gen(f"d{i}", 11 * i + 5, 3) for i in range(7)), needle_spec),
    )
    return {f.name: f for f in (
        Family("prefill", "a prefill without a cache (ragged, the ViT encoder's path)", False, prefill_batches),
        Family("paged-prefill", "a prefill on a paged cache", True, prefill_batches),
        Family("decode", "one-token generation requests on a paged cache", True, decode_batches),
        Family("mixed", "context requests and decodes in one batch", True, mixed_batches),
        Family("spec-decode", "generation requests of 3 new tokens (speculative decoding)", True, spec_batches),
    )}


FAMILIES = tuple(families())
#: The long requests of the suite's per-case batches on a GPU (the command's default is 2048): each of
#: the catalog's cases runs them on every backend, and their inputs are drawn on the CPU.
SUITE_LONG_CUDA = 512


def default_layer(device, return_lse: bool = False) -> LayerSpec:
    """What the properties run with: an LLM layer on a GPU (32/8 heads x 128, bf16, causal), a small
    one on CPU."""
    if str(device).startswith("cuda"):
        return LayerSpec(32, 8, 128, "bfloat16", "causal", return_lse=return_lse)
    return LayerSpec(8, 2, 64, "bfloat16", "causal", return_lse=return_lse)


# -- building a composed batch -------------------------------------------------------------------------
@dataclass
class Composed:
    """A batch built from requests, with the row range of each request in its q/out."""

    metadata: AttentionMetadata
    q: "torch.Tensor"
    k: "torch.Tensor"
    v: "torch.Tensor"
    rows: dict  # key -> slice of q/out rows

    def describe(self) -> str:
        return self.metadata.describe()


def _request_inputs(request: Request, layer: LayerSpec, device, seed: int, part: str, n: int):
    return make_qkv(n, layer, device, derive_seed(seed, "properties", request.key, request.cached, request.new, part))


def compose(requests: Sequence[Request], layer: LayerSpec, *, cache: bool, device, seed: int = 0,
            page_size: int = 16, layout: str = "NHD", scramble: int = 0) -> Composed:
    """A batch of ``requests`` (context requests first, as the metadata wants them); each request's
    queries, keys and history derive from its key alone, so the needle holds the same numbers in
    every batch. ``scramble`` places the pages differently."""
    import torch

    from pytest_attn.core.kv_cache import PagedKVCacheManager

    ordered = [r for r in requests if r.cached == 0] + [r for r in requests if r.cached]
    if not cache:
        if any(r.cached for r in ordered):
            raise ValueError("requests with cached tokens need a cache")
        metadata = AttentionMetadata.ragged([r.new for r in ordered])
    else:
        pages = sum(pages_for(r.cached + r.new, page_size) for r in ordered) + 1
        manager = PagedKVCacheManager(num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
                                      head_dim_v=layer.head_dim_v, page_size=page_size, num_pages=pages,
                                      dtype=layer.cache_dtype, device=device, layout=layout,
                                      scramble_seed=scramble)
        ids = list(range(len(ordered)))
        prior = [i for i in ids if ordered[i].cached]
        if prior:  # each generation request's history, written through the cache itself
            md0 = manager.prepare([ordered[i].cached for i in prior], prior, num_contexts=len(prior))
            history = [_request_inputs(ordered[i], layer, device, seed, "history", ordered[i].cached) for i in prior]
            manager.write(0, md0, torch.cat([h[1] for h in history]), torch.cat([h[2] for h in history]),
                          k_scale=layer.k_scale, v_scale=layer.v_scale)
        contexts = sum(1 for r in ordered if r.cached == 0)
        metadata = manager.prepare([r.new for r in ordered], ids, num_contexts=contexts)
    inputs = [_request_inputs(r, layer, device, seed, "new", r.new) for r in ordered]
    q, k, v = (torch.cat([t[i] for t in inputs]) for i in range(3))
    rows, start = {}, 0
    for r in ordered:
        rows[r.key] = slice(start, start + r.new)
        start += r.new
    return Composed(metadata, q, k, v, rows)


def run_composed(backend: Backend, batch: Composed, layer: LayerSpec, device):
    """(plan, out, lse) of one forward of the batch, planned anew."""
    from pytest_attn.check.case_steps import forward_once

    return forward_once(backend, batch.q, batch.k, batch.v, batch.metadata, layer, device)


# -- the measurements ------------------------------------------------------------------------------------
def bitwise_diff(a: "torch.Tensor", b: "torch.Tensor") -> tuple[int, float]:
    """(elements whose bits differ, the largest absolute difference; inf where only one is finite)."""
    import torch

    if a.shape != b.shape:
        return max(a.numel(), b.numel()), math.inf
    if a.is_floating_point() and a.element_size() in (2, 4, 8):
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        differs = a.contiguous().view(view) != b.contiguous().view(view)
    else:
        differs = a != b
    count = int(differs.sum())
    if not count:
        return 0, 0.0
    da, db = a.float()[differs], b.float()[differs]
    both = torch.isfinite(da) & torch.isfinite(db)
    biggest = float((da[both] - db[both]).abs().max()) if bool(both.any()) else 0.0
    return count, (math.inf if not bool(both.all()) else biggest)


@dataclass
class Measurement:
    """One property of one backend on one family: ``holds`` True/False as measured, None when the
    backend cannot run the family (``reason``); ``declared`` what it declares; ``differences`` what differed."""

    backend: str
    family: str
    prop: str  # "deterministic" or "batch_invariant"
    holds: Optional[bool]
    declared: Optional[bool] = None
    differences: list = field(default_factory=list)
    reason: str = ""
    plans: list = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Declared and measured otherwise."""
        return self.declared is True and self.holds is False

    def text(self) -> str:
        if self.holds is None:
            return f"n/a ({self.reason})"
        word = "yes" if self.holds else "NO"
        declared = "" if self.declared is None else (" (declared)" if self.declared else " (declared not)")
        return word + declared

    def as_dict(self) -> dict:
        return {"backend": self.backend, "family": self.family, "property": self.prop, "holds": self.holds,
                "declared": self.declared, "failed": self.failed, "differences": list(self.differences),
                "reason": self.reason, "plans": list(self.plans),
                "detail": self.differences[0] if self.differences else ""}


def _lse_layer(backend: Backend, device) -> LayerSpec:
    return default_layer(device, return_lse=backend.capabilities.lse_base is not None)


def measure_determinism(backend: Backend, family: Family, *, device, seed: int = 0, repeats: int = 2,
                        layer: Optional[LayerSpec] = None) -> Measurement:
    """The family's largest batch run ``repeats`` times (each planned anew, on a cache built anew),
    output and LSE compared bitwise with the first run."""
    declared = backend.capabilities.deterministic
    layers = [layer] if layer is not None else [_lse_layer(backend, device), default_layer(device)]
    last_reason = ""
    for chosen in dict.fromkeys(layers):  # with the LSE where the backend returns one; else without
        try:
            runs = []
            for _ in range(repeats):
                batch = compose(family.largest(), chosen, cache=family.cache, device=device, seed=seed,
                                page_size=family.page_size)
                runs.append(run_composed(backend, batch, chosen, device))
        except UnsupportedCase as exc:
            last_reason = "; ".join(exc.reasons)
            continue
        differences = []
        for i, (_, out, lse) in enumerate(runs[1:], start=2):
            count, biggest = bitwise_diff(runs[0][1], out)
            if count:
                differences.append(f"run {i}: {count} output element(s) differ from run 1 (max |diff| {biggest:.3e})")
            if lse is not None:
                count, biggest = bitwise_diff(runs[0][2], lse)
                if count:
                    differences.append(f"run {i}: {count} LSE element(s) differ from run 1 (max |diff| {biggest:.3e})")
        return Measurement(backend.name, family.name, "deterministic", not differences, declared, differences,
                           plans=[runs[0][0].describe()])
    return Measurement(backend.name, family.name, "deterministic", None, declared, reason=last_reason)


def measure_batch_invariance(backend: Backend, family: Family, *, device, seed: int = 0,
                             layer: Optional[LayerSpec] = None, layout: str = "NHD") -> Measurement:
    """The needle's rows in every batch of the family against its rows alone, bitwise; each batch
    planned anew and its pages placed differently."""
    declared = backend.capabilities.batch_invariant
    layer = layer or default_layer(device)
    baseline, differences, plans, ran = None, [], [], 0
    reasons = []
    for index, requests in enumerate(family.batches):
        batch = compose(requests, layer, cache=family.cache, device=device, seed=seed, page_size=family.page_size,
                        layout=layout, scramble=index)
        try:
            plan, out, _ = run_composed(backend, batch, layer, device)
        except UnsupportedCase as exc:
            if index == 0:
                return Measurement(backend.name, family.name, "batch_invariant", None, declared,
                                   reason="; ".join(exc.reasons))
            reasons.append(f"batch {index + 1} ({batch.describe()}) skipped: {'; '.join(exc.reasons)}")
            continue
        rows = out[batch.rows[NEEDLE]]
        plans.append(plan.describe())
        if baseline is None:
            baseline = rows.clone()
            continue
        ran += 1
        count, biggest = bitwise_diff(baseline, rows)
        if count:
            where = [k for k in batch.rows].index(NEEDLE)
            differences.append(f"in {batch.describe()} (needle at position {where}): {count} element(s) differ from "
                               f"the needle alone (max |diff| {biggest:.3e})")
    if not ran:
        return Measurement(backend.name, family.name, "batch_invariant", None, declared,
                           reason="no batch beside the needle ran: " + "; ".join(reasons))
    return Measurement(backend.name, family.name, "batch_invariant", not differences, declared, differences,
                       reason="; ".join(reasons), plans=list(dict.fromkeys(plans)))


@dataclass
class PropertyRow:
    """One backend on one family: both measurements, and the kernels its largest batch ran."""

    backend: str
    family: str
    deterministic: Measurement
    batch_invariant: Measurement
    kernels: str = ""

    def as_dict(self) -> dict:
        return {"backend": self.backend, "family": self.family, "deterministic": self.deterministic.as_dict(),
                "batch_invariant": self.batch_invariant.as_dict(), "kernels": self.kernels}


def measure(backend: Backend, family: Family, *, device, seed: int = 0, with_kernels: bool = True) -> PropertyRow:
    """Both properties of ``backend`` on ``family``, and (``with_kernels``) the kernels of one forward
    of its largest batch."""
    det = measure_determinism(backend, family, device=device, seed=seed)
    inv = measure_batch_invariance(backend, family, device=device, seed=seed)
    kernels = ""
    if with_kernels and det.holds is not None:
        kernels = kernels_of(backend, family, device=device, seed=seed)
    return PropertyRow(backend.name, family.name, det, inv, kernels)


def kernels_of(backend: Backend, family: Family, *, device, seed: int = 0) -> str:
    """The attention kernels one forward of the family's largest batch launched (warm), in one line."""
    from pytest_attn.check.case_steps import forward_once
    from pytest_attn.check.traces import record

    layer = default_layer(device)
    batch = compose(family.largest(), layer, cache=family.cache, device=device, seed=seed, page_size=family.page_size)
    traces = []

    def around(index, plan, call):
        if str(device).startswith("cuda"):
            call()
        traces.append(record(call, device))

    try:
        forward_once(backend, batch.q, batch.k, batch.v, batch.metadata, layer, device, around)
    except UnsupportedCase as exc:
        return f"n/a ({'; '.join(exc.reasons)})"
    return traces[0].summary() if traces else ""


def problems(rows: Sequence[PropertyRow]) -> list[str]:
    """A declared property measured false, one line each."""
    out = []
    for row in rows:
        for m in (row.deterministic, row.batch_invariant):
            if m.failed:
                out.append(f"{row.backend} declares {m.prop} but on {row.family}: " + "; ".join(m.differences[:3]))
    return out


def table(rows: Sequence[PropertyRow]) -> list[str]:
    """A Markdown table: backend x family, deterministic, batch-invariant, kernels."""
    lines = ["| backend | family | deterministic | batch-invariant | kernels |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.backend} | {r.family} | {r.deterministic.text()} | {r.batch_invariant.text()} | "
                     f"{r.kernels.replace('|', '/')} |")
    return lines


def assert_property(m: Measurement) -> None:
    """Raise AttnCheckFailure when a declared property was measured false."""
    __tracebackhide__ = True
    from pytest_attn.core.errors import AttnCheckFailure

    if m.failed:
        summary = f"{m.backend} declares {m.prop}={m.declared} but {m.family}: {m.differences[0]}"
        raise AttnCheckFailure("\n".join([summary, *(f"- {d}" for d in m.differences)]), summary=summary)


# -- per catalog case (the suite) ----------------------------------------------------------------------
def family_of_case(case) -> str:
    """The family whose batches a catalog case's kind of step fits: no cache -> prefill; speculative
    or mixed steps -> spec-decode or mixed; decode steps -> decode; otherwise a paged prefill."""
    tags = set(case.tags)
    if not case.cache:
        return "prefill"
    if "spec-decode" in tags:
        return "spec-decode"
    if "mixed" in tags:
        return "mixed"
    return "decode" if case.decode_steps else "paged-prefill"


def measure_case_determinism(backend: Backend, case, *, device, seed: int = 0) -> Measurement:
    """Every step of ``case`` run twice (a cache built anew each time), output and LSE compared
    bitwise step by step. UnsupportedCase propagates: the case cannot run at all."""
    from pytest_attn.check.case_steps import forward_steps

    first = [(s.out.clone(), None if s.lse is None else s.lse.clone()) for s in
             forward_steps(backend, case, device=device, seed=seed)]
    differences, plans = [], []
    for i, step in enumerate(forward_steps(backend, case, device=device, seed=seed)):
        plans.append(step.plan.describe())
        for what, a, b in (("output", first[i][0], step.out), ("LSE", first[i][1], step.lse)):
            if a is None or b is None:
                continue
            count, biggest = bitwise_diff(a, b)
            if count:
                differences.append(f"step {step.index}{f' layer {step.layer_idx}' if step.layer_idx else ''}: "
                                   f"{count} {what} element(s) differ between two runs (max |diff| {biggest:.3e})")
    return Measurement(backend.name, case.name, "deterministic", not differences, backend.capabilities.deterministic,
                       differences, plans=list(dict.fromkeys(plans)))


def measure_case_batch_invariance(backend: Backend, case, *, device, seed: int = 0) -> Measurement:
    """The batches of the case's family (:func:`family_of_case`) with the case's layer, the needle's
    rows compared bitwise with its rows alone."""
    long = SUITE_LONG_CUDA if str(device).startswith("cuda") else 96
    family = dataclasses.replace(families(long)[family_of_case(case)], page_size=case.page_size if case.cache else 16)
    layer = case.layer(0)
    m = measure_batch_invariance(backend, family, device=device, seed=seed, layer=layer, layout=case.kv_layout)
    m.family = f"{case.name} ({family.name} batches)"
    return m
