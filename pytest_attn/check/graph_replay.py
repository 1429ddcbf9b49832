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
from pytest_attn.check.harness import References, compare_to, derive_seed, make_qkv, references, run_forward
from pytest_attn.check.history import KVHistory
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
    pad_to: int = 0  # capture this many requests: more than the prompts pads past the live batch from the start
    hostile: bool = False  # NaN padded queries, and another batch planned and run between each plan and replay

    @property
    def max_batch(self) -> int:
        return max(len(self.prompts), self.pad_to)

    def layer(self) -> LayerSpec:
        return LayerSpec(self.num_heads, self.num_kv_heads, self.head_dim, self.dtype, "causal",
                         window_left=self.window_left)

    def pages_needed(self) -> int:
        return sum(pages_for(n + self.steps, self.page_size) for n in self.prompts) + 2


SCENARIOS = {s.name: s for s in [
    GraphScenario("decode-gqa4-hd128", 32, 8, 128),
    GraphScenario("decode-gqa4-hd128-hnd", 32, 8, 128, kv_layout="HND"),
    GraphScenario("decode-gqa8-hd64-window", 16, 2, 64, window_left=20, prompts=(40, 9, 33, 17)),
    GraphScenario("hostile-gqa4-hd128-pad8", 32, 8, 128, pad_to=8, hostile=True),
    GraphScenario("hostile-gqa4-hd128-hnd-pad6", 32, 8, 128, kv_layout="HND", prompts=(70, 5, 31), pad_to=6,
                  hostile=True, finish_after=3),
]}


@dataclass
class Replay:
    step: int
    live: int
    comparison: Comparison
    kind: str = "replay"  # or "eager between plan and replay" (a hostile scenario's interleaved batch)

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
    history = KVHistory()  # request -> its K and V
    prefill = manager.prepare(scenario.prompts, ids, num_contexts=len(ids))
    q, k, v = make_qkv(prefill.num_tokens, layer, device, derive_seed(seed, scenario.name, "prefill"))
    history.add_rows(prefill.request_ids, prefill.seq_lens, k, v)
    result = run_forward(backend, q, k, v, prefill, layer, device)
    comparison = compare_to(backend, result, _refs(q, history, prefill, layer), prefill, layer)
    replays = [Replay(0, len(ids), comparison)]
    if scenario.hostile:  # the workspace the decoder is built over has served another plan already
        replays.append(interleaved_batch(backend, scenario, 0, device, seed))
    decoder = graph_decoder(backend, manager, layer, scenario.max_batch, device)
    if decoder_hook is not None:
        decoder = decoder_hook(decoder)
    q_static = torch.zeros((scenario.max_batch, layer.num_heads, layer.head_dim), dtype=q.dtype, device=device)
    out_static = torch.zeros_like(q_static)
    graph = None
    live = list(ids)
    for step in range(1, scenario.steps + 1):
        md = manager.prepare([1] * len(live), live, num_contexts=0)
        q, k, v = make_qkv(md.num_tokens, layer, device, derive_seed(seed, scenario.name, "decode", step))
        history.add_rows(md.request_ids, md.seq_lens, k, v)
        manager.write(layer.layer_idx, md, k, v)
        decoder.plan(md)  # outside the capture: the step's lengths and page table into fixed buffers
        if scenario.hostile:  # the backend plans and runs another batch before this plan's replay
            replays.append(interleaved_batch(backend, scenario, step, device, seed))
        q_static.fill_(padding_value(scenario))
        q_static[: len(live)] = q
        out_static.fill_(float("nan"))  # a replay that writes nothing cannot pass
        if graph is None:
            refuse_capture(backend, decoder)
            graph = _capture(lambda: decoder.run(q_static, out_static), device)
        graph.replay()
        _synchronize(device)
        out = out_static[: len(live)].clone()
        comparison = compare_to(backend, _as_forward(out), _refs(q, history, md, layer), md, layer)
        replays.append(Replay(step, len(live), comparison))
        if step == scenario.finish_after:  # a request finishes: the live batch shrinks, its pages go back
            gone = live.pop(1)
            manager.free(gone)
            history.drop(gone)
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


def _refs(q, history, metadata, layer) -> References:
    keys, values = history.keys_values(metadata.request_ids)
    return references(q, keys, values, metadata, layer)


def _as_forward(out):
    from pytest_attn.check.harness import Forward

    return Forward(None, out)


def padding_value(scenario: GraphScenario) -> float:
    """What the padded query rows hold before a replay: NaN in a hostile scenario (a kernel that reads
    them as data puts NaN in live rows), zero otherwise."""
    return float("nan") if scenario.hostile else 0.0


