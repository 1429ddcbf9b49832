"""The performance gate (bench.gate, --attn-gate, `pytest-attn gate`), `pytest-attn ab`, `pytest-attn
history`, timing that cannot be gamed, and bench/ without pytest. On CPU: sleeps and planted
backends stand in for slow kernels (tests/gaming_backends.py)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from backend_packages import write_backend_package
from gaming_backends import CachesOutput, CopiesCachedOutput, FinishesLater, WritesNaN
from pytest_attn.bench import gate as gate_mod
from pytest_attn.bench.gate import GateError, RowSamples, SavedRun, compare_rows, gate, ratio_interval, rows_of
from pytest_attn.bench.history import Point, Series
from pytest_attn.bench.machine import differences
from pytest_attn.cli import args
from pytest_attn.cli import main as cli

def samples(median, rel_noise=0.01, n=40):
    """n samples spread like a normal distribution around ``median`` (its quantiles, in a fixed
    shuffled order): the same in every test order and process, with exactly that median."""
    from scipy.stats import norm

    z = norm.ppf((np.arange(n) + 0.5) / n)
    z = z[np.random.default_rng(n).permutation(n)]
    return tuple(float(x) for x in median * (1 + rel_noise * z))


# -- bench/ imports no pytest ---------------------------------------------------------------------------
NO_PYTEST = """
import sys
{body}
leaked = sorted(m for m in sys.modules
                if m in ("pytest", "_pytest") or m.startswith(("_pytest.", "pytest_attn.plugin")))
