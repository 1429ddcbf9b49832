"""Benchmarks of attention backends, recorded by pytest-benchmark.

``attn_benchmark(backend, batch)`` plans the batch (timing the plan), runs it once untimed through
the harness (contract check, first-call costs), times it with :mod:`pytest_attn.bench.timing` and hands
the per-call DEVICE times to pytest-benchmark, so its table, saved JSON, --benchmark-compare and
--benchmark-compare-fail all work on device time. Host overhead and plan time go in the row's
``extra_info`` beside the plan, FLOPs, TFLOP/s, µs per token and percent of a measured bf16
matrix-product peak.

How device times reach pytest-benchmark: ``benchmark.pedantic`` times ``target`` with the
fixture's timer, reading it before and after each round. We make that timer a clock that only
moves when ``target`` replays one of our measured samples, so each round records exactly one
device-time sample and everything downstream (stats, JSON, compare, the regression gate) is
pytest-benchmark's own. The timer is the fixture's private ``_timer`` (pytest-benchmark reads no
per-call timer option); so that a future pytest-benchmark cannot silently record host time
instead, the recorded data are checked against the samples afterwards.

torch is imported inside functions only: loading the plugin must stay cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import pytest

from pytest_attn.core.contract import Backend
from pytest_attn.env.packages import dist_version, flashinfer_version

if TYPE_CHECKING:
    from pytest_attn.check.batch import AttnBatch
    from pytest_attn.bench.timing import Timing

# The seed's microbenchmark: one ViT sequence (hidden 1280 = 16 heads x 80), bf16, full mask.
SEED_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192)
SEED_SERIES = "seed"
# Ragged ViT batches: images of several sizes at patch 14 (112 px: 64 tokens, 224: 256, 336: 576,
# 448: 1024, 672: 2304).
VIT_MIXES = {
    "vit-mix-small": (64, 144, 256, 16),
    "vit-mix": (256, 576, 1024, 2304, 64),
}
CPU_BENCH_MAX_TOKENS = 256  # the pytest benchmarks on CPU (CI): small sizes unless --attn-max-tokens says otherwise
CPU_SEED_TABLE_MAX_SEQ = 1024  # `pytest-attn seed-table` on CPU


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = 10
    iters: int = 50
    graph: str = "auto"
    cold_l2: bool = False

    @classmethod
    def from_config(cls, config) -> "BenchSettings":
        # the values were checked at configure time (options.check)
        return cls(config.getoption("attn_bench_warmup"), config.getoption("attn_bench_iters"),
                   config.getoption("attn_bench_graph"), bool(config.getoption("attn_bench_cold_l2")))


def bench_max_tokens(session) -> Optional[int]:
    """The longest sequence the pytest benchmarks generate: --attn-max-tokens when given (0: no
    limit), else CPU_BENCH_MAX_TOKENS on CPU and no limit on CUDA."""
    if session.max_tokens_option is not None:
        return session.max_tokens_option or None
    return CPU_BENCH_MAX_TOKENS if session.device_type == "cpu" else None


# -- what a row records ------------------------------------------------------------------------------
def attended_pairs(q_len: int, kv_len: int, causal: bool, window_left: int = -1) -> int:
    """Unmasked (query, key) pairs of one request whose q_len queries are its last tokens."""
    if window_left < 0:
        if not causal:
            return q_len * kv_len
        # query i sits at position kv_len - q_len + i and sees keys 0..that position
        return q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2
    total = 0
    for i in range(q_len):
        pos = kv_len - q_len + i
        last = pos if causal else kv_len - 1
        total += max(0, last - max(0, pos - window_left) + 1)
    return total


def attention_flops(metadata, layer) -> int:
    """Forward FLOPs: QK^T and PV, 2 FLOPs per multiply-add each, over unmasked pairs only."""
    pairs = sum(attended_pairs(q, kv, layer.causal, layer.window_left)
                for q, kv in zip(metadata.seq_lens, metadata.kv_lens))
    return 4 * pairs * layer.head_dim * layer.num_heads


def row_info(backend: Backend, plan, batch: "AttnBatch", timing: "Timing", *, series: str, peak_tflops: float,
             device: str, label: Optional[str] = None, metric: str = "device") -> dict:
    """Everything a benchmark row carries besides the device-time stats (all JSON-able)."""
    md, layer = batch.metadata, batch.layer
    flops = attention_flops(md, layer)
    median = timing.device_median_s
    tflops = flops / median / 1e12 if median > 0 else 0.0
    info = {
        "backend": backend.name, "series": series, "label": label or series,
        "plan": plan.describe(), "plan_dict": plan.as_dict(),
        "seq_lens": list(md.seq_lens), "kv_lens": list(md.kv_lens), "tokens": md.num_tokens,
        "num_heads": layer.num_heads, "num_kv_heads": layer.num_kv_heads, "head_dim": layer.head_dim,
        "dtype": layer.dtype, "mask": layer.mask, "device": device,
        "flops": flops, "tflops": tflops,
        "device_ms": median * 1e3, "eager_ms": timing.eager_median_s * 1e3,
        "host_overhead_ms": timing.host_overhead_s * 1e3, "host_call_ms": timing.host_median_s * 1e3,
        "metric": metric,  # which samples pytest-benchmark's statistics (and so the gate) hold
        "plan_ms": None if timing.plan_s is None else timing.plan_s * 1e3,
        "plan_first_ms": None if timing.plan_first_s is None else timing.plan_first_s * 1e3,
        "us_per_token": median * 1e6 / max(1, md.num_tokens),
        "matmul_peak_tflops": peak_tflops,
        "pct_of_matmul_peak": 100.0 * tflops / peak_tflops if peak_tflops else None,
        "timer": timing.method, "graph_fallback": timing.graph_fallback, "cold_l2": timing.cold_l2,
        "warmup": timing.warmup, "iters": timing.iters,
    }
    if md.num_requests == 1:
        info["seq_len"] = md.seq_lens[0]  # the x axis of sweeps (pytest-attn compare)
    info.update(timing.details)
    return info


# -- measuring without pytest (the CLI and the fidelity script use this too) -------------------------
def measure_backend(backend: Backend, batch: "AttnBatch", settings: BenchSettings = BenchSettings(),
                    *, warm_call: bool = True):
    """(plan, timing, forward) for one batch: plan timed, one untimed call through the harness
    (the output contract, JIT and first-call costs), then the timed calls. Raises UnsupportedCase
    before launching anything when the backend cannot run the batch. Every call goes through guard,
    so a backend that raises or breaks its contract fails with a BackendError naming it."""
    from pytest_attn.core import calls as guard
    from pytest_attn.check.harness import run_forward
    from pytest_attn.bench.timing import measure_call, time_plan

    device = batch.device
    guard.require_supported(backend, batch.layer, batch.metadata, device)
    plan, plan_s, plan_first_s = time_plan(lambda: guard.plan(backend, batch.metadata, batch.layer, device), device)
    _, out = run_forward(backend, batch.q, batch.k, batch.v, batch.metadata, batch.layer, device, plan)

    def forward():  # the contract was checked by the call above: the timed calls pay guard.call's try only
        return guard.call(backend, "forward", batch.q, batch.k, batch.v, batch.metadata, plan, out=out)

    timing = measure_call(forward, device=device, warmup=settings.warmup, iters=settings.iters,
                          graph=settings.graph, cold_l2=settings.cold_l2)
    timing.plan_s, timing.plan_first_s = plan_s, plan_first_s
    return plan, timing, forward


# -- feeding samples to pytest-benchmark -------------------------------------------------------------
class ReplayClock:
    """pytest-benchmark's timer while our samples are recorded: time moves only in ``advance``,
    by the next measured sample, so the timer read around ``advance`` differs by exactly it."""

    def __init__(self, samples: Sequence[float], method: str):
        self._samples = iter(samples)
        self.now = 0.0
        self.__name__ = f"pytest_attn.bench.timing[{method}]"  # what the saved JSON's options.timer shows

    def __call__(self) -> float:
        return self.now

    def advance(self) -> None:
        self.now += next(self._samples)


def record_samples(benchmark, samples: Sequence[float], method: str) -> None:
    """Make ``samples`` the rounds of this pytest-benchmark fixture (see the module docstring)."""
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark has no BenchmarkFixture._timer, which pytest-attn uses to record "
                           "device times; install pytest-benchmark>=5.1,<6")
    clock = ReplayClock(samples, method)
    benchmark._timer = clock
    benchmark.pedantic(clock.advance, rounds=len(samples), iterations=1, warmup_rounds=0)
    recorded = list(benchmark.stats.stats.data) if benchmark.stats is not None else []
    if len(recorded) != len(samples) or any(abs(r - s) > 1e-9 * max(1.0, s) for r, s in zip(recorded, samples)):
        raise RuntimeError("pytest-benchmark did not record the device-time samples pytest-attn gave it "
                           f"({len(recorded)} recorded, {len(samples)} given); pin pytest-benchmark>=5.1,<6")


class AttnBenchmark:
    """The ``attn_benchmark`` fixture's value: call it once per test with a backend and a batch."""

    def __init__(self, benchmark, session, settings: BenchSettings):
        self.benchmark = benchmark
        self.session = session
        self.settings = settings
        self.info: Optional[dict] = None

    @property
    def disabled(self) -> bool:
        """pytest-benchmark is off (--benchmark-disable, or xdist): calls run once, untimed."""
        return bool(self.benchmark.disabled)

    def __call__(self, backend: Backend, batch: "AttnBatch", *, series: str = "", label: Optional[str] = None,
                 group: Optional[str] = None, metric: str = "device") -> Optional["Timing"]:
        """Benchmark one forward of ``batch`` through ``backend``; returns the Timing (None when
        benchmarks are disabled, where the call still runs once, as pytest-benchmark does).
        ``metric`` picks what pytest-benchmark records, and so what --benchmark-compare-fail gates:
        "device" (CUDA-graph replay where the call can be captured) or "eager" (wall time per call
        of uncaptured calls back to back, host overhead included). The row's extra_info has both."""
        from pytest_attn.bench.timing import GraphCaptureError, matmul_peak_tflops

        if self.disabled:
            from pytest_attn.check.harness import run_forward

            self.benchmark.pedantic(run_forward, args=(backend, batch.q, batch.k, batch.v, batch.metadata,
                                                       batch.layer, batch.device))
            return None
        try:
            plan, timing, _ = measure_backend(backend, batch, self.settings)
        except GraphCaptureError as exc:
            pytest.fail(str(exc), pytrace=False)
        layer = batch.layer
        shape = f"h{layer.num_heads}/{layer.num_kv_heads}xd{layer.head_dim} {layer.dtype} {layer.mask}"
        series = series or "custom"
        tail = f" {label}" if label and label != series else ""
        regime = "" if metric == "device" else f" [{metric}]"
        self.benchmark.group = group or f"{series} {shape}{tail}{regime}"
        self.info = row_info(backend, plan, batch, timing, series=f"{series} {shape}",
                             peak_tflops=matmul_peak_tflops(batch.device), device=batch.device, label=label,
                             metric=metric)
        self.benchmark.extra_info.update(self.info)
        record_samples(self.benchmark, timing.samples(metric), timing.method if metric == "device" else "eager-wall")
        return timing


