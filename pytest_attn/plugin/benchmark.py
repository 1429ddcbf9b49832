"""The pytest-benchmark adapter: the ``attn_benchmark`` fixture, which benchmarks run, and the
machine_info hooks.

``attn_benchmark(backend, batch)`` measures with :func:`pytest_attn.bench.measure.measure_backend`
(no pytest there) and hands the samples of one regime to pytest-benchmark, so its table, saved
JSON, --benchmark-compare and --benchmark-compare-fail work on them. Every sample of both regimes
also goes into the row's ``extra_info["samples_s"]``: pytest-attn's own gate (--attn-gate,
``pytest-attn gate``) decides from those.

How samples reach pytest-benchmark: ``benchmark.pedantic`` times ``target`` with the fixture's
timer, reading it before and after each round. pytest-benchmark has no public way to record
samples timed elsewhere, so ``record_samples`` is the one seam: it sets the fixture's private
``_timer`` to a clock that moves only when ``target`` replays one of our samples, and checks
afterwards that pytest-benchmark recorded exactly those samples (a future pytest-benchmark cannot
silently record host time instead).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import pytest

from pytest_attn.bench.machine import attn_machine_info, machine_key
from pytest_attn.bench.measure import BenchSettings, measure_backend, row_info
from pytest_attn.core.contract import Backend

if TYPE_CHECKING:
    from pytest_attn.check.batch import AttnBatch
    from pytest_attn.bench.timing import Timing

ROWS_KEY = pytest.StashKey[list]()  # every row this run's attn_benchmark recorded (the gate reads them)


def settings_from_config(config) -> BenchSettings:
    # the values were checked at configure time (options.check)
    return BenchSettings(config.getoption("attn_bench_warmup"), config.getoption("attn_bench_iters"),
                         config.getoption("attn_bench_graph"), bool(config.getoption("attn_bench_cold_l2")))


def recorded_rows(config) -> list:
    """(name, extra_info) of every row timed in this process."""
    return config.stash.setdefault(ROWS_KEY, [])


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

    def __init__(self, benchmark, session, settings: BenchSettings, node=None):
        self.benchmark = benchmark
        self.session = session
        self.settings = settings
        self.node = node
        self.info: Optional[dict] = None

    @property
    def disabled(self) -> bool:
        """pytest-benchmark is off (--benchmark-disable, or xdist): calls run once, untimed."""
        return bool(self.benchmark.disabled)

    def __call__(self, backend: Backend, batch: "AttnBatch", *, series: str = "", label: Optional[str] = None,
                 group: Optional[str] = None, metric: str = "device",
                 threshold: Optional[float] = None) -> Optional["Timing"]:
        """Benchmark one forward of ``batch`` through ``backend``; returns the Timing (None when
        benchmarks are disabled, where the call still runs once, as pytest-benchmark does).
        ``metric`` picks what pytest-benchmark records, and so what --benchmark-compare-fail gates:
        "device" (CUDA-graph replay where the call can be captured) or "eager" (wall time per call
        of uncaptured calls back to back, host overhead included). The row's extra_info has both.
        ``threshold`` (or an ``attn_gate_threshold(0.2)`` marker on the test) overrides the gate's
        threshold for this row: the slowdown, as a fraction, past which it is a regression."""
        from pytest_attn.bench.timing import GraphCaptureError, copy_peak_gbps, matmul_peak_tflops

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
                             metric=metric, copy_peak_gbps=copy_peak_gbps(batch.device))
        threshold = threshold if threshold is not None else marker_threshold(self.node)
        if threshold is not None:
            self.info["gate_threshold"] = float(threshold)
        self.benchmark.extra_info.update(self.info)
        if self.node is not None:
            recorded_rows(self.node.config).append((self.node.nodeid, self.info))
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
    return AttnBenchmark(benchmark, attn_session, settings_from_config(request.config), request.node)


THRESHOLD_MARKER = "attn_gate_threshold"


def marker_threshold(node) -> Optional[float]:
    """The ``attn_gate_threshold(FRACTION)`` marker's value on this test, checked; None without one."""
    marker = node.get_closest_marker(THRESHOLD_MARKER) if node is not None else None
    if marker is None:
        return None
    value = marker.args[0] if marker.args else marker.kwargs.get("threshold")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 10:
        pytest.fail(f"@pytest.mark.{THRESHOLD_MARKER}({value!r}): give the slowdown that counts as a regression as a "
                    "fraction, e.g. 0.2 for 20%", pytrace=False)
    return float(value)


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