def interleaved_batch(backend: Backend, scenario: GraphScenario, step: int, device, seed: int) -> Replay:
    """A decode batch of another size, on a cache of its own, planned and run eagerly through the
    same backend between a graph decoder's plan() and its replay (an engine's other wrappers and
    layers do), and checked against the reference like any forward. A backend whose graph decoder
    keeps its plan in a workspace that this plan overwrites fails the replay after it (flashinfer #5176)."""
    from pytest_attn.check.batch import build_batch

    lens = (1,) * (step % 3 + 2)
    cached = tuple(23 + 17 * i + step for i in range(len(lens)))
    batch = build_batch(lens, cached_lens=cached, num_heads=scenario.num_heads, num_kv_heads=scenario.num_kv_heads,
                        head_dim=scenario.head_dim, dtype=scenario.dtype, mask="causal", kv_layout=scenario.kv_layout,
                        page_size=scenario.page_size, device=device, window_left=scenario.window_left,
                        seed=derive_seed(seed, scenario.name, "interleaved", step))
    _, _, comparison = batch.run(backend)
    return Replay(step, len(lens), comparison, kind="eager between plan and replay")


def capture_refusal(decoder) -> Optional[str]:
    """Why ``decoder`` must not be captured, or None: it says so itself (``graph_refusal()``), or a
    wrapper it holds reports ``is_cuda_graph_enabled`` False (FlashInfer's wrappers do). A wrapper
    built without ``use_cuda_graph=True`` reallocates its plan buffers on the next plan(), so a graph
    captured over it replays stale or freed metadata, silently (flashinfer #3904)."""
    inner = getattr(decoder, "decoder", decoder)  # a CheckedDecoder's own decoder
    ask = getattr(inner, "graph_refusal", None)
    if callable(ask):
        reason = ask()
        if reason:
            return str(reason)
    for name, value in sorted(vars(inner).items()) if hasattr(inner, "__dict__") else ():
        if getattr(value, "is_cuda_graph_enabled", None) is False:
            return (f"its {name} ({type(value).__name__}) was not built for CUDA graphs (is_cuda_graph_enabled is "
                    "False): captured, it replays plan data from buffers that the next plan() replaces "
                    "(flashinfer #3904); build it with use_cuda_graph=True over fixed buffers")
    return None


def refuse_capture(backend: Backend, decoder) -> None:
    """Raise AttnCheckFailure, with the reason, before capturing a decoder that must not be captured."""
    __tracebackhide__ = True
    from pytest_attn.core.errors import AttnCheckFailure

    reason = capture_refusal(decoder)
    if reason:
        summary = f"{backend.name}: graph capture refused: {reason}"
        raise AttnCheckFailure(summary + ". Its graph decoder must hold only graph-safe wrappers.", summary=summary)


def _synchronize(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class _CallAgain:
    """Off a GPU there is no CUDA graph: a 'replay' calls the captured function again, so the decision
    logic of replay (plan in place, padding, interleaved plans) runs on CPU with planted decoders."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def _capture(fn, device):
    """A CUDA graph of ``fn``, after a warm call on a side stream (JIT loads, lazy allocations); off
    a GPU, a stand-in that calls ``fn`` at each replay."""
    if not str(device).startswith("cuda"):
        fn()
        return _CallAgain(fn)
    from pytest_attn.check.cuda_graph import capture

    graph, _ = capture(fn, device)
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


def trace_graph_decode(backend: Backend, scenario: GraphScenario, *, device, seed: int = 0):
    """(eager trace, replay trace, the decoder's plan) of one decode step of the scenario's requests:
    the graph decoder's run() called eagerly (after a warm call) and traced, then captured and its
    replay traced. What a replay launches must be what the eager call launched."""
    import torch

    from pytest_attn.check.traces import record

    layer = scenario.layer()
    guard.require_supported(backend, layer, _probe_metadata(scenario, device), str(device))
    manager = PagedKVCacheManager(num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim,
                                  page_size=scenario.page_size, num_pages=scenario.pages_needed(), dtype=layer.dtype,
                                  device=device, layout=scenario.kv_layout)
    ids = list(range(len(scenario.prompts)))
    prefill = manager.prepare(scenario.prompts, ids, num_contexts=len(ids))
    _, k, v = make_qkv(prefill.num_tokens, layer, device, derive_seed(seed, scenario.name, "trace", "prefill"))
    manager.write(layer.layer_idx, prefill, k, v)
    decoder = graph_decoder(backend, manager, layer, scenario.max_batch, device)
    md = manager.prepare([1] * len(ids), ids, num_contexts=0)
    q, k, v = make_qkv(md.num_tokens, layer, device, derive_seed(seed, scenario.name, "trace", "decode"))
    manager.write(layer.layer_idx, md, k, v)
    plan = decoder.plan(md)
    q_static = torch.zeros((scenario.max_batch, layer.num_heads, layer.head_dim), dtype=q.dtype, device=device)
    q_static[: len(ids)] = q
    out_static = torch.zeros_like(q_static)

    def step():
        decoder.run(q_static, out_static)

    step()  # warm: JIT loads, lazy allocations
    eager = record(step, device)
    refuse_capture(backend, decoder)
    graph = _capture(step, device)
    replay = record(graph.replay, device)
    return eager, replay, plan
