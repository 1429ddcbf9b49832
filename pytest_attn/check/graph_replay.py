"""Correctness under CUDA-graph replay: the decode step an engine captures once and replays every
step after, with the metadata updated in place (new lengths, page tables, a smaller live batch).

The bugs of this class are silent and need several replays to show: decode plans never refreshed
under replay (TensorRT-LLM PR #18769: batch size 1 looked fine), padded CTAs reading scheduler
entries nothing wrote (flashinfer #4002), a compiled graph reused after a change it baked in
(flashinfer PR #4146). So a scenario here prefills a few requests eagerly, captures one decode
step through the backend's ``graph_decoder`` (see :meth:`Backend.graph_decoder`), and replays it
for several steps while requests grow across page boundaries and one finishes, comparing every
replay's live rows with the reference. Only the attention is captured: each step's new K/V are
written into the cache before its replay, as an engine's fused append kernel would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from pytest_attn.core import calls as guard
from pytest_attn.core.contract import Backend, LayerSpec
from pytest_attn.core.errors import AttnError, UnsupportedCase
from pytest_attn.check.harness import References, compare_to, derive_seed, make_qkv, references, run_forward, split_tokens
from pytest_attn.core.kv_cache import PagedKVCacheManager
from pytest_attn.core.metadata import pages_for
from pytest_attn.check.reference import Comparison

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GraphScenario:
    """Requests prefilled eagerly, then ``steps`` replays of one captured decode step; request
    ``finish_after`` (an index) finishes after that many steps, so later replays have a smaller live
    batch (padded) and a page table with a freed request's pages gone."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    prompts: tuple[int, ...] = (33, 17, 64, 9)
    page_size: int = 16
    kv_layout: str = "NHD"
    steps: int = 6
    finish_after: int = 2
    window_left: int = -1
    dtype: str = "bfloat16"

    def layer(self) -> LayerSpec:
        return LayerSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.dtype, "causal",
                         window_left=self.window_left)

    def pages_needed(self) -> int:
        return sum(pages_for(n + self.steps, self.page_size) for n in self.prompts) + 2


SCENARIOS = {s.name: s for s in [
    GraphScenario("decode-gqa4-hd128", 32, 8, 128),
    GraphScenario("decode-gqa4-hd128-hnd", 32, 8, 128, kv_layout="HND"),
    GraphScenario("decode-gqa8-hd64-window", 16, 2, 64, window_left=20, prompts=(40, 9, 33, 17)),
]}


@dataclass
class Replay:
    step: int
    live: int
    comparison: Comparison

    @property
    def passed(self) -> bool:
        return self.comparison.passed


def run_graph_decode(backend: Backend, scenario: GraphScenario, *, device, seed: int = 0,
                     decoder_hook=None) -> list[Replay]:
    """The scenario through ``backend``: prefill eagerly (checked like any step), capture one decode
    step of the backend's graph decoder, replay it step after step; each replay compared with the
    reference. ``decoder_hook(decoder)`` may wrap the decoder (to test that a stale plan fails).
    UnsupportedCase when the backend offers no graph decoder for this layer."""
    import torch

    layer = scenario.layer()
    guard.require_supported(backend, layer, _probe_metadata(scenario, device), str(device))
    manager = PagedKVCacheManager(num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
                                  page_size=scenario.page_size, num_pages=scenario.pages_needed(), dtype=layer.dtype,
                                  device=device, layout=scenario.kv_layout,
                                  scramble_seed=derive_seed(seed, scenario.name, "pages"))
    ids = list(range(len(scenario.prompts)))
    history: dict[int, tuple[list, list]] = {}
    prefill = manager.prepare(scenario.prompts, ids, num_contexts=len(ids))
    q, k, v = make_qkv(prefill.num_tokens, layer, device, derive_seed(seed, scenario.name, "prefill"))
    _remember(history, prefill, k, v)
    result = run_forward(backend, q, k, v, prefill, layer, device)
    comparison = compare_to(backend, result, _refs(q, history, prefill, layer), prefill, layer)
    replays = [Replay(0, len(ids), comparison)]
    decoder = graph_decoder(backend, manager, layer, len(ids), device)
    if decoder_hook is not None:
        decoder = decoder_hook(decoder)
    q_static = torch.zeros((len(ids), layer.num_heads, layer.head_dim), dtype=q.dtype, device=device)
    out_static = torch.zeros_like(q_static)
    graph = None
    live = list(ids)
    for step in range(1, scenario.steps + 1):
        md = manager.prepare([1] * len(live), live, num_contexts=0)
        q, k, v = make_qkv(md.num_tokens, layer, device, derive_seed(seed, scenario.name, "decode", step))
        _remember(history, md, k, v)
        manager.write(layer.layer_idx, md, k, v)
        decoder.plan(md)  # outside the capture: the step's lengths and page table into fixed buffers
        q_static.zero_()
        q_static[: len(live)] = q
        out_static.fill_(float("nan"))  # a replay that writes nothing cannot pass
        if graph is None:
            graph = _capture(lambda: decoder.run(q_static, out_static), device)
        graph.replay()
        torch.cuda.synchronize(device)
        out = out_static[: len(live)].clone()
        comparison = compare_to(backend, _as_forward(md, out), _refs(q, history, md, layer), md, layer)
        replays.append(Replay(step, len(live), comparison))
        if step == scenario.finish_after:  # a request finishes: the live batch shrinks, its pages go back
            gone = live.pop(1)
            manager.free(gone)
            history.pop(gone)
    return replays


