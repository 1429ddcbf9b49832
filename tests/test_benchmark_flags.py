"""pytest-benchmark's own flags do what it documents, the attention benchmarks included (issue 17:
--benchmark-only skipped them, wrote no JSON and exited 0)."""
import json

import pytest

FAST = ["--attn-backend=torch", "--attn-suite=on", "--attn-bench-iters=2", "--attn-bench-warmup=0",
        "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist"]


def outcomes(result) -> dict:
    reports = [r for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call" or r.skipped]
    found = {}
    for r in reports:
        kind = "bench" if "test_benchmarks.py" in r.nodeid else "other"
        found.setdefault((kind, r.outcome), set()).add(r.nodeid)
    return {key: len(ids) for key, ids in found.items()}


@pytest.fixture(autouse=True)
def not_an_xdist_worker(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark switches itself off


@pytest.fixture
def bench_count(pytester):
    result = pytester.runpytest(*FAST, "-m", "attn_bench", "--collect-only", "-q")
    count = sum(1 for line in result.stdout.lines if "test_benchmarks.py::" in line)
    assert count >= 2, result.stdout.str()
    return count


def test_benchmark_only_runs_the_attention_benchmarks_and_writes_their_json(pytester, bench_count):
    result = pytester.runpytest(*FAST, "--benchmark-only", "--benchmark-json=b.json")
    found = outcomes(result)
    assert found[("bench", "passed")] == bench_count
    assert ("other", "passed") not in found  # the correctness tests are what it skips
    rows = json.loads((pytester.path / "b.json").read_text())["benchmarks"]
    assert len(rows) == bench_count and all(r["extra_info"]["backend"] == "torch" for r in rows)
    assert result.ret == pytest.ExitCode.OK


def test_benchmark_skip_skips_the_attention_benchmarks(pytester, bench_count):
    result = pytester.runpytest(*FAST, "-m", "attn_bench", "--benchmark-skip")
    assert outcomes(result) == {("bench", "skipped"): bench_count}
    assert "Skipping benchmark (--benchmark-skip active)" in "".join(
        str(r.longrepr) for r in result.reprec.getreports("pytest_runtest_logreport") if r.skipped)


def test_benchmark_json_alone_asks_for_them(pytester, bench_count):
    result = pytester.runpytest(*FAST, "--benchmark-json=b.json")
    assert outcomes(result)[("bench", "passed")] == bench_count
    assert len(json.loads((pytester.path / "b.json").read_text())["benchmarks"]) == bench_count


def test_autosave_then_compare_reads_it_back(pytester, bench_count):
    saved = pytester.runpytest(*FAST, "-m", "attn_bench", "--benchmark-autosave")
    assert outcomes(saved)[("bench", "passed")] == bench_count
    files = list((pytester.path / ".benchmarks").rglob("*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["benchmarks"]) == bench_count
    compared = pytester.runpytest(*FAST, "-m", "attn_bench", "--benchmark-compare")
    assert outcomes(compared)[("bench", "passed")] == bench_count
    rows = [line for line in compared.stdout.lines if line.startswith("test_vit_table[seq128--torch] (")]
    assert sorted(row.split("(")[1].split(")")[0] for row in rows) == ["0001_unversi", "NOW"], rows


def test_benchmark_disable_runs_each_once_untimed(pytester, bench_count):
    result = pytester.runpytest(*FAST, "-m", "attn_bench", "--benchmark-disable", "--benchmark-json=b.json")
    assert outcomes(result)[("bench", "passed")] == bench_count  # each call ran, and checked its output
    assert not (pytester.path / "b.json").exists() and "Name (time in" not in result.stdout.str()