assert not leaked, leaked
print("clean")
"""


@pytest.mark.parametrize("body", [
    "import pytest_attn.bench.measure, pytest_attn.bench.compare, pytest_attn.bench.gate, pytest_attn.bench.history, "
    "pytest_attn.bench.ab, pytest_attn.bench.timing, pytest_attn.bench.machine",
    "from pytest_attn.cli.main import main\nassert main(['compare', 'runs']) == 0",
    "from pytest_attn.cli.main import main\nassert main(['vit-table', '--backends', 'torch', '--seq-lens', '16', "
    "'--iters', '1', '--warmup', '0', '--no-mix', '--device', 'cpu']) == 0",
    "from pytest_attn.cli.main import main\nassert main(['seed-table', '--backends', 'torch', '--seq-lens', '16', "
    "'--iters', '1', '--warmup', '0', '--no-mix', '--device', 'cpu']) == 0",
    "from pytest_attn.cli.main import main\nassert main(['gate', 'runs/a.json', 'runs/a.json']) == 0",
], ids=["modules", "compare", "vit-table", "seed-table", "gate"])
def test_bench_and_the_benchmark_commands_import_no_pytest(tmp_path, body):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text(json.dumps(saved_run({"t[seq64]": samples(1e-3)})))
    done = subprocess.run([sys.executable, "-c", NO_PYTEST.format(body=body)], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "clean" in done.stdout, done.stdout + done.stderr


def test_seed_table_is_a_deprecated_alias_of_vit_table(capsys):
    argv = ["--backends", "torch", "--seq-lens", "16", "--iters", "1", "--warmup", "0", "--no-mix", "--device", "cpu"]
    assert cli.main(["seed-table", *argv]) == 0
    old = capsys.readouterr().out
    assert cli.main(["vit-table", *argv]) == 0
    new = capsys.readouterr().out
    assert old.splitlines()[-1] == cli.DEPRECATED_SEED_TABLE and cli.DEPRECATED_SEED_TABLE not in new
    assert "ViT table" in new and "seed" not in new.split("\n")[0].lower().replace("seed ", "")


# -- the statistics -----------------------------------------------------------------------------------------
def test_ratio_interval_holds_the_true_ratio_and_is_reproducible():
    base, head = samples(1.0), samples(1.2)
    ratio, low, high = ratio_interval(base, head)
    assert low < ratio < high and low < 1.2 < high and high - low < 0.05
    assert ratio_interval(base, head) == (ratio, low, high)  # a fixed seed: a rerun prints the same


def _outcome(head, base=None, threshold=None):
    b = RowSamples("t", "device", base or samples(1.0))
    h = RowSamples("t", "device", head, threshold)
    return compare_rows([b], [h]).verdicts[0].outcome


def test_a_row_regresses_when_its_interval_is_past_half_the_threshold_and_reaches_it():
    assert _outcome(samples(1.20)) == "regressed"
    assert _outcome(samples(0.80)) == "improved"
    assert _outcome(samples(1.0)) == "unchanged"
    # the median moved 8%, but the samples spread 40%: the interval is wider than 5%, so it cannot tell
    assert _outcome(samples(1.08, 0.4, 12), samples(1.0, 0.4, 12)) == "unresolved"
    assert _outcome(samples(1.20), threshold=0.5) == "unchanged"  # the row's own threshold wins


@pytest.mark.parametrize("seed", range(5))
def test_a_slowdown_equal_to_the_threshold_is_caught_every_time(seed):
    """5% slower with 0.3% noise: the median ratio lands on either side of 1.05, the interval always
    clears +2.5% and reaches +5%. A rule asking the whole interval to lie past +5% caught 0 of 40 seeds:
    its interval straddles 1.05."""
    rng = np.random.default_rng(seed)
    base = tuple(1.0 + 0.003 * rng.standard_normal(50))
    head = tuple(1.05 + 0.003 * rng.standard_normal(50))
    verdict = compare_rows([RowSamples("t", "device", base)], [RowSamples("t", "device", head)]).verdicts[0]
    assert verdict.outcome == "regressed", (verdict.low, verdict.high)


def test_a_tight_small_drift_is_not_a_regression_of_the_thresholds_size():
    # +3% with 0.2% noise: certainly slower, certainly not 5% slower
    assert _outcome(samples(1.03, 0.002), samples(1.0, 0.002)) == "unchanged"
    assert _outcome(samples(0.97, 0.002), samples(1.0, 0.002)) == "unchanged"
    assert gate_mod.outcome(1.026, 1.05, 0.05) == "regressed" and gate_mod.outcome(1.024, 1.06, 0.05) == "unchanged"
    assert gate_mod.outcome(1.024, 1.2, 0.05) == "unresolved"  # wider than the threshold: cannot tell
    assert gate_mod.outcome(0.95, 0.974, 0.05) == "improved" and gate_mod.outcome(0.951, 0.974, 0.05) == "unchanged"


def test_a_planted_gate_that_ignores_the_interval_would_fail_these_tests(monkeypatch):
    """The check of the check: a gate deciding on the median ratio alone flags the noisy row above."""
    monkeypatch.setattr(gate_mod.Verdict, "outcome", property(lambda v: "regressed" if v.ratio > 1 + v.threshold
                                                                else "unchanged"))
    noisy = compare_rows([RowSamples("t", "device", samples(1.0, 0.4, 12))],
                         [RowSamples("t", "device", samples(1.3, 0.4, 12))]).verdicts[0]
    assert noisy.outcome == "regressed" and noisy.low < 1.05  # what the real rule refuses to call


def test_regimes_have_their_own_thresholds():
    base = [RowSamples("t", "device", samples(1.0, 0.002)), RowSamples("t", "eager", samples(1.0, 0.002))]
    head = [RowSamples("t", "device", samples(1.07, 0.002)), RowSamples("t", "eager", samples(1.07, 0.002))]
    outcomes = {v.regime: v.outcome for v in compare_rows(base, head).verdicts}
    assert outcomes == {"device": "regressed", "eager": "unchanged"}  # 5% and 10% by default
    assert {v.regime: v.outcome for v in compare_rows(base, head, {"eager": 0.02}).verdicts}["eager"] == "regressed"


# -- saved runs -----------------------------------------------------------------------------------------------
def saved_run(rows: dict, *, metric="device", gpu=None, torch="2.13.0", threshold=None) -> dict:
    attn = {"device": "cuda:0" if gpu else "cpu", "gpu": gpu, "gpu_capability": "9.0" if gpu else None,
            "torch": torch, "cuda": "12.8" if gpu else None, "cpu": "test cpu"}
    benchmarks = []
    for name, values in rows.items():
        info = {"backend": "b", "metric": metric, "samples_s": {metric: list(values)}}
        if threshold is not None:
            info["gate_threshold"] = threshold
        benchmarks.append({"fullname": name, "extra_info": info, "stats": {"median": float(np.median(values))}})
    return {"machine_info": {"attn": attn}, "benchmarks": benchmarks, "commit_info": {"id": "abc"},
            "datetime": "2026-12-04T10:00:00"}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_gate_command_fails_on_a_regressed_row_with_one_table_and_a_final_line(tmp_path, capsys):
    base = write(tmp_path, "base.json", saved_run({"t[a]": samples(1e-3), "t[b]": samples(2e-3)}, gpu="NVIDIA H200"))
    head = write(tmp_path, "head.json", saved_run({"t[a]": samples(1.3e-3), "t[b]": samples(2e-3)}, gpu="NVIDIA H200"))
    assert cli.main(["gate", base, head]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out.split("t[a]")[1].splitlines()[0] and "Traceback" not in out
    assert out.splitlines()[-1].startswith("pytest-attn gate: FAILED: 1 of 2 rows regressed")
    assert cli.main(["gate", base, base]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("pytest-attn gate: passed: 0 of 2 rows regressed")


def test_runs_from_other_versions_or_machines_are_refused_naming_the_difference(tmp_path, capsys):
    base = write(tmp_path, "base.json", saved_run({"t": samples(1e-3)}, gpu="NVIDIA H200"))
    newer = write(tmp_path, "newer.json", saved_run({"t": samples(1e-3)}, gpu="NVIDIA H200", torch="2.14.0"))
    other = write(tmp_path, "other.json", saved_run({"t": samples(1e-3)}, gpu="NVIDIA A100"))
    assert cli.main(["gate", base, newer]) == args.USAGE
    assert "torch 2.13.0 -> 2.14.0" in capsys.readouterr().err
    assert cli.main(["gate", base, other]) == args.USAGE
    assert "machine NVIDIA H200 (sm 9.0) -> NVIDIA A100 (sm 9.0)" in capsys.readouterr().err
    assert differences(json.load(open(base))["machine_info"], json.load(open(base))["machine_info"]) == []


def test_cpu_timings_are_shown_but_not_gated_unless_asked(tmp_path, capsys):
    base = write(tmp_path, "base.json", saved_run({"t": samples(1e-3)}))
    head = write(tmp_path, "head.json", saved_run({"t": samples(2e-3)}))
    assert cli.main(["gate", base, head]) == 0
    assert "NOT GATED" in capsys.readouterr().out
    assert cli.main(["gate", base, head, "--gate-cpu"]) == 1


def test_a_rows_saved_threshold_is_used_and_rows_without_samples_say_so(tmp_path):
    data = saved_run({"t": samples(1e-3)}, threshold=0.5)
    (row,) = rows_of(data)
    assert row.threshold == 0.5 and row.regime == "device"
    empty = write(tmp_path, "empty.json", {"machine_info": {}, "benchmarks": [
        {"fullname": "t", "extra_info": {"backend": "b"}, "stats": {"median": 1.0}}]})
    with pytest.raises(GateError, match="keeps no timed samples"):
        gate_mod.load_saved(empty)


# -- --attn-gate in a pytest run ---------------------------------------------------------------------------------
SLEEPY = '''
import os
import time

from pytest_attn.core.contract import Backend, Plan
from pytest_attn.plugin.fixtures import build_batch


class SleepyBackend(Backend):
    name = "sleepy"

    def plan(self, metadata, layer, device="cpu"):
        return Plan(self.name, "sleep", "python", "NHD", "tokens", False, device=str(device), layer=layer)

    def forward(self, q, k, v, metadata, plan, out=None):
        time.sleep(float(os.environ.get("ATTN_TEST_SLEEP_S", "0")))
        out.copy_(v * 1)
        return out


def test_speed(attn_benchmark):
    attn_benchmark(SleepyBackend(), build_batch([8], num_heads=2, head_dim=8), series="sleepy")
'''
CHEAP_MACHINE_INFO = """
def pytest_benchmark_generate_machine_info(config):
    return {"machine": "x86_64", "cpu": {"brand_raw": "test cpu"}}