@pytest.fixture
def attn_benchmark(request, attn_session, benchmark) -> AttnBenchmark:
    """Time a backend on a batch and record its device time with pytest-benchmark::

        def test_speed(attn_benchmark, attn_backend, make_attn_batch):
            attn_benchmark(attn_backend, make_attn_batch([1024]), series="my-sweep")

    --attn-bench-warmup/--attn-bench-iters/--attn-bench-graph/--attn-bench-cold-l2 set how.
    It requests pytest-benchmark's ``benchmark`` fixture by name, so pytest-benchmark counts the
    test as a benchmark (--benchmark-only runs it, --benchmark-skip skips it). Without
    pytest-benchmark (``-p no:benchmark``) the test is skipped with that reason (see
    deselect_unasked_benchmarks)."""
    return AttnBenchmark(benchmark, attn_session, BenchSettings.from_config(request.config))


# -- when benchmarks run --------------------------------------------------------------------------------
BENCH_MARKER = "attn_bench"
# pytest-benchmark options that ask for benchmarks: to time them (--benchmark-only, or saving, comparing,
# plotting), or to run each once untimed (--benchmark-disable) or timed despite a configured disable.
_ASKING_OPTIONS = ("benchmark_only", "benchmark_autosave", "benchmark_save", "benchmark_json", "benchmark_compare",
                   "benchmark_compare_fail", "benchmark_histogram", "benchmark_disable", "benchmark_enable")