class CheckedDecoder:
    """A backend's graph decoder whose plan() and run() name the backend when they raise (as guard
    does for the backend's own methods), so that a broken decoder fails its own test, saying whose."""

    def __init__(self, backend: Backend, decoder):
        self.backend, self.decoder = backend, decoder

    def plan(self, metadata):
        return self._call("plan", metadata)

    def run(self, q, out):
        return self._call("run", q, out)

    def _call(self, method: str, *args):
        __tracebackhide__ = True
        try:
            return getattr(self.decoder, method)(*args)
        except (AttnError, AssertionError):
            raise
        except Exception as exc:
            raise guard.BackendError(f"{guard.who(self.backend)} raised in graph_decoder().{method}(): "
                                     f"{type(exc).__name__}: {exc}. This is a bug in the backend, not in pytest-attn: "
                                     f"fix its graph decoder's {method}() (the traceback above shows where)") from exc


def graph_decoder(backend: Backend, manager, layer: LayerSpec, max_batch: int, device) -> CheckedDecoder:
    """The backend's graph decoder, checked: UnsupportedCase where it offers none (None); a
    BackendError naming it where graph_decoder() raises or returns something without plan() and run()."""
    __tracebackhide__ = True
    decoder = guard.call(backend, "graph_decoder", manager, layer, max_batch, device)
    if decoder is None:
        raise UnsupportedCase(backend.name, ["offers no CUDA-graph decode path (graph_decoder returns None)"])
    missing = [m for m in ("plan", "run") if not callable(getattr(decoder, m, None))]
    if missing:
        raise guard.BackendError(f"{guard.who(backend)}: graph_decoder() returned {decoder!r}, which has no "
                                 f"{' or '.join(m + '()' for m in missing)}; return None, or an object with "
                                 "plan(metadata) and run(q, out) (see Backend.graph_decoder)")
    return CheckedDecoder(backend, decoder)


def _probe_metadata(scenario: GraphScenario, device):
    manager = PagedKVCacheManager(num_kv_heads=scenario.num_kv_heads, head_dim=scenario.head_dim,
                                  page_size=scenario.page_size, num_pages=scenario.pages_needed(),
                                  dtype=scenario.dtype, device="meta", layout=scenario.kv_layout)
    return manager.prepare(scenario.prompts, list(range(len(scenario.prompts))))


def _remember(history, metadata, k, v) -> None:
    for rid, kk, vv in zip(metadata.request_ids, split_tokens(k, metadata.seq_lens), split_tokens(v, metadata.seq_lens)):
        ks, vs = history.setdefault(rid, ([], []))
        ks.append(kk)
        vs.append(vv)


def _refs(q, history, metadata, layer) -> References:
    import torch

    keys = [torch.cat(history[rid][0]) for rid in metadata.request_ids]
    values = [torch.cat(history[rid][1]) for rid in metadata.request_ids]
    return references(q, keys, values, metadata, layer)


def _as_forward(metadata, out):
    from pytest_attn.check.harness import Forward

    return Forward(None, out)


def _capture(fn, device):
    """A CUDA graph of ``fn``, after a warm call on a side stream (JIT loads, lazy allocations)."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph


def stale_plan(decoder):
    """Wrap a graph decoder so that only its first plan() reaches it: the capture-time plan is reused
    for every later replay (TensorRT-LLM PR #18769). A correct test of graph replay must fail it."""

    class Stale:
        def __init__(self):
            self.planned: Optional[object] = None

        def plan(self, metadata):
            if self.planned is None:
                self.planned = decoder.plan(metadata)
            return self.planned

        def run(self, q, out):
            decoder.run(q, out)

    return Stale()