"""
FAST = ["--attn-bench-iters=12", "--attn-bench-warmup=1", "-p", "no:cacheprovider", "-p", "no:randomly"]


@pytest.fixture
def sleepy(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest(CHEAP_MACHINE_INFO)
    pytester.makepyfile(test_sleepy=SLEEPY)
    monkeypatch.setenv("ATTN_TEST_SLEEP_S", "0.004")
    pytester.runpytest(*FAST, "--benchmark-json=base.json").assert_outcomes(passed=1)
    return pytester


def test_attn_gate_ends_a_slowed_run_with_the_table_and_exit_1_never_a_traceback(sleepy, monkeypatch):
    monkeypatch.setenv("ATTN_TEST_SLEEP_S", "0.016")
    slowed = sleepy.runpytest_subprocess(*FAST, "--attn-gate=base.json", "--attn-gate-cpu")
    assert slowed.ret == 1
    out = slowed.stdout.str()
    slowed.stdout.fnmatch_lines(["*pytest-attn performance gate*", "row*regime*ratio*95% interval*threshold*",
                                 "*test_speed*device*REGRESSED*",
                                 "pytest-attn gate: FAILED: 1 of 1 rows regressed against base.json*"])
    assert "Traceback" not in out + slowed.stderr.str() and "PerformanceRegression" not in out


def test_attn_gate_passes_an_unchanged_run_and_does_not_gate_cpu_unless_asked(sleepy, monkeypatch):
    # a loaded CI box stretches a sleep by whole scheduler slices: only a 2x slowdown counts here
    unchanged = sleepy.runpytest(*FAST, "--attn-gate=base.json", "--attn-gate-cpu", "--attn-gate-threshold=device=1.0")
    assert unchanged.ret == 0, unchanged.stdout.str()
    unchanged.stdout.fnmatch_lines(["pytest-attn gate: passed: 0 of 1 rows regressed*"])
    monkeypatch.setenv("ATTN_TEST_SLEEP_S", "0.016")
    cpu = sleepy.runpytest(*FAST, "--attn-gate=base.json")
    assert cpu.ret == 0
    cpu.stdout.fnmatch_lines(["pytest-attn gate: NOT GATED: CPU timings*1 of 1 rows would have regressed*"])


def test_attn_gate_with_no_benchmark_run_fails_saying_so(sleepy):
    result = sleepy.runpytest(*FAST, "--attn-gate=base.json", "--benchmark-skip")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["pytest-attn gate: FAILED: no attention benchmark was timed*"])


@pytest.mark.parametrize("argv, message", [
    (["--attn-gate=nope.json"], "*--attn-gate=nope.json does not exist*"),
    (["--attn-gate-threshold=device"], "*--attn-gate-threshold 'device': write REGIME=FRACTION*"),
    (["--attn-gate-threshold=graph=0.1"], "*write REGIME=FRACTION with REGIME device or eager*"),
])
def test_bad_gate_options_are_usage_errors(pytester, argv, message):
    result = pytester.runpytest(*argv)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_the_threshold_marker_lands_in_the_row(sleepy):
    sleepy.makepyfile(test_sleepy=SLEEPY.replace("def test_speed", "import pytest\n\n"
                                                 "@pytest.mark.attn_gate_threshold(0.3)\ndef test_speed"))
    sleepy.runpytest(*FAST, "--benchmark-json=marked.json").assert_outcomes(passed=1)
    (row,) = json.loads((sleepy.path / "marked.json").read_text())["benchmarks"]
    assert row["extra_info"]["gate_threshold"] == 0.3 and len(row["extra_info"]["samples_s"]["eager"]) == 12


# -- timing that cannot be gamed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [CachesOutput(), CopiesCachedOutput(), FinishesLater()],
                         ids=["cached-output", "copies-a-cached-output", "finishes-after-returning"])
def test_a_backend_that_games_the_timer_is_caught(backend):
    from pytest_attn.bench.ab import vit_batch
    from pytest_attn.bench.measure import BenchSettings, TimedCallsDidNotCompute, measure_backend

    try:
        with pytest.raises(TimedCallsDidNotCompute, match="its timed calls did not compute"):
            measure_backend(backend, vit_batch(32, "cpu"), BenchSettings(1, 3, "auto", False))
    finally:
        getattr(backend, "wait", lambda: None)()


def test_a_backend_whose_output_is_nan_is_not_timed():
    from pytest_attn.bench.ab import vit_batch
    from pytest_attn.bench.measure import BenchSettings, OutputNotFinite, measure_backend

    with pytest.raises(OutputNotFinite, match=r"backend 'writes-nan': its output holds 40960 NaN/Inf value\(s\) of 40960"):
        measure_backend(WritesNaN(), vit_batch(32, "cpu"), BenchSettings(1, 3, "auto", False))


def test_an_honest_backend_passes_the_compute_check():
    from pytest_attn.bench.ab import vit_batch
    from pytest_attn.bench.measure import BenchSettings, measure_backend
    from pytest_attn_backends.torch_sdpa import TorchSDPABackend

    _, timing, _ = measure_backend(TorchSDPABackend(name="torch"), vit_batch(32, "cpu"), BenchSettings(1, 3))
    assert len(timing.device_s) == 3


# -- pytest-attn ab -----------------------------------------------------------------------------------------------
AB_BACKENDS = """
import time
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

