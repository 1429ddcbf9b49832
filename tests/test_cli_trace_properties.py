"""`pytest-attn trace` and `pytest-attn properties`: what they print on CPU, their JSON, their exit
status when a backend breaks its declaration (planted backends in a registry of their own), and a
bad argument as one line with exit 4."""
import dataclasses
import json

import pytest
from test_properties import RunDependentOrder

from pytest_attn_backends.torch_sdpa import TorchSDPABackend
from pytest_attn.cli.main import main
from pytest_attn.env.registry import Registry


class SaysFlashRunsMath(TorchSDPABackend):
    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        return super().forward(q, k, v, metadata, dataclasses.replace(plan, kernel_backend="math"), out, lse)


@pytest.fixture
def planted(monkeypatch):
    registry = Registry([TorchSDPABackend(), SaysFlashRunsMath("says-flash"), RunDependentOrder()])
    monkeypatch.setattr(Registry, "discover", classmethod(lambda cls: registry))
    return registry


def test_trace_prints_each_backends_kernels_and_writes_json(planted, capsys, tmp_path):
    path = tmp_path / "trace.json"
    assert main(["trace", "hd64-decode-page1", "--backends", "torch", "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "torch: step 0: scaled_dot_product_attention[flash] NHD tokens paged cache: matches its declaration" in out
    assert "2x aten::_scaled_dot_product_flash_attention_for_cpu" in out
    steps = json.loads(path.read_text())["backends"]["torch"]["steps"]
    assert steps[0]["declared"][0]["name"] == "SDPA flash (cpu)" and steps[0]["problems"] == []


def test_trace_fails_a_backend_that_runs_a_kernel_its_plan_does_not_declare(planted, capsys):
    assert main(["trace", "hd64-ragged", "--backends", "torch,says-flash", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "says-flash: step 0: scaled_dot_product_attention[flash] NHD tokens no cache: DOES NOT MATCH" in captured.out
    assert "pytest-attn trace: FAILED: says-flash step 0: launched aten::_scaled_dot_product_attention_math x3" in captured.err
    assert "torch step" not in captured.err


def test_trace_reports_a_backend_without_a_declaration(planted, capsys):
    assert main(["trace", "hd64-decode-page1", "--backends", "run-order", "--device", "cpu"]) == 0
    assert "run-order: step 0: einsum[torch] NHD tokens paged cache: no declaration: reported only" in capsys.readouterr().out


def test_properties_prints_the_table_and_fails_a_declared_property_that_does_not_hold(planted, capsys, tmp_path):
    path = tmp_path / "props.json"
    code = main(["properties", "--backends", "torch,run-order", "--families", "decode,prefill", "--device", "cpu",
                 "--no-kernels", "--json", str(path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "| torch | decode | yes | yes |" in captured.out
    assert "| run-order | decode | NO (declared) | NO (declared) |" in captured.out
    assert "pytest-attn properties: FAILED: run-order declares deterministic but on decode" in captured.err
    rows = json.loads(path.read_text())["rows"]
    assert {(r["backend"], r["family"]) for r in rows} == {("torch", "decode"), ("torch", "prefill"),
                                                            ("run-order", "decode"), ("run-order", "prefill")}


def test_properties_lists_kernels(planted, capsys):
    assert main(["properties", "--backends", "torch", "--families", "mixed", "--device", "cpu"]) == 0
    assert "aten::_scaled_dot_product_flash_attention_for_cpu x5" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["trace", "no-such-case", "--device", "cpu"], "unknown case 'no-such-case'"),
    (["trace", "hd64-ragged", "--backends", "nope", "--device", "cpu"], "nope"),
    (["properties", "--families", "decode,nope", "--device", "cpu"], "unknown family nope; use prefill"),
    (["properties", "--long", "0"], "give a length >= 1"),
    (["trace", "hd64-ragged", "--seed", "-1"], "give a seed >= 0"),
])
def test_a_bad_argument_is_one_line_and_exit_4(planted, capsys, argv, says):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks exit from the parser
        code = exc.code
    assert code == 4
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
