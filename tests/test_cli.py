"""The `pytest-attn` command: compare (on synthetic saved runs), seed-table and cases, and the
fidelity script, all on CPU with tiny sizes."""
import json
import re
import subprocess
import sys

import pytest

from pytest_attn.cli import args
from pytest_attn.cli import main as cli
from pytest_attn.bench import fidelity
from pytest_attn.bench.compare import Crossover, crossovers, load_runs

SEQ = (128, 256, 512, 1024, 2048)
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0", "torch": "2.11.0", "cuda": "13.0",
        "flashinfer": "0.7.2.post1", "device": "cuda:0"}


def write_run(path, commit, us_per_token: dict, gpu=H100, when="2026-11-20T10:00:00+00:00"):
    """A saved pytest-benchmark run as pytest-attn writes it: µs per token per backend and seq_len."""
    benchmarks = []
    for backend, values in us_per_token.items():
        for seq_len, us in zip(SEQ, values):
            median = us * seq_len / 1e6
            benchmarks.append({
                "group": f"seed h16/16xd80 bfloat16 full seq {seq_len}", "name": f"test_seed[{backend}-seq{seq_len}]",
                "fullname": f"suite/test_benchmarks.py::test_seed[{backend}-seq{seq_len}]",
                "extra_info": {"backend": backend, "series": "seed h16/16xd80 bfloat16 full", "seq_len": seq_len,
                               "tokens": seq_len, "us_per_token": us},
                "stats": {"median": median, "min": median, "max": median, "mean": median, "rounds": 50},
            })
    benchmarks.append({"name": "test_vit_ragged_mix[vit-mix-torch]", "fullname": "x::mix",  # not a sweep: ignored
                       "extra_info": {"backend": "torch", "series": "vit-mix", "tokens": 4224},
                       "stats": {"median": 1e-3}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "machine_info": {"node": "gpu-runner", "attn": gpu},
        "commit_info": {"id": commit, "dirty": False, "branch": "main"},
        "datetime": when, "version": "5.2.3", "benchmarks": benchmarks}))
    return path


# flashinfer is slower per token than torch below 1024 and faster from 1024 on
CROSSING = {"flashinfer": [4.0, 3.0, 2.5, 1.0, 0.8], "torch": [2.0, 2.0, 2.0, 2.0, 2.0]}


def test_crossovers_finds_each_change_of_leader():
    a = dict(zip(SEQ, [1, 1, 3, 3, 1]))
    b = dict(zip(SEQ, [2, 2, 2, 2, 2]))
    assert crossovers("a", a, "b", b) == [Crossover("a", "b", 512, 256), Crossover("b", "a", 2048, 1024)]
    assert crossovers("a", a, "c", {128: 9.0, 4096: 1.0}) == []  # one common seq_len: no crossing


