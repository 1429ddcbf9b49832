"""The benchmark fixture, its timers and pytest-benchmark's regression gate, on CPU.

The pytester runs use tiny batches and few iterations (--attn-bench-iters/--attn-bench-warmup) so
they stay quick on a 2-core CI runner.
"""
import json
import time

import pytest

from pytest_attn.bench.machine import machine_key
from pytest_attn.bench.measure import BenchSettings, bench_max_tokens
from pytest_attn.bench.roofline import attended_pairs, attention_flops
from pytest_attn.plugin.benchmark import ReplayClock, compare_machine_info, settings_from_config
from pytest_attn.core.contract import LayerSpec
from pytest_attn.core.metadata import AttentionMetadata
from pytest_attn.bench.timing import GRAPH_MODES, measure_call

FAST = ["--attn-bench-iters=5", "--attn-bench-warmup=1", "-p", "no:cacheprovider"]

# A test-local backend: real inputs and output contract, and a forward that sleeps for
# $ATTN_TEST_SLEEP_S, so the pytester test can slow it down between two runs.
SLEEPY_TEST = '''
import os
import time

from pytest_attn.core.contract import Backend, Plan
from pytest_attn.plugin.fixtures import build_batch

CALLS = []


class SleepyBackend(Backend):
    name = "sleepy"

    def plan(self, metadata, layer, device="cpu"):
        return Plan(self.name, "sleep", "python", "NHD", "tokens", False, device=str(device), layer=layer)

    def forward(self, q, k, v, metadata, plan, out=None):
        CALLS.append(1)
        time.sleep(float(os.environ.get("ATTN_TEST_SLEEP_S", "0")))
        out.copy_(v)
        return out


def test_speed(attn_benchmark):
    batch = build_batch([8, 4], num_heads=2, head_dim=8)
    attn_benchmark(SleepyBackend(), batch, series="sleepy")
    print(f"forward calls: {len(CALLS)}")
'''

# py-cpuinfo takes over a second per call and pytest-benchmark asks for machine_info on every save and
# compare: the pytester runs answer with a cheap one (the `attn` part is still added by the plugin).
CHEAP_MACHINE_INFO = """
import platform

def pytest_benchmark_generate_machine_info(config):
    return {"node": platform.node(), "machine": platform.machine(), "cpu": {"brand_raw": "test cpu"}}
"""


@pytest.fixture
def pytester(pytester, monkeypatch):
    pytester.makeconftest(CHEAP_MACHINE_INFO)
    # pytest-benchmark switches itself off in any process that looks like an xdist worker; the
    # runs made here are not workers even when this suite runs under -n.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    return pytester


# -- FLOPs --------------------------------------------------------------------------------------------
def brute_pairs(q_len, kv_len, causal, window_left=-1):
    count = 0
    for i in range(q_len):
        pos = kv_len - q_len + i
        for key in range(kv_len):
            if causal and key > pos:
                continue
            if window_left >= 0 and key < pos - window_left:
                continue
            count += 1
    return count


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (5, 5), (3, 9), (1, 40), (17, 17)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_left", [-1, 0, 4])
def test_attended_pairs_counts_unmasked_pairs(q_len, kv_len, causal, window_left):
    assert attended_pairs(q_len, kv_len, causal, window_left) == brute_pairs(q_len, kv_len, causal, window_left)


def test_attention_flops_sums_requests():
    metadata = AttentionMetadata.ragged([128, 64])
    full = LayerSpec(16, 16, 80, mask="full")
    causal = LayerSpec(16, 16, 80, mask="causal")
    assert attention_flops(metadata, full) == 4 * (128 * 128 + 64 * 64) * 80 * 16
    assert attention_flops(metadata, causal) == 4 * (128 * 129 // 2 + 64 * 65 // 2) * 80 * 16


# -- timers -------------------------------------------------------------------------------------------
def test_cpu_timer_records_wall_time_after_warmup():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.002)

    timing = measure_call(work, device="cpu", warmup=2, iters=4)
    assert len(calls) == 6 and timing.iters == 4 and timing.method == "wall-clock"
    assert all(s >= 0.002 for s in timing.device_s)
    assert timing.host_overhead_s == 0.0  # on the CPU the host is the device


def test_timer_rejects_bad_settings():
    with pytest.raises(ValueError, match="graph="):
        measure_call(lambda: None, graph="sometimes")
    with pytest.raises(ValueError, match="iters >= 1"):
        measure_call(lambda: None, iters=0)
    assert GRAPH_MODES == ("auto", "on", "off")


