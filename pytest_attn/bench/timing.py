"""Timers for attention calls: device time, eager time, host overhead and plan time, kept apart.

Two regimes, because a model pays one or the other: a layer captured in a CUDA graph costs its
**device time** (CUDA events around the replay of a graph of the call: no launch gaps, the same
call the serving engine replays; a backend that cannot be captured is timed eagerly with events
instead, and the reason is recorded), and a layer that is not captured costs its **eager time**
(wall time per call of back-to-back uncaptured calls: the host's launch work and the device's work
overlap as they do in an eager model, so it is the larger of the two, plus what they cannot hide). Each
sample is the mean of a few back-to-back calls (one with a cold L2), so the launch of a graph or an
event pair per sample stays out of the figure. On CPU the same code path runs with a wall-clock
timer, so CI exercises it.

First-call costs (JIT builds, cuDNN graph builds, lazy allocations) stay out: every timed call
comes after ``warmup`` untimed ones. The garbage collector is paused while samples are taken (a
collection inside a timed loop is a 1-10 ms outlier in the eager regime, whose samples are host
wall time), and the eager loop is warmed up again after the synchronisation that precedes it, so
that its first sample does not start from an idle GPU.

The host's speed drifts: on the H200 machines this project measured on, every host-bound call
(FlashInfer's, torch SDPA's, a loop of tiny launches, a pure-Python loop) slowed by up to 1.5-2x
together for a second or so, and a process started later read 5-12% apart
(tests/evidence/host_speed_probe.py; docs/measured.md). So on CUDA each eager sample is taken in
turn with a sample of a fixed host workload, HOST_REFERENCE (a loop of tiny launches: what a
host-bound call is made of), and the gate judges a host-bound row's eager time divided, sample by
sample, by it (bench.gate): the drift falls on both and cancels, a regression in the backend's own
host work does not. torch is imported inside functions only.
"""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pytest_attn.check import cuda_graph

GRAPH_MODES = ("auto", "on", "off")
# The queue the GPU works through while the host enqueues the timed calls is primed with a sleep
# kernel of at most this long, so eager event timings hold device time, not launch gaps.
MAX_PRIME_S = 0.2
# On CUDA each sample is the mean of back-to-back calls, enough for a sample to last this long. Two
# reasons, both measured on the H100: the ~1 µs of launching a graph and recording events per sample
# (one call per sample read 5% high at 20 µs), and the clock under sustained load: FlashInfer's
# cuDNN kernel at 8192 tokens drops the SM clock from ~1965 to ~1800 MHz within a few hundred ms,
# so 1 ms samples (50 of them, 90 ms in all) read 0.87-0.92 ms where a 26-call graph and triton's
# do_bench read 0.93-0.96; 25 ms samples read 0.943. A benchmark should report the steady state a
# model's back-to-back layers see.
MIN_SAMPLE_S = 20e-3
MAX_CALLS_PER_SAMPLE = 512
HOST_REFERENCE = "host-reference"  # the name of the fixed host workload's samples, wherever they are kept
HOST_REFERENCE_LAUNCHES = 8  # tiny adds per reference call
HOST_REFERENCE_SAMPLE_S = 5e-3  # a reference sample lasts about this long (it only has to share the moment)
CPU_MATMUL_N = 1024  # bf16 matrix product for the CPU's "peak": quick, and enough to be compute bound
CUDA_MATMUL_N = 8192


class GraphCaptureError(RuntimeError):
    """--attn-bench-graph=on, and the call could not be captured into a CUDA graph."""


