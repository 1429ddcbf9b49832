"""`pytest-attn seed-table` and the crossovers with planted backends: a backend that did not run or
broke has its reason and the others keep their rows; a named one that did not run fails the command;
a seq_len where two medians lie within their spread is too close to call, and noise makes no
crossover."""
import json

import pytest

from backend_packages import write_backend_package
from pytest_attn.cli import args
from pytest_attn.cli import main as cli
from pytest_attn.bench.compare import crossovers, describe_pair, load_runs, report

FAST = ["--iters", "4", "--warmup", "0", "--no-mix", "--device", "cpu"]

PLANTED = """
from pytest_attn.core.contract import Availability
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

class LongOnly(TorchSDPABackend):
    def unsupported(self, layer, metadata, device="cpu"):
        return ["needs 100 tokens or more"] if max(metadata.seq_lens) < 100 else []

class AvailableRaises(TorchSDPABackend):
    def available(self):
        raise OSError("libwidget.so: cannot open shared object file")

class ForwardRaises(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None):
        raise RuntimeError("illegal memory access")

BACKENDS = [LongOnly(name="longonly"), AvailableRaises(name="nolib"), ForwardRaises(name="crashes")]
"""


@pytest.fixture
def planted(pytester):
    return write_backend_package(pytester, "seed_attn", PLANTED, {"seed": "seed_attn:BACKENDS"})


def _row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.strip().startswith(f"{label} |"))
    return [cell.strip() for cell in line.split("|")[1:]]


def test_a_named_backend_that_is_unavailable_gets_its_reason_the_others_are_timed_and_it_fails(capsys):
    code = cli.main(["seed-table", "--backends", "flashinfer,torch", "--seq-lens", "64", *FAST])
    out, err = capsys.readouterr()
    assert code == args.FAILED
    assert "flashinfer: did not run: unavailable here: no CUDA device" in out
    assert len(_row(out, "64")) == 1 and _row(out, "64")[0].endswith("%)")  # torch's row, with its spread
    assert err == "pytest-attn seed-table: FAILED: named but timed no row: flashinfer (the reasons are above)\n"


def test_a_row_a_backend_cannot_run_keeps_its_reason_after_later_rows_are_timed(planted, capsys):
    code = cli.main(["seed-table", "--backends", "longonly,torch", "--seq-lens", "64,128", *FAST])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert _row(out, "64")[0] == "n/a" and _row(out, "128")[0].endswith("%)")
    assert "longonly: cannot run 64: needs 100 tokens or more" in out
    assert "longonly: scaled_dot_product_attention" in out  # and its plan, from the row it ran


def test_broken_backends_are_reported_alone_and_fail_the_command(planted, capsys):
    code = cli.main(["seed-table", "--backends", "nolib,crashes,torch", "--seq-lens", "64,128", *FAST])
    out, err = capsys.readouterr()
    assert code == args.FAILED and "Traceback" not in out + err
    assert "nolib: did not run: BROKE: available() raised OSError: libwidget.so" in out
    assert [cell for cell in _row(out, "64")][0] == "n/a" and _row(out, "128")[0] == "n/a"
    assert all(_row(out, label)[1].endswith("%)") for label in ("64", "128"))  # torch's rows are all there
    assert ("crashes: BROKE at 64: backend 'crashes' (package seed_attn 0.1, entry point 'seed = seed_attn:BACKENDS') "
            "raised in forward(): RuntimeError: illegal memory access") in out
    assert [line.split(":")[1].strip() for line in err.splitlines()] == ["FAILED", "FAILED"]
    assert "FAILED: nolib broke: available() raised OSError" in err and "FAILED: crashes broke at 64:" in err


def test_nothing_to_time_fails_in_one_line_per_reason(capsys):
    assert cli.main(["seed-table", "--a", "flashinfer", "--b", "trtllm", "--seq-lens", "64", *FAST]) == args.FAILED
    out, err = capsys.readouterr()
    assert "no backend to time" in out and "seq_len |" not in out
    assert err.splitlines() == [
        "pytest-attn seed-table: FAILED: named but timed no row: flashinfer, trtllm (the reasons are above)",
        "pytest-attn seed-table: FAILED: no backend was timed: name one that runs here (pytest-attn backends lists "
        "them)"]


# -- crossovers with their spread ------------------------------------------------------------------------------
NOISY_A = {128: 1.00, 256: 1.02, 512: 0.99, 1024: 1.01}  # µs per token: two backends within 3% of each other
NOISY_B = {128: 1.01, 256: 1.00, 512: 1.01, 1024: 0.99}
SPREAD_5 = dict.fromkeys(NOISY_A, 0.05)  # interquartile ranges of 5% of the median


def test_noise_within_the_spread_makes_no_crossover():
    assert len(crossovers("a", NOISY_A, "b", NOISY_B)) == 3  # medians alone: the lead flips three times
    assert crossovers("a", NOISY_A, "b", NOISY_B, SPREAD_5, SPREAD_5) == []
    assert describe_pair("a", NOISY_A, "b", NOISY_B, SPREAD_5, SPREAD_5) == (
        "a vs b: too close to call at every seq_len (128..1024); no crossover")


def test_a_crossover_past_the_spread_is_found_and_printed_with_it():
    slow_then_fast = {128: 2.0, 256: 1.5, 512: 1.02, 1024: 0.5}
    steady = {128: 1.0, 256: 1.0, 512: 1.0, 1024: 1.0}
    line = describe_pair("fast", slow_then_fast, "steady", steady, SPREAD_5, SPREAD_5)
    assert line == ("fast vs steady: fast overtakes steady at seq_len 1024 (after 256) [µs/token at 1024: fast 0.5 "
                    "(IQR 5%), steady 1 (IQR 5%)]; too close to call at 512 (medians within their spread)")


def _saved_run(path, iqr_share: float):
    rows = []
    for backend, per_token in (("a", NOISY_A), ("b", NOISY_B)):
        for seq_len, us in per_token.items():
            median = us * seq_len / 1e6
            rows.append({"name": f"test_seed[{backend}-{seq_len}]", "fullname": f"x::{backend}-{seq_len}",
                         "extra_info": {"backend": backend, "series": "seed h16/16xd80 bfloat16 full",
                                        "seq_len": seq_len, "tokens": seq_len, "metric": "device"},
                         "stats": {"median": median, "iqr": median * iqr_share}})
    path.write_text(json.dumps({"machine_info": {"attn": {"gpu": "NVIDIA H200"}}, "commit_info": {"id": "c" * 40},
                                "datetime": "2026-12-01T10:00:00", "benchmarks": rows}))
    return path


def test_compare_reads_each_rows_spread_from_the_saved_run(tmp_path):
    text, _ = report(load_runs([_saved_run(tmp_path / "noisy.json", 0.05)]))
    assert "a vs b: too close to call at every seq_len (128..1024); no crossover" in text
    quiet, _ = report(load_runs([_saved_run(tmp_path / "noisy.json", 0.001)]))
    assert "a vs b: b overtakes a at seq_len 256 (after 128) [µs/token at 256: a 1.02 (IQR 0%), b 1 (IQR 0%)]" in quiet
