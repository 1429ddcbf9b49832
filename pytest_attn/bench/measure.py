"""Measuring a backend on a batch, and what a benchmark row records. No pytest: the CLI
(``pytest-attn vit-table``, ``ab``), the fidelity script and the evidence script measure without a
pytest session; the ``attn_benchmark`` fixture (pytest_attn.plugin.benchmark) hands what is
measured here to pytest-benchmark.

``measure_backend`` plans the batch (timing the plan), runs it once untimed through the harness
(contract check, first-call costs), times it with :mod:`pytest_attn.bench.timing`, and then checks
that the timed calls computed: a call after timing, into a poisoned buffer and with V doubled,
must give twice the first output (a backend that hands back a cached output, or whose work is
still running when it returns, fails that check instead of posting a fast time). Every call goes
through :mod:`pytest_attn.core.calls`.

torch is imported inside functions only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from pytest_attn.bench.roofline import achieved, attention_bytes, attention_flops
from pytest_attn.core.contract import Backend

if TYPE_CHECKING:
    from pytest_attn.check.batch import AttnBatch
    from pytest_attn.bench.timing import Timing

# The founding workload, the ViT table: one ViT sequence (hidden 1280 = 16 heads x 80), bf16, full mask.
VIT_TABLE_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192)
VIT_TABLE_SERIES = "vit-table"
# Ragged ViT batches: images of several sizes at patch 14 (112 px: 64 tokens, 224: 256, 336: 576,
# 448: 1024, 672: 2304).
VIT_MIXES = {
    "vit-mix-small": (64, 144, 256, 16),
    "vit-mix": (256, 576, 1024, 2304, 64),
}
CPU_BENCH_MAX_TOKENS = 256  # the pytest benchmarks on CPU (CI): small sizes unless --attn-max-tokens says otherwise
MIN_SAMPLES_FOR_SPREAD = 4  # fewer timed samples give no interquartile range worth the name
CPU_VIT_TABLE_MAX_SEQ = 1024  # `pytest-attn vit-table` on CPU


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = 10
    iters: int = 50
    graph: str = "auto"
    cold_l2: bool = False
    eager: bool = True  # False: no eager samples (pytest-attn ab takes them itself, both sides in turn)


def bench_max_tokens(session) -> Optional[int]:
    """The longest sequence the pytest benchmarks generate: --attn-max-tokens when given (0: no
    limit), else CPU_BENCH_MAX_TOKENS on CPU and no limit on CUDA."""
    if session.max_tokens_option is not None:
        return session.max_tokens_option or None
    return CPU_BENCH_MAX_TOKENS if session.device_type == "cpu" else None


# -- what a row records ------------------------------------------------------------------------------
def spread(samples) -> Optional[float]:
    """Interquartile range / median of ``samples``; None with fewer than MIN_SAMPLES_FOR_SPREAD."""
    import statistics

    if len(samples) < MIN_SAMPLES_FOR_SPREAD:
        return None
    median = statistics.median(samples)
    if median <= 0:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / median


def timing_samples(timing: "Timing") -> dict:
    """Every timed sample, in seconds, by regime; plus the host reference taken in turn with the
    eager samples, where there is one (bench.timing.HOST_REFERENCE; the gate divides by it)."""
    from pytest_attn.bench.timing import HOST_REFERENCE

    samples = {"device": list(timing.device_s), "eager": list(timing.samples("eager"))}
    if timing.host_reference_s:
        samples[HOST_REFERENCE] = list(timing.host_reference_s)
    return samples


def row_info(backend: Backend, plan, batch: "AttnBatch", timing: "Timing", *, series: str, peak_tflops: float,
             device: str, label: Optional[str] = None, metric: str = "device", copy_peak_gbps: float = 0.0) -> dict:
    """Everything a benchmark row carries besides the device-time stats (all JSON-able)."""
    md, layer = batch.metadata, batch.layer
    median = timing.device_median_s
    roofline = achieved(attention_flops(md, layer), attention_bytes(md, layer), median, peak_tflops, copy_peak_gbps)
    info = {
        "backend": backend.name, "series": series, "label": label or series,
        "plan": plan.describe(), "plan_dict": plan.as_dict(),
        "seq_lens": list(md.seq_lens), "kv_lens": list(md.kv_lens), "tokens": md.num_tokens,
        "num_heads": layer.num_heads, "num_kv_heads": layer.num_kv_heads, "head_dim": layer.head_dim,
        "dtype": layer.dtype, "mask": layer.mask, "device": device,
        **roofline,  # flops, bytes, tflops, gbps and their share of the measured peaks (device time)
        "device_ms": median * 1e3, "eager_ms": timing.eager_median_s * 1e3,
        "host_overhead_ms": timing.host_overhead_s * 1e3, "host_call_ms": timing.host_median_s * 1e3,
        "metric": metric,  # which samples pytest-benchmark's statistics (and so the gate) hold
        "plan_ms": None if timing.plan_s is None else timing.plan_s * 1e3,
        "plan_first_ms": None if timing.plan_first_s is None else timing.plan_first_s * 1e3,
        "us_per_token": median * 1e6 / max(1, md.num_tokens),
        "timer": timing.method, "graph_fallback": timing.graph_fallback, "cold_l2": timing.cold_l2,
        "warmup": timing.warmup, "iters": timing.iters,
        # every timed sample of both regimes, in seconds: the gate's bootstrap reads these
        "samples_s": timing_samples(timing),
        "device_spread": spread(timing.device_s), "eager_spread": spread(timing.samples("eager")),
    }
    if md.num_requests == 1:
        info["seq_len"] = md.seq_lens[0]  # the x axis of sweeps (pytest-attn compare)
    info.update(timing.details)
    return info


# -- measuring without pytest (the fixture, the CLI and the scripts all use this) -----------------------
class TimedCallsDidNotCompute(AssertionError):
    """The timed calls did not compute what the first call did: a cached output, or work still
    running when forward() returned. An assertion: a failed check, not a broken contract."""


class OutputNotFinite(AssertionError):
    """The first call's output holds NaN or Inf: what would be timed is not attention (every query
    of a batch sees at least one key, so its output is finite). An assertion: a failed check."""


def measure_backend(backend: Backend, batch: "AttnBatch", settings: BenchSettings = BenchSettings()):
    """(plan, timing, forward) for one batch: plan timed, one untimed call through the harness
    (the output contract, JIT and first-call costs) whose output must be finite
    (check_output_finite), the timed calls, then check_timed_calls_compute.
    Raises UnsupportedCase before launching anything when the backend cannot run the batch. Every
    call goes through core.calls, so a backend that raises or breaks its contract fails with
    a BackendError naming it."""
    from pytest_attn.core import calls
    from pytest_attn.check.harness import run_forward
    from pytest_attn.bench.timing import measure_call, time_plan

    device = batch.device
    calls.require_supported(backend, batch.layer, batch.metadata, device)
    plan, plan_s, plan_first_s = time_plan(lambda: calls.plan(backend, batch.metadata, batch.layer, device), device)
    out = run_forward(backend, batch.q, batch.k, batch.v, batch.metadata, batch.layer, device, plan).out
    expected = out.clone()
    check_output_finite(backend, expected)

    def forward():  # calls.forward checks each call hands back the buffer it was given
        return calls.forward(backend, batch.q, batch.k, batch.v, batch.metadata, plan, out)

    timing = measure_call(forward, device=device, warmup=settings.warmup, iters=settings.iters,
                          graph=settings.graph, cold_l2=settings.cold_l2, eager=settings.eager)
    timing.plan_s, timing.plan_first_s = plan_s, plan_first_s
    check_timed_calls_compute(backend, batch, plan, out, expected)
    return plan, timing, forward


def check_output_finite(backend: Backend, out) -> None:
    """OutputNotFinite when ``out`` holds a NaN or an Inf (the check after the timed calls compares
    finite values only, so without this a backend writing NaN would be timed as if it computed)."""
    import torch

    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise OutputNotFinite(f"backend {backend.name!r}: its output holds {bad} NaN/Inf value(s) of {out.numel()}, "
                              "so its times would not be attention's; run pytest --attn-backend="
                              f"{backend.name} to see which cases it gets wrong, and time it once they pass")


def check_timed_calls_compute(backend: Backend, batch: "AttnBatch", plan, out, expected) -> None:
    """One more call after the timed ones, into ``out`` poisoned with NaN. Without a KV cache V is
    doubled in place for it (exact in floating point): attention is linear in V, so the output must
    be twice the first call's; a backend that hands back a cached output fails. With a cache (whose
    earlier tokens this call does not rewrite) the inputs stay and the output must be the first
    call's. The output is read right after forward() returns, with no synchronisation but the
    stream order any caller of a kernel relies on: an output written by work that outlives the
    call (a thread, a side stream nobody waits on) fails here too."""
    import torch

    from pytest_attn.core import calls

    v = batch.v
    scale = 1.0 if batch.metadata.has_cache else 2.0
    original = v.clone() if scale != 1.0 else None
    try:
        if original is not None:
            v.copy_((original.float() * scale).to(v.dtype))
        out.fill_(float("nan"))
        calls.forward(backend, batch.q, batch.k, v, batch.metadata, plan, out)
        got = out.float().cpu()  # on CUDA: ordered after the call on the current stream
    finally:
        if original is not None:
            v.copy_(original)
    want = expected.float().cpu() * scale
    finite = torch.isfinite(want)
    ok = bool(torch.isfinite(got[finite]).all()) and torch.allclose(got[finite], want[finite], rtol=3e-2, atol=3e-2)
    if not ok:
        what = "with V doubled, did not return twice the first output" if scale != 1.0 else \
            "did not return the first output again"
        raise TimedCallsDidNotCompute(
            f"backend {backend.name!r}: a call after the timed ones, into a NaN-poisoned buffer and {what} (NaN left "
            "in the buffer, or the old output): its timed calls did not compute, or their work was still running when "
            "forward() returned, so its times are not the attention's. forward() must compute from its inputs on "
            "every call and finish (or enqueue on the current stream) before returning")