NO_PYTEST_BENCHMARK = ("pytest-benchmark is not loaded (-p no:benchmark?): attention benchmarks record their times "
                       "through it; pip install pytest-benchmark or drop -p no:benchmark")


def pytest_benchmark_loaded(config) -> bool:
    """pytest-benchmark's plugin is in this run: by its entry point's name, or given with -p by module."""
    manager = config.pluginmanager
    return manager.hasplugin("benchmark") or manager.hasplugin("pytest_benchmark.plugin")


def benchmarks_asked(config) -> bool:
    """Benchmarks run when the -m expression picks them out (``-m attn_bench``), or a
    pytest-benchmark option asks for benchmarks (--benchmark-only, a save, JSON or compare option,
    --benchmark-disable); a correctness run, and one given --benchmark-skip, leaves them out, so it
    prints no benchmark tables."""
    expression = config.getoption("markexpr", "") or ""
    if expression:
        try:
            from _pytest.mark.expression import Expression

            compiled = Expression.compile(expression)
            with_marker = compiled.evaluate(_matcher({BENCH_MARKER}))
            without = compiled.evaluate(_matcher(set()))
        except Exception:  # an expression pytest itself will reject, or another pytest's API
            with_marker, without = BENCH_MARKER in expression, False
        if with_marker and not without:
            return True  # with --benchmark-skip too: pytest-benchmark then skips them, saying so
    option = config.getoption
    if option("benchmark_skip", False) and not option("benchmark_only", False):  # only wins, as in pytest-benchmark
        return False
    return any(option(name, None) for name in _ASKING_OPTIONS)