@dataclass
class Timing:
    """What one benchmarked call cost. All times in seconds."""

    device_s: list[float]  # one sample per timed call: device time (wall clock on CPU)
    host_s: list[float]  # eager calls, each synchronised: wall time per call
    method: str  # "cuda-graph", "cuda-events" or "wall-clock"
    plan_s: Optional[float] = None  # median of repeated plan() calls, after the first
    plan_first_s: Optional[float] = None  # the first plan() call (may build or JIT things)
    graph_fallback: str = ""  # why a CUDA graph was not used, when it was not
    cold_l2: bool = False
    warmup: int = 0
    details: dict = field(default_factory=dict)
    eager_s: list[float] = field(default_factory=list)  # back-to-back eager calls: wall time per call
    # HOST_REFERENCE's wall time per call, one sample taken in turn with each eager sample (CUDA only)
    host_reference_s: list[float] = field(default_factory=list)

    @property
    def iters(self) -> int:
        return len(self.device_s)

    @property
    def device_median_s(self) -> float:
        return statistics.median(self.device_s)

    @property
    def host_median_s(self) -> float:
        return statistics.median(self.host_s) if self.host_s else self.device_median_s

    @property
    def eager_median_s(self) -> float:
        """Wall time per call of uncaptured calls back to back (the device median where not measured)."""
        return statistics.median(self.eager_s) if self.eager_s else self.device_median_s

    def samples(self, metric: str) -> list[float]:
        """The samples of one regime: "device" (graph replay or events) or "eager" (wall per call)."""
        if metric == "device":
            return self.device_s
        if metric == "eager":
            return self.eager_s or self.device_s
        raise ValueError(f"metric {metric!r}: 'device' or 'eager'")

    @property
    def host_overhead_s(self) -> float:
        """Eager wall time per call minus device time: what the host adds to each call."""
        return max(0.0, self.host_median_s - self.device_median_s)