def test_compare_reports_the_crossover_and_writes_a_plot(tmp_path, capsys):
    write_run(tmp_path / ".benchmarks" / "Linux-CPython-3.11-64bit" / "0001_aaaa.json", "a" * 40, CROSSING)
    out = tmp_path / "plot.png"
    assert cli.main(["compare", str(tmp_path / ".benchmarks"), "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "flashinfer vs torch: flashinfer overtakes torch at seq_len 1024 (after 512)" in text
    assert "NVIDIA H100 80GB HBM3" in text and "run aaaaaaaa" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_compare_reports_each_commit(tmp_path, capsys):
    write_run(tmp_path / "0001.json", "1" * 40, CROSSING, when="2026-11-20T10:00:00+00:00")
    later = {"flashinfer": [4.0, 1.5, 1.2, 1.0, 0.8], "torch": [2.0] * 5}  # the new commit wins from 256 on
    write_run(tmp_path / "0002.json", "2" * 40, later, when="2026-11-21T10:00:00+00:00")
    assert cli.main(["compare", str(tmp_path / "0001.json"), str(tmp_path / "0002.json")]) == 0
    text = capsys.readouterr().out
    first, second = text.index("run 11111111"), text.index("run 22222222")
    assert first < second
    assert "overtakes torch at seq_len 1024" in text[first:second]
    assert "overtakes torch at seq_len 256" in text[second:]


def test_compare_keeps_runs_from_different_gpus_apart(tmp_path, capsys):
    write_run(tmp_path / "h100.json", "1" * 40, CROSSING)
    write_run(tmp_path / "a100.json", "1" * 40, CROSSING, gpu=dict(H100, gpu="NVIDIA A100-SXM4-80GB", gpu_capability="8.0"))
    assert cli.main(["compare", str(tmp_path), "--plot", str(tmp_path / "p.png")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("WARNING: these runs come from 2 different devices")
    assert "== NVIDIA A100-SXM4-80GB (sm 8.0): 1 run(s) ==" in text
    assert "== NVIDIA H100 80GB HBM3 (sm 9.0): 1 run(s) ==" in text
    assert cli.main(["compare", str(tmp_path), "--require-same-device"]) == args.USAGE
    assert "refusing to compare runs from different devices" in capsys.readouterr().err


def test_compare_without_runs_says_how_to_make_them(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == args.USAGE
    assert "--benchmark-autosave" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path / "missing")]) == args.USAGE


def test_runs_of_one_commit_are_labelled_apart(tmp_path):
    write_run(tmp_path / "a.json", "c" * 40, CROSSING, when="2026-11-20T10:00:00+00:00")
    write_run(tmp_path / "b.json", "c" * 40, CROSSING, when="2026-11-20T11:00:00+00:00")
    assert [r.label for r in load_runs([tmp_path])] == ["cccccccc", "cccccccc#2"]


def test_seed_table_on_cpu_prints_one_regime_with_its_spread_and_the_crossovers(capsys, tmp_path):
    plot = tmp_path / "seed.png"
    code = cli.main(["seed-table", "--backends", "torch,flex", "--seq-lens", "64,128", "--iters", "4",
                     "--warmup", "1", "--no-mix", "--device", "cpu", "--plot", str(plot)])
    assert code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("seq_len"))
    # a CPU has no CUDA graph and no device clock: one column of wall clock, not two of the same numbers
    assert [c.strip() for c in header.split("|")] == ["seq_len", "torch wall", "flex wall"]
    assert "CUDA-graph replay" not in out and "device time" not in out
    assert "  wall: wall time per call (a CPU has no CUDA graph and no device clock: both regimes are this one" in out
    rows = [line for line in lines if line.strip().startswith(("64 |", "128 |"))]
    assert len(rows) == 2 and all(len(r.split("|")) == 3 for r in rows)
    assert all(re.fullmatch(r"\d+\.\d{4} \(\d+%\)", c.strip()) for r in rows for c in r.split("|")[1:]), rows
    assert any(line.startswith("crossovers, wall (") for line in lines)
    assert not any(("graph" in line or "eager" in line) for line in lines if line.startswith("crossovers"))
    assert any(line.startswith("  flex vs torch: ") for line in lines)
    assert any(line.startswith("torch: scaled_dot_product_attention") for line in lines)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_table_says_when_there_are_too_few_samples_for_a_spread(capsys):
    assert cli.main(["seed-table", "--backends", "torch", "--seq-lens", "64", "--iters", "3", "--warmup", "0",
                     "--no-mix", "--device", "cpu"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("64 |"))
    assert re.fullmatch(r"\d+\.\d{4} \(n<4\)", row.split("|")[1].strip()), row


def test_seed_table_defaults_to_the_seeds_pair_and_torch_where_available(capsys):
    code = cli.main(["seed-table", "--seq-lens", "64", "--iters", "1", "--warmup", "0", "--no-mix", "--device", "cpu"])
    assert code == 0  # the defaults that cannot run here are listed, not failures
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("seq_len"))
    assert "torch wall" in header and "trtllm" not in header  # trtllm and flashinfer need a GPU
    assert "trtllm: skipped: unavailable here: no CUDA device" in out
    assert "flashinfer: skipped: unavailable here: no CUDA device" in out


def test_seed_table_on_cpu_stops_at_1024_and_adds_the_small_mix():
    rows = cli.seed_rows(1024, None, True)
    assert [r[0] for r in rows] == ["128", "256", "512", "1024", "vit-mix-small"]


def test_seed_table_names_the_registered_backends_for_an_unknown_one(capsys):
    assert cli.main(["seed-table", "--a", "nope", "--b", "torch", "--device", "cpu"]) == args.USAGE
    err = capsys.readouterr().err
    assert "unknown attention backend 'nope'; registered:" in err and "torch" in err


def test_cases_lists_the_catalog_without_importing_torch():
    code = ("import sys; from pytest_attn.cli.main import main; main(['cases', 'vit']); "
            "assert 'torch' not in sys.modules, 'pytest-attn cases imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "vit-ragged-mix" in done.stdout and "llm-decode-gqa-nhd" not in done.stdout


def test_fidelity_script_prints_its_table_on_cpu(capsys):
    code = fidelity.main(["--backend", "torch", "--seq-lens", "64", "--device", "cpu", "--iters", "2",
                          "--warmup", "0", "--tolerance", "1e9"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "spread%" in out and "wall-clock loop" in out and "0 check(s) failed" in out


@pytest.mark.parametrize("argv", [[], ["seed-table", "--bogus"], ["compare", "--bogus"]])
def test_usage_errors_exit_4_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == args.USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_flashinfer_unpacked_without_metadata_is_reported_by_its_module_version(monkeypatch):
    # A GPU image that brings FlashInfer as an archive has no dist-info: its backends run, so the
    # report and the benchmarks' machine_info must not say it is missing.
    from types import SimpleNamespace

    from pytest_attn.cli import backends_info as info
    from pytest_attn.env import packages

    real_version = packages.version

    def version(name):
        if name.startswith("flashinfer"):
            raise packages.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(packages, "version", version)
    find_spec = packages.importlib.util.find_spec
    monkeypatch.setattr(packages.importlib.util, "find_spec",
                        lambda name, *args: object() if name == "flashinfer" else find_spec(name, *args))
    monkeypatch.setitem(sys.modules, "flashinfer", SimpleNamespace(__version__="0.7.2.post1"))
    assert packages.flashinfer_version() == "0.7.2.post1"
    lines = info.environment_lines()
    assert any(line.startswith("flashinfer-python 0.7.2.post1 |") for line in lines), lines


BROKEN_FOR_LISTING = """
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

class DescriptionRaises(TorchSDPABackend):
    @property
    def description(self):
        raise RuntimeError("version table not loaded")

class AvailableRaises(TorchSDPABackend):
    def available(self):
        raise OSError("libwidget.so: cannot open shared object file")

BACKENDS = [DescriptionRaises(name="nodesc"), AvailableRaises(name="nolib"), TorchSDPABackend(name="fine")]
"""


def test_backends_lists_each_broken_backend_with_what_broke_and_every_other(pytester, capsys):
    from backend_packages import write_backend_package

    write_backend_package(pytester, "listing_attn", BROKEN_FOR_LISTING, {"listing": "listing_attn:BACKENDS"})
    write_backend_package(pytester, "noimport_attn", "raise RuntimeError('no driver')\n",
                          {"noimport": "noimport_attn:X"})
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    entries = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "[BROKEN: available() raised OSError: libwidget.so: cannot open shared object file" in entries["nolib"]
    assert "[BROKEN: package noimport_attn 0.1, entry point 'noimport = noimport_attn:X' failed to import: " \
           "RuntimeError: no driver" in entries["noimport"]
    assert entries["nodesc"] == "nodesc  [available]"
    assert "    BROKEN: reading what it declares raised RuntimeError: version table not loaded" in out
    assert entries["fine"] == "fine  [available]"  # listed after the broken ones, in full
    assert out.index("fine  [available]") < out.index("devices cpu, cuda", out.index("fine  [available]"))
    for name in ("torch", "flex", "flashinfer", "trtllm"):
        assert name in entries