def _matcher(markers: set):
    def matches(name: str, **kwargs) -> bool:
        return name in markers

    return matches


def deselect_unasked_benchmarks(config, items) -> None:
    """At collection: the attn_bench tests leave a run that did not ask for benchmarks; and
    without pytest-benchmark, a test that uses attn_benchmark is skipped with the reason (it
    cannot set up the ``benchmark`` fixture attn_benchmark needs)."""
    if not benchmarks_asked(config):
        drop = [item for item in items if item.get_closest_marker(BENCH_MARKER) is not None]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = [item for item in items if item.get_closest_marker(BENCH_MARKER) is None]
    if not pytest_benchmark_loaded(config):
        skip = pytest.mark.skip(reason=NO_PYTEST_BENCHMARK)
        for item in items:
            if "attn_benchmark" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


# -- machine_info --------------------------------------------------------------------------------------
def _nvidia_driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            found = pynvml.nvmlSystemGetDriverVersion()
            return found.decode() if isinstance(found, bytes) else str(found)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip().splitlines()[0]
        except Exception:
            pass
    return None


def attn_machine_info(device: str) -> dict:
    """GPU, driver and library versions: what makes two benchmark runs comparable."""
    import torch

    info = {"device": device, "gpu": None, "gpu_capability": None, "driver": None,
            "cuda": torch.version.cuda, "cudnn": None, "torch": torch.__version__,
            "flashinfer": flashinfer_version(), "triton": dist_version("triton")}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["driver"] = _nvidia_driver()
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def update_machine_info(config, machine_info: dict) -> None:
    """pytest_benchmark_update_machine_info: add ``machine_info['attn']`` (GPU, driver, CUDA, cuDNN,
    torch, FlashInfer). pytest-benchmark warns when a compared run's machine_info differs, and
    ``pytest-attn compare`` keeps runs from different GPUs apart."""
    from pytest_attn.plugin.session import attn_session_of

    try:
        device = attn_session_of(config).device
    except Exception as exc:  # no session (configure failed) or no usable device: say so, do not crash saving
        machine_info["attn"] = {"error": f"could not read the attention device: {exc}"}
        return
    machine_info["attn"] = attn_machine_info(device)


def machine_key(machine_info: dict) -> str:
    """What must match for two runs to be compared: the GPU (or, on CPU, the processor)."""
    attn = machine_info.get("attn") or {}
    if attn.get("gpu"):
        return f"{attn['gpu']} (sm {attn.get('gpu_capability') or '?'})"
    cpu = machine_info.get("cpu") or {}
    brand = cpu.get("brand_raw") if isinstance(cpu, dict) else None
    return f"cpu: {brand or machine_info.get('processor') or machine_info.get('machine') or 'unknown'}"


def compare_machine_info(config, benchmarksession, machine_info, compared_benchmark) -> None:
    """For a pytest_benchmark_compare_machine_info hook: refuse to gate a run against a baseline
    recorded on another GPU (the numbers say nothing about a regression then)."""
    saved = compared_benchmark.get("machine_info") or {}
    if "attn" not in saved or "attn" not in machine_info:
        return
    now, then = machine_key(machine_info), machine_key(saved)
    if now != then:
        raise pytest.UsageError(
            f"pytest-attn: the benchmark baseline was recorded on {then}, this run is on {now}; "
            "compare only runs from the same GPU (save a baseline on this runner with --benchmark-autosave, "
            "or point --benchmark-storage at this GPU's baselines)")