def test_replay_clock_moves_only_by_samples():
    clock = ReplayClock([0.5, 0.25], "cuda-graph")
    before = clock()
    clock.advance()
    assert clock() - before == 0.5 and clock.__name__ == "pytest_attn.bench.timing[cuda-graph]"


def test_bench_max_tokens_is_small_on_cpu_unless_asked():
    class Session:
        device_type, max_tokens_option = "cpu", None

    assert bench_max_tokens(Session()) == 256
    Session.max_tokens_option = 0
    assert bench_max_tokens(Session()) is None
    Session.device_type, Session.max_tokens_option = "cuda", None
    assert bench_max_tokens(Session()) is None


def test_settings_come_from_the_options(pytester):
    config = pytester.parseconfigure("--attn-bench-iters=7", "--attn-bench-warmup=0", "--attn-bench-graph=off",
                                  "--attn-bench-cold-l2")
    assert settings_from_config(config) == BenchSettings(0, 7, "off", True)
    bad = pytester.runpytest("--attn-bench-iters=0")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--attn-bench-iters must be >= 1*"])


# -- machine_info ---------------------------------------------------------------------------------------
def test_baseline_from_another_gpu_is_refused():
    h100 = {"attn": {"gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0"}}
    a100 = {"attn": {"gpu": "NVIDIA A100-SXM4-80GB", "gpu_capability": "8.0"}}
    compare_machine_info(None, None, h100, {"machine_info": h100})  # same GPU: fine
    with pytest.raises(pytest.UsageError, match="baseline was recorded on NVIDIA A100"):
        compare_machine_info(None, None, h100, {"machine_info": a100})
    assert machine_key({"cpu": {"brand_raw": "AMD EPYC"}, "attn": {"gpu": None}}) == "cpu: AMD EPYC"


# -- the fixture, through pytest-benchmark ----------------------------------------------------------------
def test_rows_hold_device_time_and_extra_info(pytester, monkeypatch):
    monkeypatch.setenv("ATTN_TEST_SLEEP_S", "0")
    pytester.makepyfile(test_rows=SLEEPY_TEST)
    result = pytester.runpytest(*FAST, "--benchmark-json=out.json")
    result.assert_outcomes(passed=1)
    data = json.loads((pytester.path / "out.json").read_text())
    assert data["machine_info"]["attn"]["device"] == "cpu" and data["machine_info"]["attn"]["torch"]
    (row,) = data["benchmarks"]
    info, stats = row["extra_info"], row["stats"]
    assert stats["rounds"] == 5 and row["options"]["timer"] == "pytest_attn.bench.timing[wall-clock]"
    assert info["backend"] == "sleepy" and info["plan"] == "sleep[python] NHD tokens no cache"
    assert info["plan_dict"]["kernel"] == "sleep" and info["plan_dict"]["layer"]["head_dim"] == 8
    assert info["seq_lens"] == [8, 4] and info["tokens"] == 12 and info["dtype"] == "bfloat16"
    assert info["flops"] == 4 * (8 * 8 + 4 * 4) * 8 * 2
    assert info["device_ms"] == pytest.approx(stats["median"] * 1e3)
    assert info["us_per_token"] == pytest.approx(stats["median"] * 1e6 / 12)
    assert info["tflops"] == pytest.approx(info["flops"] / stats["median"] / 1e12)
    assert info["matmul_peak_tflops"] > 0 and info["pct_of_matmul_peak"] > 0
    assert info["bytes"] > 0 and info["gbps"] == pytest.approx(info["bytes"] / stats["median"] / 1e9)
    assert info["copy_peak_gbps"] > 0 and info["pct_of_copy_peak"] > 0
    device, eager = info["samples_s"]["device"], info["samples_s"]["eager"]  # every sample, for the gate
    assert len(device) == len(eager) == 5 and sorted(device)[2] == pytest.approx(stats["median"])
    assert info["device_spread"] is not None and info["eager_spread"] is not None
    for key in ("plan_ms", "plan_first_ms", "host_overhead_ms", "timer", "warmup", "iters"):
        assert key in info
    assert info["warmup"] == 1 and info["iters"] == 5