@contextlib.contextmanager
def gc_paused():
    """The garbage collector off for the block (as it was after), so no collection lands in a sample."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def device_type(device: Any) -> str:
    return str(device).split(":")[0]


def synchronize(device: Any) -> None:
    if device_type(device) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_plan(plan_fn: Callable[[], Any], device: Any, repeats: int = 5) -> tuple[Any, float, float]:
    """(last plan, median plan time, first plan time). Synchronises after each call, since a plan
    may copy its index arrays to the device asynchronously."""
    samples = []
    plan = None
    for _ in range(1 + max(1, repeats)):
        start = time.perf_counter()
        plan = plan_fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return plan, statistics.median(samples[1:]), samples[0]


# -- CUDA helpers ------------------------------------------------------------------------------------
_flush_buffers: dict = {}


def l2_flush_buffer(device):
    """A buffer twice the L2 cache (at least 64 MiB); writing it evicts the inputs from L2."""
    import torch

    key = str(device)
    if key not in _flush_buffers:
        props = torch.cuda.get_device_properties(device)
        l2_bytes = int(getattr(props, "L2_cache_size", 0) or 0) or 50 * 2**20
        _flush_buffers[key] = torch.empty(max(2 * l2_bytes, 64 * 2**20) // 4, dtype=torch.int32, device=device)
    return _flush_buffers[key]


def _prime_queue(seconds: float) -> None:
    """Keep the GPU busy while the host enqueues the timed calls (torch.cuda._sleep spins for a
    number of cycles; ~1.5 GHz is a low clock, so the spin is at least as long as asked)."""
    import torch

    if seconds > 0 and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(int(min(seconds, MAX_PRIME_S) * 1.5e9))


def calls_per_sample(call_s: float, cold_l2: bool) -> int:
    """Back-to-back calls per timed sample: 1 with a cold L2 (each call must start cold)."""
    if cold_l2 or call_s <= 0:
        return 1
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / call_s)))


def capture_graph(fn: Callable[[], Any], device, calls: int = 1) -> tuple[Any, str]:
    """(graph of ``calls`` back-to-back calls, "") when ``fn`` can be captured and its replay
    reproduces the eager output;
    (None, reason) otherwise. The eager output is compared so that a backend doing its work outside
    the capturing stream (which a replay would silently skip) is caught."""
    import torch

    reason = ""
    graph = None
    try:
        torch.cuda.synchronize(device)
        graph, static_out = cuda_graph.capture(fn, device, calls)
    except Exception as exc:  # any capture error means "time it eagerly"
        reason = f"capture failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        graph = None
    if graph is None:
        _reset_generator_after_failed_capture(device)
        try:
            torch.cuda.synchronize(device)
        except Exception as exc:  # the failed capture left the CUDA context unusable
            raise RuntimeError(f"CUDA graph capture failed ({reason}) and left the CUDA context broken: {exc}. "
                               "Rerun with --attn-bench-graph=off (or seed-table --graph off)") from exc
        return None, reason
    if not isinstance(static_out, torch.Tensor):
        return None, "the call returned no tensor to check the graph replay against"
    expected = fn().clone()
    torch.cuda.synchronize(device)
    if static_out.is_floating_point():
        static_out.fill_(float("nan"))  # a replay that writes nothing cannot pass
    graph.replay()
    torch.cuda.synchronize(device)
    if not torch.allclose(static_out.float(), expected.float(), rtol=2e-2, atol=2e-2):
        return None, "graph replay did not reproduce the eager output (work outside the captured stream?)"
    return graph, ""


def _reset_generator_after_failed_capture(device) -> None:
    """A failed capture leaves torch's CUDA generator believing it is still capturing (every later
    random op raises "Offset increment outside graph capture"); setting its state again clears that."""
    import torch

    try:
        index = torch.device(device).index
        generator = torch.cuda.default_generators[torch.cuda.current_device() if index is None else index]
        generator.graphsafe_set_state(generator.clone_state())
    except Exception:
        pass  # older torch: no graph-safe generator state, and no such leftover either


def _event_samples(call: Callable[[], Any], iters: int, flush, prime_s: float, calls: int = 1) -> list[float]:
    """Per-call device times from event pairs around ``call`` (which makes ``calls`` calls); all
    enqueued first, then one synchronisation."""
    import torch

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    _prime_queue(prime_s)
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()  # outside the event pair: only the call is timed
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 / calls for s, e in zip(starts, ends)]


def measure_call(fn: Callable[[], Any], *, device: Any = "cpu", warmup: int = 10, iters: int = 50,
                 graph: str = "auto", cold_l2: bool = False, eager: bool = True) -> Timing:
    """Time ``fn`` (one attention call, returning its output tensor) ``iters`` times after
    ``warmup`` untimed calls. graph: "auto" (replay a CUDA graph when capture works, else events),
    "on" (raise GraphCaptureError when it does not), "off" (events). eager=False: no eager samples
    (on CUDA; ``Timing.eager_s`` stays empty)."""
    if graph not in GRAPH_MODES:
        raise ValueError(f"graph={graph!r}: use one of {GRAPH_MODES}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if device_type(device) != "cuda":
        with gc_paused():
            return _measure_cpu(fn, warmup, iters, cold_l2)
    import torch

    with torch.cuda.device(device), gc_paused():
        for _ in range(max(1, warmup)):
            fn()
        torch.cuda.synchronize()
        host = []
        for _ in range(iters):  # eager, each synchronised: what one call costs the host and device together
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            host.append(time.perf_counter() - start)
        flush = l2_flush_buffer(device) if cold_l2 else None
        calls = calls_per_sample(min(_event_samples(fn, 3, None, 0.0)), cold_l2)
        eager_s, reference_s = [], []
        if eager:
            sampled = _eager_samples({"call": (fn, calls), HOST_REFERENCE: host_reference_call(device)}, iters,
                                     device, flush)
            eager_s, reference_s = sampled["call"], sampled[HOST_REFERENCE]
        captured, fallback = (None, "--attn-bench-graph=off") if graph == "off" else capture_graph(fn, device, calls)
        if captured is None and graph == "on":
            raise GraphCaptureError(f"--attn-bench-graph=on but the call cannot be timed as a CUDA graph: {fallback}. "
                                    "Use --attn-bench-graph=auto to fall back to CUDA events")
        if captured is not None:
            call = captured.replay
        else:
            def call():
                for _ in range(calls):
                    fn()
        prime = iters * calls * statistics.median(host)
        for _ in range(2):  # untimed: a graph's first replay uploads it
            call()
        device_s = _event_samples(call, iters, flush, prime, calls)
    return Timing(device_s, host, "cuda-graph" if captured is not None else "cuda-events", eager_s=eager_s,
                  host_reference_s=reference_s,
                  graph_fallback=fallback, cold_l2=cold_l2, warmup=warmup, details={"calls_per_sample": calls})


def _eager_samples(calls: dict, iters: int, device: Any, flush) -> dict:
    """Wall time per call of back-to-back uncaptured calls (synchronised at both ends only): what a
    layer outside a CUDA graph costs in a model that runs layers one after another. ``calls`` maps a
    name to (fn, calls per sample); with several, one sample of each is taken at a time, the order
    reversed every turn (A B, B A, ...) -> {name: samples}."""
    names = list(calls)
    samples = {name: [] for name in names}
    synchronize(device)
    for fn, count in calls.values():  # warm again after the synchronisation: the first sample must not start idle
        for _ in range(count):
            fn()
    for turn in range(iters):
        for name in (names if turn % 2 == 0 else names[::-1]):
            fn, count = calls[name]
            if flush is not None:
                flush.zero_()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(count):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / count)
    return samples


def host_reference_call(device: Any) -> tuple[Callable[[], None], int]:
    """(HOST_REFERENCE's call, calls per sample): HOST_REFERENCE_LAUNCHES adds of a 16-element
    tensor on ``device``, host-bound on a GPU (each launch costs the host more than the GPU), with
    enough calls for a sample of about HOST_REFERENCE_SAMPLE_S (timed here, once)."""
    import torch

    a = torch.ones(16, device=device)
    c = torch.empty_like(a)

    def reference():
        for _ in range(HOST_REFERENCE_LAUNCHES):
            torch.add(a, a, out=c)

    for _ in range(5):
        reference()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(20):
        reference()
    synchronize(device)
    per_call = max((time.perf_counter() - start) / 20, 1e-7)
    return reference, max(1, min(MAX_CALLS_PER_SAMPLE, round(HOST_REFERENCE_SAMPLE_S / per_call)))


def interleaved_eager_samples(calls: dict, iters: int, device: Any, cold_l2: bool = False) -> dict:
    """Eager samples of several calls taken in turn (see :func:`_eager_samples`): ``calls`` maps a
    name to (fn, calls per sample) -> {name: samples}.

    Host time per call drifts: on the H200 machines this project measured on, the same eager row
    moved by up to 1.5x between measurements seconds apart, pinned to one core or not
    (docs/measured.md). Two sides timed in blocks one after the other read that drift as a
    regression or an improvement; sampled in turn, it falls on both alike."""
    flush = l2_flush_buffer(device) if cold_l2 and device_type(device) == "cuda" else None
    with gc_paused():
        return _eager_samples(calls, iters, device, flush)


def _measure_cpu(fn, warmup: int, iters: int, cold_l2: bool) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    # On the CPU the "device" is the host: wall time is device time and there is no separate overhead.
    details = {"calls_per_sample": 1, **({"cold_l2_ignored": True} if cold_l2 else {})}
    return Timing(samples, list(samples), "wall-clock", eager_s=list(samples), graph_fallback="cpu: no CUDA graphs",
                  cold_l2=False, warmup=warmup, details=details)


# -- the matrix-product peak -------------------------------------------------------------------------
_peaks: dict[str, float] = {}


def matmul_peak_tflops(device: Any = "cpu") -> float:
    """bf16 matrix-product TFLOP/s measured on this device (once per process and device): the
    yardstick for "percent of peak", measured rather than taken from a datasheet."""
    key = str(device)
    if key in _peaks:
        return _peaks[key]
    import torch

    cuda = device_type(device) == "cuda"
    n = CUDA_MATMUL_N if cuda else CPU_MATMUL_N
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=torch.bfloat16)
    timing = measure_call(lambda: a @ b, device=device, warmup=3, iters=10 if cuda else 3, graph="off")
    _peaks[key] = 2.0 * n ** 3 / min(timing.device_s) / 1e12
    del a, b
    return _peaks[key]


_copy_peaks: dict[str, float] = {}
CPU_COPY_BYTES = 64 * 2**20
CUDA_COPY_BYTES = 1 * 2**30


def copy_peak_gbps(device: Any = "cpu") -> float:
    """Memory bandwidth measured on this device (once per process and device): GB/s of a large
    device-to-device copy, counting the bytes read and the bytes written, the yardstick for
    "percent of peak bandwidth"."""
    key = str(device)
    if key in _copy_peaks:
        return _copy_peaks[key]
    import torch

    cuda = device_type(device) == "cuda"
    nbytes = CUDA_COPY_BYTES if cuda else CPU_COPY_BYTES
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = measure_call(lambda: dst.copy_(src), device=device, warmup=3, iters=10 if cuda else 3, graph="off")
    _copy_peaks[key] = 2.0 * nbytes / min(timing.device_s) / 1e9
    del src, dst
    return _copy_peaks[key]