class Slower(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        time.sleep(0.01)
        return super().forward(q, k, v, metadata, plan, out=out)

BACKENDS = [TorchSDPABackend(name="same"), Slower(name="slower")]
"""
AB_FAST = ["--seq-lens", "16", "--rounds", "2", "--iters", "6", "--warmup", "1", "--device", "cpu"]


@pytest.mark.attn_long
def test_ab_flags_a_slower_head_and_passes_the_same_code(pytester, capsys):
    write_backend_package(pytester, "ab_attn", AB_BACKENDS, {"ab": "ab_attn:BACKENDS"})
    assert cli.main(["ab", "--base", "same", "--head", "slower", "--gate-cpu", *AB_FAST]) == 1
    out = capsys.readouterr().out
    assert "vit-table seq 16  device" in out and "REGRESSED" in out and "round 2/2 done" in out
    assert out.splitlines()[-1].startswith("pytest-attn gate: FAILED")
    assert cli.main(["ab", "--base", "same", "--head", "torch", "--gate-cpu", "--threshold",
                     "device=0.9,eager=0.9", *AB_FAST, "--json", "ab.json"]) == 0
    saved = json.loads(pytester.path.joinpath("ab.json").read_text())  # in one process: eager pair by pair
    assert saved["paired"] == ["eager"] and saved["failed"] is False
    eager = next(v for v in saved["verdicts"] if v["regime"] == "eager")
    assert eager["basis"] == "paired" and eager["pair_spread"] is not None and eager["outcome"] == "unchanged"


def test_ab_refuses_the_same_backend_in_one_environment(capsys):
    assert cli.main(["ab", "--base", "torch", "--head", "torch", "--device", "cpu"]) == args.USAGE
    assert "name two backends" in capsys.readouterr().err


@pytest.mark.attn_long
def test_ab_times_another_environment_in_alternating_subprocesses(capsys, tmp_path):
    assert cli.main(["ab", "--base", "torch", "--head", "torch", "--head-python", sys.executable,
                     "--base-python", sys.executable, *AB_FAST, "--json", str(tmp_path / "ab.json")]) == 0
    out = capsys.readouterr().out
    assert "base torch@" in out and "round 2/2 done" in out and "NOT GATED" in out.splitlines()[-1]
    assert "with pytest-attn ab" not in out  # ab's own advice, when a row is unresolved, is more rounds
    assert f"  head: {sys.executable} with pytest_attn from " in out
    # --json keeps what the table showed and every sample: 2 rounds x 6 per side; no pairs across processes
    saved = json.loads((tmp_path / "ab.json").read_text())
    assert saved["gated"] is False and saved["paired"] == [] and saved["rounds"] == 2
    assert {v["regime"] for v in saved["verdicts"]} == {"device", "eager"}
    assert all(v["outcome"] in out for v in saved["verdicts"]) and saved["verdicts"][0]["pair_spread"] is None
    assert len(saved["samples"]["head"]["vit-table seq 16"]["eager"]) == 12


@pytest.mark.attn_long
def test_the_gpu_evidence_script_runs_the_commands_users_run(tmp_path):
    """tests/evidence/gate_evidence.py on CPU (its smoke test, falling back to torch): the flow
    ab-processes runs the pytest-attn ab command itself, its sides in subprocesses, the planted
    wrapper reaching them through an entry point (the script stops when the command's verdicts differ
    from the gate's code on the samples --json kept); the flow pytest, pytest --attn-gate."""
    from pathlib import Path

    script = Path(__file__).resolve().parent / "evidence" / "gate_evidence.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--device", "cpu", "--flows",
                           "ab-processes,pytest", "--kinds", "host", "--seq-len", "64", "--host-seq-len", "32",
                           "--unchanged-trials", "1", "--planted-trials", "1", "--ab-rounds", "2", "--ab-iters", "3",
                           "--iters", "6"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    evidence = json.loads((tmp_path / "evidence.json").read_text())
    trials = [(t["flow"], t["planted"], t["seq_len"]) for t in evidence["trials"]]
    assert sorted(trials) == [(flow, kind, n) for flow in ("ab-proc", "pytest")
                              for kind, n in (("host", 32), ("unchanged", 32), ("unchanged", 64))]
    runs = {(t["flow"], t["pytest"]["run"]): t["pytest"] for t in evidence["trials"]}
    assert len(runs) == 4 and all(r["final"].startswith("pytest-attn gate: ") for r in runs.values()), runs
    assert all(len(t["samples"]["head"]["eager"]) == 6 for t in evidence["trials"] if t["flow"] == "ab-proc")  # 2 x 3


# -- history ------------------------------------------------------------------------------------------------------
def test_history_marks_a_step_and_names_the_regressed_row(tmp_path, capsys):
    runs = [(1.0, 0.01), (1.0, 0.01), (1.02, 0.3), (1.25, 0.01)]  # the noisy third run makes no step
    for i, (median, noise) in enumerate(runs):
        data = saved_run({"t[a]": samples(median * 1e-3, noise), "t[b]": samples(2e-3, 0.01)})
        data["datetime"] = f"2026-12-0{i + 1}T10:00:00"
        write(tmp_path, f"run{i}.json", data)
    assert cli.main(["history", str(tmp_path), "--fail-on-regression", "--plot", str(tmp_path / "h.png")]) == 1
    out = capsys.readouterr().out
    assert out.count("<- step up (slower)") == 1 and "t[a] [device]  REGRESSED" in out
    assert out.splitlines()[-1] == "pytest-attn history: 2 rows over up to 4 runs; regressed: t[a] [device]"
    assert (tmp_path / "h.png").stat().st_size > 0


def test_overlapping_intervals_make_no_step():
    series = Series("t", "device", [Point("a", 1.0, 0.9, 1.2, 10), Point("b", 1.15, 1.1, 1.3, 10)])
    assert series.steps() == [] and not series.regressed()
    series.points.append(Point("c", 1.5, 1.45, 1.55, 10))
    assert [s.after.run for s in series.steps()] == ["c"] and series.regressed()


def test_eager_samples_taken_in_turn_cancel_a_drift_that_blocks_would_read_as_a_regression():
    """The same call on both sides; the host gets three times slower a third of the way in (as host
    time drifts over seconds on the GPU machines). Sampled in turn the two sides agree; sampled in
    blocks, one after the other, the second reads three times slower."""
    import statistics
    import time

    from pytest_attn.bench.timing import interleaved_eager_samples

    def drifting_host():
        state = {"calls": 0}

        def call():
            state["calls"] += 1
            time.sleep(0.002 if state["calls"] <= 30 else 0.006)
        return call

    call = drifting_host()
    turns = interleaved_eager_samples({"a": (call, 2), "b": (call, 2)}, 20, "cpu")
    assert 0.8 < statistics.median(turns["b"]) / statistics.median(turns["a"]) < 1.25
    call = drifting_host()
    a = interleaved_eager_samples({"a": (call, 2)}, 20, "cpu")["a"]
    b = interleaved_eager_samples({"b": (call, 2)}, 20, "cpu")["b"]
    assert statistics.median(b) / statistics.median(a) > 2


def test_eager_samples_are_taken_in_turn_the_order_reversed_every_turn():
    from pytest_attn.bench.timing import interleaved_eager_samples

    log = []
    interleaved_eager_samples({"a": (lambda: log.append("a"), 1), "b": (lambda: log.append("b"), 1)}, 4, "cpu")
    assert "".join(log) == "ab" + "ab" + "ba" + "ab" + "ba"  # warm-up, then A B, B A, A B, B A


def test_a_row_too_noisy_to_resolve_the_threshold_is_said_and_does_not_fail_the_gate():
    result = compare_rows([RowSamples("t", "eager", samples(1.0, 0.4, 12)), RowSamples("u", "device", samples(1.0))],
                          [RowSamples("t", "eager", samples(1.05, 0.4, 12)), RowSamples("u", "device", samples(1.0))])
    assert [v.outcome for v in result.verdicts] == ["unresolved", "unchanged"] and not result.failed
    line = gate_mod.summary_line(result, "base.json")
    assert line.startswith("pytest-attn gate: passed: 0 of 2 rows regressed") and "1 unresolved" in line
    assert "UNRESOLVED" in "\n".join(gate_mod.table(result.verdicts))


def _drift(n, low=1.0, high=1.6, seed=3):
    """The host's speed over n moments: a random walk between low and high (as measured on the GPU
    machines: tests/evidence/host_speed_probe.py)."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0, 0.08, n))
    return low + (high - low) * (walk - walk.min()) / max(np.ptp(walk), 1e-9)


def _host_bound_run(name, eager_scale, drift, reference=True):
    """A saved benchmark row whose eager time is host work (device 0.05, eager ~1.0): each eager
    sample, and the host reference taken with it, slowed by the host's speed at that moment."""
    noise = np.asarray(samples(1.0, 0.02, len(drift)))
    saved = {"device": list(samples(0.05, 0.01, len(drift))), "eager": list(eager_scale * drift * noise)}
    if reference:
        saved["host-reference"] = list(0.2 * drift * np.asarray(samples(1.0, 0.02, len(drift)))[::-1])
    return {"benchmarks": [{"fullname": name, "extra_info": {"backend": "b", "metric": "eager", "samples_s": saved}}]}


def test_a_host_bound_row_is_judged_against_the_host_reference_so_a_host_wide_drift_cancels():
    """The baseline saved while the host ran fast, HEAD while it ran up to 1.6x slower (a later
    process, a noisy neighbour): undivided, that reads as a regression; divided by the host
    reference sampled with each sample, it cancels, and a real +12% of the backend's host work
    does not."""
    quiet, busy = np.full(40, 1.0), _drift(40)
    base = rows_of(_host_bound_run("t", 1.0, quiet))
    unchanged = compare_rows(base, rows_of(_host_bound_run("t", 1.0, busy))).verdicts[0]
    assert unchanged.basis == "host-reference" and unchanged.outcome == "unchanged", unchanged
    slower = compare_rows(base, rows_of(_host_bound_run("t", 1.12, busy))).verdicts[0]
    assert slower.outcome == "regressed" and 1.08 < slower.ratio < 1.16, slower
    raw = compare_rows(base, rows_of(_host_bound_run("t", 1.0, busy, reference=False))).verdicts[0]
    assert raw.basis == "samples" and raw.outcome != "unchanged"  # one side without the reference: judged raw
    lines = gate_mod.table([unchanged])
    assert "eager*" in lines[2] and "host reference" in lines[-1]


def test_a_row_whose_eager_time_is_device_time_is_not_divided_by_the_host_speed():
    saved = {"device": list(samples(1.0)), "eager": list(samples(1.05)), "host-reference": list(samples(0.2))}
    rows = rows_of({"benchmarks": [{"fullname": "t", "extra_info": {"backend": "b", "metric": "eager",
                                                                    "samples_s": saved}}]})
    assert rows[0].regime == "eager" and rows[0].reference == ()
    saved["eager"] = list(samples(2.5))  # host work now dominates
    rows = rows_of({"benchmarks": [{"fullname": "t", "extra_info": {"backend": "b", "metric": "eager",
                                                                    "samples_s": saved}}]})
    assert len(rows[0].reference) == 40


def test_samples_taken_in_turn_are_judged_pair_by_pair_so_a_shared_drift_cancels():
    """pytest-attn ab in one process samples the two sides in turn: sample i of each at one moment.
    With the host's speed wandering 1-1.6x over the run, each side's own spread hides a +10% host
    regression (the unpaired interval is wider than the threshold); pair by pair it is plain, and no
    change is none."""
    drift = _drift(48)
    base = [RowSamples("t", "eager", tuple(drift * np.asarray(samples(1.0, 0.02, 48))))]
    head = [RowSamples("t", "eager", tuple(1.10 * drift * np.asarray(samples(1.0, 0.02, 48))[::-1]))]
    same = [RowSamples("t", "eager", tuple(drift * np.asarray(samples(1.0, 0.02, 48))[::-1]))]
    unpaired = compare_rows(base, head).verdicts[0]
    paired = compare_rows(base, head, paired=("eager",)).verdicts[0]
    assert unpaired.basis == "samples" and unpaired.high - unpaired.low > 0.1, unpaired  # wider than the threshold
    assert paired.basis == "paired" and paired.outcome == "regressed" and paired.high - paired.low < 0.03, paired
    assert compare_rows(base, same, paired=("eager",)).verdicts[0].outcome == "unchanged"
    # the table shows what was judged: each side spreads with the drift, the pairs' ratios do not
    assert unpaired.pair_spread is None and paired.head_spread > 0.1 and paired.pair_spread < 0.06, paired
    lines = gate_mod.table([unpaired, paired])
    assert "pairs" not in lines[2] and f"pairs {paired.pair_spread:.1%}" in lines[3]
    assert "HEAD_i / BASE_i" in lines[-1]


def test_ab_in_one_process_pairs_its_eager_samples():
    from pytest_attn.bench.ab import compare_sides, measure_rounds_in_process
    from pytest_attn.bench.measure import BenchSettings
    from pytest_attn.env.registry import Registry

    torch_backend = Registry.discover().get("torch")
    base, head = measure_rounds_in_process(torch_backend, torch_backend, [32], "cpu", BenchSettings(1, 6, "off"), 2)
    assert base.paired == head.paired == ("eager",)
    verdicts = {v.regime: v for v in compare_sides(base, head).verdicts}
    assert verdicts["eager"].basis == "paired" and verdicts["device"].basis == "samples"


def test_the_host_reference_is_a_host_bound_call_kept_with_the_samples():
    from pytest_attn.bench.measure import timing_samples
    from pytest_attn.bench.timing import HOST_REFERENCE, Timing, host_reference_call

    call, count = host_reference_call("cpu")
    assert call() is None and count >= 1
    timing = Timing([1.0], [1.0], "cuda-graph", eager_s=[2.0], host_reference_s=[0.5])
    assert timing_samples(timing) == {"device": [1.0], "eager": [2.0], HOST_REFERENCE: [0.5]}
    assert HOST_REFERENCE not in timing_samples(Timing([1.0], [1.0], "wall-clock", eager_s=[1.0]))