@pytest.mark.attn_long
def test_regression_gate_fails_a_slowed_backend_and_passes_an_unchanged_one(pytester, monkeypatch):
    """Baseline, then the same backend (passes), then the backend slowed 4x (fails the gate)."""
    pytester.makepyfile(test_gate=SLEEPY_TEST)
    gate = ["--benchmark-compare", "--benchmark-compare-fail=median:100%"]
    monkeypatch.setenv("ATTN_TEST_SLEEP_S", "0.01")
    pytester.runpytest(*FAST, "--benchmark-autosave").assert_outcomes(passed=1)
    assert list((pytester.path / ".benchmarks").rglob("*.json")), "--benchmark-autosave saved nothing"

    unchanged = pytester.runpytest(*FAST, *gate)
    assert unchanged.ret == 0, unchanged.stdout.str()
    assert "Performance has regressed" not in unchanged.stdout.str()

    monkeypatch.setenv("ATTN_TEST_SLEEP_S", "0.04")
    # a subprocess: pytest-benchmark raises out of the terminal summary, and the exit code is what CI sees
    slowed = pytester.runpytest_subprocess(*FAST, *gate)
    assert slowed.ret == 1
    slowed.stderr.fnmatch_lines(["*Performance has regressed*", "*test_speed*median*"])  # pytest-benchmark logs it there


def test_disabled_benchmarks_run_the_call_once(pytester, monkeypatch):
    """Under xdist (or --benchmark-disable) pytest-benchmark is off: the call runs once, untimed."""
    monkeypatch.setenv("ATTN_TEST_SLEEP_S", "0")
    pytester.makepyfile(test_disabled=SLEEPY_TEST)
    result = pytester.runpytest(*FAST, "--benchmark-disable", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*forward calls: 1*"])


def test_unsupported_case_skips_with_the_reason(pytester):
    pytester.makepyfile(test_unsupported='''
        from pytest_attn.core.contract import Backend, Capabilities
        from pytest_attn.plugin.fixtures import build_batch

        class CudaOnly(Backend):
            name = "cuda-only"
            capabilities = Capabilities(devices=frozenset({"cuda"}))
            def plan(self, metadata, layer, device="cpu"):
                raise AssertionError("planned an unsupported case")
            def forward(self, q, k, v, metadata, plan, out=None):
                raise AssertionError("ran an unsupported case")

        def test_speed(attn_benchmark):
            attn_benchmark(CudaOnly(), build_batch([4], num_heads=2, head_dim=8))
    ''')
    result = pytester.runpytest(*FAST, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*cuda-only: runs on cuda, not cpu*"])


def test_gate_refuses_a_baseline_from_another_gpu(pytester, monkeypatch):
    """With the pytest_benchmark_compare_machine_info hook forwarding to bench.compare_machine_info."""
    pytester.makeconftest(CHEAP_MACHINE_INFO + '''

def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    from pytest_attn.plugin.benchmark import compare_machine_info

    compare_machine_info(config, benchmarksession, machine_info, compared_benchmark)
''')
    monkeypatch.setenv("ATTN_TEST_SLEEP_S", "0")
    pytester.makepyfile(test_gpu=SLEEPY_TEST)
    pytester.runpytest(*FAST, "--benchmark-autosave").assert_outcomes(passed=1)
    (saved,) = (pytester.path / ".benchmarks").rglob("*.json")
    data = json.loads(saved.read_text())
    data["machine_info"]["attn"].update(gpu="NVIDIA A100-SXM4-80GB", gpu_capability="8.0")
    saved.write_text(json.dumps(data))
    result = pytester.runpytest(*FAST, "--benchmark-compare", "--benchmark-compare-fail=median:100%")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*baseline was recorded on NVIDIA A100-SXM4-80GB (sm 8.0), this run is on cpu*"])


# -- pytest-benchmark's own flags, with the bundled suite's attention benchmarks ----------------------------
# test_benchmark_flags.py runs --benchmark-only, -json, -autosave with -compare, and -skip and -disable with
# -m attn_bench; here, the flags alone decide whether the attention benchmarks run. The suite runs torch on
# one short correctness case (its output and plan tests) and its three benchmarks up to 256 tokens, beside a
# plain test of the user's own.
SUITE_BENCH = ["--attn-backend=torch", "--attn-suite=on", "--attn-cases=gqa-r2-kv1", "--attn-max-tokens=256",
               "-p", "no:xdist", "-rs", *FAST]
USER_TEST = "def test_mine():\n    assert 1 + 1 == 2\n"
NOT_ASKING = ([], ["--benchmark-skip"], ["--benchmark-skip", "--benchmark-json=x.json"])


@pytest.mark.parametrize("asking", [*NOT_ASKING, ["-m", "attn_bench"], ["--benchmark-disable"], ["--benchmark-only"],
                                    ["--benchmark-json=x.json"], ["--benchmark-autosave"], ["--benchmark-compare"],
                                    ["--benchmark-save=base"], ["--benchmark-skip", "--benchmark-only"],
                                    ["-m", "attn_bench", "--benchmark-skip"]])
def test_which_options_ask_for_benchmarks(pytester, asking):
    from pytest_attn.plugin.benchmark import benchmarks_asked

    assert benchmarks_asked(pytester.parseconfigure(*asking)) == (asking not in NOT_ASKING)


@pytest.mark.parametrize("extra", NOT_ASKING)
def test_a_correctness_run_and_benchmark_skip_run_no_benchmark(pytester, extra):
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest(*SUITE_BENCH, *extra)
    result.assert_outcomes(passed=5)  # the user's test, and torch's output, plan, kernel-trace and same-bits tests
    assert "test_benchmarks.py" not in result.stdout.str() and "Name (time in" not in result.stdout.str()
    assert not (pytester.path / "x.json").exists()


def test_benchmark_disable_alone_runs_each_benchmark_once_untimed(pytester):
    """pytest-benchmark: "Benchmarked functions are only ran once and no stats are reported. Use this
    if you want to run the test but don't do any benchmarking." """
    result = pytester.runpytest(*SUITE_BENCH, "--benchmark-disable")
    result.assert_outcomes(passed=7)  # the three benchmarks, and torch's four correctness tests
    result.stdout.fnmatch_lines(["test_benchmarks.py ...*"])
    assert "Name (time in" not in result.stdout.str()


def test_without_pytest_benchmark_the_attention_benchmarks_are_skipped_with_the_reason(pytester):
    pytester.makeconftest("")  # without pytest-benchmark's hooks
    result = pytester.runpytest(*SUITE_BENCH, "-m", "attn_bench", "-p", "no:benchmark")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*pytest-benchmark is not loaded (-p no:benchmark?)*"])


# -- a broken backend in a benchmark is named ---------------------------------------------------------------
BROKEN_BACKENDS = '''
import torch

from pytest_attn.core.contract import Backend, Plan


class Copies(Backend):
    """Writes v into out: a backend that keeps the contract (not attention: nothing here checks it)."""

    def __init__(self, name, breaks=None):
        self.name, self.breaks, self.calls = name, breaks, 0

    def plan(self, metadata, layer, device="cpu"):
        if self.breaks == "plan":
            raise KeyError("no kernel for this head_dim")
        if self.breaks == "plan-returns":
            return "cudnn"
        return Plan(self.name, "copy", "python", "NHD", "tokens", False, device=str(device), layer=layer)

    def forward(self, q, k, v, metadata, plan, out=None):
        self.calls += 1
        if self.breaks == "forward-returns":
            return torch.zeros_like(out)  # a new tensor, not the buffer it was given
        if self.breaks == "later-forward" and self.calls > 1:
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")  # fine once, broken when timed
        out.copy_(v)
        return out
'''
BREAKS = {"plan": "raised in plan(): KeyError: 'no kernel for this head_dim'",
          "plan-returns": "plan() returned 'cudnn', not a pytest_attn.Plan",
          "forward-returns": "forward() returned a tensor that is not the `out` buffer it was given",
          "later-forward": "raised in forward(): RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED"}


@pytest.fixture
def broken_backends():
    namespace = {}
    exec(BROKEN_BACKENDS, namespace)
    return namespace["Copies"]


@pytest.mark.parametrize("breaks", BREAKS)
def test_measure_backend_names_a_broken_backend(broken_backends, breaks):
    from pytest_attn.bench.measure import measure_backend
    from pytest_attn.check.batch import build_batch
    from pytest_attn.core.calls import BackendError

    batch = build_batch([8, 4], num_heads=2, head_dim=8)
    with pytest.raises(BackendError) as raised:
        measure_backend(broken_backends(f"broken-{breaks}", breaks), batch, BenchSettings(warmup=1, iters=3))
    assert f"backend 'broken-{breaks}'" in str(raised.value) and BREAKS[breaks] in str(raised.value)
    plan, timing, _ = measure_backend(broken_backends("copies"), batch, BenchSettings(warmup=1, iters=3))
    assert plan.kernel == "copy" and timing.iters == 3  # the same backend, unbroken, is measured


def test_a_broken_backend_fails_its_benchmark_with_its_name(pytester):
    pytester.makepyfile(test_broken=BROKEN_BACKENDS + '''

import pytest
from pytest_attn.check.batch import build_batch

@pytest.mark.parametrize("breaks", [None, "later-forward"])
def test_speed(attn_benchmark, breaks):
    attn_benchmark(Copies(f"copies-{breaks}", breaks), build_batch([8, 4], num_heads=2, head_dim=8))
''')
    result = pytester.runpytest(*FAST, "--benchmark-json=out.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*BackendError: backend 'copies-later-forward' (*) raised in forward(): "
                                 "RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED*"])
    rows = json.loads((pytester.path / "out.json").read_text())["benchmarks"]
    assert [row["extra_info"]["backend"] for row in rows] == ["copies-None"]
